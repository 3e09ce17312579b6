"""Checkpoints with megatron-core's dist_checkpointing (torch_dist format), in Megatron-LM's
layout:

    SAVE/latest_checkpointed_iteration.txt     "100"
    SAVE/iter_0000100/                         the dist_checkpointing directory

A checkpoint holds the model's and the optimizer's sharded state dicts (so it can be
resharded to another TP/PP/DP layout), the LR scheduler, the iteration and the consumed
samples (the data position), the RNG states and the run's configuration
(`TrainConfig.to_dict()`).

Crash safety: every rank writes into SAVE/iter_0000100.incomplete/; only after all ranks
are done (barrier) does rank 0 rename it to iter_0000100/ and then replace the tracker
file atomically (write + fsync + rename). A crash at any point leaves the tracker naming
the previous complete checkpoint. Loading a missing or empty directory starts afresh.
Before the rename, the ranks hash the files (`checkpoint_checksums`: iter_N/checksums.json);
a load verifies them. A save that fails (a full disk) removes its incomplete directory and stops
the run with one line naming the latest complete checkpoint.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_reweight.arguments import StrategyOptions
from megatron_reweight.checkpoint_checksums import (
    CHECKSUM_FILE,
    ChecksumFileError,
    read_checksums,
    record_checksums,
    size_problems,
    verify_checksums,
)
from megatron_reweight.loss import ReweightConfig
from megatron_reweight.loss_checks import LossChecks
from megatron_reweight.processes import bind_checkpoint_writer_to_this_process
from megatron_reweight.settings import flag_of, setting_fields
from megatron_reweight.training.errors import ConfigError, TrainingStopped

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
INCOMPLETE_SUFFIX = ".incomplete"
EMBEDDING_KEY = "embedding.word_embeddings.weight"
# What reading a damaged checkpoint raises, from torch's unpickler to megatron-core's loader.
READ_ERRORS = (EOFError, OSError, RuntimeError, AttributeError, KeyError, ValueError, pickle.UnpicklingError,
               CheckpointingException, CheckpointException)  # fmt: skip


@dataclass
class TrainState:
    """What the loop needs besides the model and optimizer to continue a run exactly."""

    iteration: int = 0
    consumed_samples: int = 0


def checkpoint_name(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: Path | None) -> int | None:
    """The latest complete iteration under `root`, or None (no directory, no tracker)."""
    if root is None:
        return None
    tracker = Path(root) / TRACKER_FILENAME
    if not tracker.exists():
        return None
    try:
        text = tracker.read_text().strip()
    except OSError as error:
        raise ConfigError(f"--load {root}: cannot read {tracker} ({error.strerror or error})") from None
    try:
        iteration = int(text)
    except ValueError:
        raise ConfigError(f"--load {root}: {TRACKER_FILENAME} holds {text!r}, not an iteration") from None
    if not checkpoint_name(root, iteration).is_dir():
        raise ConfigError(
            f"--load {root}: {TRACKER_FILENAME} names iteration {iteration} but {checkpoint_name(root, iteration)} is "
            f"missing; {older_checkpoints(root, iteration)}"
        )
    return iteration


def unwritable(directory: Path) -> str | None:
    """Why files cannot be written in `directory` (created if missing), or None."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        return "is a file, not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        return f"cannot be written ({error.strerror or error})"
    return None


def check_save_directory(save: Path | None, load: Path | None) -> None:
    """Refuse a --save that cannot be written, and one with another run's checkpoints:
    Megatron-LM, given a --save directory with checkpoints and no --load of it, trains afresh
    and overwrites them one by one."""
    if save is None:
        return
    problem = unwritable(save)
    if problem:
        raise ConfigError(f"--save {save} {problem}; choose a writable directory")
    iteration = _tracked_iteration(save)
    if iteration is not None and (load is None or Path(load).resolve() != Path(save).resolve()):
        raise ConfigError(
            f"--save {save} holds another run's checkpoints (up to iteration {iteration}); add --load {save} "
            "to resume that run, or choose an empty --save directory"
        )


def _tracked_iteration(root: Path) -> int | None:
    tracker = Path(root) / TRACKER_FILENAME
    try:
        return int(tracker.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rng_state() -> ShardedObject:
    """Python, NumPy, torch and megatron's model-parallel RNG states, one per (PP, TP) rank
    and replicated over DP x CP (Megatron-LM's torch_dist layout)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": numpy.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        [state],
        (
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _restore_rng_state(states: list[dict]) -> None:
    state = states[0]
    random.setstate(state["random_rng_state"])
    numpy.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and state["cuda_rng_state"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _optimizer_metadata(fully_reshardable: bool, use_distributed_optimizer: bool) -> dict:
    """Megatron-LM's sharded-state-dict metadata: the distributed optimizer's state is saved
    DP-reshardable by default (fast, no gathering), fully reshardable on request."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable" if fully_reshardable else "dp_reshardable"
    return metadata


def _materialize_torch_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer's torch Adam its (zero) state before loading.

    megatron-core 0.16.1's DistributedOptimizer.state_dict() reads each parameter's Adam
    `step` when it falls back to torch.optim.Adam (no Transformer Engine / Apex, e.g. on
    CPU) and asserts there is one, so a freshly built optimizer cannot produce the state
    dict that loading needs. Zero state, as Adam itself would create it, is overwritten
    by the load. A no-op with TE/Apex optimizers or an optimizer that has stepped."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, distrib_optimizer.DistributedOptimizer):
            continue
        inner = sub.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }


def _saved_adam_step(optimizer_state) -> float | None:
    """The Adam step count stored in a loaded optimizer state dict (its param_groups)."""
    if isinstance(optimizer_state, dict):
        for group in (
            optimizer_state.get("param_groups", []) if isinstance(optimizer_state.get("param_groups"), list) else []
        ):
            if isinstance(group, dict) and group.get("step") is not None:
                return float(group["step"])
        for value in optimizer_state.values():
            step = _saved_adam_step(value)
            if step is not None:
                return step
    return None


def _restore_torch_adam_steps(optimizer, optimizer_state) -> None:
    """After loading: megatron-core 0.16.1's DistributedOptimizer.load_state_dict leaves the
    torch Adam fallback with one `step` tensor shared by every parameter (and, for a
    freshly built optimizer, the placeholder value), which Adam then increments in place
    once per parameter per step, corrupting the bias correction. Give every parameter its
    own copy of the saved step. A no-op with TE/Apex optimizers."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    step = _saved_adam_step(optimizer_state)
    if step is None:
        return
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, distrib_optimizer.DistributedOptimizer):
            for param_state in sub.optimizer.state.values():
                if "step" in param_state:
                    param_state["step"] = torch.tensor(step, dtype=torch.float32)


def _sharded_state_dict(
    mo, state: TrainState, extra: dict, metadata: dict, is_loading: bool, optimizer: bool = True, rng: bool = True
) -> dict:
    model_state = unwrap_model(mo.model[0]).sharded_state_dict(metadata=metadata)
    sharded = {
        "model": model_state,
        "opt_param_scheduler": mo.scheduler.state_dict(),
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "checkpoint_version": CHECKPOINT_VERSION,
        **extra,
    }
    if optimizer:
        sharded["optimizer"] = mo.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    if rng:
        sharded["rng_state"] = _rng_state()
    return sharded


def save_checkpoint(root: Path, state: TrainState, mo, config) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    root = Path(root)
    final = checkpoint_name(root, state.iteration)
    partial = final.with_name(final.name + INCOMPLETE_SUFFIX)
    rank = dist.get_rank()
    metadata = _optimizer_metadata(
        config.checkpoint.dist_ckpt_optim_fully_reshardable, config.parallel.use_distributed_optimizer
    )
    extra = {"train_config": config.to_dict()}
    sharded = _sharded_state_dict(mo, state, extra, metadata, is_loading=False)
    needed = _tensor_bytes(sharded)
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)  # left by a crash during an earlier save
            partial.mkdir()
        dist.barrier()
        bind_checkpoint_writer_to_this_process()
        dist_checkpointing.save(sharded, str(partial), sharded_strategy=("torch_dist", 1), content_metadata=metadata)
        dist.barrier()
        if config.checkpoint.ckpt_checksums:
            record_checksums(partial)
        if rank == 0:
            if final.exists():
                # Left by a crash between the rename and the tracker update: the tracker still
                # names an older iteration, so it never points at a missing directory here.
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(root)
            _write_atomically(root / TRACKER_FILENAME, str(state.iteration))
    except (OSError, RuntimeError, CheckpointingException, CheckpointException) as error:
        # megatron-core gathers every rank's write failure, so all ranks stop here together.
        raise _save_failed(root, state.iteration, partial, error, needed) from None
    dist.barrier()
    return final


def _tensor_bytes(sharded: dict) -> int:
    """The bytes of the tensors this rank hands to the save (an upper bound of what it writes)."""
    return sum(
        value.data.nbytes for value in nested_values(sharded) if isinstance(getattr(value, "data", None), torch.Tensor)
    )


def _save_failed(root: Path, iteration: int, partial: Path, error: BaseException, needed: int) -> TrainingStopped:
    """The failed save as one line: what happened and where, the incomplete directory removed
    (it holds space and can never load), and the checkpoint to resume from."""
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    try:
        stats = os.statvfs(root)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        free = None
    # torch's zip writer reports a short write as "unexpected pos", without the errno: a file
    # system left with less room than the save needed tells it too.
    full = _out_of_space(error) or (free is not None and free < needed)
    if full:
        what = f"no space left on the device of {root} ({free / 2**20:.1f} MiB free)" if free is not None else (
            f"no space left on the device of {root}"
        )
    else:
        what = f"the save failed ({_failure_reason(error)})"
    latest = _tracked_iteration(root)
    last = (
        f"the latest complete checkpoint is iteration {latest} ({checkpoint_name(root, latest)}), so the steps "
        "after it are not saved"
        if latest is not None
        else "no complete checkpoint is saved there"
    )
    fix = "free space" if full else "fix the cause"
    return TrainingStopped(
        f"--save {root}: {what} while saving the checkpoint of iteration {iteration}; removed the incomplete "
        f"{partial}; {last}; {fix}, then resume with --load {root}"
    )


def _out_of_space(error: BaseException) -> bool:
    """Whether the error, its causes or a rank's write failure it gathers say the disk (or quota) is full."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return any(text in str(error) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)))


def _failure_reason(error: BaseException) -> str:
    """The error as one line; a save's gathered failures as each rank's last line."""
    if isinstance(error, CheckpointException) and error.failures:
        parts = [f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in sorted(error.failures.items())]
    else:
        parts = [f"{type(error).__name__}: {error}"]
    return "; ".join(parts).replace("\n", " ")


def load_checkpoint(root: Path | None, mo, config) -> tuple[TrainState, dict, list[str]] | None:
    """Load the tracker's latest checkpoint (or --ckpt-step's) into model, optimizer, scheduler
    and RNGs. Its files are verified against their checksums first; a damaged or unreadable
    checkpoint is a ConfigError naming the iteration, the files and the older ones to fall back to.

    A checkpoint of another TP/PP layout loads as Megatron-LM's does: the model reshards, the
    RNG states (one per TP/PP rank) are left out, and the distributed optimizer's state needs
    the fully reshardable format or `--no-load-optim`.

    Returns (state, common part of the checkpoint, notes on what was left out), or None when
    there is nothing to load."""
    iteration = read_tracker(root) if config.checkpoint.ckpt_step is None else _requested_step(root, config)
    # All ranks must agree (Megatron-LM takes the maximum); -1 = nothing to load.
    found = torch.tensor([-1 if iteration is None else iteration], dtype=torch.long, device=_device())
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    if int(found) < 0:
        return None
    iteration = int(found)
    directory = checkpoint_name(root, iteration)
    _verify_files(root, iteration, config)
    try:
        return _load(root, directory, mo, config)
    except ConfigError:
        raise
    except READ_ERRORS as error:
        reason = f"cannot be read ({type(error).__name__}: {error})"
        raise ConfigError(damaged_checkpoint(root, iteration, [reason], verdict="")) from None


def _load(root: Path, directory: Path, mo, config) -> tuple[TrainState, dict, list[str]]:
    common = dist_checkpointing.load_common_state_dict(str(directory))
    _check_same_model(root, common.get("train_config", {}).get("model", {}), config)
    _check_same_vocabulary(root, directory, unwrap_model(mo.model[0]).vocab_size)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or _optimizer_metadata(
        False, config.parallel.use_distributed_optimizer
    )
    saved_layout = _saved_layout(common, config)
    layout = (config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size)
    layout_note = f"TP {saved_layout[0]} PP {saved_layout[1]} -> TP {layout[0]} PP {layout[1]}"
    load_optimizer = config.checkpoint.load_optim
    if load_optimizer:
        _check_optimizer_format(root, metadata, config, saved_layout != layout, layout_note)
    load_rng = config.checkpoint.load_rng and saved_layout == layout
    notes = []
    if not load_optimizer:
        notes.append("optimizer state not loaded (--no-load-optim)")
    if not config.checkpoint.load_rng:
        notes.append("RNG states not loaded (--no-load-rng)")
    elif not load_rng:
        notes.append(f"RNG states not loaded ({layout_note})")

    state = TrainState(iteration=common["iteration"], consumed_samples=common["consumed_samples"])
    if load_optimizer:
        _materialize_torch_adam_state(mo.optimizer)
    sharded = _sharded_state_dict(mo, state, {}, metadata, is_loading=True, optimizer=load_optimizer, rng=load_rng)
    with warnings.catch_warnings():
        # megatron-core 0.16's torch_dist loader calls torch APIs that torch deprecates: nothing to act on.
        warnings.filterwarnings("ignore", r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core")
        warnings.filterwarnings("ignore", r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning)
        loaded = dist_checkpointing.load(sharded, str(directory), sharded_strategy=("torch_dist", 1))

    with torch.no_grad():  # the fp32 distributed optimizer copies into views of the parameters
        unwrap_model(mo.model[0]).load_state_dict(loaded["model"], strict=True)
        if load_optimizer:
            mo.optimizer.load_state_dict(loaded["optimizer"])
        else:
            # The optimizer's fp32 main weights (bf16 runs) are copies of the parameters.
            mo.optimizer.reload_model_params()
    if load_optimizer:
        _restore_torch_adam_steps(mo.optimizer, loaded["optimizer"])
    _check_schedule(root, mo.scheduler, loaded["opt_param_scheduler"], config)
    mo.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _restore_rng_state(loaded["rng_state"])
    dist.barrier()
    return state, common, notes


def _saved_layout(common: dict, config) -> tuple[int, int]:
    """(TP, PP) of the run that saved the checkpoint (this run's if it does not say)."""
    saved = common.get("train_config", {}).get("parallel", {})
    return (
        saved.get("tensor_model_parallel_size", config.parallel.tensor_model_parallel_size),
        saved.get("pipeline_model_parallel_size", config.parallel.pipeline_model_parallel_size),
    )


def _check_optimizer_format(root, metadata: dict, config, layout_changed: bool, layout_note: str) -> None:
    saved_distributed = "distrib_optim_sharding_type" in metadata
    if saved_distributed != config.parallel.use_distributed_optimizer:
        # The two optimizers' checkpoints differ in structure; Megatron-LM needs a conversion too.
        raise ConfigError(
            f"--load {root}: checkpoint saved {'with' if saved_distributed else 'without'} "
            f"--use-distributed-optimizer; run with the same setting to resume it, or add --no-load-optim"
        )
    sharding = metadata.get("distrib_optim_sharding_type")
    if layout_changed and saved_distributed and sharding != "fully_reshardable":
        raise ConfigError(
            f"--load {root}: the distributed optimizer's {sharding} state cannot move to another layout "
            f"({layout_note}); resume with the saved TP/PP, or add --no-load-optim to start the optimizer "
            f"state afresh (saving with --dist-ckpt-optim-fully-reshardable keeps it across layouts)"
        )


_MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def _check_same_model(root, saved: dict, config) -> None:
    """A one-line error instead of dist_checkpointing's shape mismatch deep in the load."""
    for name in _MODEL_FIELDS:
        if name in saved and saved[name] != getattr(config.model, name):
            raise ConfigError(
                f"--load {root}: the checkpoint's model has {name} {saved[name]}, this run "
                f"{getattr(config.model, name)} (--{name.replace('_', '-')})"
            )


def _check_same_vocabulary(root, directory: Path, vocab_size: int) -> None:
    """The embedding's rows (the padded vocabulary) from the checkpoint's tensor metadata:
    megatron-core would load a larger one cut down to its first rows, a smaller one into the
    first rows of a fresh embedding, and train on without a word."""
    saved = dist_checkpointing.load_tensors_metadata(str(directory)).get(EMBEDDING_KEY)
    if saved is not None and saved.global_shape[0] != vocab_size:
        raise ConfigError(
            f"--load {root}: the checkpoint's model has a vocabulary of {saved.global_shape[0]} ids, this run "
            f"{vocab_size} (both padded: the tokenizer's ids rounded up to a multiple of "
            "--make-vocab-size-divisible-by x TP); resume with the checkpoint's --tokenizer-model and "
            "--make-vocab-size-divisible-by"
        )


def _requested_step(root: Path, config) -> int:
    """--ckpt-step N: that checkpoint instead of the tracker's latest (Megatron-LM's flag)."""
    step = config.checkpoint.ckpt_step
    if not checkpoint_name(root, step).is_dir():
        raise ConfigError(
            f"--ckpt-step {step}: {checkpoint_name(root, step)} does not exist; {older_checkpoints(root, None)}"
        )
    return step


def _verify_files(root: Path, iteration: int, config) -> None:
    """Every file against the checksums recorded at save (the same verdict on every rank)."""
    if not config.checkpoint.ckpt_checksums:
        return
    problems = checksum_problems(checkpoint_name(root, iteration), contents=True)
    if problems:
        raise ConfigError(damaged_checkpoint(root, iteration, problems))


def checksum_problems(directory: Path, contents: bool, group=None) -> list[str]:
    """What the checksums say is wrong with a checkpoint: an unreadable checksums.json, a missing
    one although the run saved checksums, missing or truncated files and (with `contents`, a
    collective: every file is read) files whose bytes differ. A checkpoint saved without
    checksums (--no-ckpt-checksums, an older version) has no problems here."""
    try:
        files = read_checksums(directory)
    except ChecksumFileError as error:
        return [str(error)]
    if files is None:
        saved_with_checksums = _saved_with_checksums(directory)
        return [f"{CHECKSUM_FILE} is missing, although the run saved checksums"] if saved_with_checksums else []
    return verify_checksums(directory, files, group) if contents else size_problems(directory, files)


def _saved_with_checksums(directory: Path) -> bool:
    """Whether the configuration in common.pt says the run recorded checksums (False when it
    cannot be read: loading it then says so)."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except READ_ERRORS:
        return False
    return bool(common.get("train_config", {}).get("checkpoint", {}).get("ckpt_checksums", False))


def damaged_checkpoint(
    root: Path, iteration: int, problems: list[str], verdict: str = "is damaged: ", flag: str = "--load"
) -> str:
    more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
    return (
        f"{flag} {root}: the checkpoint of iteration {iteration} {verdict}{problems[0]}{more}; "
        f"{older_checkpoints(root, iteration)}"
    )


def older_checkpoints(root: Path, below: int | None) -> str:
    """Which complete checkpoints the user can fall back to, and how."""
    complete = []
    for directory in sorted(Path(root).glob("iter_*"), reverse=True):
        try:
            iteration = int(directory.name.removeprefix("iter_"))
        except ValueError:  # iter_NNNNNNN.incomplete: a save that did not finish
            continue
        # Without checksums (saved by an older version) a checkpoint cannot be told incomplete: listed.
        if (below is None or iteration < below) and not checksum_problems(directory, contents=False):
            complete.append(iteration)
    if not complete:
        return f"no complete checkpoint{' before it' if below else ''} is left: start afresh with another --load"
    listed = ", ".join(map(str, complete))
    return f"complete checkpoints: iteration {listed}; load one with --ckpt-step {complete[0]}"


# The scheduler's state-dict entries, the flags that set them and their unit in samples (per iteration: gbs).
_SCHEDULE = {
    "max_lr": ("--lr", False),
    "min_lr": ("--min-lr", False),
    "lr_warmup_steps": ("--lr-warmup-iters", True),
    "lr_decay_steps": ("--lr-decay-iters (default: --train-iters)", True),
    "lr_decay_style": ("--lr-decay-style", False),
    "start_wd": ("--weight-decay", False),
    "wd_incr_steps": ("--train-iters", True),
}


def _check_schedule(root: Path, scheduler, saved: dict, config) -> None:
    """Megatron's rule for a resumed learning-rate schedule: the same settings, unless
    --override-opt-param-scheduler (this run's) or --use-checkpoint-opt-param-scheduler (the checkpoint's)."""
    if scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler:
        return
    gbs = config.optim.global_batch_size
    differences = [
        f"{flag} {saved[key] // gbs if per_iteration else saved[key]} in the checkpoint, "
        f"{getattr(scheduler, key) // gbs if per_iteration else getattr(scheduler, key)} now"
        for key, (flag, per_iteration) in _SCHEDULE.items()
        if key in saved and saved[key] != getattr(scheduler, key)
    ]
    if differences:
        raise ConfigError(
            f"--load {root}: the learning-rate schedule differs from the checkpoint's ({'; '.join(differences)}); "
            "resume with the same settings, or add --override-opt-param-scheduler to follow this run's "
            "schedule or --use-checkpoint-opt-param-scheduler to keep the checkpoint's"
        )


def data_changes(common: dict, config) -> list[str]:
    """Settings that differ from the checkpoint's run and shape the sample order (the
    datasets' sizes set their epochs and shuffles): the resumed run may then read other
    samples than an uninterrupted one would."""
    saved_data = common.get("train_config", {}).get("data", {})
    saved_optim = common.get("train_config", {}).get("optim", {})
    saved_model = common.get("train_config", {}).get("model", {})
    now = config.to_dict()
    changes = []
    for section, saved, keys in (
        ("data", saved_data, ("data_path", "split", "mock_data")),
        ("optim", saved_optim, ("seed", "train_iters", "global_batch_size")),
        ("model", saved_model, ("seq_length",)),
    ):
        for key in keys:
            if key in saved and saved[key] != now[section][key]:
                changes.append(f"{key}: {saved[key]} -> {now[section][key]}")
    return changes


def reweighting_changes(common: dict, config) -> list[str]:
    """Reweighting settings that differ from the checkpoint's run, as `--flag saved -> now`.
    Legitimate (e.g. another r from here on), so they are noted, not refused."""
    saved = common.get("train_config", {}).get("reweight")
    if not isinstance(saved, dict):
        return []
    now = config.to_dict()["reweight"]

    def flat(section: dict) -> dict:
        values = {key: value for key, value in section.items() if key not in ("temperature", "strategy_kwargs")}
        values.update(section.get("temperature", {}))
        values.update({f"reweight_{key}": value for key, value in section.get("strategy_kwargs", {}).items()})
        return values

    saved, now = flat(saved), flat(now)
    flags = [(f.name, flag_of(f)) for cls in (ReweightConfig, StrategyOptions) for f, _ in setting_fields(cls)]
    return [
        f"{flag} {saved.get(name, 'unset')} -> {now.get(name, 'unset')}"
        for name, flag in flags
        if saved.get(name) != now.get(name)
    ]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Checkpointer:
    """The run's checkpoints: resumes from --load, and saves to --save at every
    --save-interval, on an early exit and at the end of training, at most once per iteration."""

    def __init__(self, config, mo, log, loss_checks: LossChecks | None = None):
        self.config, self.mo, self.log, self.loss_checks = config, mo, log, loss_checks
        self.saved_at: int | None = None
        self.last_checkpoint: str | None = None  # the latest saved or loaded

    def load(self) -> TrainState:
        """The state to continue from (a fresh one without a checkpoint to load)."""
        root = self.config.checkpoint.load
        loaded = load_checkpoint(root, self.mo, self.config) if root is not None else None
        if loaded is None:
            if root is not None:  # as Megatron-LM: a first run of a requeued job starts this way
                self.log.print(
                    f"warning: --load {root}: no checkpoint found (no {TRACKER_FILENAME}); training starts from random"
                )
            return TrainState()
        state, common, notes = loaded
        self.saved_at, self.last_checkpoint = state.iteration, str(checkpoint_name(root, state.iteration))
        self.log.print(
            f"resumed from {self.last_checkpoint} (iteration {state.iteration}, {state.consumed_samples} samples)"
            + "".join(f"; {note}" for note in notes)
        )
        changes = reweighting_changes(common, self.config)
        if changes:
            self.log.print(
                f"note: reweighting differs from the checkpoint's run ({'; '.join(changes)}): this run's applies"
            )
        changes = data_changes(common, self.config)
        if changes:
            self.log.print(
                f"warning: data settings differ from the checkpoint's run ({'; '.join(changes)}): "
                "the resumed run may read other samples than an uninterrupted one"
            )
        return state

    def should_save(self, iteration: int) -> bool:
        interval = self.config.checkpoint.save_interval
        return bool(interval) and iteration % interval == 0

    def save(self, state: TrainState, reason: str) -> None:
        """Collective. A no-op without --save or when this iteration is saved already."""
        from megatron_reweight.training.model import parameters_synced

        root = self.config.checkpoint.save
        if root is None or self.saved_at == state.iteration:
            return
        if self._step_flagged():
            self.log.print(f"not saving a checkpoint of iteration {state.iteration}: it failed --check-for-spiky-loss")
            return
        start = time.perf_counter()
        with parameters_synced(self.mo.model):
            path = save_checkpoint(root, state, self.mo, self.config)
        self.saved_at, self.last_checkpoint = state.iteration, str(path)
        self.log.print(f"saved checkpoint {path} ({reason}, {time.perf_counter() - start:.1f}s)")

    def _step_flagged(self) -> bool:
        """Whether the loss checks flagged the last step on any rank (all must agree to save)."""
        if self.loss_checks is None:
            return False
        flagged = torch.tensor([float(bool(self.loss_checks.flagged))], device=_device())
        dist.all_reduce(flagged, op=dist.ReduceOp.MAX)
        return bool(flagged.item())
