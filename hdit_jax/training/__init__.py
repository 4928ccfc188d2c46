"""Training: state, optimizer groups, EMA, sharding, the jitted step, checkpoints, metrics."""
