"""Stage functions for ``test_ray_failures``: each meets one kind of fault inside real Ray Train
workers (``jobs.ray_train.StageFn``: ``(backend, args, log)``). Shipped to the workers by value
(the tests register this module with cloudpickle), since workers cannot import ``tests``."""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from elastictrain.distributed import check_identical


def diverged(backend, args, log):
    log("checking the masks")
    # a real check over the real process group: rank 1's mask differs in one layer
    masks = {"conv1.weight": torch.ones(4, dtype=torch.bool),
             "fc.weight": torch.tensor([True, backend.rank == 0, True])}
    check_identical(masks, what="masks")
    return {}, None


def bug_on_one_rank(backend, args, log):
    if backend.rank == 1:
        return {"x": 1 / 0}, None
    dist.barrier()  # rank 0 waits for a peer that will never come: the group is stopped for it
    return {}, None


def lost(backend, args, log):
    dist.barrier()  # both ranks are training
    if backend.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # every attempt: only the restart budget ends it
    dist.barrier()
    return {}, None
