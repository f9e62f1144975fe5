"""Actions: what taskomatic can do to VMs, hosts and storage (and plugins of the same shape)."""
