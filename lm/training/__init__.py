"""Training: the train state and step, the loop and its hooks, optimizers, metrics, and what a
workdir holds (checkpoints with checksums, the lock, the config record, a run read back)."""
