"""What a compressed model achieved, measured from its weights alone: ``accounting`` (non-zeros,
nominal ratio and the bits each encoding would store) and ``structure`` (where the non-zeros are:
empty units, balance across workloads, distinct values per codebook group)."""
