"""Deployable models: a trained, constrained network with its pruned structure physically removed.

A filter-pruned model is small on paper and dense at inference — the zeros still cost MACs,
memory and latency. ``shrink`` traces the model (``torch.fx``), finds which channels move
together (``graph``: residual sums, concatenations, flatten → linear, depthwise convs), decides
which of them nothing depends on any more (``shrink``, with ``constants`` for channels that only
carry a constant), builds the sliced model (``rebuild``) and says what changed (``report``).

    small, report = shrink(model, torch.randn(1, 3, 32, 32))
    print(report.table())
    channel_groups(model, torch.randn(1, 3, 32, 32))  # what must be pruned together

``coupling`` turns those groups into parameter names for coupled filter pruning in training.
"""
from elastictrain.deploy.coupling import Coupling, coupling
from elastictrain.deploy.graph import ChannelGroup, UntraceableModel, channel_groups
from elastictrain.deploy.report import ShrinkReport
from elastictrain.deploy.shrink import shrink

__all__ = ["ChannelGroup", "Coupling", "ShrinkReport", "UntraceableModel", "channel_groups", "coupling", "shrink"]
