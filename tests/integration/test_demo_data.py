"""The offline demo corpus: what the trainer's default CPU run gets from `ensure_demo_data`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from megatron_reweight.data import demo
from megatron_reweight.data.demo import DemoData, ensure_demo_data, split_documents
from megatron_reweight.data.errors import DataPrepError


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def demo_data(demo_root) -> DemoData:
    return ensure_demo_data(demo_root)


def test_demo_data_describes_one_indexed_dataset_per_domain(demo_data, demo_root):
    assert {"code", "licences"} <= set(demo_data.domains) and len(demo_data.domains) >= 3
    weights, prefixes = demo_data.data_path[0::2], demo_data.data_path[1::2]
    assert [Path(prefix).name for prefix in prefixes] == demo_data.domains
    assert len(set(weights)) == 1 and float(weights[0]) > 0  # uniform
    tokenizer = Tokenizer.from_file(str(demo_data.tokenizer_path))
    assert demo_data.vocab_size == tokenizer.get_vocab_size() == demo.VOCAB_SIZE
    assert demo_data.eod_id == tokenizer.token_to_id("<|endoftext|>")

    for domain, prefix in zip(demo_data.domains, prefixes):
        rows = pq.read_table(demo_root / "corpus" / f"{domain}.parquet").to_pylist()
        assert 0 < sum(len(row["text"]) for row in rows) <= demo.MAX_DOMAIN_CHARS
        assert all(row["domain"] == domain and len(row["text"]) <= demo.MAX_DOCUMENT_CHARS for row in rows)
        dataset = IndexedDataset(prefix)
        assert len(dataset) == len(rows)
        for index in (0, len(rows) // 2, len(rows) - 1):
            expected = tokenizer.encode(rows[index]["text"], add_special_tokens=False).ids + [demo_data.eod_id]
            assert dataset[index].tolist() == expected


def test_a_second_call_reuses_the_build(demo_data, demo_root):
    built = {
        path: path.stat().st_mtime_ns for path in demo_root.rglob("*") if path.is_file() and path.name != ".demo.lock"
    }
    started = time.monotonic()
    assert ensure_demo_data(demo_root) == demo_data
    assert time.monotonic() - started < 10
    assert {path: path.stat().st_mtime_ns for path in built} == built


def test_a_changed_source_rebuilds(demo_data, demo_root, monkeypatch):
    monkeypatch.setattr(demo, "MAX_DOMAIN_CHARS", 100_000)  # small, so the rebuild is quick
    monkeypatch.setitem(demo.DOMAIN_SOURCES, "extra", lambda: iter(["An extra domain.\n\nWith two paragraphs."]))
    rebuilt = ensure_demo_data(demo_root)
    assert rebuilt.domains == [*demo_data.domains, "extra"]
    assert len(IndexedDataset(rebuilt.data_path[-1])) == 1
    assert json.loads((demo_root / "indexed" / "summary.json").read_text())["domains"].keys() == set(rebuilt.domains)


def test_missing_sources_are_skipped_and_too_few_is_an_error(monkeypatch):
    monkeypatch.setattr(demo, "MAX_DOMAIN_CHARS", 20_000)
    for missing in ("prose", "docs", "jargon"):
        monkeypatch.setitem(demo.DOMAIN_SOURCES, missing, lambda: None)
    monkeypatch.setitem(demo.DOMAIN_SOURCES, "more", lambda: iter(["text"]))
    assert list(demo.collect_corpus()) == ["code", "licences", "more"]
    monkeypatch.delitem(demo.DOMAIN_SOURCES, "more")
    with pytest.raises(DataPrepError, match="at least 3 domains, found code, licences; install .*python3.11-doc"):
        demo.collect_corpus()


@pytest.mark.parametrize("max_chars", [10, 100, 1000])
def test_split_documents_keeps_all_text_within_the_size_limit(max_chars):
    text = Path(demo.__file__).read_text()
    documents = split_documents(text, max_chars)
    assert all(0 < len(document) <= max_chars for document in documents)
    assert re.sub(r"\s", "", "".join(documents)) == re.sub(r"\s", "", text)
    if max_chars == 1000:  # large enough that no paragraph needs cutting: every cut is at a blank line
        assert all(text.count(document) for document in documents)
