"""Data preparation: Hugging Face datasets to Megatron indexed datasets, and the offline demo corpus.

* `megatron_reweight.data.prepare`: the resumable, deterministic, parallel pipeline and its CLI
  (`megatron-reweight-prepare --help`); see docs/data.md.
* `megatron_reweight.data.demo`: the offline multi-domain demo corpus, its tokenizer, and
  `ensure_demo_data(root)` for CPU runs and tests.
* `megatron_reweight.data.domains`: which domain each prefix of a `--data-path` belongs to.

The submodules are imported explicitly, so importing this package loads neither megatron-core
nor `datasets`; the commands below check for the `data` extra before importing them.
"""

import importlib
import sys

from megatron_reweight.extras import MissingExtraError, require_extra


def prepare_command() -> int:
    """`megatron-reweight-prepare`."""
    return _run_command("megatron-reweight-prepare", "megatron_reweight.data.prepare")


def demo_command() -> int:
    """`megatron-reweight-demo`."""
    return _run_command("megatron-reweight-demo", "megatron_reweight.data.demo")


def _run_command(name: str, module: str) -> int:
    try:
        require_extra("data", name)
    except MissingExtraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return importlib.import_module(module).main()
