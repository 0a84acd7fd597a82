"""What keeps a run alive and its files safe: checkpoints, the workdir lock,
preemption."""
