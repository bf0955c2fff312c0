"""Keeping constraint state identical — and exact — across data-parallel ranks.

Each guarantee and the collective it rests on (every function also runs with torch.distributed
off, as world size 1, and with gloo or NCCL):

- ``check_identical`` — masks / libraries / codebooks are bitwise equal on all ranks, or *every*
  rank raises naming the first differing layer: all_gather of one 63-bit hash per tensor
  (``state_fingerprints``), so 8 bytes a layer cross the network, not the state.
- ``broadcast_masks`` / ``broadcast_tensors`` — make them equal (seed or repair) from one rank:
  one broadcast of packed bits (1 bit a weight: ``pack_bits`` / ``unpack_bits``) or raw bytes.
- ``global_kth_largest`` / ``global_topk_mask`` — a global (pooled) top-k over shards (ZeRO-3)
  equal to ``topk.topk_mask`` on the concatenation, ties included: all_reduce(SUM) of bucket
  counts for a few rounds, then an all_gather of at most ``max_candidates`` values and of one tie
  count per rank (the exclusive prefix that hands ties to lower ranks first). Bytes ∝ buckets.
- ``distributed_kmeans`` — codebooks of sharded groups, bit-identical on every rank and to a
  single process on the union: all_reduce(MIN) of per-group extremes, then one all_reduce(SUM) of
  fixed-point (integer, hence associative) centroid sums and counts per Lloyd iteration.
- ``SparseReducer`` — the gradient all_reduce moves only kept entries: one all_reduce(SUM) of a
  buffer laid out by the masks, which therefore must be identical on all ranks (checked above).
- ``shm.SharedMemoryAllReduce`` — ranks of one host sum CPU buffers in a shared file instead of
  through sockets: every element summed by one rank in rank order, so every rank gets the same bits.

Only torch / torch.distributed here: no Ray, DeepSpeed or W&B.
"""
from elastictrain.distributed.kmeans import distributed_kmeans
from elastictrain.distributed.sparse_reduce import SparseReducer
from elastictrain.distributed.sync import (
           RanksDiverged,
           broadcast_masks,
           broadcast_tensors,
           check_identical,
           pack_bits,
           state_fingerprints,
           unpack_bits,
)
from elastictrain.distributed.threshold import Traffic, global_kth_largest, global_topk_mask, ordered_keys

__all__ = ["RanksDiverged", "SparseReducer", "Traffic", "broadcast_masks", "broadcast_tensors", "check_identical",
           "distributed_kmeans", "global_kth_largest", "global_topk_mask", "ordered_keys", "pack_bits",
           "state_fingerprints", "unpack_bits"]
