"""GPU checks of the runtime for constrained layers (issue "Deployable models II", item 3), run on a
machine with an NVIDIA GPU by bench/gpu_deploy.sh; writes $OUT/gpu-deploy.json (or
bench/results/gpu-deploy.json) with the machine's description.

1. N:M 2:4 linear layers through PyTorch's semi-structured sparse tensors (sm80+, fp16 and bf16):
   the masked dense product vs ``to_sparse_semi_structured`` — max |Δ| and median latency at
   several token counts, on a VGG16-classifier-sized layer and a transformer-MLP-sized one.
2. The codebook path on CUDA: a 2-bit × 64-codebook conv weight held as uint8 codes + tables,
   dequantized just in time per forward vs the fp32 / fp16 dense weight — resident bytes of the
   weight (torch.cuda.memory_allocated around building it) and median latency at batch 64.
3. The autotune on CUDA: VGG16 at 100× kernel (one-shot, bench/runtime.py's masked model) —
   deployed dense vs the tuned runtime (gather, the path CUDA has) at batch 64, logits within 1e-4.

Median of 50 timed calls after 10 warm-up, synchronised. Needs only torch (and this repository).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def cuda_ms(fn, warmup: int = 10, runs: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def semi_structured() -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in ((512, 512), (11008, 4096)):
            w = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
            mask = torch.zeros_like(w, dtype=torch.bool).view(out_f, in_f // 4, 4)
            mask.scatter_(2, w.view(out_f, in_f // 4, 4).abs().topk(2, dim=2).indices, True)  # 2 of every 4
            w = w * mask.view(out_f, in_f)
            try:
                ws = to_sparse_semi_structured(w)
            except Exception as e:  # a GPU or build without it is a result
                rows.append({"dtype": str(dtype), "shape": [out_f, in_f], "failed": f"{type(e).__name__}: {e}"[:200]})
                continue
            for tokens in (64, 1024, 8192):
                x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
                ref = F.linear(x, w)
                got = F.linear(x, ws)
                dense_ms, sparse_ms = cuda_ms(lambda: F.linear(x, w)), cuda_ms(lambda: F.linear(x, ws))
                rows.append({"dtype": str(dtype), "shape": [out_f, in_f], "tokens": tokens,
                             "max_abs_diff": float((got.float() - ref.float()).abs().max()),
                             "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms})
    return rows


def codebook() -> dict:
    """A 512×512×3×3 conv weight, 2-bit codes in 64 groups (filter tiles of 8): codes + tables on the
    GPU, dequantized per call, vs fp32 and fp16 dense weights."""
    g = torch.Generator(device="cpu").manual_seed(0)
    cout, cin, groups, levels = 512, 512, 64, 4
    tables = torch.randn(groups, levels, generator=g)
    codes = torch.randint(0, levels, (cout, cin, 3, 3), generator=g, dtype=torch.uint8)
    group_of_filter = torch.arange(cout) // (cout // groups)
    w = tables[group_of_filter[:, None, None, None], codes.long()]
    x = torch.randn(64, cin, 4, 4, device="cuda")
    out = {}
    for name, build in (("fp32", lambda: w.cuda()), ("fp16", lambda: w.cuda().half()),
                        ("codes", lambda: (codes.cuda(), tables.cuda(), group_of_filter.cuda()))):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        held = build()
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated() - before
        if name == "codes":
            c, t, gf = held
            run = lambda: F.conv2d(x, t[gf[:, None, None, None], c.long()], padding=1)
        elif name == "fp16":
            xh = x.half()
            run = lambda: F.conv2d(xh, held, padding=1)
        else:
            run = lambda: F.conv2d(x, held, padding=1)
        ref = F.conv2d(x, w.cuda(), padding=1)
        out[name] = {"resident_bytes": resident, "ms": cuda_ms(run),
                     "max_abs_diff": float((run().float() - ref).abs().max())}
    out["codes_bytes_if_packed_2bit"] = codes.numel() // 4 + tables.numel() * 4
    return out


def runtime_vgg16() -> dict:
    import copy

    from bench.runtime import masked_model
    from elastictrain.deploy import shrink
    from elastictrain.deploy.export import fold_batchnorm
    from elastictrain.runtime import apply, autotune

    masked, _ = masked_model("vgg16", "vgg16-100x-kernel.yaml", 0)
    x = torch.randn(64, 3, 32, 32)
    small, _ = shrink(masked, x[:1])
    deployed = fold_batchnorm(small).eval().cuda()
    xc = x.cuda()
    tuning = autotune(deployed, xc)
    rt = apply(copy.deepcopy(deployed), tuning.choices())
    with torch.inference_mode():
        ref = masked.cuda()(xc)
        diff = float((rt(xc) - ref).abs().max())
        dense_ms = cuda_ms(lambda: masked(xc))
        deployed_ms, rt_ms = cuda_ms(lambda: deployed(xc)), cuda_ms(lambda: rt(xc))
    return {"dense_ms": dense_ms, "deployed_ms": deployed_ms, "runtime_ms": rt_ms, "max_abs_diff": diff,
            "choices": tuning.choices()}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_deploy: no CUDA device here")
    torch.backends.cudnn.benchmark = True
    t0 = time.time()
    cap = torch.cuda.get_device_capability()
    result = {"benchmark": "gpu-deploy", "gpu": torch.cuda.get_device_name(0), "capability": list(cap),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name, fn in (("semi_structured_2to4", semi_structured), ("codebook_conv", codebook),
                     ("runtime_vgg16_100x_kernel", runtime_vgg16)):
        if name == "semi_structured_2to4" and cap < (8, 0):
            result[name] = "skipped: needs sm80+"
            continue
        try:
            result[name] = fn()
        except Exception as e:  # one check failing must not lose the others' figures
            result[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        print(name, json.dumps(result[name])[:600], flush=True)
    result["seconds"] = time.time() - t0
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "gpu-deploy.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
