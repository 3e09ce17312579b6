"""The preparation pipeline against independent references: the tokenizer called directly on each
document, megatron-core's own IndexedDataset reader and --data-path parser, and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from megatron_reweight.data.errors import DataPrepError
from megatron_reweight.data.prepare import (
    OutputConfig,
    PrepareConfig,
    TokenizerConfig,
    prepare,
)
from megatron_reweight.data.sources import InputConfig
from tests.helpers import REPO

DOMAINS = ("web", "code", "books")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real text (standard-library sources) cut into documents of varied size, plus edge cases."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("*.py"))[:40]]
    documents, size = [], 300
    for source in sources:
        for start in range(0, len(source), size):
            documents.append(source[start : start + size])
            size = 300 + (size * 7) % 1700  # 300..2000 characters
    documents[3] = ""  # empty documents are skipped
    documents[5] = "naïve café ☕ — ünïcödé 日本語"
    return documents


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, texts) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def reference(tokenizer_file):
    """The expected token ids of a text: the tokenizer called directly, plus EOD."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eod = tokenizer.token_to_id("<|endoftext|>")
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids + [eod]


def domain_of(index: int) -> str:
    return DOMAINS[(index * 7 // 5) % len(DOMAINS)]


def file_rows(texts: list[str], files: int) -> list[range]:
    """The rows of each of `files` input files: consecutive, unequal parts of the corpus."""
    bounds = [round(len(texts) * (part / files) ** 1.3) for part in range(files + 1)]
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory, texts) -> list[str]:
    folder = tmp_path_factory.mktemp("parquet")
    files = []
    for part, rows in enumerate(file_rows(texts, 4)):
        table = pa.table({"text": [texts[i] for i in rows], "source": [{"name": domain_of(i)} for i in rows]})
        files.append(str(folder / f"part-{part}.parquet"))
        pq.write_table(table, files[-1], row_group_size=50)
    return files


def write_jsonl(folder: Path, texts: list[str], files: int) -> list[str]:
    paths = []
    for part, rows in enumerate(file_rows(texts, files)):
        paths.append(str(folder / f"corpus-{part:03d}.jsonl"))
        with open(paths[-1], "w", encoding="utf-8") as file:
            for index in rows:
                file.write(json.dumps({"id": index, "content": texts[index], "meta": {"set": domain_of(index)}}) + "\n")
    return paths


@pytest.fixture(scope="module")
def jsonl_files(tmp_path_factory, texts) -> list[str]:
    return write_jsonl(tmp_path_factory.mktemp("jsonl"), texts, 3)


def config(files, tokenizer_file, output_dir, **overrides) -> PrepareConfig:
    input_config = InputConfig(files=list(files), **overrides.pop("input", {}))
    output = OutputConfig(output_dir=output_dir, **overrides.pop("output", {}))
    return PrepareConfig(input_config, TokenizerConfig(str(tokenizer_file)), output, progress=False, **overrides)


def read_documents(prefix: Path) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    assert len(dataset.document_indices) - 1 == len(dataset)  # one sequence per document
    return [dataset[index].tolist() for index in range(len(dataset))]


def read_domain(output_dir: Path, summary: dict, domain: str) -> list[list[int]]:
    return [doc for file in summary["domains"][domain]["files"] for doc in read_documents(output_dir / file["prefix"])]


def directory_bytes(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes; data_path.txt with the folder's own path replaced."""
    files = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
    files["data_path.txt"] = files["data_path.txt"].replace(str(folder).encode(), b"OUT")
    return files


# ----------------------------------------------------------------------------- round trip
def test_round_trip_equals_tokenizer_output(parquet_files, tokenizer_file, reference, texts, tmp_path):
    prepared = prepare(config(parquet_files, tokenizer_file, tmp_path, workers=2))

    expected = [reference(text) for text in texts if text]
    summary = prepared.summary
    assert read_domain(tmp_path, summary, "data") == expected
    assert summary["documents"] == len(expected) and summary["empty_rows_skipped"] == 1
    assert summary["tokens"] == sum(map(len, expected)) and summary["input_rows"] == len(texts)
    assert summary["dtype"] == "uint16" and IndexedDataset(str(tmp_path / "data_00000")).index.dtype == np.uint16
    # Shard n holds data file n.
    files = summary["domains"]["data"]["files"]
    assert [file["prefix"] for file in files] == [f"data_{index:05d}" for index in range(len(parquet_files))]
    for file, rows in zip(files, file_rows(texts, len(parquet_files))):
        assert read_documents(tmp_path / file["prefix"]) == [reference(texts[row]) for row in rows if texts[row]]
    shard_files = {f"{file['prefix']}.{ext}" for file in files for ext in ("bin", "idx")}
    assert {path.name for path in tmp_path.iterdir()} == shard_files | {"data_path.txt", "summary.json"}


def test_hub_dataset_code_path_on_a_local_dataset_folder(tmp_path, tokenizer_file, reference, texts):
    """`--dataset NAME` goes through load_dataset(NAME, CONFIG, split=...), which also opens a local folder."""
    folder = tmp_path / "my-dataset" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:30]}), folder / "train-00000-of-00001.parquet")
    input_config = InputConfig(dataset=str(tmp_path / "my-dataset"), split="train")
    output = OutputConfig(output_dir=tmp_path / "out", name="fineweb")
    prepared = prepare(PrepareConfig(input_config, TokenizerConfig(str(tokenizer_file)), output, progress=False))
    assert read_documents(tmp_path / "out" / "fineweb_00000") == [reference(t) for t in texts[:30] if t]
    assert prepared.data_path == ["1", str(tmp_path / "out" / "fineweb_00000")]


# ----------------------------------------------------------------------------- domains and the data path
def test_nested_domain_field_splits_jsonl_and_writes_the_data_path(
    jsonl_files, tokenizer_file, reference, texts, tmp_path
):
    weights = {"web": 3, "code": 1, "books": 0}
    spec = ",".join(f"{name}={weight}" for name, weight in weights.items())
    run = config(
        jsonl_files,
        tokenizer_file,
        tmp_path,
        input={"text_field": "content", "domain_field": "meta.set"},
        output={"domain_weights": spec},
    )
    prepared = prepare(run)

    summary = prepared.summary
    for domain in DOMAINS:
        expected = [reference(text) for index, text in enumerate(texts) if text and domain_of(index) == domain]
        assert read_domain(tmp_path, summary, domain) == expected
        assert summary["domains"][domain]["documents"] == len(expected)

    # Megatron's own parser reads the line; weights are the domain weights, spread over shards by tokens.
    line = (tmp_path / "data_path.txt").read_text().split()
    assert line == prepared.data_path
    prefixes, parsed_weights = get_blend_from_list(line)
    expected_prefixes, expected_weights = [], []
    for domain in ("web", "code"):  # books has weight 0: left out
        for file in summary["domains"][domain]["files"]:
            expected_prefixes.append(str(tmp_path / file["prefix"]))
            expected_weights.append(weights[domain] / 4 * file["tokens"] / summary["domains"][domain]["tokens"])
    assert prefixes == expected_prefixes
    assert parsed_weights == pytest.approx(expected_weights, rel=1e-8)

    # A finished run is re-weighted without touching its shards.
    inode = (tmp_path / "web_00000.bin").stat().st_ino
    reweighted = prepare(replace(run, output=replace(run.output, domain_weights="tokens")))
    _, token_weights = get_blend_from_list(reweighted.data_path)
    tokens = [file["tokens"] for domain in summary["domains"].values() for file in domain["files"]]
    assert token_weights == pytest.approx(np.array(tokens) / sum(tokens), rel=1e-8)
    assert (tmp_path / "web_00000.bin").stat().st_ino == inode


def test_domain_weights_must_name_the_domains(jsonl_files, tokenizer_file, tmp_path):
    run = config(
        jsonl_files,
        tokenizer_file,
        tmp_path,
        input={"text_field": "content", "domain_field": "meta.set"},
        output={"domain_weights": "web=1,code=2"},
    )
    with pytest.raises(DataPrepError, match="exactly the domains web, code, books"):
        prepare(run)
    assert (tmp_path / "summary.json").is_file()  # the data itself is complete and kept


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize(
    "where, workers",
    [
        ("in the first file", 1),
        ("in the first file", 3),
        ("inside a document", 1),
        ("inside a document", 3),  # the shards after the budget's were written ahead, then dropped
        ("at a document end", 1),
        ("at the last document", 1),
        ("beyond the input", 3),
    ],
)
def test_token_budget_stops_after_the_document_that_reaches_it(
    where, workers, parquet_files, tokenizer_file, reference, texts, tmp_path
):
    expected = [reference(text) for text in texts if text]
    ends = np.cumsum([len(document) for document in expected])
    budget = {
        "in the first file": 1000,
        "inside a document": ends[700] - 5,
        "at a document end": ends[700],
        "at the last document": ends[-1],
        "beyond the input": ends[-1] + 1,
    }[where]
    kept = int(np.searchsorted(ends, budget)) + 1 if budget <= ends[-1] else len(expected)

    summary = prepare(
        config(parquet_files, tokenizer_file, tmp_path, output={"token_budget": int(budget)}, workers=workers)
    ).summary

    assert read_domain(tmp_path, summary, "data") == expected[:kept]
    assert summary["tokens"] == ends[kept - 1] and summary["token_budget"] == budget
    assert summary["budget_reached"] == (where != "beyond the input")
    assert sorted(path.name for path in tmp_path.glob("*.idx")) == [
        f"{f['prefix']}.idx" for f in summary["domains"]["data"]["files"]
    ]


# ----------------------------------------------------------------------------- determinism and resumption
def test_output_is_identical_for_any_worker_count_and_batch_size(parquet_files, tokenizer_file, tmp_path):
    runs = [dict(workers=1), dict(workers=2, batch_chars=3_000), dict(workers=3, batch_chars=50_000)]
    outputs = []
    for index, overrides in enumerate(runs):
        output_dir = tmp_path / f"run{index}"
        prepare(config(parquet_files, tokenizer_file, output_dir, input={"domain_field": "source.name"}, **overrides))
        outputs.append(directory_bytes(output_dir))
    assert outputs[0] == outputs[1] == outputs[2]


def test_merged_shards_equal_the_concatenated_shards(parquet_files, tokenizer_file, tmp_path):
    sharded = prepare(config(parquet_files, tokenizer_file, tmp_path / "a", input={"domain_field": "source.name"}))
    merged = prepare(
        config(
            parquet_files,
            tokenizer_file,
            tmp_path / "b",
            input={"domain_field": "source.name"},
            output={"merge_shards": True},
        )
    )
    for domain in DOMAINS:
        assert len(sharded.summary["domains"][domain]["files"]) > 1
        assert read_documents(tmp_path / "b" / domain) == read_domain(tmp_path / "a", sharded.summary, domain)
    assert merged.data_path[1::2] == [str(tmp_path / "b" / domain) for domain in merged.summary["domains"]]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        [f"{d}.{ext}" for d in DOMAINS for ext in ("bin", "idx")] + ["data_path.txt", "summary.json"]
    )


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_reweight.data.prepare", *args, "--no-progress"]


def test_killed_run_resumes_to_byte_identical_output(texts, tokenizer_file, tmp_path):
    files = write_jsonl(tmp_path, texts, 40)
    fields = {"text_field": "content", "domain_field": "meta.set"}
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    arguments = ["--input", *files, "--text-field", "content", "--domain-field", "meta.set",
                 "--tokenizer", str(tokenizer_file), "--output-dir", str(killed_dir), "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(
        cli(*arguments), env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(killed_dir.glob("*.idx"))) < 6:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no shards written within 120 s"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "summary.json").exists(), "the run finished before it was killed"
    inodes = {path.name: path.stat().st_ino for path in killed_dir.glob("*_*.*")}

    # Rerun (in-process, another worker count) and compare with an uninterrupted run.
    prepare(config(files, tokenizer_file, killed_dir, input=fields, workers=1))
    reference = prepare(config(files, tokenizer_file, reference_dir, input=fields, workers=3))
    assert directory_bytes(killed_dir) == directory_bytes(reference_dir)
    assert not (killed_dir / ".prepare").exists()

    # Shards complete before the kill were kept, not rewritten.
    shard_files: dict[str, list[str]] = {}
    for domain in reference.summary["domains"].values():
        for file in domain["files"]:
            shard = file["prefix"].rsplit("_", 1)[1]
            shard_files.setdefault(shard, []).extend(f"{file['prefix']}.{ext}" for ext in ("bin", "idx"))
    complete = [names for names in shard_files.values() if all(name in inodes for name in names)]
    assert complete and len(complete) < len(shard_files)
    assert all((killed_dir / name).stat().st_ino == inodes[name] for names in complete for name in names)


def test_resuming_with_different_settings_is_refused(parquet_files, tokenizer_file, tmp_path):
    prepare(config(parquet_files, tokenizer_file, tmp_path, output={"token_budget": 50_000}))
    with pytest.raises(DataPrepError, match="different output settings"):
        prepare(config(parquet_files, tokenizer_file, tmp_path, output={"token_budget": 60_000}))


# ----------------------------------------------------------------------------- bad input
def write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, tokenizer_file, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    good = write(tmp_path / "good.jsonl", b'{"text": "hello"}\n' * 50)
    no_eod = Tokenizer(models.BPE())
    no_eod.save(str(tmp_path / "no_eod.json"))
    pq.write_table(pa.table({"text": pa.array([b"bytes"], pa.binary())}), tmp_path / "binary.parquet")
    pq.write_table(pa.table({"body": ["text in another field"]}), tmp_path / "other.parquet")
    cases = {
        "is empty": ([write(tmp_path / "empty.jsonl", b"")], {}),
        "no field 'text' .*fields: body.*--text-field": ([str(tmp_path / "other.parquet")], {}),
        "bad.jsonl.*not UTF-8.*iconv": (
            [write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n' * 500 + b'{"text": "caf\xe9"}\n')],
            {},
        ),
        "holds bytes": ([str(tmp_path / "binary.parquet")], {}),
        "nodomain.jsonl, row 1: no field 'meta.set'": (
            [write(tmp_path / "nodomain.jsonl", b'{"text": "a", "meta": {"set": "x"}}\n{"text": "b", "meta": {}}\n')],
            {"input": {"domain_field": "meta.set"}},
        ),
        "no documents with text": ([write(tmp_path / "blank.jsonl", b'{"text": ""}\n{"text": null}\n')], {}),
        "unknown format": ([write(tmp_path / "notes.txt", b"plain text")], {}),
        "does not exist": ([str(tmp_path / "missing.parquet")], {}),
        "tokenizer file .* does not exist": ([good], {"tokenizer": "missing/tokenizer.json"}),
        "unknown tokenizer 'no-such-org/no-such-tokenizer'": ([good], {"tokenizer": "no-such-org/no-such-tokenizer"}),
        "not a Hugging Face tokenizers file": ([good], {"tokenizer": good}),
        "no end-of-document token .*--eod-id": ([good], {"tokenizer": str(tmp_path / "no_eod.json")}),
        "domain weights 'web=x'": ([good], {"output": {"domain_weights": "web=x"}}),
        "token budget must be at least 1": ([good], {"output": {"token_budget": 0}}),
    }
    for message, (files, overrides) in cases.items():
        output_dir = tmp_path / "out"
        run = config(files, overrides.pop("tokenizer", tokenizer_file), output_dir, **overrides)
        with pytest.raises(DataPrepError, match=message):
            prepare(run)
        assert not output_dir.exists() or not any(output_dir.rglob("*")), message


def test_cli_reports_bad_input_without_a_traceback(tmp_path, tokenizer_file):
    empty = write(tmp_path / "empty.jsonl", b"")
    result = subprocess.run(
        cli("--input", empty, "--tokenizer", str(tokenizer_file), "--output-dir", str(tmp_path / "out")),
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: input file {empty} is empty (0 bytes); remove it from the inputs"
    )
    assert "Traceback" not in result.stderr
