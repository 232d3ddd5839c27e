"""The round loop: its phases, recovery, the round record, and the state a checkpoint carries."""
