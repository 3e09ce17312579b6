"""`megatron-reweight-audit DIR`: what a run's reweighting did, from its weight audit
(--reweight-audit-dir).

    megatron-reweight-audit runs/audit                   print, and plot to runs/audit/audit.png
    megatron-reweight-audit runs/audit --top 20 --json   the same for scripts, on stdout
    megatron-reweight-audit runs/audit --data-path /new/place/prose /new/place/code ...

It shows each domain's mean weight x b over the run (1 is uniform; below 1, down-weighted) and
its spread, and the documents with the lowest and highest mean weight x b, with a snippet of
their text read from the run's data prefixes (or --data-path, when the data has moved) and
tokenizer. A document's weight is the mean over the samples whose tokens come from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy

from megatron_reweight.audit.writer import read_audit

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
TIME_BINS = 20  # points of the weight-over-time curves


@dataclass
class Documents:
    """Mean weight x b per (dataset_id, document), over the samples that touch the document."""

    dataset_ids: numpy.ndarray
    document_ids: numpy.ndarray
    mean_weight_x_b: numpy.ndarray
    samples: numpy.ndarray  # samples that touched the document
    domains: list[str]


def columns(table) -> dict[str, numpy.ndarray]:
    """The audit's scalar columns as numpy arrays."""
    names = ("iteration", "r", "sample", "loss", "weight_x_b")
    values = {name: table[name].to_numpy(zero_copy_only=False) for name in names}
    values["domain"] = numpy.asarray(table["domain"].to_pylist(), dtype=object)
    return values


def document_weights(table, dataset_domains: list[str]) -> Documents:
    """Each document's mean weight x b: every sample counts once for each document it spans."""
    import pyarrow.compute as pc

    documents = table["documents"].combine_chunks()
    owner = pc.list_parent_indices(documents).to_numpy()
    document_ids = pc.list_flatten(documents).to_numpy()
    dataset_ids = table["dataset_id"].to_numpy(zero_copy_only=False)[owner].astype(numpy.int64)
    weights = table["weight_x_b"].to_numpy(zero_copy_only=False)[owner].astype(numpy.float64)
    keys, inverse = numpy.unique(numpy.stack([dataset_ids, document_ids]), axis=1, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = numpy.bincount(inverse, minlength=keys.shape[1])
    means = numpy.bincount(inverse, weights=weights, minlength=keys.shape[1]) / counts
    return Documents(keys[0], keys[1], means, counts, [dataset_domains[d] for d in keys[0]])


def summarise(meta: dict, table, top: int = 10, from_iteration: int = 0, min_samples: int = 1) -> dict:
    """The report's numbers (rows of iterations >= `from_iteration`), without the text snippets;
    the documents listed are those touched by at least `min_samples` samples."""
    import pyarrow.compute as pc

    table = table.filter(pc.greater_equal(table["iteration"], from_iteration))
    if table.num_rows == 0:
        raise ValueError("the audit holds no rows" + (f" from iteration {from_iteration}" if from_iteration else ""))
    values = columns(table)
    iterations = values["iteration"]
    edges = numpy.unique(numpy.linspace(iterations.min(), iterations.max() + 1, TIME_BINS + 1).astype(int))
    domains = {}
    for domain in [d for d in meta["domains"] if (values["domain"] == d).any()] or [None]:
        chosen = values["domain"] == domain if domain is not None else numpy.ones(table.num_rows, bool)
        w = values["weight_x_b"][chosen]
        over_time = []
        for begin, end in zip(edges[:-1], edges[1:]):
            in_bin = chosen & (iterations >= begin) & (iterations < end)
            over_time.append(float(values["weight_x_b"][in_bin].mean()) if in_bin.any() else None)
        domains[domain or "all"] = {
            "samples": int(chosen.sum()),
            "mean_weight_x_b": float(w.mean()),
            "mean_loss": float(values["loss"][chosen].mean()),
            "quantiles": dict(zip(map(str, QUANTILES), numpy.quantile(w, QUANTILES).round(4).tolist())),
            "weight_x_b_over_time": over_time,
            "histogram": numpy.histogram(numpy.minimum(w, 4.0), bins=40, range=(0.0, 4.0))[0].tolist(),
        }
    report = {
        "run": {k: meta[k] for k in ("strategy", "window", "window_size") if k in meta},
        "iterations": [int(iterations.min()), int(iterations.max())],
        "rows": table.num_rows,
        "time_bin_starts": edges[:-1].tolist(),
        "domains": domains,
        "documents_recorded": meta.get("documents_recorded", False),
    }
    if not report["documents_recorded"]:
        report["documents_note"] = meta.get("documents_note", "the run recorded no document ids")
        return report
    docs = document_weights(table, meta["dataset_domains"])
    listed = numpy.flatnonzero(docs.samples >= min_samples)
    order = listed[numpy.argsort(docs.mean_weight_x_b[listed], kind="stable")]

    def entry(i):
        return {
            "domain": docs.domains[i],
            "dataset_id": int(docs.dataset_ids[i]),
            "document": int(docs.document_ids[i]),
            "mean_weight_x_b": round(float(docs.mean_weight_x_b[i]), 4),
            "samples": int(docs.samples[i]),
        }

    report["documents"] = {
        "count": len(docs.samples),
        "listed_with_samples_at_least": min_samples,
        "down_weighted": [entry(i) for i in order[:top]],
        "up_weighted": [entry(i) for i in order[::-1][:top]],
    }
    return report


def add_snippets(report: dict, prefixes: list[str], tokenizer_model: str | None, characters: int = 120) -> None:
    """Each listed document's first `characters` characters of text (token ids without a tokenizer)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = None
    if tokenizer_model:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_model))
    datasets: dict[int, IndexedDataset] = {}
    for entry in report["documents"]["down_weighted"] + report["documents"]["up_weighted"]:
        dataset_id = entry["dataset_id"]
        if dataset_id not in datasets:
            datasets[dataset_id] = IndexedDataset(prefixes[dataset_id])
        tokens = datasets[dataset_id].get(entry["document"], length=4 * characters).tolist()
        text = tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens))
        entry["snippet"] = " ".join(text.split())[:characters]


def print_report(report: dict, out=sys.stdout) -> None:
    run = report["run"]
    first, last = report["iterations"]
    print(
        f"weight audit: {run.get('strategy')}, {run.get('window')} window (b={run.get('window_size')}), "
        f"iterations {first}..{last}, {report['rows']} samples",
        file=out,
    )
    print("\nweight x b per domain (1 = uniform):", file=out)
    print(f"  {'domain':16s} {'samples':>8s} {'mean':>6s} {'loss':>6s}   5%    25%   50%   75%   95%", file=out)
    for domain, d in report["domains"].items():
        q = " ".join(f"{v:5.2f}" for v in d["quantiles"].values())
        print(
            f"  {domain:16s} {d['samples']:8d} {d['mean_weight_x_b']:6.3f} {d['mean_loss']:6.3f}  {q}", file=out
        )
    if "documents" not in report:
        print(f"\ndocuments: {report['documents_note']}", file=out)
        return
    for title, key in (("down-weighted", "down_weighted"), ("up-weighted", "up_weighted")):
        print(f"\nmost {title} documents (of {report['documents']['count']}):", file=out)
        for e in report["documents"][key]:
            snippet = f"  {e['snippet']!r}" if "snippet" in e else ""
            print(
                f"  {e['mean_weight_x_b']:6.3f}  {e['domain']:12s} document {e['document']:<8d} "
                f"({e['samples']} samples){snippet}",
                file=out,
            )


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (over_time, spread) = plt.subplots(1, 2, figsize=(11, 3.8))
    starts = report["time_bin_starts"]
    names = list(report["domains"])
    for name in names:
        values = [numpy.nan if v is None else v for v in report["domains"][name]["weight_x_b_over_time"]]
        over_time.plot(starts, values, marker=".", label=name)
    over_time.axhline(1.0, color="gray", lw=0.8)
    over_time.set(xlabel="iteration", ylabel="mean weight x b", title="Mean weight per domain over the run")
    over_time.legend(fontsize=8)
    centres = numpy.arange(0.05, 4.0, 0.1)
    for name in names:
        counts = numpy.array(report["domains"][name]["histogram"], dtype=float)
        spread.plot(centres, counts / max(counts.sum(), 1), label=name)
    spread.axvline(1.0, color="gray", lw=0.8)
    spread.set(xlabel="weight x b (last bin: 3.9 and above)", ylabel="share of the domain's samples",
               title="Weight distribution per domain")  # fmt: skip
    run = report["run"]
    fig.suptitle(f"{run.get('strategy')}, {run.get('window')} window (b = {run.get('window_size')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-reweight-audit", description="What a run's reweighting did, from its --reweight-audit-dir."
    )
    parser.add_argument("audit_dir", type=Path, help="the run's --reweight-audit-dir")
    parser.add_argument("--data-path", nargs="+", help="the run's dataset prefixes, in its --data-path order "
                        "(default: where the run read them)")  # fmt: skip
    parser.add_argument("--tokenizer-model", help="tokenizer.json for the snippets (default: the run's)")
    parser.add_argument("--top", type=int, default=10, help="documents listed each way (default 10)")
    parser.add_argument("--min-samples", type=int, default=1, help="list only documents in this many samples or more")
    parser.add_argument("--from-iteration", type=int, default=0, help="leave out the rows before this iteration")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead")
    parser.add_argument("--plot", type=Path, help="the PNG to write (default: AUDIT_DIR/audit.png)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_reweight.extras import MissingExtraError, require_extra

    args = build_parser().parse_args(argv)
    try:
        require_extra("data", "megatron-reweight-audit")
        if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
            raise MissingExtraError("the plot needs matplotlib: pip install 'megatron-reweight[bench]', or pass --no-plot")
        meta, table = read_audit(args.audit_dir)
        report = summarise(meta, table, args.top, args.from_iteration, args.min_samples)
        prefixes = args.data_path or meta.get("prefixes")
        if "documents" in report and prefixes:
            if len(prefixes) != len(meta["dataset_domains"]):
                raise ValueError(
                    f"--data-path gives {len(prefixes)} prefixes, the run read {len(meta['dataset_domains'])}: give "
                    "them all, in the run's order"
                )
            add_snippets(report, prefixes, args.tokenizer_model or meta.get("tokenizer_model"))
        if not args.no_plot:
            report["plot"] = str(args.plot or args.audit_dir / "audit.png")
            plot_report(report, Path(report["plot"]))
    except (MissingExtraError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
        if "plot" in report:
            print(f"\nplot: {report['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
