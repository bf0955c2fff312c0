"""The training-time rank check (jobs.backend.check_ranks, run after every constraint update) on two real
gloo ranks: identical updates pass; a rank whose mask is perturbed is caught at the next sync,
on every rank, naming the layer and the rank."""
import torch
from test_dist import run2

from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import parse
from elastictrain.train import Constrainer, EnforceConfig

SPEC = {"rules": [{"match": "conv.weight", "prune": {"unit": "kernel", "ratio": 4}},
                  {"match": "fc.weight", "prune": {"ratio": 10}, "quantize": {"bits": 2}}]}


def _worker(rank: int, world: int, perturb: bool):
    from jobs.backend import check_ranks

    torch.manual_seed(0)  # identical weights on both ranks, as data parallelism keeps them
    params = {"conv.weight": torch.nn.Parameter(torch.randn(8, 4, 3, 3)),
              "fc.weight": torch.nn.Parameter(torch.randn(5, 40))}
    plans = resolve(parse(SPEC), {n: tuple(p.shape) for n, p in params.items()})
    c = Constrainer(params, plans, EnforceConfig(method="progressive"), 100)

    outcome = []
    for progress in (0.3, 0.6, 1.0):
        try:
            c.update_masks(progress)
            if perturb and rank == 1 and c.stats["mask_updates"] == 2:
                c.masks["fc.weight"].view(-1)[7] ^= True  # one bit, one rank
            check_ranks(c)
            outcome.append("ok")
        except RuntimeError as e:
            outcome.append(str(e))
            break
    return outcome


def test_identical_updates_pass_on_every_rank(tmp_path):
    assert run2(tmp_path, _worker, False) == [["ok", "ok", "ok"]] * 2


def test_a_perturbed_rank_is_caught_at_the_next_sync(tmp_path):
    for outcome in run2(tmp_path, _worker, True):
        assert outcome[0] == "ok" and len(outcome) == 2
        msg = outcome[1]
        assert "\n" not in msg and msg.startswith("masks differ across ranks: layer fc.weight"), msg
        assert "rank 1" in msg
