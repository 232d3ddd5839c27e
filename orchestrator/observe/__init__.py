"""Watching a run: Prometheus metrics, experiment trackers, progress, process memory, charts."""
