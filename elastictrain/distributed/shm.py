"""Sum all-reduce of CPU buffers between the ranks of one host, through shared memory.

Why: gloo moves a CPU all-reduce through TCP sockets and its own threads. On a host whose ranks
already fill every core, a 3.3 MB gradient costs ~4 ms idle and 10+ ms under load
(``bench/scaling.py``), which is most of a small model's step. Ranks of one host can add each
other's buffers in memory instead: each writes its buffer into its slot of one shared file, sums a
1/W slice of all slots, and copies the whole sum back. Two arrival flags per call; no thread, no
socket, no copy of the data beyond those.

Guarantees:

- Every rank gets the *same bits*: each element is summed by one rank, in slot (rank) order, and
  copied by all. (Not the same bits as gloo's ring, whose order differs: equal within rounding.)
- Nothing is left on disk: the file in ``/dev/shm`` is unlinked once every rank has mapped it, so
  a killed job leaves no segment behind.
- A rank whose peer never arrives raises ``TimeoutError`` after ``timeout_s`` (the process
  group's timeout by default) instead of spinning forever, so a launcher can restart the group.

Waiting polls the peers' flags and yields the core between polls: a rank that arrives first gives
its core to whatever runs there. The flags rely on x86's store order (data is written before the
flag that announces it); ``usable()`` is false elsewhere, and callers fall back to the process group.

Only torch / torch.distributed here: the rendezvous (the file's name) is one broadcast over the
existing process group.
"""
from __future__ import annotations

import mmap
import os
import platform
import secrets
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from elastictrain.distributed import _comm

_FLAG_STRIDE = 8  # int64s between two ranks' flags: one 64-byte cache line each
_NAME_BYTES = 256  # the file's path, sent as bytes
_DIR = "/dev/shm"


def usable(local_world_size: Optional[int]) -> bool:
    """Whether this process group can reduce through shared memory: more than one rank, every rank
    on this host (``local_world_size`` — e.g. torchrun's / Ray Train's ``LOCAL_WORLD_SIZE`` — equal
    to the world size), and an x86 CPU (see the module's note on store order)."""
    W = _comm.world_size()
    return (W > 1 and local_world_size == W and platform.machine().lower() in ("x86_64", "amd64")
            and os.path.isdir(_DIR))


class SharedMemoryAllReduce:
    """``all_reduce_(buf)`` sums float32 CPU buffers of up to ``capacity`` elements over the
    process group's ranks, all of which must be on this host. A collective: construct and call it
    on every rank, in the same order."""

    def __init__(self, capacity: int, *, timeout_s: Optional[float] = None):
        W, r = _comm.world_size(), _comm.rank()
        if capacity < 1:
            raise ValueError(f"SharedMemoryAllReduce: capacity must be >= 1 (got {capacity})")
        self.W, self.rank, self.capacity = W, r, int(capacity)
        self.timeout_s = timeout_s if timeout_s is not None else _default_timeout()
        flags_bytes = W * _FLAG_STRIDE * 8
        size = flags_bytes + (W + 1) * self.capacity * 4  # flags | W slots | the sum
        path = _rendezvous(size)
        self._mm, err = None, None
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                self._mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError as e:  # ranks on different hosts (or a private /dev/shm)
            err = e
        mapped = _comm.all_reduce_(torch.tensor([int(self._mm is not None)]), op=dist.ReduceOp.MIN)
        if r == 0:  # every rank has mapped it (or given up): the name may go
            os.unlink(path)
        _comm.all_reduce_(torch.zeros(1))  # ... and is gone before any rank returns
        if int(mapped) == 0:
            raise RuntimeError(f"SharedMemoryAllReduce: a rank cannot open {path} — are all ranks on one host?"
                               + (f" (rank {r}: {err})" if err else ""))
        flat = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._flags = flat[:flags_bytes].view(torch.int64).view(W, _FLAG_STRIDE)[:, 0]
        data = flat[flags_bytes:].view(torch.float32)
        self._slots = data[:W * self.capacity].view(W, self.capacity)
        self._sum = data[W * self.capacity:]
        self._calls = 0

    def all_reduce_(self, buf: torch.Tensor) -> torch.Tensor:
        """Sum ``buf`` (1-D, contiguous float32 on the CPU) over every rank, in place."""
        n = buf.numel()
        if buf.dtype != torch.float32 or buf.device.type != "cpu" or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError(f"SharedMemoryAllReduce: needs a contiguous 1-D float32 CPU tensor "
                             f"(got {buf.dtype} {tuple(buf.shape)} on {buf.device})")
        if n > self.capacity:
            raise ValueError(f"SharedMemoryAllReduce: {n} elements exceed the capacity of {self.capacity}")
        self._calls += 1
        phase = 2 * self._calls
        self._slots[self.rank, :n].copy_(buf)
        self._arrive(phase - 1)  # my slot is written
        a, b = n * self.rank // self.W, n * (self.rank + 1) // self.W
        torch.sum(self._slots[:, a:b], dim=0, out=self._sum[a:b])
        self._arrive(phase)  # my slice of the sum is written, and I have read every slot
        buf.copy_(self._sum[:n])
        return buf

    def close(self) -> None:
        self._flags = self._slots = self._sum = None
        self._mm.close()

    def _arrive(self, phase: int) -> None:
        """Announce ``phase`` and wait until every rank has. Phases only grow, and a rank can be at
        most one phase ahead (it waits here), so "every flag ≥ phase" is the whole condition:
        before a rank writes its slot for the next call, all have finished reading this call's."""
        self._flags[self.rank] = phase
        if int(self._flags.min()) >= phase:
            return
        deadline = time.monotonic() + self.timeout_s
        polls = 0
        while int(self._flags.min()) < phase:
            os.sched_yield()
            polls += 1
            if polls % 4096 == 0 and time.monotonic() > deadline:
                late = [i for i in range(self.W) if int(self._flags[i]) < phase]
                raise TimeoutError(f"SharedMemoryAllReduce: rank(s) {late} did not arrive within "
                                   f"{self.timeout_s:.0f} s (call {self._calls})")


def _default_timeout() -> float:
    t = getattr(dist, "default_pg_timeout", timedelta(minutes=30))
    return t.total_seconds()


def _rendezvous(size: int) -> str:
    """Rank 0 creates a fresh, sized file with a random name; every rank learns the name."""
    name = torch.zeros(_NAME_BYTES, dtype=torch.uint8)
    if _comm.rank() == 0:
        path = os.path.join(_DIR, f"elastictrain-allreduce-{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        raw = path.encode()
        assert len(raw) <= _NAME_BYTES, path
        name[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    _comm.broadcast_(name, src=0)
    return bytes(name[name != 0].tolist()).decode()
