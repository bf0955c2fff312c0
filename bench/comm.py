"""Benchmark: what crosses the network per step and per constraint sync, 2 ranks (gloo, loopback).

Run from the repository root:

    .venv/bin/python bench/comm.py [--repeats 5]

For VGG16's conv and linear weights (14.7 M, as gradients) at 50× and 1000× unstructured
sparsity — masks from one global top-k, identical on both ranks:
  * dense all_reduce of every gradient vs ``elastictrain.distributed.SparseReducer`` (kept entries
    only; target ≤ 1.2 × non-zeros × 4 bytes), bytes and median wall time;
  * a mask check (``check_identical``: all-gathered fingerprints), a packed mask broadcast
    (``broadcast_masks``: 1 bit a weight) and a codebook broadcast (64 codebooks × 2 bits per
    layer), bytes and time;
  * ZeRO-3: a whole mask update on each rank's slices of the weights (``distributed.shards.project_shards``
    with the seed's specs: 50× unstructured, and 1000× + 2-bit × 64 codebooks), bytes each rank
    sends and time, against gathering the weights (what a projection on whole weights would need).
Biases and BatchNorm parameters (21 k, always dense) are reported apart. Two processes on two
cores: the times measure the collective's software path on loopback, not a network.
Writes bench/results/comm.json, keeping its ``link_steps`` section: wall-clock VGG16 training
steps between two hosts on a ``tc``-limited link, ZeRO-2 dense vs sparse-aware reduction, which
``bench/comm_link.py`` measures and merges in (it needs root for the network namespaces).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    dist.barrier()
    runs = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


ZERO3_SPECS = {50: "configs/specs/vgg16-50x-unstructured.yaml", 1000: "configs/specs/vgg16-16000x-1000x-2bit-64cb.yaml"}


def zero3_update(rank: int, weights: dict, ratio: int, repeats: int) -> tuple[int, float]:
    """One mask (+ codebook) update on ZeRO-3 slices (rank r holds [r·P, (r+1)·P) of every weight)."""
    from elastictrain.constraints.plan import resolve
    from elastictrain.constraints.spec import load
    from elastictrain.distributed import Traffic
    from elastictrain.distributed.shards import Shard, project_shards

    plans = resolve(load(ROOT / ZERO3_SPECS[ratio]), {n: tuple(w.shape) for n, w in weights.items()})
    shards = {}
    for n, w in weights.items():
        P = -(-w.numel() // 2)
        part = w.reshape(-1)[rank * P:(rank + 1) * P]
        shards[n] = Shard(part.clone(), rank * P, tuple(w.shape))
    traffic = Traffic()
    project_shards(shards, plans, traffic=traffic)
    return traffic.bytes_sent, timed(lambda: project_shards(shards, plans), max(1, repeats // 2))


def worker(rank: int, port: int, repeats: int, out: str) -> None:
    from elastictrain.constraints.topk import keep_count, topk_mask
    from elastictrain.distributed import SparseReducer, broadcast_masks, broadcast_tensors, check_identical
    from elastictrain.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_model("vgg16")
    weights = {n: p.detach() for n, p in model.named_parameters() if p.dim() in (2, 4)}
    others = {n: p.detach() for n, p in model.named_parameters() if p.dim() not in (2, 4)}
    n_w = sum(w.numel() for w in weights.values())
    rows = []
    for ratio in (50, 1000):
        flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])
        keep = topk_mask(flat[None], keep_count(flat.numel(), ratio=ratio))[0]
        parts = keep.split([w.numel() for w in weights.values()])
        masks = {n: m.reshape(w.shape) for (n, w), m in zip(weights.items(), parts)}
        nnz = int(keep.sum())
        grads = {n: torch.randn_like(w) for n, w in weights.items()}
        g_all = {**grads, **{n: torch.randn_like(p) for n, p in others.items()}}
        dense_t = timed(lambda: [dist.all_reduce(g) for g in grads.values()], repeats)
        red_w = SparseReducer(masks, weights)
        sparse_t = timed(lambda: red_w.all_reduce_(grads), repeats)
        red_all = SparseReducer(masks, {**weights, **others})
        books = {n: torch.randn(64, 4) for n in weights}
        check_bytes = check_identical(masks, "masks")
        check_t = timed(lambda: check_identical(masks, "masks"), repeats)
        bcast_bytes = broadcast_masks(dict(masks))
        bcast_t = timed(lambda: broadcast_masks(dict(masks)), repeats)
        book_bytes = broadcast_tensors(books)
        book_t = timed(lambda: broadcast_tensors(books), repeats)
        z3_bytes, z3_t = zero3_update(rank, weights, ratio, repeats)
        rows.append({
            "ratio": ratio, "weights": n_w, "nonzeros": nnz,
            "dense_allreduce_bytes": n_w * 4, "dense_allreduce_s": dense_t,
            "sparse_allreduce_bytes": red_w.bytes_per_step, "sparse_allreduce_s": sparse_t,
            "sparse_over_nonzeros_x4": red_w.bytes_per_step / (nnz * 4),
            "with_bias_bn": {"dense_bytes": red_all.dense_bytes, "sparse_bytes": red_all.bytes_per_step},
            "mask_check_bytes_per_rank": check_bytes, "mask_check_s": check_t,
            "mask_broadcast_bytes": bcast_bytes, "mask_broadcast_s": bcast_t,
            "codebook_broadcast_bytes": book_bytes, "codebook_broadcast_s": book_t,
            "zero3_spec": ZERO3_SPECS[ratio], "zero3_update_bytes_per_rank": z3_bytes, "zero3_update_s": z3_t,
            "gather_weights_bytes_per_rank": n_w * 4 // 2,
        })
        del g_all
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv=None) -> dict:
    from bench.machine import add_quick

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    add_quick(ap, "comm", "one repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from bench.machine import describe, finish, out_path, spawn_two

    rows = spawn_two(worker, args.repeats, out=out_path(args, "comm"))

    m = describe()
    print(f"### Communication per step and per sync — VGG16 weights, 2 ranks, gloo on loopback; {m['cpu_model']}, "
          f"{m['logical_cores']} cores\n")
    print("| sparsity | non-zeros | dense all-reduce | sparse-aware all-reduce | sparse / (nnz × 4 B) | mask check "
          "| packed mask broadcast | codebook broadcast |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ratio']}× | {r['nonzeros']:,} "
              f"| {r['dense_allreduce_bytes'] / 1e6:.1f} MB, {1e3 * r['dense_allreduce_s']:.1f} ms "
              f"| {r['sparse_allreduce_bytes'] / 1e3:.1f} kB, {1e3 * r['sparse_allreduce_s']:.1f} ms "
              f"| {r['sparse_over_nonzeros_x4']:.2f}× "
              f"| {r['mask_check_bytes_per_rank']} B, {1e3 * r['mask_check_s']:.1f} ms "
              f"| {r['mask_broadcast_bytes'] / 1e6:.2f} MB, {1e3 * r['mask_broadcast_s']:.1f} ms "
              f"| {r['codebook_broadcast_bytes'] / 1e3:.1f} kB, {1e3 * r['codebook_broadcast_s']:.1f} ms |")
    print("\n| ZeRO-3 mask update on slices | sent per rank | time | gathering the weights instead |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['zero3_spec']).stem} | {r['zero3_update_bytes_per_rank'] / 1e6:.2f} MB "
              f"| {r['zero3_update_s']:.2f} s "
              f"| {r['gather_weights_bytes_per_rank'] / 1e6:.1f} MB |")
    for r in rows:
        wb = r["with_bias_bn"]
        print(f"{r['ratio']}×, counting biases and BatchNorm (always dense): dense {wb['dense_bytes'] / 1e6:.2f} MB, "
              f"sparse-aware {wb['sparse_bytes'] / 1e3:.1f} kB")
    result = {"machine": m, "model": "vgg16", "world_size": 2, "backend": "gloo", "repeats": args.repeats, "rows": rows}
    old = Path(out_path(args, "comm"))
    if old.is_file():  # bench/comm_link.py's section (training steps on a rate-limited link) is kept
        link = json.loads(old.read_text()).get("link_steps")
        if link is not None:
            result["link_steps"] = link
    return finish(result, args, "comm")


if __name__ == "__main__":
    main()
