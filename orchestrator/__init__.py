"""odpo's driver side: config, CLI, the round loop, run directory, metrics and checkpoints."""
