"""Training: one runner per stage over shared pieces (loop, loss, checkpoints, run directory, tracking)."""
