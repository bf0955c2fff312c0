"""Benchmark: wall-clock training steps of VGG16 on two hosts joined by a rate-limited link —
DeepSpeed ZeRO-2's dense gradient reduction against the sparse-aware one (ZeRO-0 +
``deepspeed.sparse_reduce``), at 50× and 1000× unstructured sparsity.

Run from the repository root, as root (the hosts are network namespaces, ``tests/hosts.py``):

    .venv/bin/python bench/comm_link.py [--links unlimited,1gbit,100mbit] [--steps 5] [--warmup 2] [--batch 32]

Two hosts (namespaces ``et9-h0``/``et9-h1`` on a private bridge, 10.213.9.0/24), one rank on each,
gloo over the bridge (``GLOO_SOCKET_IFNAME=eth0``); per link rate the harness shapes both hosts'
links both ways with ``tc`` (token bucket; ``unlimited``: none). Each rank builds its engines as a
Ray Train worker does (``jobs.backend.DeepSpeedBackend``, fp32, one CPU thread, SGD), the masks
final from the first step (``EnforceConfig(method="fixed")`` with ``vgg16-50x-unstructured.yaml`` /
``vgg16-1000x-unstructured.yaml``), CIFAR-shaped random inputs (3×32×32, ``--batch`` per rank).
A step is one ``elastictrain.train.train_epoch`` over one batch — forward, backward, the gradient
reduction, the optimizer step, the constrainer's re-mask and the ranks' loss check.

Variants per link: ZeRO-2 dense and ZeRO-0 sparse-aware at each ratio, plus a compute-only
reference (ZeRO-0, gradient reduction switched off: each rank trains alone) — its step time is
what a step costs without the reduction, so ``step − compute-only`` estimates communication.
After ``--warmup`` steps of each, ``--steps`` rounds time one step of every variant (order
rotating each round, a barrier before each step); a step's time is the slower rank's, reported
as the median. Bytes per step: the reduced gradient buffer (dense: every parameter × 4 B; sparse:
``SparseReducer.bytes_per_step``) and what rank 0's ``eth0`` really sent and received
(``/proc/net/dev``, TCP/IP headers included; ZeRO-2 also all-gathers the updated weights).
Every timed variant is checked afterwards: weights finite, pruned weights 0, masks and (with a
reduction) weights bit-identical on both ranks (``check_identical``).

Merges a ``link_steps`` section into bench/results/comm.json (``--quick``: comm-quick.json),
leaving ``bench/comm.py``'s rows as they are; a full run also writes bench/results/comm-link.md.
Needs root and iproute2 (``ip``, ``tc``): without them it prints one line and exits with 3.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECS = {50: "configs/specs/vgg16-50x-unstructured.yaml", 1000: "configs/specs/vgg16-1000x-unstructured.yaml"}
RATES = {"unlimited": None, "1gbit": "1gbit", "100mbit": "100mbit"}  # label -> tc rate
NET = 9  # the hosts' subnet 10.213.9.0/24 (tests use 7 and 8)
PORT = 29531


def variants(ratios: list[int]) -> list[dict]:
    out = [{"name": "compute-only", "ratio": ratios[0], "zero": 0, "sparse": False, "reduce": False}]
    for r in ratios:
        out.append({"name": "zero2-dense", "ratio": r, "zero": 2, "sparse": False, "reduce": True})
        out.append({"name": "zero0-sparse", "ratio": r, "zero": 0, "sparse": True, "reduce": True})
    return out


def net_bytes(dev: str = "eth0") -> tuple[int, int]:
    """(received, sent) bytes of ``dev`` in this process's network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == dev:
            v = rest.split()
            return int(v[0]), int(v[8])
    raise RuntimeError(f"no interface {dev} in /proc/net/dev")


# ----------------------------------------------------------------------------- one rank (on one host)

def rank_main(rank: int, master: str, port: int, batch: int, warmup: int, steps: int, ratios: list[int],
              out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GLOO_SOCKET_IFNAME="eth0")
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=2, timeout=timedelta(seconds=900))
    import deepspeed  # noqa: F401  (DeepSpeed's accelerator set up before the models are built)

    from elastictrain.constraints.plan import resolve
    from elastictrain.constraints.spec import load
    from elastictrain.distributed import RanksDiverged, SparseReducer, check_identical
    from elastictrain.models import build_model
    from elastictrain.train import (
        Constrainer,
        EnforceConfig,
        Hooks,
        LRConfig,
        OptimConfig,
        build_optimizer,
        build_scheduler,
        train_epoch,
    )
    from jobs.backend import DeepSpeedBackend
    from jobs.cluster import DeepSpeedConfig

    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))]
    runs = []
    for v in variants(ratios):
        torch.manual_seed(0)
        model = build_model("vgg16", num_classes=10, in_channels=3)
        opt = build_optimizer(model, OptimConfig(lr=0.01))
        sched = build_scheduler(opt, LRConfig(name="constant"), 1000, 1)
        plans = resolve(load(ROOT / SPECS[v["ratio"]]), {n: tuple(p.shape) for n, p in model.named_parameters()})
        c = Constrainer(dict(model.named_parameters()), plans, EnforceConfig(method="fixed"), 10**6)
        backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=v["zero"], sparse_reduce=v["sparse"], precision="fp32"),
                                   rank, 2, torch.device("cpu"))
        engine, stepper = backend.engine(model, opt, sched, c, batch_per_rank=batch, clip=None)
        if not v["reduce"]:
            engine.enable_backward_allreduce = False  # ZeRO-0 with no reducer: no gradient crosses the link
        for event in c.begin(opt):  # the masks at their target sparsity before the first step
            backend.after_update(c, event)
        params = dict(engine.module.named_parameters())
        dense_bytes = sum(p.numel() * p.element_size() for p in params.values())
        reduced = (SparseReducer(dict(c.masks), params).bytes_per_step if v["sparse"]
                   else dense_bytes if v["reduce"] else 0)
        hooks = Hooks(on_update=lambda e, b=backend, c=c: b.after_update(c, e), finite=backend.all_finite)
        runs.append({**v, "engine": engine, "stepper": stepper, "c": c, "hooks": hooks, "reduced_bytes": reduced,
                     "dense_bytes": dense_bytes, "t": [], "rx": [], "tx": []})

    def step(r: dict) -> None:
        dist.barrier()
        rx0, tx0 = net_bytes()
        t0 = time.perf_counter()
        train_epoch(r["engine"], data, r["stepper"], r["c"], r["hooks"])
        dt = time.perf_counter() - t0
        rx1, tx1 = net_bytes()
        r["t"].append(dt)
        r["rx"].append(rx1 - rx0)
        r["tx"].append(tx1 - tx0)

    for r in runs:
        for _ in range(warmup):
            step(r)
        r["t"], r["rx"], r["tx"] = [], [], []
    for i in range(steps):
        for r in runs[i % len(runs):] + runs[:i % len(runs)]:
            step(r)

    rows = []
    for r in runs:
        t = torch.tensor(r["t"], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step takes as long as its slower rank
        c, model = r["c"], r["engine"].module
        weights = {n: p.detach() for n, p in model.named_parameters()}
        checks = {"finite": all(bool(w.isfinite().all()) for w in weights.values()),
                  "pruned_nonzero": sum(int(((weights[n] != 0) & ~m).sum()) for n, m in c.masks.items())}
        for what, tensors in (("masks", c.masks), ("weights", weights)):
            if what == "weights" and not r["reduce"]:
                continue  # each rank trained on its own: the weights differ by design
            try:
                check_identical(tensors, what)
                checks[f"{what}_identical"] = True
            except RanksDiverged as e:
                checks[f"{what}_identical"] = False
                checks[f"{what}_error"] = str(e)[:300]
        kept = sum(int(m.sum()) for m in c.masks.values())
        rows.append({"variant": r["name"], "ratio": r["ratio"], "zero_stage": r["zero"],
                     "sparse_reduce": r["sparse"], "spec": SPECS[r["ratio"]],
                     "kept_weights": kept, "masked_weights": sum(m.numel() for m in c.masks.values()),
                     "reduced_bytes_per_step": r["reduced_bytes"], "dense_gradient_bytes": r["dense_bytes"],
                     "median_step_s": statistics.median(t.tolist()), "step_s": t.tolist(),
                     "rank0_sent_bytes_per_step": statistics.median(r["tx"]),
                     "rank0_received_bytes_per_step": statistics.median(r["rx"]), "checks": checks})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the harness

def run_link(h, label: str, args, tmp: Path) -> list[dict]:
    """Both ranks on the link shaped to ``label``; rank 0's rows (raises on a failed rank)."""
    h.limit(RATES[label])
    out = tmp / f"{label}.json"
    procs, logs = [], []
    for i in range(2):
        log = tmp / f"{label}-rank{i}.log"
        logs.append(log)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rank", str(i), "--master", h.addrs[0],
               "--port", str(PORT), "--batch", str(args.batch), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--ratios", args.ratios, "--rows-out", str(out)]
        with open(log, "w") as f:
            procs.append(h.popen(i, cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + args.timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:  # `ip netns exec` execs the command: these are the ranks themselves
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs) or not out.is_file():
        tails = "\n".join(f"--- rank {i} (exit {p.returncode}):\n" + "\n".join(log.read_text().splitlines()[-25:])
                          for i, (p, log) in enumerate(zip(procs, logs)))
        raise RuntimeError(f"comm_link: the ranks failed on link {label}\n{tails}")
    return [{"link": label, "tc_rate": RATES[label], **r} for r in json.loads(out.read_text())]


def passed(row: dict) -> bool:
    c = row["checks"]
    return bool(c["finite"] and c["pruned_nonzero"] == 0 and c.get("masks_identical")
                and c.get("weights_identical", True))


def summarise(rows: list[dict]) -> list[dict]:
    """Per link and ratio: sparse-aware vs ZeRO-2 dense (speedup, byte ratios, comm estimate)."""
    out = []
    for link in dict.fromkeys(r["link"] for r in rows):
        at = [r for r in rows if r["link"] == link]
        compute = next((r["median_step_s"] for r in at if r["variant"] == "compute-only"), None)
        for ratio in dict.fromkeys(r["ratio"] for r in at if r["variant"] != "compute-only"):
            d = next(r for r in at if r["ratio"] == ratio and r["variant"] == "zero2-dense")
            s = next(r for r in at if r["ratio"] == ratio and r["variant"] == "zero0-sparse")
            out.append({
                "link": link, "ratio": ratio, "dense_step_s": d["median_step_s"], "sparse_step_s": s["median_step_s"],
                "speedup": d["median_step_s"] / s["median_step_s"],
                "byte_ratio": d["reduced_bytes_per_step"] / s["reduced_bytes_per_step"],
                "wire_byte_ratio": (d["rank0_sent_bytes_per_step"] / s["rank0_sent_bytes_per_step"]
                                    if s["rank0_sent_bytes_per_step"] else None),
                "compute_only_step_s": compute,
                "dense_comm_s_est": None if compute is None else d["median_step_s"] - compute,
                "sparse_comm_s_est": None if compute is None else s["median_step_s"] - compute,
            })
    return out


def table(rows: list[dict], summary: list[dict], m: dict, args) -> str:
    lines = [f"### VGG16 training step on two hosts, link rate-limited by tc — gloo, 1 CPU thread per rank, "
             f"batch {args.batch} per rank; {m['cpu_model']}, {m['logical_cores']} cores; "
             f"median of {args.steps} steps\n",
             "| link | sparsity | reduction | median step | reduced / step | rank 0 sent / step | checks |",
             "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['link']} | {r['ratio']}× | {r['variant']} | {r['median_step_s']:.3f} s "
                     f"| {r['reduced_bytes_per_step'] / 1e6:.3f} MB | {r['rank0_sent_bytes_per_step'] / 1e6:.2f} MB "
                     f"| {'ok' if passed(r) else 'FAILED'} |")
    lines += ["", "| link | sparsity | ZeRO-2 dense step | sparse-aware step | speedup | byte ratio (reduced) "
              "| byte ratio (wire) | comm. est. dense / sparse |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        est = ("" if s["dense_comm_s_est"] is None
               else f"{s['dense_comm_s_est']:.3f} s / {s['sparse_comm_s_est']:.3f} s")
        wire = "" if s["wire_byte_ratio"] is None else f"{s['wire_byte_ratio']:.0f}×"
        lines.append(f"| {s['link']} | {s['ratio']}× | {s['dense_step_s']:.3f} s | {s['sparse_step_s']:.3f} s "
                     f"| **{s['speedup']:.2f}×** | {s['byte_ratio']:.0f}× | {wire} | {est} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.machine import add_quick

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--links", default=None, help=f"comma-separated, of {', '.join(RATES)} (default: all three)")
    ap.add_argument("--ratios", default="50,1000", help=f"comma-separated, of {', '.join(map(str, SPECS))}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first")
    ap.add_argument("--batch", type=int, default=32, help="images per rank and step")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per link before the ranks are killed")
    add_quick(ap, "comm", "--steps 2 --warmup 1, the 100mbit link unless --links says")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # set by the harness: run one rank
    ap.add_argument("--master", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    ap.add_argument("--rows-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ratios = [int(r) for r in args.ratios.split(",")]
    if args.rank is not None:
        rank_main(args.rank, args.master, args.port, args.batch, args.warmup, args.steps, ratios, args.rows_out)
        return 0
    if args.quick:
        args.steps, args.warmup = 2, 1
    links = (args.links or ("100mbit" if args.quick else ",".join(RATES))).split(",")
    bad = [x for x in links if x not in RATES] + [str(r) for r in ratios if r not in SPECS]
    if bad:
        ap.error(f"unknown link or ratio: {', '.join(bad)}")

    sys.path.insert(0, str(ROOT / "tests"))
    import hosts

    why = hosts.available()
    if why:
        print(f"comm_link: skipped: {why}")
        return 3
    from bench.machine import cpu_busy, describe, out_path, write_result

    busy_before = cpu_busy()
    t0 = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="comm-link-") as tmp:
        h = hosts.Hosts(2, net=NET)
        try:
            for link in links:
                rows += run_link(h, link, args, Path(tmp))
                print(f"link {link}: done ({time.monotonic() - t0:.0f} s)", flush=True)
        finally:
            h.close()
    busy_after = cpu_busy()
    m = describe()
    summary = summarise(rows)
    md = table(rows, summary, m, args)
    print("\n" + md)
    section = {
        "machine": m, "cpu_busy_before": busy_before, "cpu_busy_after": busy_after,
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else ["bench/comm_link.py", *argv]),
        "quick": args.quick, "model": "vgg16", "input": [3, 32, 32], "batch_per_rank": args.batch,
        "world_size": 2, "backend": "gloo", "hosts": "two network namespaces on a bridge (tests/hosts.py), tc tbf "
        "on each host's link both ways", "threads_per_rank": 1, "steps": args.steps, "warmup": args.warmup,
        "seconds": time.monotonic() - t0, "rows": rows, "summary": summary,
    }
    out = Path(out_path(args, "comm"))
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["link_steps"] = section  # bench/comm.py's own rows stay as they are
    write_result(result, out)
    if not args.quick:
        out.with_name("comm-link.md").write_text(
            "Written by bench/comm_link.py (the `link_steps` section of comm.json).\n\n" + md + "\n")
    if busy_before is not None and busy_before > 0.2:
        print(f"note: the cores were {100 * busy_before:.0f}% busy before the run: the timings are distorted")
    failed = [r for r in rows if not passed(r)]
    if failed:
        print(f"comm_link: {len(failed)} rows failed their checks (see link_steps.rows[].checks)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
