"""Training: the per-batch objective, the one Ray Train worker loop and its driver."""
