"""Training: the loop and the small pieces around it (precision, optim, EMA, checkpoints, logs)."""
