"""Constrained training on DeepSpeed engines — ZeRO-3 and bf16 — on two gloo ranks (each a DeepSpeed engine built as
a Ray Train worker builds it; Ray itself is exercised in test_ray.py).

Checked against references computed from the *gathered* weights: a mask update on the slices
equals ``projection.project`` on the whole weights; pruned weights stay exactly 0 through further
steps (DeepSpeed's fp32 master slices and momentum were re-masked); the quantized forward sees
only codebook values; every rank ends with the same masks and codebooks, and the gathered
result passes ``verify``. ``precision: bf16`` computes in bf16 over fp32 weights (ZeRO 2 and 3).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dist import run2

from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import load
from elastictrain.train import (  # (no DeepSpeed behind these: safe before a worker sets its environment)
    Constrainer,
    DistillConfig,
    EnforceConfig,
    Hooks,
    LRConfig,
    OptimConfig,
    Teacher,
    build_optimizer,
    build_scheduler,
    train_epoch,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "configs/specs/smallcnn-zero3-mixture.yaml"


def _worker(rank: int, world: int, spec: str):
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    import deepspeed  # noqa: F401  (DeepSpeed's accelerator set up before the model is built)
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    from elastictrain.constraints.projection import project
    from elastictrain.constraints.schedule import plans_at
    from elastictrain.constraints.verify import verify
    from elastictrain.models import build_model
    from jobs.backend import DeepSpeedBackend
    from jobs.cluster import DeepSpeedConfig
    from jobs.deepspeed_engine import gathered_state_dict

    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1)
    plans = resolve(load(spec), {n: tuple(p.shape) for n, p in model.named_parameters()})
    opt = build_optimizer(model, OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4))
    sched = build_scheduler(opt, LRConfig(name="constant"), 8, 3)
    c = Constrainer(dict(model.named_parameters()), plans,
                    EnforceConfig(method="progressive", update_every=3, end=0.5), 24)
    backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=3), rank, world, torch.device("cpu"))
    engine, stepper = backend.engine(model, opt, sched, c, batch_per_rank=16, clip=None)
    synced = Hooks(on_update=lambda event: backend.after_update(c, event))  # re-mask + rank check
    for event in c.begin(opt):
        backend.after_update(c, event)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of the data
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]
    out = {"sharded": c.layout.sharded, "shape_outside_forward": tuple(next(iter(c.params.values())).shape)}

    train_epoch(engine, batches, stepper, c, synced)  # progressive updates at steps 3 and 6 (rank-checked)
    whole = gathered_state_dict(model)
    backend.after_update(c, c.update_masks(0.8))  # on the slices ...
    _, ref = project({n: whole[n] for n in plans}, plans_at(plans, 0.8))  # ... vs the gathered weights
    out["update_matches_gathered"] = {n: bool(torch.equal(c.masks[n], ref[n].mask & c.base_masks[n])) for n in plans}

    train_epoch(engine, batches, stepper, c, synced)  # masks final from step 12; codebooks refit every 50
    whole = gathered_state_dict(model)
    out["revived"] = {n: int((whole[n] != 0).logical_and(~c.masks[n]).sum()) for n in plans}
    master = {}  # this rank's slice of DeepSpeed's fp32 master copy and of SGD's momentum
    for n in plans:
        _, start = c.layout.local(n)
        m32, mom = (safe_get_local_fp32_param(c.params[n]),
                    safe_get_local_optimizer_state(c.params[n], "momentum_buffer"))
        pruned = ~c.masks[n].reshape(-1)[start:start + m32.numel()]
        master[n] = int((m32[:pruned.numel()][pruned] != 0).sum() + (mom[:pruned.numel()][pruned] != 0).sum())
    out["master_revived"] = master

    x = batches[0][0]
    with torch.no_grad():  # a forward outside the engine's training path leaves whole copies gathered
        model.eval()
        latent_logits = model(x)
        with c.effective():
            quant_logits = model(x)
            eff = gathered_state_dict(model)
        again_logits = model(x)
    out["quantized_forward_differs"] = not torch.equal(quant_logits, latent_logits)
    out["latent_forward_restored"] = torch.equal(again_logits, latent_logits)
    out["effective_violations"] = [str(v) for v in verify(plans, {n: eff[n] for n in plans})]
    after = gathered_state_dict(model)
    out["latent_restored"] = all(torch.equal(after[n], whole[n]) for n in plans)

    train_epoch(engine, batches, stepper, c, synced)
    states = c.finish()
    final = gathered_state_dict(model)
    out["final_violations"] = [str(v) for v in verify(plans, {n: final[n] for n in plans})]
    out["masks"] = {n: s.mask.numpy() for n, s in states.items()}
    out["books"] = {n: s.codebook.numpy() for n, s in states.items() if s.codebook is not None}
    out["checksum"] = c.checksum()
    out["density"] = sum(int(m.sum()) for m in c.masks.values()) / sum(m.numel() for m in c.masks.values())
    with torch.no_grad():  # the engine's own forward works on what finish() wrote into the slices
        engine.eval()
        out["logits_finite"] = bool(engine(batches[0][0]).isfinite().all())
    return out


def test_zero3_constrained_training_on_two_ranks(tmp_path):
    r0, r1 = run2(tmp_path, _worker, str(SPEC))
    for r in (r0, r1):
        assert r["sharded"] and r["shape_outside_forward"] == (0,)  # ZeRO-3 really partitioned the weights
        assert all(r["update_matches_gathered"].values()), r["update_matches_gathered"]
        assert r["revived"] == {n: 0 for n in r["revived"]}
        assert r["master_revived"] == {n: 0 for n in r["master_revived"]}
        assert r["quantized_forward_differs"] and r["latent_forward_restored"]
        assert r["effective_violations"] == [] and r["latent_restored"]
        assert r["final_violations"] == []
        assert r["logits_finite"]
    assert r0["checksum"] == r1["checksum"]
    for n in r0["masks"]:
        assert np.array_equal(r0["masks"][n], r1["masks"][n])
    for n in r0["books"]:
        assert np.array_equal(r0["books"][n], r1["books"][n])
    assert 0.01 < r0["density"] < 0.05  # 64× on 97% of the weights


def _bf16_worker(rank: int, world: int, spec: str, zero: int):
    """precision: bf16 — autocast compute over fp32 weights, QAT included."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    from elastictrain.constraints.verify import verify
    from elastictrain.models import build_model
    from jobs.backend import DeepSpeedBackend
    from jobs.cluster import DeepSpeedConfig
    from jobs.deepspeed_engine import autocast_dtype, gathered_state_dict

    ds = DeepSpeedConfig(zero_stage=zero, precision="bf16")
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1)
    plans = resolve(load(spec), {n: tuple(p.shape) for n, p in model.named_parameters()})
    opt = build_optimizer(model, OptimConfig(lr=0.05))
    c = Constrainer(dict(model.named_parameters()), plans, EnforceConfig(method="fixed", refit_every=3), 8)
    backend = DeepSpeedBackend(ds, rank, world, torch.device("cpu"))
    engine, stepper = backend.engine(model, opt, build_scheduler(opt, LRConfig(name="constant"), 8, 1), c,
                                     batch_per_rank=16, clip=None)
    for event in c.begin(opt):
        backend.after_update(c, event)
    g = torch.Generator().manual_seed(7 + rank)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]
    dtype = autocast_dtype(ds, torch.device("cpu"))
    m = train_epoch(engine, batches, stepper, c, Hooks(on_update=lambda e: backend.after_update(c, e)), dtype)
    with torch.autocast("cpu", dtype=dtype):
        logits = engine(batches[0][0])
    c.finish()
    sd = gathered_state_dict(model) if zero == 3 else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"autocast": str(dtype), "logits": str(logits.dtype),
            "weights": sorted({str(v.dtype) for v in sd.values() if v.is_floating_point()}),
            "loss_finite": bool(np.isfinite(m["loss"])), "refits": c.stats["codebook_refits"],
            "violations": [str(v) for v in verify(plans, {n: sd[n] for n in plans})], "checksum": c.checksum()}


def test_bf16_autocast_over_fp32_weights(tmp_path):
    """bf16 compute, fp32 weights: the baked codebook values are exact, so verify passes."""
    for zero in (2, 3):
        r0, r1 = run2(tmp_path / f"z{zero}", _bf16_worker, str(SPEC), zero)
        for r in (r0, r1):
            assert r["autocast"] == "torch.bfloat16" and r["logits"] == "torch.bfloat16"
            assert r["weights"] == ["torch.float32"] and r["loss_finite"] and r["refits"] >= 2
            assert r["violations"] == []
        assert r0["checksum"] == r1["checksum"]


def _adversarial_worker(rank: int, world: int, spec: str, zero: int):
    """Adversarial training through a DeepSpeed engine: each rank attacks its own shard, and distils
    from a frozen teacher (a whole replica per rank, outside the engine) on the same, attacked batch."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    from elastictrain.constraints.verify import verify
    from elastictrain.models import build_model
    from elastictrain.train.attacks import AttackConfig, attack, robust_accuracy
    from jobs.backend import DeepSpeedBackend
    from jobs.cluster import DeepSpeedConfig
    from jobs.deepspeed_engine import gathered_state_dict

    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1)
    teacher_net = build_model("smallcnn", num_classes=10, in_channels=1)
    teacher_net.load_state_dict(model.state_dict())
    teacher_before = {k: v.clone() for k, v in teacher_net.state_dict().items()}
    rows_taught = []
    teacher_net.register_forward_hook(lambda mod, inp, out: rows_taught.append(inp[0].shape[0]))
    plans = resolve(load(spec), {n: tuple(p.shape) for n, p in model.named_parameters()})
    opt = build_optimizer(model, OptimConfig(lr=0.05))
    c = Constrainer(dict(model.named_parameters()), plans, EnforceConfig(method="fixed", refit_every=3), 6)
    backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=zero), rank, world, torch.device("cpu"))
    engine, stepper = backend.engine(model, opt, build_scheduler(opt, LRConfig(name="constant"), 6, 1), c,
                                     batch_per_rank=16, clip=None)
    for event in c.begin(opt):
        backend.after_update(c, event)
    g = torch.Generator().manual_seed(11 + rank)
    mean, std = (0.3,), (0.35,)  # batches arrive normalized, as the loader makes them
    batches = [((torch.rand(16, 1, 28, 28, generator=g) - mean[0]) / std[0], torch.randint(0, 10, (16,), generator=g))
               for _ in range(6)]
    fgsm = AttackConfig(kind="fgsm", eps=0.1)
    seen = []

    def adv(m, x, y):
        x_adv = attack(model, x, y, fgsm, mean, std)  # the module, not the engine (see pipeline.stage)
        seen.append(float((x_adv - x).abs().max() * std[0]))  # the largest pixel change
        return x_adv

    teacher = Teacher(teacher_net, DistillConfig(teacher="dense", alpha=0.5, temperature=4.0))
    m = train_epoch(engine, batches, stepper, c, Hooks(adversarial=adv, adv_beta=0.5, teacher=teacher,
                                                       on_update=lambda e: backend.after_update(c, e)))
    r = robust_accuracy(model, batches[:2], AttackConfig(kind="pgd", steps=3, eps=0.1, alpha=0.03), mean, std)
    c.finish()
    sd = gathered_state_dict(model) if zero == 3 else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"steps": m["steps"], "loss_finite": bool(np.isfinite(m["loss"])), "max_change": max(seen),
            "robust_images": r["images"], "violations": [str(v) for v in verify(plans, {n: sd[n] for n in plans})],
            "checksum": c.checksum(), "rows_taught": rows_taught,
            "teacher_unchanged": all(torch.equal(teacher_before[k], v) for k, v in teacher_net.state_dict().items())}


def test_adversarial_training_through_deepspeed_engines(tmp_path):
    for zero in (2, 3):
        r0, r1 = run2(tmp_path / f"adv{zero}", _adversarial_worker, str(SPEC), zero)
        for r in (r0, r1):
            assert r["steps"] == 6 and r["loss_finite"] and r["robust_images"] == 32
            assert 0.09 < r["max_change"] <= 0.1 + 1e-5  # FGSM moved pixels by up to ε
            assert r["violations"] == []
            assert r["rows_taught"] == [32] * 6 and r["teacher_unchanged"]  # clean + attacked rows, frozen
        assert r0["checksum"] == r1["checksum"]


def _resume_worker(rank: int, world: int, spec: str, zero: int, where: str):
    """Train 2 epochs; separately, a fresh engine loads the point saved after epoch 1 and trains
    epoch 2 again: the weights (gathered), masks and codebooks must come out bit-identical."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    import torch.distributed as dist

    from elastictrain.models import build_model
    from jobs.backend import DeepSpeedBackend
    from jobs.cluster import DeepSpeedConfig
    from jobs.deepspeed_engine import gathered_state_dict
    from pipeline import resume

    g = torch.Generator().manual_seed(7 + rank)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]

    def fresh():
        torch.manual_seed(0)
        model = build_model("smallcnn", num_classes=10, in_channels=1)
        plans = resolve(load(spec), {n: tuple(p.shape) for n, p in model.named_parameters()})
        opt = build_optimizer(model, OptimConfig(lr=0.05, momentum=0.9))
        sched = build_scheduler(opt, LRConfig(name="cosine"), 4, 2)
        c = Constrainer(dict(model.named_parameters()), plans,
                        EnforceConfig(method="progressive", update_every=2, end=0.6), 8)
        backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=zero), rank, world, torch.device("cpu"))
        engine, stepper = backend.engine(model, opt, sched, c, batch_per_rank=16, clip=None)
        hooks = Hooks(on_update=lambda e: backend.after_update(c, e))
        return model, c, engine, stepper, hooks, backend

    model, c, engine, stepper, hooks, backend = fresh()
    for event in c.begin(engine.optimizer):
        backend.after_update(c, event)
    train_epoch(engine, batches, stepper, c, hooks)
    state = {"constrainer": c.state_dict(), "history": [], "rng": resume.rng_state(), "checksum": c.checksum()}
    resume.save_point(Path(where), 1, stepper, state, {"t": 1}, rank, dist.barrier)
    train_epoch(engine, batches, stepper, c, hooks)
    straight = gathered_state_dict(model)
    straight_sum = c.checksum()

    model, c, engine, stepper, hooks, backend = fresh()
    at, manifest = resume.find_point(Path(where), {"t": 1})
    stepper.load(at)
    saved = resume.load_state(at)
    c.resume(saved["constrainer"])
    resume.set_rng_state(saved["rng"])  # (SmallCNN has dropout)
    restored_sum = c.checksum()
    c.begin(engine.optimizer)  # (resumed: no update at begin)
    train_epoch(engine, batches, stepper, c, hooks)
    again = gathered_state_dict(model)
    return {"restored_equals_saved": restored_sum == manifest["checksum"], "same_final": straight_sum == c.checksum(),
            # parameters on every rank; buffers (BN running statistics) as rank 0 keeps them: DeepSpeed
            # saves rank 0's module state once and never syncs buffers, so other ranks' drift
            "params_equal": all(torch.equal(straight[k], again[k]) for k, _ in model.named_parameters()),
            "buffers_equal": all(torch.equal(straight[k], again[k]) for k, _ in model.named_buffers()),
            "lr": stepper.lr}


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_point_restores_deepspeed_training_exactly(tmp_path, zero):
    r0, r1 = run2(tmp_path / f"z{zero}", _resume_worker, str(SPEC), zero, str(tmp_path / f"z{zero}" / "stage"))
    for r in (r0, r1):
        assert r["restored_equals_saved"] and r["same_final"] and r["params_equal"], r
    assert r0["buffers_equal"]


def _plain_step_worker(rank: int, world: int, zero: int):
    """A dense LeNet-5 (no BatchNorm: two halves of a batch train like the whole) on two DeepSpeed
    ranks with the stage asking for no clipping; LOCAL_WORLD_SIZE says both ranks share this host,
    so under ZeRO-0 the gradients go through shared memory."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    from elastictrain.models import build_model
    from jobs.backend import DeepSpeedBackend
    from jobs.cluster import DeepSpeedConfig

    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1)
    opt = build_optimizer(model, OptimConfig(lr=0.01, momentum=0.9))
    backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=zero), rank, world, torch.device("cpu"))
    engine, stepper = backend.engine(model, opt, build_scheduler(opt, LRConfig(name="constant"), 3, 1), None,
                                     batch_per_rank=16, clip=None)
    for x, y in _plain_batches()[rank::world]:
        stepper.backward(torch.nn.functional.cross_entropy(engine(x), y))
        stepper.step()
    return {"shm": backend.transport is not None, "finite": backend.all_finite(1.0),
            "weights": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}}


def _plain_batches() -> list:
    """Three steps of 32 images as six halves of 16 (step s: halves 2s and 2s + 1), pixel values
    large enough that the gradient's norm is far above 1."""
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 1, 28, 28, generator=g) * 30, torch.randint(0, 10, (16,), generator=g)) for _ in range(6)]


def test_deepspeed_ranks_train_like_one_process_without_clipping(tmp_path):
    """DeepSpeed clips every step at norm 1.0 unless told otherwise; a stage without
    ``clip_grad_norm`` must not be clipped on any cluster. Plain torch on the whole batches is the
    reference; its first gradient's norm is checked to be well above 1, so clipping would show."""
    from elastictrain.models import build_model

    torch.manual_seed(0)
    ref = build_model("lenet5", num_classes=10, in_channels=1)
    opt = build_optimizer(ref, OptimConfig(lr=0.01, momentum=0.9))
    halves = _plain_batches()
    norms = []
    for s in range(3):
        x, y = (torch.cat(t) for t in zip(*halves[2 * s:2 * s + 2]))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])))
        opt.step()
    assert norms[0] > 5, norms
    for zero in (0, 2):
        for r in run2(tmp_path / f"z{zero}", _plain_step_worker, zero):
            assert r["shm"] == (zero == 0) and r["finite"]
            for k, v in ref.state_dict().items():
                np.testing.assert_allclose(r["weights"][k], v.numpy(), atol=2e-5, err_msg=f"ZeRO-{zero} {k}")
