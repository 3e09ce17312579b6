"""The training loop: megatron-core's schedules, DDP, optimizer and LR schedule, with the
reweighted loss of `megatron_reweight.loss.SampleReweighter`.

    config = parse_config(["--preset", "tiny", "--train-iters", "50"])
    result = train(config)          # in this process (a world of one, or under torchrun)

One iteration: zero the grad buffers, run `get_forward_backward_func()` over
global_batch / (micro_batch x DP) micro-batches (the reweighter's loss_func weights the
samples of each micro-batch across DP, or, with --reweight-window global-batch, all samples of
the step, from a forward-only pass run first: megatron_reweight.window), let
`finalize_model_grads` reduce the gradients,
step the optimizer and the LR schedule (counted in samples, as Megatron-LM). After it, the
logger, the validator, the checkpointer and the exit monitor each decide whether it is
their turn.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from megatron_reweight import window
from megatron_reweight.loss import SampleReweighter, report_means, sum_reports
from megatron_reweight.loss_checks import LossChecks
from megatron_reweight.plan import GIB, estimate, run_layout
from megatron_reweight.training import distributed
from megatron_reweight.training.checkpointing import Checkpointer, check_save_directory
from megatron_reweight.training.config import TrainConfig
from megatron_reweight.training.data import (
    build_datasets,
    check_token_ids,
    data_loader,
    padded_vocab_size,
    prepare_data,
    to_device,
)
from megatron_reweight.training.errors import ConfigError, TrainingStopped
from megatron_reweight.training.evaluation import Validator
from megatron_reweight.training.metrics import DOMAIN_WEIGHT, WINDOW_SIZE, DomainWeights, MetricsLogger
from megatron_reweight.training.model import build_model, num_parameters
from megatron_reweight.training.optimizer import build_optimizer, current_lr
from megatron_reweight.training.signals import INTERRUPTED, INTERRUPTED_EXIT_CODE, ExitMonitor


@dataclass
class TrainResult:
    iteration: int
    consumed_samples: int
    exit_reason: str  # "completed", or why the run stopped early (signal, time budget)
    train_history: list[dict] = field(default_factory=list)  # the logged train records (logging rank)
    eval_history: list[dict] = field(default_factory=list)  # {"iteration", "domains"} (logging rank)
    checkpoint: str | None = None  # the last checkpoint saved (or loaded)


def make_forward_step(device: torch.device, vocab_size: int, dataset_names: list[str]):
    """Megatron's forward_step_func: read a micro-batch, check its token ids, slice it for context
    parallelism, run the model. The caller binds `loss_func(batch, output_tensor)` (weighted or unweighted)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    def forward_step(data_iterator, model, loss_func):
        if data_iterator is None:  # a middle pipeline stage: input comes from the previous stage
            return model(None, None, None, labels=None), partial(loss_func, None)
        batch = next(data_iterator)
        check_token_ids(batch, vocab_size, dataset_names)
        batch = to_device(batch, device)
        sequences = get_batch_on_this_cp_rank({k: batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")})
        # A blend (several --data-path prefixes) tells each sample's domain; one dataset does not.
        sequences["dataset_id"] = batch.get("dataset_id")
        output = model(sequences["tokens"], sequences["position_ids"], None, labels=sequences["labels"])
        return output, partial(loss_func, sequences)

    return forward_step


def weighted_loss_func(
    reweighter: SampleReweighter, domain_of_dataset: torch.Tensor | None, batch: dict, output_tensor: torch.Tensor
):
    """`domain_of_dataset[dataset_id]`: the domain of a blend's sample (a domain may be several shards)."""
    dataset_ids = batch["dataset_id"]
    domain_ids = None if dataset_ids is None else domain_of_dataset[dataset_ids.to(domain_of_dataset.device).long()]
    return reweighter.loss_func(batch["loss_mask"], output_tensor, domain_ids)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training described by `config`. Collective: every rank calls it.
    Raises ConfigError on bad input found after start-up (unusable data or checkpoint)."""
    data = prepare_data(config.data)
    owns_process_group = not dist.is_initialized()
    runtime = distributed.initialize(config)
    try:
        with ExitMonitor(config.checkpoint, runtime.device, announce=runtime.is_logging_rank) as exit_monitor:
            return _train(config, runtime, data, exit_monitor)
    finally:
        if owns_process_group:
            distributed.shutdown()
        else:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()


def _train(config: TrainConfig, runtime, data, exit_monitor: ExitMonitor) -> TrainResult:
    o = config.optim
    check_save_directory(config.checkpoint.save, config.checkpoint.load)  # before logs go there
    log = MetricsLogger(runtime.is_logging_rank, config)

    # --- set-up: data, model, optimizer, checkpoint -------------------------------------
    vocab = padded_vocab_size(
        data.tokenizer.vocab_size, config.model.make_vocab_size_divisible_by, config.parallel.tensor_model_parallel_size
    )
    num_microbatches = o.global_batch_size // (o.micro_batch_size * runtime.dp_size)
    datasets = build_datasets(
        data, config.data.split, config.model.seq_length, o.seed, o.train_iters * o.global_batch_size,
        config.eval.eval_iters * o.global_batch_size,
    )  # fmt: skip
    mo = build_optimizer(config, build_model(config, vocab))
    checks = LossChecks(nan_and_inf=o.check_for_nan_in_loss_and_grad, spiky=o.check_for_spiky_loss)
    reweighter = SampleReweighter.from_parallel_state(config.reweight, data.domains, checks=checks)
    checkpointer = Checkpointer(config, mo, log, checks)
    state = checkpointer.load()
    _log_run(log, config, runtime, mo, vocab, data.tokenizer.vocab_size, num_microbatches, data.domains)
    if data.prefixes is not None and data.cache_path is None:
        log.print(
            "note: no --data-cache-path: megatron-core caches the sample indices beside the data and rebuilds the "
            "blend's each run (with --save DIR they are cached in DIR/data-cache)"
        )

    train_iterator = None  # middle pipeline stages read no data
    if runtime.is_first_stage or runtime.is_last_stage:
        loader = data_loader(
            datasets.train, state.consumed_samples, o.micro_batch_size, runtime.dp_rank, runtime.dp_size,
            config.data.num_workers,
        )  # fmt: skip
        train_iterator = iter(loader)
    domain_of_dataset = None  # with a blend: the domain of each dataset_id
    dataset_names = data.domains
    if data.domain_of_prefix is not None:
        domain_of_dataset = torch.tensor(data.domain_of_prefix, device=runtime.device)
        dataset_names = [data.domains[domain] for domain in data.domain_of_prefix]
    forward_step = make_forward_step(runtime.device, data.tokenizer.vocab_size, dataset_names)
    audit = _audit_writer(config, runtime, data, datasets.train, dataset_names, reweighter, state.iteration)
    train_forward_step = partial(forward_step, loss_func=partial(weighted_loss_func, reweighter, domain_of_dataset))
    validator = Validator(config, datasets.valid, runtime, forward_step, num_microbatches)

    # --- the loop -----------------------------------------------------------------------
    from megatron.core import parallel_state

    result = TrainResult(0, 0, "completed")
    for chunk in mo.model:
        chunk.train()
    interval = _Interval()
    domain_weights = DomainWeights(state.iteration, parallel_state.get_data_parallel_group(with_context_parallel=True))
    start = time.perf_counter()
    while state.iteration < o.train_iters:
        reweighter.step = state.iteration
        checks.flagged.clear()
        try:
            step = _train_step(mo, reweighter, train_forward_step, train_iterator, num_microbatches, config, runtime)
        except RuntimeError as error:
            raise _stopped(error, state.iteration + 1, checkpointer.saved_at) from error
        interval.add(step)
        domain_weights.add(step.reports)
        if audit is not None:
            audit.add_step(state.iteration + 1, reweighter.temperature(), state.consumed_samples, reweighter.audited)
            reweighter.audited.clear()
        for flag in checks.flagged:
            log.print(f"warning: iteration {state.iteration + 1}: {flag} (--check-for-spiky-loss)")
        state.iteration += 1
        state.consumed_samples += o.global_batch_size

        if audit is not None and (log.should_log(state.iteration) or checkpointer.should_save(state.iteration)):
            audit.flush()
        if log.should_log(state.iteration):
            log.log_train(state.iteration, _interval_values(interval, mo, reweighter, state, config, runtime))
            log.log_histograms(state.iteration, _weight_histograms(reweighter))
            interval = _Interval()
        if validator.should_validate(state.iteration):
            per_domain = validator.validate(mo.model)
            log.log_eval(state.iteration, per_domain, *domain_weights.take_since_evaluation(state.iteration))
        if checkpointer.should_save(state.iteration):
            checkpointer.save(state, "interval")
        if state.iteration < o.train_iters and exit_monitor.should_exit(state.iteration):
            if audit is not None:
                audit.flush()
            checkpointer.save(state, exit_monitor.reason)
            result.exit_reason = exit_monitor.reason
            where = _saved_where(checkpointer, state)
            log.print(f"exiting at iteration {state.iteration}: {exit_monitor.reason}; {where}")
            break
    else:
        if audit is not None:
            audit.flush()
        checkpointer.save(state, "end of training")

    result.iteration, result.consumed_samples = state.iteration, state.consumed_samples
    result.checkpoint = checkpointer.last_checkpoint
    result.train_history, result.eval_history = log.train_history, log.eval_history
    weights, weights_from = domain_weights.read("run")
    _log_summary(log, config, result, checkpointer, data.domains, weights, weights_from, time.perf_counter() - start)
    log.close()
    return result


def _saved_where(checkpointer: Checkpointer, state) -> str:
    """Where an early exit left the run, for its last line."""
    root = checkpointer.config.checkpoint.save
    if root is None:
        return "nothing saved (no --save)"
    if checkpointer.saved_at == state.iteration:
        return f"checkpoint {checkpointer.last_checkpoint}, resume with --load {root}"
    return f"this step is not saved; the latest checkpoint is {checkpointer.last_checkpoint or 'none'}"


@dataclass
class _StepOutcome:
    reports: list  # loss_func reports of every micro-batch (last pipeline stage), else []
    grad_norm: float | None
    update_successful: bool
    seconds: float


@dataclass
class _Interval:
    """What the loop accumulates between two log lines."""

    reports: list = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    grad_norms: list = field(default_factory=list)
    skipped: int = 0

    def add(self, step: _StepOutcome) -> None:
        self.reports += step.reports
        self.seconds += step.seconds
        self.steps += 1
        self.skipped += not step.update_successful
        if step.grad_norm is not None:
            self.grad_norms.append(float(step.grad_norm))


def _stopped(error: RuntimeError, iteration: int, saved_at: int | None) -> BaseException:
    """A failed --check-for-nan-in-loss-and-grad (megatron-core's rerun state machine raises it in
    the loss function or the gradient reduction, before the optimizer step) as one clear line."""
    found = re.search(r"message='([^']*)'", str(error))
    if "Unexpected result" not in str(error) or found is None:
        return error
    last = f"the latest checkpoint is iteration {saved_at}" if saved_at is not None else "no checkpoint was saved"
    return TrainingStopped(
        f"iteration {iteration}: {found[1]} (--check-for-nan-in-loss-and-grad): training stopped before this "
        f"step's update, which is not saved; {last}. Lower --lr or check the data, then resume with --load"
    )


def _train_step(mo, reweighter, forward_step_func, data_iterator, num_microbatches: int, config: TrainConfig, runtime):
    """Megatron-LM's train_step: forward-backward over the micro-batches in the reweighter's
    weighting window (gradients reduced by finalize_model_grads inside the schedule), then the
    optimizer and LR schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    start = time.perf_counter()
    for chunk in mo.model:
        chunk.zero_grad_buffer()
    mo.optimizer.zero_grad()
    reports = window.forward_backward(
        reweighter,
        get_forward_backward_func(),
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=mo.model,
        num_microbatches=num_microbatches,
        seq_length=config.model.seq_length,  # the full length: the schedule divides by CP (and TP with SP)
        micro_batch_size=config.optim.micro_batch_size,
    )
    if reweighter.skip_update:  # a non-finite sample (--reweight-skip-nonfinite-samples): gradients zeroed
        update_successful, grad_norm = False, None
    else:
        update_successful, grad_norm, _ = mo.optimizer.step()
    if update_successful:
        mo.scheduler.step(increment=config.optim.global_batch_size)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    reports = reports if runtime.is_last_stage else []
    return _StepOutcome(reports, grad_norm, update_successful, time.perf_counter() - start)


def _interval_values(interval: _Interval, mo, reweighter, state, config: TrainConfig, runtime) -> dict:
    """The log line's numbers: loss_func reports averaged over the interval's micro-batches
    and the DP x CP ranks (last pipeline stage), plus LR, r, grad norm and speed."""
    from megatron.core import parallel_state

    values = {}
    if runtime.is_last_stage:
        totals = sum_reports(interval.reports, parallel_state.get_data_parallel_group(with_context_parallel=True))
        values = report_means(totals)
        # Each domain's samples in the interval (CP ranks report the same samples).
        cp = config.parallel.context_parallel_size
        values.update(
            {"samples/" + key.removeprefix(DOMAIN_WEIGHT): round(float(pair[1]) / cp)
             for key, pair in totals.items() if key.startswith(DOMAIN_WEIGHT)}
        )  # fmt: skip
        # Each step reports its largest drift (the same on every rank): the interval's is the largest of them.
        drifts = [float(r["window loss drift"][0]) for r in interval.reports if r.get("window loss drift", (0, 0))[1]]
        if drifts:
            values["window loss drift"] = max(drifts)
        if "reweight skipped samples" in values:  # each step's exact count: the interval's is their sum
            values["reweight skipped samples"] *= interval.steps
    step_time = interval.seconds / interval.steps
    values.update(
        {
            "consumed_samples": state.consumed_samples,
            "lr": current_lr(mo.optimizer),
            "r": reweighter.temperature(),
            WINDOW_SIZE + config.reweight.window: _window_size(config, runtime),
            "grad norm": sum(interval.grad_norms) / len(interval.grad_norms) if interval.grad_norms else math.nan,
            "step time s": step_time,
            "tokens per s": config.optim.global_batch_size * config.model.seq_length / step_time,
            "skipped iterations": interval.skipped,
        }
    )
    return values


def _audit_writer(config: TrainConfig, runtime, data, train_dataset, dataset_names, reweighter, iteration: int):
    """--reweight-audit-dir: the writer on the logging rank (last pipeline stage, where every
    window's gathered losses and weights are), continuing from `iteration`; None elsewhere."""
    if config.reweight.audit_dir is None or not runtime.is_logging_rank:
        return None
    from megatron_reweight.audit import AuditWriter, DocumentLookup

    reweighter.audited = []
    meta = {
        "strategy": config.reweight.strategy,
        "window": config.reweight.window,
        "window_size": _window_size(config, runtime),
        "global_batch_size": config.optim.global_batch_size,
        "domains": data.domains,
        "prefixes": data.prefixes,
        "dataset_domains": dataset_names,
        "tokenizer_model": data.tokenizer.unique_identifiers.get("path"),  # for the report's text snippets
    }
    lookup = DocumentLookup(train_dataset, dataset_names)
    return AuditWriter(config.reweight.audit_dir, iteration, meta, lookup)


def _weight_histograms(reweighter) -> dict:
    """The latest weighting window's weight x batch and finite per-sample losses (on the last
    pipeline stage, where the logging rank is; empty elsewhere)."""
    if reweighter.last_weights is None:
        return {}
    weights, losses = reweighter.last_weights, reweighter.last_losses
    return {"weight x batch": weights * weights.numel(), "sample loss": losses[torch.isfinite(losses)]}


def _window_size(config: TrainConfig, runtime) -> int:
    """b, the samples weighted together."""
    o = config.optim
    return o.global_batch_size if config.reweight.window == "global-batch" else o.micro_batch_size * runtime.dp_size


def _log_run(
    log: MetricsLogger, config: TrainConfig, runtime, mo, vocab: int, data_vocab: int, num_microbatches: int, domains
) -> None:
    # Parameter count of the whole model: sum the shards over TP and PP (DP/CP replicate).
    from megatron.core import parallel_state

    count = torch.tensor([float(num_parameters(mo.model))], device=runtime.device)
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
        count.zero_()
    dist.all_reduce(count)
    m, p, o, r = config.model, config.parallel, config.optim, config.reweight
    summary = {
        "preset": config.preset,
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
        "domains": domains,
    }
    log.print(
        f"pretrain_llama: {config.preset} ({summary['parameters'] / 1e6:.2f}M parameters, {m.num_layers} layers, "
        f"hidden {m.hidden_size}, seq {m.seq_length}, vocab {vocab}) | TP {p.tensor_model_parallel_size} "
        f"PP {p.pipeline_model_parallel_size} CP {p.context_parallel_size} DP {runtime.dp_size} | "
        f"global batch {o.global_batch_size} = micro {o.micro_batch_size} x DP {runtime.dp_size} x "
        f"{num_microbatches} micro-batches | {config.device.device} "
        f"{'bf16' if config.device.bf16 else 'fp32'} {config.device.transformer_impl} | "
        f"reweighting {r.strategy} r={r.temperature.r} "
        f"(r={r.temperature.warmup_r} for {r.temperature.warmup_steps} steps), {r.window} window "
        f"(b={_window_size(config, runtime)}) | domains {', '.join(domains)}"
    )
    # Megatron-LM's memory estimate and the step cost of this layout (megatron-reweight-plan).
    planned = estimate(m, data_vocab, run_layout(config, runtime.dp_size), r.window)
    log.print(f"pretrain_llama: layout estimate: {planned.summary()}")
    summary.update(memory_estimate_gib=planned.memory / GIB, step_cost=planned.cost)
    log.record({"kind": "run", **summary, "config": config.to_dict()})


def _log_summary(
    log: MetricsLogger, config: TrainConfig, result: TrainResult, checkpointer: Checkpointer, domains: list[str],
    weights: dict[str, float], weights_from: int, seconds: float,
) -> None:  # fmt: skip
    """The run's answer on one screen: how far it went, the final losses, each domain's mean
    weight x b (below 1: down-weighted) and validation perplexity, and where the outputs are."""
    samples = result.consumed_samples
    head = (
        f"run summary: {result.exit_reason} at iteration {result.iteration}/{config.optim.train_iters} in "
        f"{seconds:.1f}s: {samples} samples, {samples * config.model.seq_length} tokens"
    )
    if result.train_history:
        head += f", final training lm loss {result.train_history[-1]['lm loss']:.4f}"
    lines = [head]
    validation = result.eval_history[-1]["domains"] if result.eval_history else {}
    if validation or weights:
        parts = [f"validation loss and ppl at iteration {result.eval_history[-1]['iteration']}" if validation
                 else "no validation"]  # fmt: skip
        if weights:
            parts.append(
                f"mean weight x b (w*b) over iterations {weights_from}-{result.iteration} (below 1: down-weighted)"
            )
        lines.append(f"  per domain: {', '.join(parts)}")
        lines.append(f"  {'domain':<16} {'loss':>8} {'ppl':>10}" + (f" {'w*b':>7}" if weights else ""))
        for name in domains:
            d = validation.get(name)
            loss, ppl = (f"{d['loss']:.4f}", f"{d['ppl']:.2f}") if d else ("-", "-")
            weight = f"{weights[name]:.3f}" if name in weights else "-"
            lines.append(f"  {name:<16} {loss:>8} {ppl:>10}" + (f" {weight:>7}" if weights else ""))
    saved = checkpointer.saved_at is not None and config.checkpoint.save is not None
    checkpoint = checkpointer.last_checkpoint if saved else "none (no --save)"
    metrics = config.logging.metrics_file or "none (--save, --tensorboard-dir or --metrics-file writes one)"
    lines.append(f"  checkpoint: {checkpoint} | metrics: {metrics}")
    if config.logging.tensorboard_dir is not None:
        lines[-1] += f" | TensorBoard: {config.logging.tensorboard_dir}"
    log.print("\n".join(lines))


def _quiet_logging() -> None:
    """megatron-core logs through `logging`: show its warnings once (rank 0), not per rank."""
    import logging

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.WARNING if rank == 0 else logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    # Notices of megatron-core that say nothing a user of this trainer can act on: the rerun state
    # machine is off by design, mock data needs no index cache, a run without a cache directory
    # says so once itself, and a domain's validation set is a blend of that domain's prefixes,
    # often just one.
    for logger, notice in (
        ("megatron.core.rerun_state_machine", "RerunStateMachine initialized in mode RerunMode.DISABLED"),
        ("megatron.core.datasets.gpt_dataset", "Unable to save MockGPTDataset indexes because path_to_cache is None"),
        (
            "megatron.core.datasets.blended_dataset",
            "Cannot save the BlendedDataset indexes because path_to_cache is None",
        ),
        ("megatron.core.datasets.blended_dataset", "Building a BlendedDataset for a single MegatronDataset"),
    ):
        logging.getLogger(logger).addFilter(lambda record, notice=notice: record.getMessage() != notice)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: parse, check, train. Returns the process exit code."""
    from megatron_reweight.training.arguments import parse_config
    from megatron_reweight.training.errors import report_config_error

    _quiet_logging()
    try:
        result = train(parse_config(argv))
    except ConfigError as error:
        report_config_error(error)
    except TrainingStopped as error:
        report_config_error(error, exit_code=1)
    return INTERRUPTED_EXIT_CODE if result.exit_reason == INTERRUPTED else 0
