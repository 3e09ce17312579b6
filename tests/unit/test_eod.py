"""Data preparation and the trainer resolve the same end-of-document id for the same tokenizer:
GPT-2's layout, Llama 3's (base and instruct tokenizer_config.json), the demo corpus's, and
a tokenizer with several end-of-document spellings."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from megatron_reweight.data import demo
from megatron_reweight.data.encoding import resolve_eod_id
from megatron_reweight.training.data import JsonTokenizer


def word_tokenizer(path, special: list[str], config: dict | None = None):
    """A tokenizer.json with ordinary words first, then `special` as added special tokens
    (so their ids are not the first ones), and optionally a tokenizer_config.json beside it."""
    words = {f"w{i}": i for i in range(50)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(special)
    path.mkdir()
    tokenizer.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path / "tokenizer.json"


def both_sides(file) -> tuple[int, int]:
    return resolve_eod_id(Tokenizer.from_file(str(file)), file, None), JsonTokenizer(file).eod


def test_gpt2_layout(tmp_path):
    file = word_tokenizer(tmp_path / "gpt2", ["<|endoftext|>"])
    assert both_sides(file) == (50, 50)


@pytest.mark.parametrize("eos, expected", [("<|end_of_text|>", 51), ("<|eot_id|>", 52)], ids=["base", "instruct"])
def test_llama3_layout_follows_its_tokenizer_config(tmp_path, eos, expected):
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    file = word_tokenizer(
        tmp_path / "llama3", special, {"bos_token": "<|begin_of_text|>", "eos_token": {"content": eos}}
    )
    assert both_sides(file) == (expected, expected)


def test_several_spellings_resolve_in_one_order(tmp_path):
    # "</s>" and "<|end_of_text|>" were looked for in opposite orders by the two sides once.
    file = word_tokenizer(tmp_path / "both", ["</s>", "<|end_of_text|>"])
    assert both_sides(file) == (51, 51)


def test_demo_tokenizer(tmp_path):
    tokenizer = demo.train_tokenizer(["a small corpus of text", "to train the demo tokenizer on"], vocab_size=300)
    file = tmp_path / "tokenizer.json"
    tokenizer.save(str(file))
    assert both_sides(file) == (tokenizer.token_to_id(demo.EOD_TOKEN),) * 2
