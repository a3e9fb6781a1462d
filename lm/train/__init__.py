"""Training: state, optimizer, objectives, the one train step, the shared loop, checkpoints."""
