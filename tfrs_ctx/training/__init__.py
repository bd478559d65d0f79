"""Training: a run directory, the training loop, the context-trust calibration."""
