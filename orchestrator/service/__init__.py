"""The loop as a long-lived service: a prompt inbox, live control, an access token, an evaluation
gate with rollback, and the guards that stop an unattended run out loud (docs/service.md)."""
