"""Training: config, optimiser, pure train/eval steps, orbax checkpoints, the loop, CLI."""
