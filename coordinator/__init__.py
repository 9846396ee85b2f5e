"""The coordinator: Lepton's control plane (membership, shard leases, layout, status, events)."""
