"""Optional packages. A plain `pip install megatron-reweight` trains on prepared data; the extras of
pyproject.toml add the rest. A command that needs a missing one stops at start-up with one line
naming the extra to install, instead of a traceback halfway through."""

from __future__ import annotations

import importlib.util

# The modules each extra provides that the package imports (pyproject.toml [project.optional-dependencies]).
EXTRA_MODULES = {
    "data": ("datasets", "pyarrow", "tiktoken", "tqdm"),  # data preparation and the demo corpus
    "train": ("tensorboard",),  # --tensorboard-dir
    "export": ("transformers", "safetensors"),  # megatron-reweight-export
    "wandb": ("wandb",),  # --wandb-project
}


class MissingExtraError(ImportError):
    """An extra's package is not installed; the message names the extra to install."""


def require_extra(extra: str, needed_for: str) -> None:
    """Raise MissingExtraError, naming `pip install 'megatron-reweight[extra]'`, when a module of
    `extra` is missing."""
    missing = [module for module in EXTRA_MODULES[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtraError(
            f"{needed_for} needs {', '.join(missing)}: pip install 'megatron-reweight[{extra}]'"
        )
