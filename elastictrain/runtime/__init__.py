"""A runtime for constrained layers: each conv / linear of a deployed model computed by the fastest
exact implementation this machine has for its sparsity (``layers``), chosen by measuring
(``tune.autotune``), with a compiled kernel where one builds (``ext``) and pure torch otherwise."""
from elastictrain.runtime.tune import LayerChoice, Tuning, apply, autotune, tuned

__all__ = ["LayerChoice", "Tuning", "apply", "autotune", "tuned"]
