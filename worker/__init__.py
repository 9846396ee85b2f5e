"""The worker: leases shards, computes gradients, pushes them to and pulls from parameter servers."""
