"""The constrainer during training: masks hold, constraints hold after every step, ADMM converges."""
import torch
from torch import nn

from elastictrain.constraints.plan import resolve
from elastictrain.constraints.spec import parse
from elastictrain.constraints.verify import verify
from elastictrain.train import ADMMConfig, Constrainer, EnforceConfig, OptimConfig, build_optimizer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


SPEC = {"rules": [{"match": "conv.weight", "prune": {"unit": "kernel", "ratio": 4},
                   "pattern": {"entries": 4, "patterns": 4},
                   "balance": {"filter": 2, "channel": 2}, "quantize": {"bits": 2, "groups": {"filter": 2}}},
                  {"match": "fc.weight", "prune": {"ratio": 10}, "quantize": {"bits": 3}}]}


def setup(method="progressive", steps=60, **kw):
    torch.manual_seed(0)
    net = Net()
    plans = resolve(parse(SPEC), {n: tuple(p.shape) for n, p in net.named_parameters()})
    opt = build_optimizer(net, OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-3))
    c = Constrainer(dict(net.named_parameters()), plans,
                    EnforceConfig(method=method, update_every=5, end=0.5, refit_every=7, **kw), steps)
    c.begin(opt)
    return net, plans, opt, c


def train(net, opt, c, steps, check=None):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 4, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
        c.before_forward()
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        c.after_backward()
        if check:
            check("grad")
        opt.step()
        c.after_step()
        if check:
            check("step")


def test_pruned_weights_and_grads_stay_exactly_zero_with_momentum_and_decay():
    net, plans, opt, c = setup("progressive", steps=60)
    params = dict(net.named_parameters())

    def check(when):
        for n, m in c.masks.items():
            p = params[n]
            if when == "grad":
                assert not p.grad[~m].any()
            else:
                assert not p.detach()[~m].any(), f"{n}: a pruned weight moved"
                buf = opt.state[p].get("momentum_buffer")
                assert buf is None or not buf[~m].any()

    train(net, opt, c, 60, check)
    assert c.final and c.stats["mask_updates"] >= 6 and c.stats["codebook_refits"] >= 1
    # density fell to the target: 2 kernels of 8 per (4-filter × 2-channel) workload... and 10× on fc
    assert int(c.masks["fc.weight"].sum()) == round(5 * 288 / 10)
    states = c.finish()
    weights = {n: p.detach() for n, p in params.items()}
    assert verify(plans, weights, {n: s.library for n, s in states.items() if s.library is not None}) == []
    for n, m in c.masks.items():
        assert torch.equal(params[n].detach() != 0, m)  # baked: zero exactly where pruned


def test_masks_only_shrink_and_never_revive_an_earlier_stage():
    net, plans, opt, c = setup("progressive", steps=40)
    history = []
    for _ in range(8):
        train(net, opt, c, 5)
        history.append({n: m.clone() for n, m in c.masks.items()})
    for a, b in zip(history, history[1:]):
        for n in a:
            assert not (b[n] & ~a[n]).any(), "a later mask revived a pruned weight"
    # a following stage starting from this state keeps within the same masks
    state = c.state_dict()
    c2 = Constrainer(dict(net.named_parameters()), plans, EnforceConfig(method="fixed"), 10,
                     state={"masks": state["masks"], "libraries": state["libraries"]})
    c2.begin(opt)
    for n in state["masks"]:
        assert not (c2.masks[n] & ~state["masks"][n]).any()


def test_qat_forward_sees_quantized_weights_and_latent_weights_train():
    net, plans, opt, c = setup("fixed", steps=20)
    latent_before = net.fc.weight.detach().clone()
    c.before_forward()
    q = net.fc.weight.detach()
    assert q[q != 0].unique().numel() <= 8  # 3-bit codebook in the forward pass
    loss = net(torch.randn(4, 4, 6, 6)).sum()
    opt.zero_grad()
    loss.backward()
    c.after_backward()
    assert torch.equal(net.fc.weight.detach(), latent_before)  # latent restored before the step
    opt.step()
    c.after_step()
    assert not torch.equal(net.fc.weight.detach(), latent_before)


def test_admm_primal_residual_falls_on_a_small_problem():
    """Least squares whose solution satisfies the constraint: ‖W − Z‖ must fall toward 0."""
    torch.manual_seed(0)
    w_true = torch.randn(8, 32) * (torch.rand(8, 32) < 0.1)
    x = torch.randn(256, 32)
    y = x @ w_true.T
    fc = nn.Linear(32, 8, bias=False)
    plans = resolve(parse({"rules": [{"match": "weight", "prune": {"ratio": 10}}]}), {"weight": (8, 32)})
    opt = torch.optim.SGD(fc.parameters(), lr=0.1)
    c = Constrainer(dict(fc.named_parameters()), plans,
                    EnforceConfig(method="admm", update_every=10, end=0.9,
                                  admm=ADMMConfig(rho=0.05, growth=1.2, rho_max=2.0)), 1000)
    c.begin(opt)
    residuals = []
    for step in range(900):
        c.before_forward()
        loss = (fc(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        c.after_backward()
        opt.step()
        c.after_step()
        if step % 100 == 99:
            residuals.append(c.admm_residual())
    assert residuals[-1] < 0.01 and residuals[-1] < residuals[0] / 10, residuals
    assert all(b <= a * 1.05 for a, b in zip(residuals, residuals[1:])), residuals


def test_admm_ends_with_a_hard_projection_on_the_constraint():
    net, plans, opt, c = setup("admm", steps=60)
    train(net, opt, c, 60)  # past `end`: hard projection, then masked training
    assert not c.Z and c.final
    states = c.finish()
    weights = {n: p.detach() for n, p in net.named_parameters()}
    assert verify(plans, weights, {n: s.library for n, s in states.items() if s.library is not None}) == []


def test_same_weights_give_same_state_checksum():
    a = setup("progressive", steps=30)
    b = setup("progressive", steps=30)
    train(*a[0:1], a[2], a[3], 30)
    train(*b[0:1], b[2], b[3], 30)
    assert a[3].checksum() == b[3].checksum()


def test_effective_weights_for_evaluation_are_quantized_then_restored():
    net, plans, opt, c = setup("fixed", steps=10)
    latent = net.fc.weight.detach().clone()
    with c.effective():
        q = net.fc.weight.detach().clone()
    assert q[q != 0].unique().numel() <= 8 and not torch.equal(q, latent)
    assert torch.equal(net.fc.weight.detach(), latent)
