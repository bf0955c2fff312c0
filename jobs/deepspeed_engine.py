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
    clip = ds.gradient_clipping or clip
    if clip:
        cfg["gradient_clipping"] = clip
    return cfg  # no "bf16" / "fp16" section: see ``precision``


class DeepSpeedStepper:
    """``backward`` for every micro-batch, ``step`` once per optimizer step (``train_epoch``'s
    contract). DeepSpeed wants ``engine.step()`` after every micro-batch — between boundaries it
    only counts — so ``backward`` makes that call itself until the A-th micro-batch."""

    def __init__(self, engine, reducer=None):
        self.engine, self.reducer = engine, reducer
        self.accumulation = engine.gradient_accumulation_steps()

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)  # (DeepSpeed divides the loss by the accumulation steps itself)
        if not boundary:
            self.engine.step()
        elif self.reducer is not None:  # sparse-aware reduction replaces DeepSpeed's dense all-reduce
            self.reducer()

    def step(self) -> None:
        self.engine.step()

    def save(self, directory, rank: int = 0) -> None:
        """DeepSpeed's own checkpoint (a collective: every rank writes its ZeRO partition)."""
        self.engine.save_checkpoint(str(directory), tag="engine", save_latest=False)

    def load(self, directory) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint 'engine' to resume from")

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])


@torch.no_grad()
def remask_master(constrainer, zero_stage: int) -> None:
    """After a mask update: zero DeepSpeed's master weights and optimizer moments of pruned entries
    (ZeRO 1–2; under ZeRO 0 the constrainer's own masking suffices).

    Each rank masks its own fragment of the fp32 partition in place (``_hp_mapping`` says which
    slice of the flattened parameter it holds) — no collective. DeepSpeed's ``safe_get_full_*``
    would all-reduce per parameter, but skips that on ranks holding no fragment of it, so with
    small parameters the ranks' collectives fall out of step.
    """
    if zero_stage == 0:
        return
    if zero_stage == 3:
        return _remask_zero3(constrainer)
    for _, p, mask in constrainer.masked():  # the weights, and followers (coupled filter pruning)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue  # this rank holds no part of p's master copy
        addr = mapping.lp_fragment_address
        keep = mask.reshape(-1).narrow(0, addr.start, addr.numel)
        frag = mapping.get_hp_fragment()
        frag.mul_(keep.to(frag.dtype))
        for state in _optim_fragments(mapping, constrainer.optimizer):
            state.mul_(keep.to(state.dtype))


def _optim_fragments(mapping, optimizer) -> list[torch.Tensor]:
    """This rank's fragments of one parameter's optimizer states (ZeRO 1–2). DeepSpeed links them
    (``optim_fragment``) once, after the first param group's first step — before the second group
    (biases and norms: no weight decay) has any state — so for that group they are found here, in
    the state of the flat fp32 partition that holds the parameter's master fragment."""
    addr = mapping.hp_fragment_address
    linked = [s for s in (mapping.optim_fragment or {}).values()
              if isinstance(s, torch.Tensor) and s.numel() == addr.numel]
    if linked or optimizer is None:
        return linked
    ptr = mapping.hp_fragment.untyped_storage().data_ptr()
    for flat, state in optimizer.state.items():
        if isinstance(flat, torch.Tensor) and flat.untyped_storage().data_ptr() == ptr:
            return [s.narrow(0, addr.start, addr.numel) for s in state.values()
                    if isinstance(s, torch.Tensor) and s.shape == flat.shape]
    return []


def _remask_zero3(constrainer) -> None:
    """ZeRO-3: the rank's slice of the fp32 master partition and of every optimizer state."""
    for n, p in constrainer.params.items():
        z3 = p._z3_optimizer
        group, offset, _ = z3.grad_position[z3.get_param_id(p)]
        values, start = constrainer.layout.local(n)
        keep = constrainer.masks[n].reshape(-1).narrow(0, start, values.numel())
        flat = z3.fp32_partitioned_groups_flat[group]
        flat.data.narrow(0, offset, keep.numel()).mul_(keep.to(flat.dtype))
        for state in z3.optimizer.state.get(flat, {}).values():
            if isinstance(state, torch.Tensor) and state.numel() == flat.numel():
                state.narrow(0, offset, keep.numel()).mul_(keep.to(state.dtype))


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


def safe_checkpoint_engine(engine) -> None:
    """DeepSpeed reads its checkpoints with ``torch.load(weights_only=False)`` — unpickling that
    can run code from a tampered file on shared storage. Swap in an engine that loads with
    ``weights_only=True``; the classes its files need beyond plain containers — the loss scaler,
    the ZeRO stage enum and a fragment's (start, numel) address, records of numbers — are
    allow-listed by name (``torch.serialization.get_unsafe_globals_in_checkpoint`` lists them)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = WeightsOnly(engine._config)


def initialize(ds: DeepSpeedConfig, model, opt, sched, constrainer, batch_per_rank: int, world_size: int,
               clip: Optional[float] = None, accumulation: int = 1):
    """Wrap the model, optimizer and LR schedule in a DeepSpeed engine; under ZeRO-3 the
    constrainer is switched to the slices, and with ``sparse_reduce`` gradients are reduced by
    mask. Returns (engine, stepper)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                          config=ds_config(ds, batch_per_rank, world_size, clip, accumulation))
    safe_checkpoint_engine(engine)  # once, before anything can be saved or loaded
    reducer = None
    if constrainer is not None:
        if ds.zero_stage == 3:
            constrainer.use_layout(zero3_layout(engine, constrainer))
        if ds.sparse_reduce:
            reducer = sparse_reducer(engine, constrainer)
    return engine, DeepSpeedStepper(engine, reducer)


def sparse_reducer(engine, constrainer):
    """ZeRO 0: all-reduce only the kept entries of masked gradients (one packed buffer per step)."""
    from elastictrain.distributed import SparseReducer

    engine.enable_backward_allreduce = False
    params = dict(engine.module.named_parameters())
    state = {"reducer": None, "masks_id": None}

    def reduce() -> None:
        key = id(constrainer.masks), constrainer.stats["mask_updates"]
        if state["masks_id"] != key:  # masks changed: rebuild the packing indices
            state["reducer"] = SparseReducer(dict(constrainer.masks), params)
            state["masks_id"] = key
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        state["reducer"].all_reduce_(grads)

    return reduce
