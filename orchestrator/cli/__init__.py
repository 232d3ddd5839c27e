"""The ``odpo`` verbs and what runs before any actor starts: the driver, preflight checks, resources."""
