"""--reweight-audit-dir: one row per sample of every weighting window, with the documents its
tokens come from; a resumed run continues the audit without duplicate rows, and a torn write is
passed over.

The reference for the documents is megatron-core's own reading of a sample
(`GPTDataset._query_document_sample_shuffle_indices`, through `BlendedDataset.__getitem__`),
on the training blend rebuilt here from the run's index cache; for the losses and weights, the
run's metrics file (Megatron's reduction of the loss function's reports)."""

import json
import math
import shutil
import warnings

import numpy
import pytest
import torch

from megatron_reweight.audit import read_audit
from megatron_reweight.audit.writer import trim_audit
from megatron_reweight.strategies import compute_weights
from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, read_metrics, run

ITERS = 8
GLOBAL_BATCH = 8  # 4 micro-batch windows of 2 samples per step (SMALL_MODEL's micro-batch)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    corpus = make_corpus(root / "corpus")
    args = SMALL_MODEL + data_args(corpus, root / "cache") + [
        "--train-iters", str(ITERS), "--log-interval", "3", "--eval-iters", "0", "--save", str(root / "ckpt"),
        "--save-interval", "4", "--reweight-audit-dir", str(root / "audit"), "--metrics-file", str(root / "m.jsonl"),
    ]  # fmt: skip
    run(1, args)
    return root, corpus, args


def test_every_sample_of_every_window_with_its_documents(audited):
    root, corpus, _ = audited
    meta, table = read_audit(root / "audit")
    rows = table.to_pydict()
    assert meta["documents_recorded"] and meta["window_size"] == 2 and meta["domains"] == corpus["domains"]
    # In training order: each step's 8 samples, positions 0..63.
    assert rows["iteration"] == [i for i in range(1, ITERS + 1) for _ in range(GLOBAL_BATCH)]
    assert rows["sample"] == list(range(ITERS * GLOBAL_BATCH))
    assert rows["window"] == [w for _ in range(ITERS) for w in range(4) for _ in range(2)]
    assert rows["r"][:16] == [100.0] * 16 and set(rows["r"][16:]) == {0.4}

    # Documents and domains: megatron-core's reading of the same samples.
    from megatron_reweight.training import parse_config
    from megatron_reweight.training.data import build_datasets, prepare_data

    config = parse_config(_flags_without_run_outputs(audited[2]))  # the run's settings, as the trainer reads them
    data = prepare_data(config.data)
    train = build_datasets(
        data, config.data.split, config.model.seq_length, config.optim.seed, ITERS * GLOBAL_BATCH, 0
    ).train
    for sample, dataset_id, documents, domain in zip(rows["sample"], rows["dataset_id"], rows["documents"], rows["domain"]):
        expected_dataset = int(train.dataset_index[sample])
        _, expected_documents = train.datasets[expected_dataset]._query_document_sample_shuffle_indices(
            int(train.dataset_sample_index[sample])
        )
        assert (dataset_id, documents) == (expected_dataset, [int(d) for d in expected_documents])
        assert domain == corpus["domains"][expected_dataset]

    # Losses and weights: the logged means over each log interval (iterations 1-3, 4-6), and
    # LinUpper on each window's own losses.
    logged, _ = read_metrics(root / "m.jsonl")
    iterations, losses = numpy.array(rows["iteration"]), numpy.array(rows["loss"])
    weights_x_b = numpy.array(rows["weight_x_b"])
    for last in (3, 6):
        interval = (iterations > last - 3) & (iterations <= last)
        assert losses[interval].mean() == pytest.approx(logged[last]["lm loss"], rel=1e-5)
        windows = weights_x_b[interval].reshape(-1, 2)
        assert windows.max(axis=1).mean() == pytest.approx(logged[last]["max weight x batch"], rel=1e-5)
    for start in range(0, len(losses), 2):
        expected = compute_weights(torch.tensor(losses[start : start + 2]), "linupper", r=rows["r"][start], delta=1.0)
        assert weights_x_b[start : start + 2] == pytest.approx(2 * expected.numpy(), rel=1e-4, abs=1e-6)


def _flags_without_run_outputs(args: list[str]) -> list[str]:
    """The run's flags less those that make it write (the checkpoint, the audit, the metrics)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--save", "--save-interval", "--reweight-audit-dir", "--metrics-file"):
            skip = True
        else:
            kept.append(arg)
    return kept


def test_a_resumed_run_continues_the_audit_without_duplicates_or_torn_rows(audited, tmp_path):
    """The first run went on past its checkpoint at 4 (as a run killed after its last checkpoint
    does), and left a torn write; resuming from 4 keeps rows 1..4, writes 5..8 again, once."""
    root, _, args = audited
    _, first = read_audit(root / "audit")
    torn = root / "audit" / "audit-000000007-000000008.parquet.tmp"
    torn.write_bytes(b"PAR1 half a file")
    damaged = root / "audit" / "audit-000000009-000000009.parquet"
    damaged.write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="unreadable, passed over"):
        _, with_damage = read_audit(root / "audit")
    assert with_damage.num_rows == first.num_rows  # neither file is read as data
    damaged.unlink()

    # Rows after a checkpoint inside one file's range are cut from that file (on a copy).
    partial = tmp_path / "partial"
    shutil.copytree(root / "audit", partial)
    trim_audit(partial, 5)
    assert read_audit(partial)[1].to_pydict()["iteration"] == first.to_pydict()["iteration"][: 5 * GLOBAL_BATCH]

    resumed = [a if a != str(root / "ckpt") or args[i - 1] != "--save" else str(tmp_path / "ckpt") for i, a in enumerate(args)]
    run(1, resumed + ["--load", str(root / "ckpt"), "--ckpt-step", "4"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, again = read_audit(root / "audit")
    assert not torn.exists()
    rows, before = again.to_pydict(), first.to_pydict()
    assert rows["sample"] == list(range(ITERS * GLOBAL_BATCH))  # every sample once, in order
    assert rows["iteration"] == before["iteration"] and rows["documents"] == before["documents"]
    # The resumed steps replay the same samples from the same state: the same losses and weights.
    for key in ("loss", "weight_x_b"):
        assert rows[key] == pytest.approx(before[key], rel=1e-4), key
    assert not any(math.isnan(v) for v in rows["loss"])


def test_the_report_reads_domains_and_documents_from_the_audit(audited, tmp_path, capsys):
    """megatron-reweight-audit --json against the rows read directly (a plain per-document loop);
    the snippets are the documents' text from the prefixes through the run's tokenizer."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    from megatron_reweight.audit.report import main

    root, corpus, _ = audited
    plot = tmp_path / "audit.png"
    assert main([str(root / "audit"), "--json", "--top", "3", "--plot", str(plot), "--from-iteration", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = read_audit(root / "audit")[1].to_pylist()
    rows = [row for row in rows if row["iteration"] >= 3]

    assert report["rows"] == len(rows) and report["iterations"] == [3, ITERS] and plot.stat().st_size > 10_000
    for domain in corpus["domains"]:
        weights = [row["weight_x_b"] for row in rows if row["domain"] == domain]
        assert report["domains"][domain]["mean_weight_x_b"] == pytest.approx(numpy.mean(weights), rel=1e-6)
        assert report["domains"][domain]["samples"] == len(weights)
    per_document = {}
    for row in rows:
        for document in row["documents"]:
            per_document.setdefault((row["dataset_id"], document), []).append(row["weight_x_b"])
    means = sorted((numpy.mean(w), key) for key, w in per_document.items())
    assert report["documents"]["count"] == len(per_document)
    lowest, highest = report["documents"]["down_weighted"], report["documents"]["up_weighted"]
    assert [e["mean_weight_x_b"] for e in lowest] == pytest.approx([m for m, _ in means[:3]], abs=1e-4)
    assert [e["mean_weight_x_b"] for e in highest] == pytest.approx([m for m, _ in means[::-1][:3]], abs=1e-4)

    tokenizer = Tokenizer.from_file(corpus["tokenizer"])
    entry = lowest[0]
    dataset = IndexedDataset(corpus["prefixes"][entry["dataset_id"]])  # kept: its tokens are a view of its file
    text = tokenizer.decode(dataset[entry["document"]].tolist())
    assert entry["snippet"] == " ".join(text.split())[: len(entry["snippet"])] and len(entry["snippet"]) > 20


def test_the_report_names_a_missing_audit(tmp_path, capsys):
    from megatron_reweight.audit.report import main

    assert main([str(tmp_path), "--no-plot"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: no meta.json; not a weight audit (--reweight-audit-dir)\n"
