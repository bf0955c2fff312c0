"""The constraint layer: a compression spec becomes constraints on tensors, as pure functions.

The data path, one module each: ``spec`` (the YAML rules, typed) → ``plan`` (rules resolved
against each layer's shape: prune steps, pattern, quantization) → ``grid`` (*grouping*: which
elements form a unit, a workload, a codebook group) → ``topk`` / ``pattern`` / ``codebook``
(*selection*: which units survive, which pattern a kernel takes, which value an entry gets) →
``projection`` (the composed projection of whole weights or of ZeRO-3 slices) → ``verify`` (an
independent check of the result). ``schedule`` says how far along a progressive stage the plans are.
"""
from elastictrain.constraints.plan import LayerPlan, PruneStep, resolve
from elastictrain.constraints.projection import LayerState, project
from elastictrain.constraints.spec import Spec
from elastictrain.constraints.spec import load as load_spec
from elastictrain.constraints.spec import parse as parse_spec
from elastictrain.constraints.verify import Violation, verify

__all__ = ["LayerPlan", "LayerState", "PruneStep", "Spec", "Violation", "load_spec", "parse_spec", "project",
           "resolve", "verify"]
