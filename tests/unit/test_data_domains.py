"""A domain of the input stays one domain after sharded preparation, whatever the sharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from megatron_reweight.data.domains import prefix_domains
from megatron_reweight.data.prepare import OutputConfig, PrepareConfig, TokenizerConfig, prepare
from megatron_reweight.data.sources import InputConfig

DOMAINS = ("web", "code", "books")


def document(domain: str, index: int) -> str:
    return f"{domain} {index} " + " ".join(f"{domain}{index % 7}" for _ in range(20))


@pytest.fixture(scope="module")
def prepared_inputs(tmp_path_factory) -> tuple[list[str], Tokenizer, Path]:
    """Three jsonl files mixing the three domains, and a tokenizer trained on them."""
    folder = tmp_path_factory.mktemp("input")
    files = []
    for part in range(3):
        files.append(str(folder / f"part-{part}.jsonl"))
        with open(files[-1], "w") as file:
            for index in range(part * 30, part * 30 + 30):
                domain = DOMAINS[index % 3]
                file.write(json.dumps({"text": document(domain, index), "meta": {"set": domain}}) + "\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([document(d, i) for d in DOMAINS for i in range(90)], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return files, tokenizer, folder / "tokenizer.json"


def run(prepared_inputs, output_dir: Path, merge_shards: bool = False) -> list[str]:
    files, _, tokenizer_file = prepared_inputs
    config = PrepareConfig(
        InputConfig(files=files, domain_field="meta.set"),
        TokenizerConfig(str(tokenizer_file)),
        OutputConfig(output_dir=output_dir, merge_shards=merge_shards),
        progress=False,
    )
    return prepare(config).data_path[1::2]


def domain_in_text(prefix: str, tokenizer: Tokenizer) -> str:
    """The input domain of a dataset's documents, read back from the text itself."""
    dataset = IndexedDataset(prefix)
    found = {tokenizer.decode(dataset[i].tolist()).split()[0] for i in range(len(dataset))}
    assert len(found) == 1, found
    return found.pop()


@pytest.fixture(scope="module")
def sharded(prepared_inputs, tmp_path_factory) -> list[str]:
    return run(prepared_inputs, tmp_path_factory.mktemp("sharded"))


def test_the_shards_of_a_domain_are_that_domain(prepared_inputs, sharded):
    assert len(sharded) == 9  # three files x three domains: one dataset each
    expected = [domain_in_text(prefix, prepared_inputs[1]) for prefix in sharded]
    assert prefix_domains(sharded) == expected
    assert sorted(set(expected)) == sorted(DOMAINS)


def test_merged_shards_and_other_prefixes(prepared_inputs, sharded, tmp_path):
    merged = run(prepared_inputs, tmp_path / "merged", merge_shards=True)
    assert prefix_domains(merged) == [Path(prefix).name for prefix in merged]
    # Another preparation's domains are different domains with the same names.
    names = prefix_domains(merged + sharded)
    assert names[:3] == [Path(prefix).name for prefix in merged]
    assert names[3:] == [f"{domain_in_text(prefix, prepared_inputs[1])}_2" for prefix in sharded]
    # Prefixes that no summary.json lists: each is a domain of its own, named by its basename.
    assert prefix_domains(["/data/a/web", "/data/b/web", "/data/code_00000"]) == ["web", "web_2", "code_00000"]
