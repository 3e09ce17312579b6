"""Training and evaluation logs: a console line, TensorBoard scalars and histograms, the same in
Weights & Biases when asked for, and a JSON-lines file (one record per log step and per evaluation).

Only the logging rank (the last rank, which holds the loss, as in Megatron-LM) writes.
JSON-lines records:
    {"kind": "train", "iteration": 10, "consumed_samples": ..., "lm loss": ..., "weighted loss": ...,
     "lr": ..., "r": ..., "weighting window b/<window>": ..., "max weight x batch": ..., "min weight x batch": ...,
     "effective sample fraction": ..., "weight x batch/<domain>": ..., "grad norm": ...,
     "step time s": ..., "tokens per s": ..., ...}
    {"kind": "eval", "iteration": 50, "domains": {"arxiv": {"loss": ..., "ppl": ..., "weight x batch": ...}, ...},
     "loss": ..., "ppl": ..., "weights from iteration": 1}
    ("weight x batch": the domain's mean weight x b over the training samples since the previous
    evaluation, from "weights from iteration" on; "samples/<domain>" in a train record: the
    domain's samples of the interval, which weigh its "weight x batch/<domain>")
    {"kind": "run", ...}   once at the start: configuration, parameter count, world layout
A resumed run appends; a reader should keep the last record per (kind, iteration).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from megatron_reweight.loss import report_means, sum_reports

# The number of samples weighted together, keyed with the window's name
# ("weighting window b/global-batch"), so the TensorBoard scalar names the window too.
WINDOW_SIZE = "weighting window b/"
# loss_func's report of a domain's weight x b ([sum, count] over its samples): "weight x batch/arxiv".
DOMAIN_WEIGHT = "weight x batch/"

# Console columns, in order: (report key, label, format).
_CONSOLE = (
    ("lm loss", "lm loss", "{:.4f}"),
    ("weighted loss", "weighted loss", "{:.4f}"),
    ("lr", "lr", "{:.3e}"),
    ("r", "r", "{:g}"),
    ("max weight x batch", "max w*b", "{:.3f}"),
    ("min weight x batch", "min w*b", "{:.3f}"),
    ("effective sample fraction", "ESS frac", "{:.3f}"),
    ("grad norm", "grad norm", "{:.3f}"),
    ("tokens per s", "tokens/s", "{:.0f}"),
    ("step time s", "step", "{:.3f}s"),
)


class MetricsLogger:
    """Writes on the logging rank only (`enabled`), where it also keeps the records it logged."""

    def __init__(self, enabled: bool, config):
        self.enabled = enabled
        self.log_interval, self.train_iters = config.logging.log_interval, config.optim.train_iters
        self.train_history: list[dict] = []  # {"iteration", **values} per log step
        self.eval_history: list[dict] = []  # {"iteration", "domains"} per evaluation
        self.tensorboard = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        logging_config = config.logging
        if logging_config.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(logging_config.tensorboard_dir), max_queue=100)
        if logging_config.wandb_project:
            import wandb  # the wandb extra, checked at start-up

            save_dir = logging_config.wandb_save_dir
            if save_dir is not None:
                Path(save_dir).mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(
                project=logging_config.wandb_project,
                name=logging_config.wandb_exp_name or f"{config.preset}-{config.reweight.strategy}",
                dir=None if save_dir is None else str(save_dir), config=config.to_dict(), resume="allow",
            )  # fmt: skip
        if logging_config.metrics_file is not None:
            path = Path(logging_config.metrics_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(path, "a", buffering=1)  # noqa: SIM115 - open for the whole run, closed in close()

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def record(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"time": time.time(), **record}) + "\n")

    def should_log(self, iteration: int) -> bool:
        return iteration % self.log_interval == 0 or iteration == self.train_iters

    def log_train(self, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        self.train_history.append({"iteration": iteration, **values})
        parts = [f"iteration {iteration:>7d}/{self.train_iters}", f"samples {values['consumed_samples']}"]
        windows = [key for key in values if key.startswith(WINDOW_SIZE)]
        parts += [f"window {key.removeprefix(WINDOW_SIZE)} b={values[key]}" for key in windows]
        for key, label, fmt in _CONSOLE:
            if key in values and values[key] is not None and math.isfinite(values[key]):
                parts.append(f"{label} {fmt.format(values[key])}")
        if values.get("skipped iterations"):
            parts.append(f"skipped {values['skipped iterations']}")
        print(" | ".join(parts), flush=True)
        self._scalars("train/", iteration, values)
        self.record({"kind": "train", "iteration": iteration, **values})

    def log_eval(
        self, iteration: int, per_domain: dict[str, dict[str, float]], weights: dict[str, float], weights_from: int
    ) -> None:
        """`weights`: each domain's mean weight x b over the training samples of iterations
        `weights_from`..`iteration`, printed beside its validation perplexity."""
        if not self.enabled or not per_domain:
            return
        per_domain = {
            name: {**d, "weight x batch": weights[name]} if name in weights else d for name, d in per_domain.items()
        }
        self.eval_history.append(
            {"iteration": iteration, "domains": per_domain, "weights from iteration": weights_from}
        )
        total = sum(d["tokens"] for d in per_domain.values())
        mean_loss = sum(d["loss"] * d["tokens"] for d in per_domain.values()) / max(total, 1)
        text = ", ".join(
            f"{name} {d['loss']:.4f} (ppl {d['ppl']:.2f}"
            + (f", w*b {d['weight x batch']:.3f})" if "weight x batch" in d else ")")
            for name, d in per_domain.items()
        )
        legend = f" | w*b: mean weight x b over iterations {weights_from}-{iteration}" if weights else ""
        print(
            f"validation at iteration {iteration}: {text} | all {mean_loss:.4f} (ppl {_ppl(mean_loss):.2f}){legend}",
            flush=True,
        )
        scalars = {}
        for name, d in per_domain.items():
            scalars[f"{name}/loss"] = d["loss"]
            scalars[f"{name}/ppl"] = d["ppl"]
        scalars["all/loss"] = mean_loss
        scalars["all/ppl"] = _ppl(mean_loss)
        self._scalars("valid/", iteration, scalars)
        self.record(
            {"kind": "eval", "iteration": iteration, "domains": per_domain, "loss": mean_loss, "ppl": _ppl(mean_loss),
             "weights from iteration": weights_from}
        )  # fmt: skip

    def _scalars(self, prefix: str, iteration: int, values: dict) -> None:
        numeric = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(prefix + key, value, iteration)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({prefix + k: v for k, v in numeric.items()}, step=iteration)

    def log_histograms(self, iteration: int, values: dict) -> None:
        """Distributions (1-D tensors) as TensorBoard and W&B histograms, under train/."""
        if not self.enabled:
            return
        for key, tensor in values.items():
            if tensor.numel() == 0:  # e.g. every sample of the window skipped as non-finite
                continue
            data = tensor.detach().float().cpu().numpy()
            if self.tensorboard is not None:
                self.tensorboard.add_histogram("train/" + key, data, iteration)
            if self.wandb is not None:
                import wandb

                self.wandb.log({"train/" + key: wandb.Histogram(data)}, step=iteration)
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()


class DomainWeights:
    """Each domain's weight x b over training, as loss_func reports it ([sum, count] pairs): summed
    on this rank step by step (no collective), reduced over the DP x CP group only when read, on
    the last pipeline stage (elsewhere there is nothing to read). Two spans: since the previous
    evaluation, and since this process started."""

    def __init__(self, iteration: int, group):
        self.group = group
        self.totals: dict[str, dict] = {"evaluation": {}, "run": {}}
        self.first = {"evaluation": iteration + 1, "run": iteration + 1}

    def add(self, reports: list[dict]) -> None:
        step = {key: pair for key, pair in sum_reports(reports).items() if key.startswith(DOMAIN_WEIGHT)}
        for totals in self.totals.values():
            for key, pair in step.items():
                totals[key] = totals[key] + pair if key in totals else pair

    def read(self, span: str) -> tuple[dict[str, float], int]:
        """({domain: mean weight x b}, the span's first iteration). Collective on the last stage."""
        totals = self.totals[span]
        means = report_means(sum_reports([totals], self.group)) if totals else {}
        return {key.removeprefix(DOMAIN_WEIGHT): value for key, value in means.items()}, self.first[span]

    def take_since_evaluation(self, iteration: int) -> tuple[dict[str, float], int]:
        """`read("evaluation")`, then start the next span after `iteration`."""
        read = self.read("evaluation")
        self.totals["evaluation"], self.first["evaluation"] = {}, iteration + 1
        return read


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
