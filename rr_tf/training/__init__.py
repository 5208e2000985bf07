"""Training infrastructure shared by every pre-training method and fine-tuning:
distribution strategy, precision, run directory, checkpoints, callbacks."""
