"""The parameter server: holds tensors and optimizer state, applies updates, serves pull/push."""
