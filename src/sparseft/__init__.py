"""sparseft: sparse fine-tuning of transformer language models."""
from ._version import __version__
from .config import CalibrationOptions, ConfigError, DynamicOptions, GrowDropOptions, ID3Options, SparseConfig
from .delta import SparseDeltaLayer
from .lr_rule import default_lr
from .model import AdapterError, SparseModel, get_sparse_model
from .optim import SparseAdamW
from .train import TrainingArguments, create_optimizer, train

__all__ = [
    "AdapterError",
    "CalibrationOptions",
    "ConfigError",
    "DynamicOptions",
    "GrowDropOptions",
    "ID3Options",
    "SparseAdamW",
    "SparseConfig",
    "SparseDeltaLayer",
    "SparseModel",
    "SparseCallback",
    "TrainingArguments",
    "create_optimizer",
    "default_lr",
    "train",
    "get_sparse_model",
    "SparseTrainer",
    "__version__",
]


def __getattr__(name: str):
    # Imported on first use: transformers.Trainer pulls in accelerate, peft and more.
    if name == "SparseTrainer":
        from .trainer import SparseTrainer

        return SparseTrainer
    if name == "SparseCallback":
        from .callback import SparseCallback

        return SparseCallback
    raise AttributeError(f"module 'sparseft' has no attribute {name!r}")
