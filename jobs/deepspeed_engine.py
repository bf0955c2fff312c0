"""A DeepSpeed engine per worker: the JSON config generated from the cluster config, a stepper for
the training loop, and the re-masking that keeps DeepSpeed's master weights on the constraint masks
(``DeepSpeedBackend`` in ``jobs.backend`` calls it after every mask update).

Why re-mask: under ZeRO 1–3 the optimizer updates its own fp32 master copy and writes it back
into the model's parameters after every step. Zeroing a parameter is therefore not enough when a
mask changes — the master copy (and the optimizer's moments) of newly pruned weights are zeroed
in each rank's own fragment of the partition. Between
mask changes the constrainer's gradient hooks zero pruned gradients before DeepSpeed reduces them,
so master values stay 0.

Under ZeRO-3 a parameter's data is empty outside forward/backward; each rank holds a flat slice
(``ds_tensor``). The constrainer is switched to a sharded layout over those slices
(``zero3_layout``): it projects without gathering weights and writes quantized values for QAT into
the slices, which the next forward gathers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from jobs.cluster import DeepSpeedConfig


def precision(ds: DeepSpeedConfig, device: torch.device) -> str:
    """"bf16" or "fp32". bf16 means ``torch.autocast`` compute over fp32 weights, not DeepSpeed's
    bf16 engine: that one keeps bf16 model weights (fp32 only in the optimizer's master copy), so
    every quantized value written for QAT and every baked codebook value would be rounded to bf16 —
    the compressed model would no longer hold its own codebook. Autocast gives the bf16 matmuls
    and keeps weights, masks and codebooks exact; the price is fp32 gradient reduction."""
    if ds.precision != "auto":
        return ds.precision
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_dtype(ds: DeepSpeedConfig, device: torch.device):
    return torch.bfloat16 if precision(ds, device) == "bf16" else None


def ds_config(ds: DeepSpeedConfig, batch_per_rank: int, world_size: int, clip: Optional[float] = None,
              accumulation: int = 1) -> dict:
    """The DeepSpeed JSON for one stage (``clip``: the stage optimizer's gradient clipping;
    ``accumulation``: the cluster's micro-batches per step) — never kept by hand."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # every parameter partitioned: a "persistent" (unpartitioned) small parameter would keep a
        # whole copy that the constrainer's writes into the slices do not reach
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    cfg = {
        "train_micro_batch_size_per_gpu": batch_per_rank,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": batch_per_rank * accumulation * world_size,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # our optimizers are torch's own SGD / AdamW (DeepSpeed's fused Adam JIT-compiles for
        # minutes on CPU); ZeRO partitions their state like any other
        "zero_allow_untested_optimizer": True,
    }
    # always said: DeepSpeed's own default is 1.0, which would clip every step of a stage that
    # asked for no clipping (and that a single process, on the same recipe, does not clip)
    cfg["gradient_clipping"] = float(ds.gradient_clipping or clip or 0.0)
    return cfg  # no "bf16" / "fp16" section: see ``precision``


class DeepSpeedStepper:
    """``backward`` for every micro-batch, ``step`` once per optimizer step (``train_epoch``'s
    contract). DeepSpeed wants ``engine.step()`` after every micro-batch — between boundaries it
    only counts — so ``backward`` makes that call itself until the A-th micro-batch."""

    def __init__(self, engine, zero: int, params: list, groups: list[list[int]], reducer=None, transport=None):
        self.engine, self.zero, self.params, self.groups, self.reducer = engine, zero, params, groups, reducer
        self.transport = transport  # the shared-memory all-reduce (float32 CPU buffers), or None
        self.accumulation = engine.gradient_accumulation_steps()

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)  # (DeepSpeed divides the loss by the accumulation steps itself)
        if not boundary:
            self.engine.step()
        elif self.reducer is not None:  # our all-reduce (sparse-aware / shared memory) replaces DeepSpeed's
            self.reducer()

    def step(self) -> None:
        self.engine.step()

    def save(self, directory, rank: int = 0) -> None:
        """The whole state, as one process would save it (``jobs.portable_state``; a collective)."""
        from elastictrain.checkpoint import atomic_save
        from jobs.portable_state import save_state

        module = self.engine.module
        model = gathered_state_dict(module) if self.zero == 3 else {
            k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        state = save_state(self.engine, self.zero, self.params, self.groups, model, self.engine.lr_scheduler)
        if rank == 0:
            atomic_save(state, Path(directory) / "engine.pt")

    def load(self, directory) -> None:
        from elastictrain.checkpoint import load
        from jobs.portable_state import load_state

        load_state(self.engine, self.zero, self.params, load(Path(directory) / "engine.pt"), self.engine.lr_scheduler)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])


@torch.no_grad()
def remask_master(constrainer, zero_stage: int) -> None:
    """After a mask update: zero DeepSpeed's master weights and optimizer moments of pruned entries
    (ZeRO 1–3; under ZeRO 0 the constrainer's own masking suffices).

    Each rank masks its own fragment of the fp32 partition in place (``portable_state.fragments``
    says which elements of the flattened parameter it holds) — no collective. DeepSpeed's
    ``safe_get_full_*`` would all-reduce per parameter, but skips that on ranks holding no fragment
    of it, so with small parameters the ranks' collectives fall out of step.
    """
    from jobs.portable_state import base_optimizer, fragments, moment_keys

    if zero_stage == 0:
        return
    if zero_stage == 3:  # the weights' slices (followers are not sharded separately)
        pairs = [(p, constrainer.masks[n]) for n, p in constrainer.params.items()]
        opt = next(iter(constrainer.params.values()))._z3_optimizer.optimizer
    else:  # the weights, and followers (coupled filter pruning)
        pairs = [(p, mask) for _, p, mask in constrainer.masked()]
        opt = base_optimizer(constrainer.optimizer)
    keys = moment_keys(opt)
    for (_, mask), f in zip(pairs, fragments(opt, zero_stage, [p for p, _ in pairs])):
        if f is None:
            continue  # this rank holds no part of this parameter's master copy
        keep = mask.reshape(-1).narrow(0, f.start, f.numel)
        f.master.mul_(keep.to(f.master.dtype))
        for key in keys:
            moment = f.moment(opt, key, create=False)
            if moment is not None:
                moment.mul_(keep.to(moment.dtype))


def zero3_layout(engine, constrainer):
    """The constrainer's view of ZeRO-3: rank r holds elements [r·P, r·P + P) of each flattened
    weight, P = ``ds_tensor.ds_numel`` (the last slice padded; the padding is left out)."""
    import torch.distributed as dist

    from elastictrain.distributed.shards import Shard
    from elastictrain.train.layout import Sharded

    params = constrainer.params

    def local(n: str) -> Shard:
        p = params[n]
        P = p.ds_tensor.ds_numel
        start = P * dist.get_rank(group=p.ds_process_group)
        valid = max(0, min(P, p.ds_numel - start))
        return Shard(p.ds_tensor.data.view(-1).narrow(0, 0, valid), start, tuple(p.ds_shape))

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    every = list(engine.module.parameters())

    def release() -> None:  # a forward without grad (evaluation) leaves whole copies gathered
        if any(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in every):
            engine.optimizer.empty_partition_cache()

    return Sharded(local, release=release)


def gathered_state_dict(model) -> dict:
    """The whole model's state on every rank (ZeRO-3 gathers each partitioned parameter)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def initialize(ds: DeepSpeedConfig, model, opt, sched, constrainer, batch_per_rank: int, world_size: int,
               clip: Optional[float] = None, accumulation: int = 1):
    """Wrap the model, optimizer and LR schedule in a DeepSpeed engine; under ZeRO-3 the
    constrainer is switched to the slices. Under ZeRO-0 our own all-reduce replaces DeepSpeed's
    where it does better: by mask (``sparse_reduce``), through shared memory (``shared_memory``),
    or both. Returns (engine, stepper)."""
    import deepspeed

    params = [p for g in opt.param_groups for p in g["params"]]  # the optimizer's order (its state's keys)
    sizes = [len(g["params"]) for g in opt.param_groups]
    groups = [list(range(sum(sizes[:i]), sum(sizes[:i + 1]))) for i in range(len(sizes))]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                          config=ds_config(ds, batch_per_rank, world_size, clip, accumulation))
    if constrainer is not None and ds.zero_stage == 3:
        constrainer.use_layout(zero3_layout(engine, constrainer))
    reducer = None
    if ds.zero_stage == 0 and world_size == 1:
        engine.enable_backward_allreduce = False  # (DeepSpeed would all-reduce over a group of one)
    shm = shared_memory(ds, engine)
    transport = shm.all_reduce_ if shm is not None else None
    if ds.zero_stage == 0 and (shm is not None or (ds.sparse_reduce and constrainer is not None)):
        reducer = gradient_reducer(engine, constrainer if ds.sparse_reduce else None, transport)
    return engine, DeepSpeedStepper(engine, ds.zero_stage, params, groups, reducer, transport)


def shared_memory(ds: DeepSpeedConfig, engine):
    """The shared-memory all-reduce when ``ds.shared_memory`` asks for it and the ranks allow it
    (ZeRO 0, CPU, every rank on this host by ``LOCAL_WORLD_SIZE``, which Ray Train and torchrun
    set); else None. ``true`` where the ranks do not allow it is an error."""
    from elastictrain.distributed.shm import SharedMemoryAllReduce, usable

    if ds.shared_memory is False or ds.zero_stage != 0 or engine.device.type != "cpu":
        return None
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if not usable(int(local) if local and local.isdigit() else None):
        if ds.shared_memory is True:
            raise RuntimeError("deepspeed.shared_memory: true, but the ranks are not all on one x86 host "
                               f"(LOCAL_WORLD_SIZE={local}); set it to auto or false")
        return None
    numel = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    print(f"gradients: summed in shared memory by the {local} ranks of this host", flush=True)  # (the rank's log)
    return SharedMemoryAllReduce(numel)


def gradient_reducer(engine, constrainer=None, transport=None):
    """ZeRO 0: our all-reduce replaces DeepSpeed's, once per optimizer step — all gradients in one
    buffer through ``transport`` (shared memory), and with a constrainer (``sparse_reduce``) only
    the kept entries of masked gradients."""
    from elastictrain.distributed import SparseReducer

    engine.enable_backward_allreduce = False
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    state = {"reducer": None, "masks_id": None}

    def reduce() -> None:
        key = (id(constrainer.masks), constrainer.stats["mask_updates"]) if constrainer is not None else None
        if state["reducer"] is None or state["masks_id"] != key:  # masks changed: rebuild the packing indices
            masks = dict(constrainer.masks) if constrainer is not None else {}
            state["reducer"] = SparseReducer(masks, params, transport=transport)
            state["masks_id"] = key
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        state["reducer"].all_reduce_(grads)

    return reduce
