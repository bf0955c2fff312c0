"""Launch entries (Ray Train + DeepSpeed workers) — filled in by the distributed issue."""
