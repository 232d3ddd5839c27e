"""Tools around runs: audit, export, the demo task and model, the rehearsal model."""
