"""Training: the train stage, its loop, batches, per-epoch scoring, checkpoint, and the choice of hardware."""
