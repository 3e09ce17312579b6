"""The weight audit in Megatron-LM's own training loop (the drop-in, megatron_reweight.megatron_lm).

Megatron-LM's loop is not ours, so the audit follows it from the loss function: a step's
weighting windows (one per micro-batch, or the global batch's one); when they are all in, the step is added
to the audit, and written at Megatron-LM's log and save iterations (and at exit). A sample's
position in the training order is `args.consumed_train_samples` at its step plus its place in
the step, which is the sample's index in the training dataset when Megatron-LM reads it in
order (--dataloader-type single, its default): then the dataset and document ids come from
megatron-core's indices, as in pretrain_llama.py. pretrain_gpt.py's batch itself carries no
dataset or document id, so with another data loader, or no training dataset on the writing
rank, the audit records losses and weights only, and its meta.json says why.
"""

from __future__ import annotations

import atexit

from megatron_reweight.audit.writer import AuditWriter, DocumentLookup
from megatron_reweight.data.domains import prefix_domains


def _writes(parallel_state) -> bool:
    """One rank writes: the first data-, tensor- and context-parallel rank of the last pipeline
    stage (it holds every window's gathered losses, and builds the training dataset)."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
    )


def _dataset_domains(args, dataset) -> tuple[list[str] | None, list[str]]:
    """(the blend's prefixes, the domain of each of the training dataset's datasets)."""
    from megatron_reweight.training.data import parse_blend

    count = len(dataset.datasets) if hasattr(dataset, "dataset_index") else 1
    if args.data_path:
        prefixes, _ = parse_blend(args.data_path)
        if len(prefixes) == count:
            return prefixes, prefix_domains(prefixes)
    return None, ["mock" if args.mock_data else f"dataset {i}" for i in range(count)]


class MegatronLMAudit:
    """--reweight-audit-dir for one Megatron-LM run; `after_loss_func` after each training loss."""

    def __init__(self, args, reweighter, train_dataset):
        from megatron.core import parallel_state

        self.args, self.reweighter, self.writer = args, reweighter, None
        if not _writes(parallel_state):
            return
        prefixes, domains, note, lookup = None, ["unknown"], None, None
        if args.dataloader_type != "single":
            note = f"--dataloader-type {args.dataloader_type} reads samples out of order: no document ids"
        elif train_dataset is None:
            note = "no training dataset on the writing rank: no document ids"
        else:
            prefixes, domains = _dataset_domains(args, train_dataset)
            lookup = DocumentLookup(train_dataset, domains)
        meta = {
            "strategy": reweighter.config.strategy,
            "window": reweighter.config.window,
            "window_size": args.global_batch_size if reweighter.config.window == "global-batch"
            else args.micro_batch_size * parallel_state.get_data_parallel_world_size(),
            "global_batch_size": args.global_batch_size,
            "domains": list(dict.fromkeys(domains)),
            "prefixes": prefixes,
            "dataset_domains": domains,
            "tokenizer_model": args.tokenizer_model,
            **({"documents_note": note} if note else {}),
        }
        self.writer = AuditWriter(args.reweight_audit_dir, args.curr_iteration, meta, lookup)
        reweighter.audited = []
        atexit.register(self.writer.flush)  # rows past the last checkpoint are dropped on resume

    def after_loss_func(self) -> None:
        # The step is complete when its windows hold the global batch (one window, or one per micro-batch).
        if self.writer is None or sum(losses.numel() for losses, _ in self.reweighter.audited) < self.args.global_batch_size:
            return
        args = self.args
        iteration = args.curr_iteration + 1  # as Megatron-LM logs it
        self.writer.add_step(iteration, self.reweighter.temperature(), args.consumed_train_samples,
                             self.reweighter.audited)  # fmt: skip
        self.reweighter.audited = []
        due = [args.log_interval, args.save_interval if args.save else None, args.exit_interval]
        if any(interval and iteration % interval == 0 for interval in due) or iteration == args.train_iters:
            self.writer.flush()
