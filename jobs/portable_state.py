"""A DeepSpeed engine's training state in a form that does not depend on the world size.

A resume point holds what a plain PyTorch run would save — ``{"model": state_dict, "optimizer":
Optimizer.state_dict(), "scheduler": ...}`` in one ``engine.pt`` — whatever wrote it: one process
(``TorchStepper``), or W DeepSpeed ranks under ZeRO 0–3. So a stage killed on 8 workers continues on
6, or on one process, and grows back (``pipeline.stage`` keeps the global batch with gradient
accumulation).

Saving (a collective; rank 0 writes): under ZeRO 1–2 each rank holds a fragment of every fp32
master weight and optimizer moment (``_hp_mapping`` says which elements); under ZeRO-3 a slice of
each parameter (``grad_position`` says where in which flat sub-group). Each rank writes its
fragments into zero-filled whole tensors and one all-reduce (sum) of a single buffer assembles them
— every rank makes the same calls, whatever it holds. Loading: every rank reads the whole state and
copies out its own fragments; optimizer state that a fresh engine has not created yet is created.
Under ZeRO 0 the optimizer is the plain one and the state is its own ``state_dict``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

MOMENTS = {torch.optim.SGD: ("momentum_buffer",), torch.optim.AdamW: ("exp_avg", "exp_avg_sq"),
           torch.optim.Adam: ("exp_avg", "exp_avg_sq")}


def base_optimizer(opt) -> torch.optim.Optimizer:
    """The torch optimizer inside ``opt`` (ZeRO wraps it; its param groups are then flat fp32 partitions)."""
    return getattr(opt, "optimizer", opt)


def moment_keys(opt: torch.optim.Optimizer) -> tuple[str, ...]:
    kind = next((k for k in MOMENTS if type(opt) is k), None)
    if kind is None:
        raise TypeError(f"resume points: no portable state for {type(opt).__name__} (SGD, Adam, AdamW)")
    if kind is torch.optim.SGD and not any(g.get("momentum", 0) for g in opt.param_groups):
        return ()
    return MOMENTS[kind]


class Fragment:
    """Where one parameter's elements [start, start + numel) live on this rank: the fp32 master
    and each optimizer moment (views), and the flat tensor whose optimizer state holds them."""

    def __init__(self, start: int, numel: int, master: torch.Tensor, flat: torch.Tensor, offset: int):
        self.start, self.numel, self.master, self.flat, self.offset = start, numel, master, flat, offset

    def moment(self, opt, key: str, create: bool) -> Optional[torch.Tensor]:
        state = opt.state[self.flat]
        if key not in state:
            if not create:
                return None
            state[key] = torch.zeros_like(self.flat)
        return state[key].narrow(0, self.offset, self.numel)


def fragments(opt, zero: int, params: list[torch.nn.Parameter]) -> list[Optional[Fragment]]:
    """This rank's fragment of each parameter under ZeRO 1–3 (None: it holds none). ``opt``: the
    engine's optimizer or the torch optimizer inside it."""
    out = []
    for p in params:
        if zero == 3:
            z3 = p._z3_optimizer
            group, offset, _ = z3.grad_position[z3.get_param_id(p)]
            P = p.ds_tensor.ds_numel
            start = P * dist.get_rank(group=p.ds_process_group)
            numel = max(0, min(P, p.ds_numel - start))
            flat = z3.fp32_partitioned_groups_flat[group]
            out.append(Fragment(start, numel, flat.narrow(0, offset, numel), flat, offset) if numel else None)
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            out.append(None)
            continue
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        ptr = mapping.hp_fragment.untyped_storage().data_ptr()  # the flat fp32 partition holding it
        flat = next(q for g in base_optimizer(opt).param_groups for q in g["params"]
                    if q.untyped_storage().data_ptr() == ptr)
        out.append(Fragment(lp.start, lp.numel, mapping.get_hp_fragment(), flat, hp.start))
    return out


def save_state(engine, zero: int, params: list[torch.nn.Parameter], groups: list[list[int]], model_state: dict,
               scheduler) -> dict:
    """The whole training state (a collective under ZeRO 1–3: every rank calls it; all get it)."""
    opt = base_optimizer(engine.optimizer)
    if zero == 0:
        return {"model": model_state, "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}
    keys = moment_keys(opt)
    frags = fragments(opt, zero, params)
    sizes = [p.ds_numel if zero == 3 else p.numel() for p in params]
    buf = torch.zeros(sum(sizes) * (1 + len(keys)), dtype=torch.float32, device=engine.device)
    at = 0
    for f, n in zip(frags, sizes):
        for k, src in enumerate([f.master if f else None] + [f.moment(opt, key, False) if f else None for key in keys]):
            if src is not None:
                buf.narrow(0, at + k * n + f.start, f.numel).copy_(src)
        at += n * (1 + len(keys))
    dist.all_reduce(buf)
    step = next((s["step"] for s in opt.state.values() if "step" in s), None)
    names = {id(q): k for k, q in engine.module.named_parameters()}
    state, at = {}, 0
    for i, (p, n) in enumerate(zip(params, sizes)):
        shape = tuple(p.ds_shape) if zero == 3 else tuple(p.shape)
        whole = [buf.narrow(0, at + k * n, n).view(shape).cpu().clone() for k in range(1 + len(keys))]
        model_state[names[id(p)]] = whole[0]  # the fp32 master is the weight
        state[i] = {key: t for key, t in zip(keys, whole[1:])}
        if step is not None:
            state[i]["step"] = step.detach().cpu().clone()
        at += n * (1 + len(keys))
    param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": idx}
                    for g, idx in zip(opt.param_groups, groups)]
    return {"model": model_state, "optimizer": {"state": state, "param_groups": param_groups},
            "scheduler": scheduler.state_dict()}


@torch.no_grad()
def load_state(engine, zero: int, params: list[torch.nn.Parameter], saved: dict, scheduler) -> None:
    """Restore ``saved`` (as ``save_state`` or a plain PyTorch run wrote it) into this rank's engine."""
    opt = base_optimizer(engine.optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    if zero == 0:
        engine.module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        return
    names = {id(q): k for k, q in engine.module.named_parameters()}
    if zero == 3:  # parameters are slices: buffers directly, each parameter's slice below
        buffers = {k for k, _ in engine.module.named_buffers()}
        engine.module.load_state_dict({k: v for k, v in saved["model"].items() if k in buffers}, strict=False)
    else:
        engine.module.load_state_dict(saved["model"])
    keys = moment_keys(opt)
    state = saved["optimizer"]["state"]
    for i, (p, f) in enumerate(zip(params, fragments(opt, zero, params))):
        if f is None:
            continue
        whole = saved["model"][names[id(p)]].reshape(-1)
        f.master.copy_(whole.narrow(0, f.start, f.numel))
        if zero == 3:
            p.ds_tensor.data.view(-1).narrow(0, 0, f.numel).copy_(f.master)
        for key in keys:
            if state.get(i, {}).get(key) is not None:
                f.moment(opt, key, True).copy_(state[i][key].reshape(-1).narrow(0, f.start, f.numel))
        if "step" in state.get(i, {}):
            opt.state[f.flat]["step"] = state[i]["step"].detach().clone()
    for g, s in zip(opt.param_groups, saved["optimizer"]["param_groups"]):
        g.update({k: v for k, v in s.items() if k != "params"})
