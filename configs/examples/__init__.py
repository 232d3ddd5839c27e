"""Examples of custom judges, importable as ``configs.examples.<module>:<Class>`` from the repo root."""
