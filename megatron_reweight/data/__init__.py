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
    if not _has_data_extra(name):
        return 2
    return importlib.import_module(module).main()


def _has_data_extra(command: str) -> bool:
    """Whether the data extra is installed; if not, say which in one line on stderr."""
    try:
        require_extra("data", command)
    except MissingExtraError as error:
        print(f"error: {error}", file=sys.stderr)
        return False
    return True


def _check_module_form() -> None:
    """`python -m megatron_reweight.data.prepare` (or `.demo`) imports this package before running
    the module, whose own imports need the data extra: check the extra here, so that a missing one
    is one line, as with the console scripts, not a traceback. (While `-m` imports the module's
    parent packages, sys.argv[0] is "-m".)"""
    if sys.argv[:1] != ["-m"]:
        return
    argv = getattr(sys, "orig_argv", [])
    module = next((argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-m"), None)
    if module in (f"{__name__}.prepare", f"{__name__}.demo") and not _has_data_extra(f"python -m {module}"):
        sys.exit(2)


_check_module_form()
