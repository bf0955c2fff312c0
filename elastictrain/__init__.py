"""ElasticTrain: train DNNs under a mixture of compression constraints.

The library by folder, in the order a weight tensor meets it:
``constraints/`` (spec → plan → grouping + selection → projection → verify), ``train/`` (the
constrainer that keeps weights on their spec while they train, the epoch loop, the backend a stage
runs on, adversarial attacks), ``distributed/`` (keeping masks and codebooks identical across
ranks, ZeRO-3 slices, sparse gradient reduction), ``measure/`` (ratios, stored bits, structure),
``artifact/`` (the packed ``.etz``), ``data/``, ``models/``; at the root, ``checkpoint`` (the one
checkpoint dict), ``compress`` (one-shot compression), ``config`` (typed YAML configs), ``files``
and ``progress``. It never imports Ray, DeepSpeed, Slurm tooling, W&B, ``jobs`` or ``pipeline``.
"""
from elastictrain.compress import Compressed, compress_state_dict
from elastictrain.config import ConfigError
from elastictrain.constraints import (
           LayerPlan,
           LayerState,
           Spec,
           Violation,
           load_spec,
           parse_spec,
           project,
           resolve,
           verify,
)

__version__ = "0.1.0"
__all__ = ["Compressed", "ConfigError", "LayerPlan", "LayerState", "Spec", "Violation", "compress_state_dict",
           "load_spec", "parse_spec", "project", "resolve", "verify"]
