"""elastictrain.distributed: single-process behaviour, then real 2-process gloo runs (spawn, FileStore).

Each 2-process test launches one pair of processes whose worker runs several checks and returns
plain data (numpy arrays, strings) through a queue; references are computed here, in the parent,
where torch.distributed is not initialised — i.e. by the same functions at world size 1 or by
``topk.topk_mask`` on the concatenation. A worker's exception comes back as its traceback text.
"""
from __future__ import annotations

import os
import queue
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from elastictrain.constraints.topk import topk_mask
from elastictrain.distributed import (
    SparseReducer,
    Traffic,
    broadcast_masks,
    broadcast_tensors,
    check_identical,
    distributed_kmeans,
    global_kth_largest,
    global_topk_mask,
    ordered_keys,
    pack_bits,
    state_fingerprints,
    unpack_bits,
)

# --------------------------------------------------------------------------- the 2-process harness


def _entry(rank: int, world: int, store_path: str, worker, args: tuple, q) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
        try:
            q.put((rank, "ok", worker(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def run2(tmp_path, worker, *args) -> list:
    """Run ``worker(rank, 2, *args)`` on two gloo ranks; their return values, in rank order."""
    tmp_path.mkdir(parents=True, exist_ok=True)  # FileStore waits forever on a missing folder
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, 2, str(tmp_path / "store"), worker, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    out, errors = {}, []
    deadline = time.monotonic() + 120
    try:
        while len(out) + len(errors) < len(procs):
            try:
                rank, status, value = q.get(timeout=1)
            except queue.Empty:  # fail fast if a rank died without reporting (e.g. at import)
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    errors.append(f"ranks {dead} died (exit codes {[p.exitcode for p in procs]})" if dead
                                  else "timed out waiting for the ranks")
                    break
                continue
            (out.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        pytest.fail("\n".join(errors))
    return [out[0], out[1]]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


# ---------------------------------------------------------------------------- single process


def test_pack_bits_matches_numpy_and_round_trips():
    for n in (0, 1, 7, 8, 9, 63, 1001):
        m = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
        packed = pack_bits(m)
        assert packed.numel() == (n + 7) // 8
        assert np.array_equal(packed.numpy(), np.packbits(m.numpy(), bitorder="little"))
        assert torch.equal(unpack_bits(packed, n), m)
    with pytest.raises(ValueError, match="unpack_bits"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


def test_fingerprints_are_content_hashes_in_name_order():
    a, b = torch.rand(10) > 0.5, torch.randn(3, 4)
    fp = state_fingerprints({"b": b, "a": a})
    assert fp.dtype == torch.int64 and bool((fp >= 0).all())
    assert torch.equal(fp, state_fingerprints({"a": a.clone(), "b": b.clone()}))
    assert torch.equal(fp[0], state_fingerprints({"a": a})[0])
    flipped = a.clone()
    flipped[3] = ~flipped[3]
    assert fp[0] != state_fingerprints({"a": flipped})[0]
    assert fp[1] != state_fingerprints({"b": b.reshape(4, 3)})[0]  # shape is part of the content
    assert fp[1] != state_fingerprints({"b": b.double()})[0]


@given(st.lists(st.floats(allow_nan=False, width=32), min_size=2, max_size=40))
def test_ordered_keys_order_like_the_values(xs):
    x = torch.tensor(xs, dtype=torch.float32)
    k = ordered_keys(x)
    assert torch.equal(x[:, None] < x[None, :], k[:, None] < k[None, :])
    assert torch.equal(x[:, None] == x[None, :], k[:, None] == k[None, :])  # −0.0 == 0.0 included


def test_world_size_one_is_the_local_result():
    g = torch.Generator().manual_seed(0)
    shards = [torch.randn(50, generator=g), torch.randn(3, 7, generator=g)]
    cat = torch.cat([s.reshape(-1) for s in shards])
    assert global_kth_largest(shards, 9) == cat.topk(9).values[-1]
    masks = global_topk_mask(shards, 9)
    assert [m.shape for m in masks] == [s.shape for s in shards]
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), topk_mask(cat[None], 9)[0])
    assert check_identical({"a": cat}, "masks") == 0
    assert broadcast_masks({"a": cat > 0}) == 0 and broadcast_tensors({"a": cat}) == 0
    grad, mask = torch.randn(4, 5, generator=g), torch.rand(4, 5, generator=g) > 0.5
    want = grad * mask
    r = SparseReducer({"w": mask}, {"w": grad})
    r.all_reduce_({"w": grad})
    assert torch.equal(grad, want) and r.bytes_per_step == int(mask.sum()) * 4 and r.dense_bytes == 80


def test_user_errors_name_what_is_wrong():
    x = [torch.randn(10)]
    with pytest.raises(ValueError, match=r"k must be in 1\.\.10"):
        global_kth_largest(x, 11)
    with pytest.raises(ValueError, match="NaN"):
        global_kth_largest([torch.tensor([1.0, float("nan")])], 1)
    with pytest.raises(ValueError, match="one dtype"):
        global_topk_mask([torch.randn(3), torch.randn(3).double()], 2)
    with pytest.raises(ValueError, match="bits must be 1..8"):
        distributed_kmeans(torch.randn(2, 3), torch.tensor([3, 3]), 9, 10)
    with pytest.raises(ValueError, match="mask 'w' must be bool of shape"):
        SparseReducer({"w": torch.ones(3, dtype=torch.bool)}, {"w": torch.zeros(4)})


def test_kmeans_replaces_a_zero_centroid_and_keeps_levels():
    # bits = 1, init (−1, 100): {−1, −0.5, 0.5, 1} average to exactly 0 → smallest magnitude, 0.5
    vals = torch.tensor([[-1.0, 1.0, 100.0, 0.5, -0.5]])
    assert torch.equal(distributed_kmeans(vals, torch.tensor([5]), 1, 30), torch.tensor([[0.5, 100.0]]))


# ---------------------------------------------------------------------------- 2 processes


def _w_fingerprints(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(7)  # the same state on both ranks
    state = {"a": torch.rand(13, generator=g) > 0.5, "b": torch.rand(5, 9, generator=g) > 0.3,
             "c": torch.randn(4, 16, generator=g)}
    out = {"bytes": check_identical(state, "masks")}
    if rank == 1:
        state["b"][2, 3] = ~state["b"][2, 3]
    try:
        check_identical(state, "masks")
        out["flip"] = "no error"
    except RuntimeError as e:
        out["flip"] = str(e)
    extra = dict(state, **({"d": torch.zeros(1)} if rank == 1 else {}))
    try:
        check_identical(extra, "codebooks")
        out["names"] = "no error"
    except RuntimeError as e:
        out["names"] = str(e)
    return out


def test_check_identical_names_the_layer_and_the_rank(tmp_path):
    for r, out in enumerate(run2(tmp_path, _w_fingerprints)):
        assert out["bytes"] == 16 + 8 * 3
        msg = out["flip"]
        assert msg.startswith("masks differ across ranks: layer b: rank 0 has "), (r, msg)
        assert ", rank 1 has " in msg and "(1 of 3 layers differ)" in msg and "\n" not in msg
        assert out["names"].startswith("codebooks differ across ranks: layer names: rank 0 has 3 names, rank 1 has 4")


_MASK_SHAPES = [(1,), (7,), (9,), (13, 5), (3, 3, 3), (0,)]


def _w_broadcast(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)  # different masks on each rank
    masks = {f"m{i}": torch.rand(s, generator=g) > 0.5 for i, s in enumerate(_MASK_SHAPES)}
    views = {n: m for n, m in masks.items()}
    nbytes = broadcast_masks(masks, src=0)
    books = {"f32": torch.randn(3, 16, generator=g), "f64": torch.randn(5, generator=g).double(),
             "bf16": torch.randn(7, generator=g).bfloat16(), "i64": torch.randint(-9, 9, (4,), generator=g)}
    tbytes = broadcast_tensors(books, src=0)
    return {"bytes": nbytes, "tbytes": tbytes, "in_place": all(views[n] is masks[n] for n in masks),
            "masks": {n: _np(m) for n, m in masks.items()},
            "books": {n: _np(b.view(torch.int16) if b.dtype == torch.bfloat16 else b) for n, b in books.items()}}


def test_broadcast_masks_and_tensors_are_exact(tmp_path):
    r0, r1 = run2(tmp_path, _w_broadcast)
    g = torch.Generator().manual_seed(100)
    want = {f"m{i}": torch.rand(s, generator=g) > 0.5 for i, s in enumerate(_MASK_SHAPES)}
    total = sum(m.numel() for m in want.values())
    for out in (r0, r1):
        assert out["bytes"] == (total + 7) // 8 and out["in_place"]
        assert out["tbytes"] == 48 * 4 + 5 * 8 + 7 * 2 + 4 * 8
        for n, m in want.items():
            assert np.array_equal(out["masks"][n], m.numpy()), n
    for n in r0["books"]:
        assert np.array_equal(r0["books"][n], r1["books"][n]), n


def _threshold_cases() -> list[tuple[str, list[list[torch.Tensor]], int, dict]]:
    """(name, shards of rank 0 and rank 1, k, options): deterministic, rebuilt in every process."""
    g = torch.Generator().manual_seed(3)
    rnd = [[torch.randn(1000, generator=g), torch.randn(37, 3, generator=g)], [torch.randn(2500, generator=g)]]
    lv = [[(torch.randint(0, 4, (3000,), generator=g) * 0.25), torch.empty(0)],
          [torch.randint(0, 4, (40, 50), generator=g) * 0.25]]
    zeros = [[torch.tensor([0.0, -0.0, 1.0, -0.0, float("-inf"), 0.0])],
             [torch.tensor([-0.0, 2.0, 0.0, float("inf"), -1.0, -0.0, 0.0])]]
    same = [[torch.full((300,), 0.5)], [torch.full((200,), 0.5)]]
    f64 = [[torch.randn(700, generator=g).double()], [torch.randn(900, generator=g).double()]]
    empty1 = [[torch.randn(500, generator=g)], [torch.empty(0), torch.empty(2, 0)]]
    n_rnd, n_lv = 1000 + 111 + 2500, 3000 + 2000
    return [
        ("random/rounds", rnd, 500, {"max_candidates": 64}),
        ("random/one key", rnd, 500, {"max_candidates": 0}),
        ("random/gather all", rnd, 500, {"max_candidates": 10**6}),
        ("random/k=1", rnd, 1, {"max_candidates": 0}),
        ("random/k=total", rnd, n_rnd, {"max_candidates": 0}),
        ("random/4 buckets", rnd, 1234, {"buckets": 4, "max_candidates": 5}),
        ("ties/one key", lv, 2222, {"max_candidates": 0}),
        ("ties/rounds", lv, 2222, {"max_candidates": 100}),
        ("ties/k=total-1", lv, n_lv - 1, {}),
        ("signed zeros", zeros, 6, {"max_candidates": 0}),
        ("signed zeros/gather", zeros, 4, {"max_candidates": 3}),
        ("all equal", same, 7, {"max_candidates": 0}),
        ("all equal/gather", same, 450, {"max_candidates": 100}),
        ("float64", f64, 333, {"buckets": 16, "max_candidates": 0}),
        ("rank 1 empty", empty1, 17, {"max_candidates": 0}),
    ]


def _w_threshold(rank: int, world: int) -> dict:
    out = {}
    for name, shards, k, opt in _threshold_cases():
        traffic = Traffic()
        kth = global_kth_largest(shards[rank], k, traffic=traffic, **opt)
        masks = global_topk_mask(shards[rank], k, **opt)
        out[name] = (_np(kth), [_np(m) for m in masks], [tuple(m.shape) for m in masks], traffic.rounds)
    _, shards, _, _ = _threshold_cases()[0]
    out["k=0"] = [_np(m) for m in global_topk_mask(shards[rank], 0)]
    out["k>total"] = [_np(m) for m in global_topk_mask(shards[rank], 10**6)]
    nan = [torch.tensor([1.0, float("nan") if rank == 1 else 2.0])]
    try:
        global_kth_largest(nan, 1)
        out["nan"] = "no error"
    except ValueError as e:
        out["nan"] = str(e)
    return out


def test_global_threshold_equals_topk_mask_on_the_concatenation(tmp_path):
    results = run2(tmp_path, _w_threshold)
    for name, shards, k, opt in _threshold_cases():
        cat = torch.cat([s.reshape(-1) for rank in shards for s in rank])
        want_mask = topk_mask(cat[None], k)[0]
        want_kth = torch.kthvalue(cat, cat.numel() - k + 1).values
        got = []
        for rank, out in enumerate(results):
            kth, masks, shapes, rounds = out[name]
            assert kth == want_kth.numpy(), (name, rank, kth, want_kth)
            assert shapes == [tuple(s.shape) for s in shards[rank]], name
            got += [m.reshape(-1) for m in masks]
            if cat.dtype == torch.float32 and opt.get("buckets", 1024) == 1024:
                assert rounds <= 4, (name, rounds)  # a float32 key interval spans ≤ 2^32 = 1024^3.2
        assert np.array_equal(np.concatenate(got), want_mask.numpy()), name
        assert int(np.concatenate(got).sum()) == k
        assert results[0][name][0].tobytes() == results[1][name][0].tobytes(), name  # bitwise
    for out in results:
        assert not any(m.any() for m in out["k=0"]) and all(m.all() for m in out["k>total"])
        assert "NaN (on rank [1])" in out["nan"]


def _kmeans_groups() -> tuple[list[list[torch.Tensor]], list[int]]:
    """Per group, the values of rank 0 and of rank 1."""
    g = torch.Generator().manual_seed(11)
    groups = [[torch.randn(n0, generator=g), torch.randn(n1, generator=g)]
              for n0, n1 in [(300, 200), (17, 90), (50, 0)]]
    groups.append([torch.empty(0), torch.empty(0)])  # empty everywhere: eps
    groups.append([torch.tensor([-1.0, 1.0, 100.0]), torch.tensor([0.5, -0.5])])  # a zero centroid; 0.5 on rank 1
    lv = (torch.randint(-3, 4, (400,), generator=g) * 0.1)
    groups.append([lv[:150], lv[150:]])  # 7 distinct values
    return groups, [1, 2, 4]


def _packed(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N) +inf padded, unsorted, and n_G."""
    n_G = torch.tensor([v.numel() for v in values])
    vals = torch.full((len(values), max(int(n_G.max()), 1)), float("inf"))
    for i, v in enumerate(values):
        vals[i, :v.numel()] = v
    return vals, n_G


def _w_kmeans(rank: int, world: int) -> dict:
    groups, bits = _kmeans_groups()
    vals, n_G = _packed([gr[rank] for gr in groups])
    return {b: _np(distributed_kmeans(vals, n_G, b, iters=40)) for b in bits}


def test_distributed_kmeans_is_identical_and_equals_one_process(tmp_path):
    r0, r1 = run2(tmp_path, _w_kmeans)
    groups, bits = _kmeans_groups()
    vals, n_G = _packed([torch.cat(gr) for gr in groups])
    for b in bits:
        want = distributed_kmeans(vals, n_G, b, iters=40).numpy()  # world size 1, on the union
        assert want.shape == (len(groups), 1 << b)
        assert np.array_equal(r0[b].view(np.uint32), r1[b].view(np.uint32)), b  # bitwise, every rank
        assert np.array_equal(r0[b].view(np.uint32), want.view(np.uint32)), b
        assert not (want == 0).any() and (np.diff(want, axis=1) >= 0).all()
        assert want[3].tolist() == [np.finfo(np.float32).eps] * (1 << b)
        for i in (0, 1, 2, 4, 5):
            u = torch.cat(groups[i])
            assert u.min() <= want[i].min() and want[i].max() <= u.max()  # centroids are means of values
    assert r0[1][4].tolist() == [0.5, 100.0]


def _w_sparse(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(5)  # masks: the same on both ranks
    shapes = {"a": (30, 7), "b": (5, 3, 3, 3), "c": (11,)}
    masks = {"a": torch.rand(30, 7, generator=g) > 0.8, "b": torch.rand(5, 3, 3, 3, generator=g) > 0.5}
    params = {n: torch.zeros(s) for n, s in shapes.items()}
    gr = torch.Generator().manual_seed(50 + rank)  # gradients: different on each rank
    out = {}
    for average in (True, False):
        grads = {n: torch.randn(s, generator=gr) for n, s in shapes.items()}
        dense = {n: v.clone() for n, v in grads.items()}
        for n, v in dense.items():
            dist.all_reduce(v)
            if average:
                v.div_(world)
            if n in masks:
                v.mul_(masks[n])
        reducer = SparseReducer(masks, params, debug=True)
        reducer.all_reduce_(grads, average=average)
        out[average] = all(torch.equal(grads[n], dense[n]) for n in shapes)
    only_masked = SparseReducer(masks, {n: params[n] for n in masks})
    out["bytes"] = (reducer.bytes_per_step, reducer.dense_bytes, only_masked.bytes_per_step)
    if rank == 1:
        masks["a"][0, 0] = ~masks["a"][0, 0]
    try:
        SparseReducer(masks, params, debug=True).all_reduce_({n: torch.zeros(s) for n, s in shapes.items()})
        out["debug"] = "no error"
    except RuntimeError as e:
        out["debug"] = str(e)
    return out


def test_sparse_reducer_equals_dense_all_reduce_then_mask(tmp_path):
    g = torch.Generator().manual_seed(5)
    kept = int((torch.rand(30, 7, generator=g) > 0.8).sum()) + int((torch.rand(5, 3, 3, 3, generator=g) > 0.5).sum())
    for out in run2(tmp_path, _w_sparse):
        assert out[True] and out[False]
        assert out["bytes"] == ((kept + 11) * 4, (210 + 135 + 11) * 4, kept * 4)
        assert out["debug"].startswith("SparseReducer masks differ across ranks: layer a: rank 0 has ")


def _w_shm(rank: int, world: int) -> dict:
    from elastictrain.distributed.shm import SharedMemoryAllReduce, usable

    out = {"usable": (usable(world), usable(None), usable(1))}
    shm = SharedMemoryAllReduce(1000)
    out["left_on_disk"] = [f for f in os.listdir("/dev/shm") if f.startswith("elastictrain-allreduce-")]
    g = torch.Generator().manual_seed(70 + rank)  # different values on each rank
    out["sums"], out["gloo_close"] = [], []
    for n in (1000, 7, 1, 999, 1000):  # varying sizes in one buffer: the slices move between calls
        x = torch.randn(n, generator=g) * 10 ** torch.randint(-3, 4, (n,), generator=g)
        ref = x.clone()
        dist.all_reduce(ref)
        shm.all_reduce_(x)
        out["sums"].append(_np(x))
        out["gloo_close"].append(bool(torch.allclose(x, ref, rtol=1e-6, atol=0)))
    params = {"w": torch.zeros(30, 7), "b": torch.zeros(11)}
    grads = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    via_gloo = {n: v.clone() for n, v in grads.items()}
    SparseReducer({}, params, transport=shm.all_reduce_).all_reduce_(grads)
    SparseReducer({}, params).all_reduce_(via_gloo)
    out["dense_reducer_equal"] = all(torch.equal(grads[n], via_gloo[n]) for n in params)
    errors = []
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(1001), torch.zeros(2, 2)):
        try:
            shm.all_reduce_(bad)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    # a peer that never arrives: rank 0 times out naming it, instead of waiting forever
    late = SharedMemoryAllReduce(4, timeout_s=1.0)
    if rank == 0:
        try:
            late.all_reduce_(torch.ones(4))
            out["timeout"] = "no error"
        except TimeoutError as e:
            out["timeout"] = str(e)
    dist.barrier()
    shm.close()
    return out


def test_shared_memory_all_reduce_is_one_sum_on_every_rank(tmp_path):
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the shared-memory all-reduce runs on x86 only")
    outs = run2(tmp_path, _w_shm)
    g0, g1 = torch.Generator().manual_seed(70), torch.Generator().manual_seed(71)
    for i, n in enumerate((1000, 7, 1, 999, 1000)):
        a = torch.randn(n, generator=g0) * 10 ** torch.randint(-3, 4, (n,), generator=g0)
        b = torch.randn(n, generator=g1) * 10 ** torch.randint(-3, 4, (n,), generator=g1)
        for out in outs:  # the same bits on both ranks, and for two ranks exactly a + b
            np.testing.assert_array_equal(out["sums"][i], _np(a + b))
            assert out["gloo_close"][i]
    for rank, out in enumerate(outs):
        assert out["usable"] == (True, False, False)
        assert out["left_on_disk"] == []  # unlinked once both ranks had mapped it
        assert out["dense_reducer_equal"]
        assert len(out["errors"]) == 3 and "float32" in out["errors"][0] and "capacity of 1000" in out["errors"][1]
    assert outs[0]["timeout"].startswith("SharedMemoryAllReduce: rank(s) [1] did not arrive within 1 s")
