"""allspark: thirteen spatio-temporal modalities through one frozen language model.

    from allspark import AllSpark, load_config
    cfg = load_config("hsi")
    model = AllSpark.from_config(cfg, info)
"""
from __future__ import annotations

from allspark.config import Config, ConfigError, list_modalities, load_config
from allspark.registry import DATASETS, ENCODERS, EVALUATORS, HEADS, METRICS, OBJECTIVES, Registry

__version__ = "0.1.0"

__all__ = [
    "AllSpark",
    "Config",
    "ConfigError",
    "load_config",
    "list_modalities",
    "import_builtins",
    "Registry",
    "ENCODERS",
    "HEADS",
    "DATASETS",
    "METRICS",
    "OBJECTIVES",
    "EVALUATORS",
]


def import_builtins() -> None:
    """Import the built-in encoders, heads, readers, metrics, objectives, evaluators and baselines (registering them)."""
    import encoders  # noqa: F401
    import heads  # noqa: F401
    import allspark.metrics  # noqa: F401
    import allspark.objectives  # noqa: F401
    from allspark.data import import_readers
    from allspark.plugins import import_submodules

    import_submodules("allspark.evaluation")
    import_submodules("allspark.baselines")
    import_readers()


def __getattr__(name: str):
    # The model pulls in transformers; import it only when asked for.
    if name == "AllSpark":
        from allspark.model import AllSpark

        return AllSpark
    raise AttributeError(f"module 'allspark' has no attribute {name!r}")
