"""logstream-train: turn historical log dumps into windows and train / evaluate detectors."""
