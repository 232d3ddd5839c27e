"""Judges: the scoring protocol, built-in judges, pair selection. Needs nothing else of odpo."""
