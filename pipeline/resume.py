"""Resume points: a stage killed mid-way (driver killed, job preempted or requeued, a Ray worker
lost) continues from the end of its last completed epoch instead of starting over.

After every epoch a stage writes ``RUN_DIR/<stage>/resume/epoch-<k>/``:

- ``engine.pt``: latent weights, optimizer and LR-schedule state, as one PyTorch process saves
  them, whoever wrote them — one process, or W DeepSpeed ranks under any ZeRO stage, whose
  partitions are assembled first (``jobs.portable_state``);
- ``state.pt`` (rank 0): the constrainer's state (masks, base masks, codebooks, pattern
  libraries, ADMM's Z, U, ρ, step, statistics), the epoch history, the RNG state, the world size
  that wrote it, and the fingerprint of masks + codebooks;
- ``MANIFEST.json`` last, atomically: every file's SHA-256 and what the point belongs to (stage
  config, data and seed, the examples per optimizer step). A point is *committed* when its
  manifest exists and every hash matches.

Nothing in a point depends on the world size: a stage continues on more or fewer ranks (an
elastic Ray group that lost a node), or on one process, with every optimizer step taking the same
examples (``elastictrain.train.step_split``).

Resuming takes the newest committed point; a point whose files are truncated or corrupted is named
in the log and the one before it is used. Two points are kept. The data order needs no state: the
loaders reseed per epoch. Points are written only from finite weights, so a stage stopped by a
NaN keeps its last good one.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from elastictrain import checkpoint
from elastictrain.config import ConfigError
from elastictrain.files import atomic_write

FORMAT = "elastictrain.resume/2"  # /1 kept DeepSpeed's per-rank files: tied to one world size
KEEP = 2


def points_dir(stage_dir: Path) -> Path:
    return stage_dir / "resume"


def fingerprint(obj) -> str:
    """A stable hash of a plain config (what a resume point belongs to)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_point(stage_dir: Path, epoch: int, stepper, state: dict, owner: dict, rank: int,
               barrier: Callable[[], None] = lambda: None) -> Path:
    """Write the resume point after ``epoch`` (every rank calls this; rank 0 commits it)."""
    where = points_dir(stage_dir) / f"epoch-{epoch}"
    if rank == 0:
        shutil.rmtree(where, ignore_errors=True)  # a half-written point of an earlier attempt
    barrier()
    stepper.save(where, rank)
    if rank == 0:
        checkpoint.atomic_save({"format": FORMAT, "epoch": epoch, **state}, where / "state.pt")
    barrier()  # every rank's files are on disk before the manifest says so
    if rank == 0:
        files = {str(p.relative_to(where)): checkpoint.file_digest(p) for p in sorted(where.rglob("*"))
                 if p.is_file() and not p.name.endswith(".sha256")}
        manifest = json.dumps({"format": FORMAT, "epoch": epoch, "owner": owner, "files": files,
                               "checksum": state.get("checksum")}, indent=1).encode()
        atomic_write(where / "MANIFEST.json", lambda f: f.write(manifest))
        for old in _points(stage_dir)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return where


def _points(stage_dir: Path) -> list[Path]:
    root = points_dir(stage_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("epoch-*") if p.name[6:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[6:]))


def find_point(stage_dir: Path, owner: dict, log=print) -> Optional[tuple[Path, dict]]:
    """The newest committed, intact resume point: (its folder, its manifest), or None."""
    for where in reversed(_points(stage_dir)):
        try:
            manifest = json.loads((where / "MANIFEST.json").read_text())
        except (OSError, ValueError):
            continue  # never committed: the process died while writing it
        problem = _check(where, manifest)
        if problem is None:
            if manifest.get("owner") != owner:
                differs = sorted(k for k in set(owner) | set(manifest.get("owner", {}))
                                 if owner.get(k) != manifest.get("owner", {}).get(k))
                raise ConfigError(f"{where}: this resume point belongs to a different {' and '.join(differs)}; "
                                  f"restore that, or remove {points_dir(stage_dir)} to start the stage over")
            return where, manifest
        log(f"[resume] {problem}; trying the point before it")
    return None


def _check(where: Path, manifest: dict) -> Optional[str]:
    if manifest.get("format") != FORMAT:
        return f"{where / 'MANIFEST.json'}: not a resume manifest"
    for rel, digest in manifest.get("files", {}).items():
        path = where / rel
        if not path.is_file():
            return f"{path}: missing"
        if checkpoint.file_digest(path) != digest:
            return f"{path}: truncated or corrupted (SHA-256 differs from the manifest)"
    return None


def load_state(where: Path) -> dict:
    return checkpoint.load(where / "state.pt")


def clear(stage_dir: Path) -> None:
    """The stage finished: its final checkpoint supersedes every resume point."""
    shutil.rmtree(points_dir(stage_dir), ignore_errors=True)
