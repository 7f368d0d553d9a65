"""Detectors: score batches of closed windows. `registry.load_detector(settings)` picks one by name."""
