"""ElasticTrain: train DNNs under a mixture of compression constraints.

The library, from spec to tensors: ``spec`` (the YAML rules) → ``plan`` (rules resolved against
shapes) → ``grid`` (grouping) + ``select`` / ``pattern`` / ``codebook`` (selection) →
``project`` (the composed projection) → ``verify`` (an independent check) → ``accounting``
(nominal and stored bits) → ``checkpoint``. It never imports Ray, Slurm, W&B or ``pipeline``.
"""
from .compress import Compressed, compress_state_dict
from .config import ConfigError
from .plan import LayerPlan, resolve
from .projection import LayerState, project
from .spec import Spec, load as load_spec, parse as parse_spec
from .verify import Violation, verify

__version__ = "0.1.0"
__all__ = ["Compressed", "ConfigError", "LayerPlan", "LayerState", "Spec", "Violation", "compress_state_dict",
           "load_spec", "parse_spec", "project", "resolve", "verify"]
