"""The training loop: megatron-core's schedules, DDP, optimizer and LR schedule, with the
reweighted loss of `megatron_reweight.loss.SampleReweighter`.

    config = parse_config(["--preset", "tiny", "--train-iters", "50"])
    result = train(config)          # in this process (a world of one, or under torchrun)

One iteration: zero the grad buffers, run `get_forward_backward_func()` over
global_batch / (micro_batch x DP) micro-batches (the reweighter's loss_func weights the
samples of each micro-batch across DP), let `finalize_model_grads` reduce the gradients,
step the optimizer and the LR schedule (counted in samples, as Megatron-LM).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from megatron_reweight.loss import SampleReweighter, check_megatron_config, reduce_reports
from megatron_reweight.training import checkpointing, distributed
from megatron_reweight.training.config import TrainConfig
from megatron_reweight.training.data import (
    JsonTokenizer,
    NullTokenizer,
    build_datasets,
    data_loader,
    padded_vocab_size,
    to_device,
)
from megatron_reweight.training.errors import ConfigError
from megatron_reweight.training.evaluation import evaluate
from megatron_reweight.training.metrics import MetricsLogger
from megatron_reweight.training.optimizer import build_model_and_optimizer, current_lr, parameters_synced
from megatron_reweight.training.signals import ExitMonitor


@dataclass
class TrainResult:
    iteration: int
    consumed_samples: int
    exit_reason: str  # "completed", or why the run stopped early (signal, time budget)
    train_history: list[dict] = field(default_factory=list)  # the logged train records (logging rank)
    eval_history: list[dict] = field(default_factory=list)  # {"iteration", "domains"} (logging rank)
    checkpoint: str | None = None  # the last checkpoint saved


def make_forward_step(runtime, device: torch.device):
    """Megatron's forward_step_func: read a micro-batch, slice it for context parallelism,
    run the model. The caller binds `loss_func(batch, output_tensor)` (weighted or unweighted)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    def forward_step(data_iterator, model, loss_func):
        if data_iterator is None:  # a middle pipeline stage: input comes from the previous stage
            return model(None, None, None, labels=None), partial(loss_func, None)
        batch = to_device(next(data_iterator), device)
        sequences = get_batch_on_this_cp_rank({k: batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")})
        # A blend (several --data-path prefixes) tells each sample's domain; one dataset does not.
        sequences["dataset_id"] = batch.get("dataset_id")
        output = model(sequences["tokens"], sequences["position_ids"], None, labels=sequences["labels"])
        return output, partial(loss_func, sequences)

    return forward_step


def weighted_loss_func(reweighter: SampleReweighter, batch: dict, output_tensor: torch.Tensor):
    return reweighter.loss_func(batch["loss_mask"], output_tensor, batch["dataset_id"])


def _tokenizer(config: TrainConfig):
    if config.data.tokenizer_model is not None:
        return JsonTokenizer(config.data.tokenizer_model)
    return NullTokenizer(config.data.vocab_size)


def _weight_report_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training described by `config`. Collective: every rank calls it.
    Raises ConfigError on bad input found after start-up (e.g. an unusable checkpoint)."""
    owns_process_group = not dist.is_initialized()
    runtime = distributed.initialize(config)
    try:
        return _train(config, runtime)
    finally:
        if owns_process_group:
            distributed.shutdown()
        else:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()


@dataclass
class _Interval:
    """What the loop accumulates between two log lines."""

    reports: list = field(default_factory=list)  # loss_func reports of every micro-batch
    seconds: float = 0.0
    steps: int = 0
    grad_norms: list = field(default_factory=list)
    skipped: int = 0


def _train(config: TrainConfig, runtime) -> TrainResult:
    o = config.optim
    checkpointing.check_save_directory(config.checkpoint.save, config.checkpoint.load)  # before logs go there
    log = MetricsLogger(runtime.is_logging_rank, config.logging, _run_name(config), config.to_dict())
    exit_monitor = ExitMonitor(
        config.checkpoint.exit_signal if config.checkpoint.exit_signal_handler else None,
        config.checkpoint.exit_duration_in_mins,
        config.checkpoint.exit_interval,
        runtime.device,
    )
    with exit_monitor:
        # --- set-up: data, model, optimizer, checkpoint ---------------------------------
        tokenizer = _tokenizer(config)
        config.data.vocab_size, config.data.eod_id = tokenizer.vocab_size, tokenizer.eod
        vocab = padded_vocab_size(
            tokenizer.vocab_size, config.model.make_vocab_size_divisible_by, config.parallel.tensor_model_parallel_size
        )
        num_microbatches = o.global_batch_size // (o.micro_batch_size * runtime.dp_size)
        datasets = build_datasets(
            config.data, config.model.seq_length, o.seed, tokenizer, o.train_iters * o.global_batch_size,
            config.eval.eval_iters * o.global_batch_size,
        )  # fmt: skip
        mo = build_model_and_optimizer(config, vocab)
        check_megatron_config(mo.transformer_config.calculate_per_token_loss, False)
        reweighter = SampleReweighter.from_parallel_state(config.reweight, config.data.domains)

        state, result = checkpointing.TrainState(), TrainResult(0, 0, "completed")
        loaded = checkpointing.load_checkpoint(config.checkpoint.load, mo, config) if config.checkpoint.load else None
        if loaded is not None:
            state, common, notes = loaded
            result.checkpoint = str(checkpointing.checkpoint_name(config.checkpoint.load, state.iteration))
            log.print(
                f"resumed from {result.checkpoint} (iteration {state.iteration}, {state.consumed_samples} samples)"
                + "".join(f"; {note}" for note in notes)
            )
            changes = checkpointing.data_changes(common, config)
            if changes:
                log.print(f"warning: data settings differ from the checkpoint's run ({'; '.join(changes)}): "
                          f"the resumed run may read other samples than an uninterrupted one")  # fmt: skip
        _log_run(log, config, runtime, mo, vocab, num_microbatches)

        train_iterator = None  # middle pipeline stages read no data
        if runtime.is_first_stage or runtime.is_last_stage:
            train_iterator = iter(
                data_loader(
                    datasets.train, state.consumed_samples, o.micro_batch_size, runtime.dp_rank, runtime.dp_size,
                    config.data.num_workers,
                )
            )  # fmt: skip
        forward_step = make_forward_step(runtime, runtime.device)
        saved_at = state.iteration if loaded is not None else None

        def save(reason: str) -> None:
            nonlocal saved_at
            if config.checkpoint.save is None or saved_at == state.iteration:
                return
            start = time.perf_counter()
            with parameters_synced(mo):
                path = checkpointing.save_checkpoint(
                    config.checkpoint.save, state, mo, config, _reweight_dict(config.reweight)
                )
            saved_at, result.checkpoint = state.iteration, str(path)
            log.print(f"saved checkpoint {path} ({reason}, {time.perf_counter() - start:.1f}s)")

        # --- the loop ---------------------------------------------------------------------
        for chunk in mo.model:
            chunk.train()
        interval = _Interval()
        while state.iteration < o.train_iters:
            reweighter.step = state.iteration
            start = time.perf_counter()
            reports, grad_norm, update_successful = _train_step(
                mo,
                partial(forward_step, loss_func=partial(weighted_loss_func, reweighter)),
                train_iterator,
                num_microbatches,
                config,
            )
            state.iteration += 1
            state.consumed_samples += o.global_batch_size
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            interval.seconds += time.perf_counter() - start
            interval.steps += 1
            interval.skipped += not update_successful
            if grad_norm is not None:
                interval.grad_norms.append(float(grad_norm))
            if runtime.is_last_stage:
                interval.reports += reports

            if state.iteration % config.logging.log_interval == 0 or state.iteration == o.train_iters:
                values = _interval_values(interval, mo, reweighter, state, config, runtime)
                log.log_train(state.iteration, o.train_iters, values)
                if runtime.is_logging_rank:
                    result.train_history.append({"iteration": state.iteration, **values})
                interval = _Interval()

            if config.eval.eval_iters and (
                state.iteration % config.eval.eval_interval == 0 or state.iteration == o.train_iters
            ):
                with parameters_synced(mo):
                    per_domain = evaluate(mo, datasets.valid, config, runtime, forward_step, num_microbatches)
                log.log_eval(state.iteration, per_domain)
                if runtime.is_logging_rank:
                    result.eval_history.append({"iteration": state.iteration, "domains": per_domain})

            if config.checkpoint.save_interval and state.iteration % config.checkpoint.save_interval == 0:
                save("interval")
            if state.iteration < o.train_iters and exit_monitor.should_exit(state.iteration):
                save(exit_monitor.reason)
                result.exit_reason = exit_monitor.reason
                log.print(f"exiting at iteration {state.iteration}: {exit_monitor.reason}")
                break
        else:
            save("end of training")

        result.iteration, result.consumed_samples = state.iteration, state.consumed_samples
        log.close()
        return result


def _train_step(mo, forward_step_func, data_iterator, num_microbatches: int, config: TrainConfig):
    """Megatron-LM's train_step: forward-backward over the micro-batches (gradients reduced
    by finalize_model_grads inside the schedule), then the optimizer and LR schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in mo.model:
        chunk.zero_grad_buffer()
    mo.optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=mo.model,
        num_microbatches=num_microbatches,
        seq_length=config.model.seq_length,  # the full length: the schedule divides by CP (and TP with SP)
        micro_batch_size=config.optim.micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = mo.optimizer.step()
    if update_successful:
        mo.scheduler.step(increment=config.optim.global_batch_size)
    return reports, grad_norm, update_successful


def _interval_values(interval: _Interval, mo, reweighter, state, config: TrainConfig, runtime) -> dict:
    """The log line's numbers: loss_func reports averaged over the interval's micro-batches
    and the DP x CP ranks (last pipeline stage), plus LR, r, grad norm and speed."""
    values = reduce_reports(interval.reports, _weight_report_group()) if runtime.is_last_stage else {}
    step_time = interval.seconds / interval.steps
    values.update(
        {
            "consumed_samples": state.consumed_samples,
            "lr": current_lr(mo.optimizer),
            "r": reweighter.temperature(),
            "grad norm": sum(interval.grad_norms) / len(interval.grad_norms) if interval.grad_norms else math.nan,
            "step time s": step_time,
            "tokens per s": config.optim.global_batch_size * config.model.seq_length / step_time,
            "skipped iterations": interval.skipped,
        }
    )
    return values


def _run_name(config: TrainConfig) -> str:
    return f"{config.model.preset}-{config.reweight.strategy}"


def _reweight_dict(reweight) -> dict:
    t = reweight.temperature
    return {
        "strategy": reweight.strategy,
        "r": t.r,
        "warmup_steps": t.warmup_steps,
        "warmup_r": t.warmup_r,
        "anneal": t.anneal,
        "anneal_steps": t.anneal_steps,
        "delta": reweight.delta,
        "strategy_kwargs": dict(reweight.strategy_kwargs),
    }


def _log_run(log: MetricsLogger, config: TrainConfig, runtime, mo, vocab: int, num_microbatches: int) -> None:
    # Parameter count of the whole model: sum the shards over TP and PP (DP/CP replicate).
    from megatron.core import parallel_state

    count = torch.tensor([float(mo.num_parameters())], device=runtime.device)
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
        count.zero_()
    dist.all_reduce(count)
    m, p, o = config.model, config.parallel, config.optim
    summary = {
        "preset": m.preset,
        "parameters": int(count.item()),
        "world_size": runtime.world_size,
        "tp": p.tensor_model_parallel_size,
        "pp": p.pipeline_model_parallel_size,
        "cp": p.context_parallel_size,
        "dp": runtime.dp_size,
        "micro_batch_size": o.micro_batch_size,
        "global_batch_size": o.global_batch_size,
        "num_microbatches": num_microbatches,
        "seq_length": m.seq_length,
        "padded_vocab_size": vocab,
        "device": config.device.device,
        "bf16": config.device.bf16,
        "transformer_impl": config.device.transformer_impl,
        "reweight": _reweight_dict(config.reweight),
        "domains": config.data.domains,
    }
    log.print(
        f"pretrain_llama: {m.preset} ({summary['parameters'] / 1e6:.2f}M parameters, {m.num_layers} layers, "
        f"hidden {m.hidden_size}, seq {m.seq_length}, vocab {vocab}) | TP {p.tensor_model_parallel_size} "
        f"PP {p.pipeline_model_parallel_size} CP {p.context_parallel_size} DP {runtime.dp_size} | "
        f"global batch {o.global_batch_size} = micro {o.micro_batch_size} x DP {runtime.dp_size} x "
        f"{num_microbatches} micro-batches | {config.device.device} "
        f"{'bf16' if config.device.bf16 else 'fp32'} {config.device.transformer_impl} | "
        f"reweighting {config.reweight.strategy} r={config.reweight.temperature.r} "
        f"(r={config.reweight.temperature.warmup_r} for {config.reweight.temperature.warmup_steps} steps) | "
        f"domains {', '.join(config.data.domains)}"
    )
    log.record({"kind": "run", **summary, "config": config.to_dict()})


def _quiet_logging() -> None:
    """megatron-core logs through `logging`: show its warnings once (rank 0), not per rank."""
    import logging
    import os

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.WARNING if rank == 0 else logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: parse, check, train. Returns the process exit code."""
    from megatron_reweight.training.arguments import parse_config
    from megatron_reweight.training.errors import report_config_error

    _quiet_logging()
    try:
        config = parse_config(argv)
        train(config)
    except ConfigError as error:
        report_config_error(error)
    return 0
