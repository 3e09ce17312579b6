"""Blends and prepared data that cannot train as written: refused with the fix named."""

import json

import pytest

from megatron_reweight.training.data import JsonTokenizer, check_prepared_tokenizer, parse_blend
from megatron_reweight.training.errors import ConfigError
from tests.helpers.pretrain import write_tokenizer


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf"])
def test_blend_weight_zero_or_invalid_is_refused_naming_the_prefix(weight):
    with pytest.raises(ConfigError, match=rf"--data-path: weight {weight} for /data/code: .*leave the prefix out"):
        parse_blend(["0.7", "/data/web", weight, "/data/code"])


def test_prepared_data_with_another_tokenizer_is_refused(tmp_path):
    """summary.json of a preparation records its tokenizer's digest and vocabulary."""
    from megatron_reweight.data.encoding import tokenizer_sha256

    prepared_with = write_tokenizer(tmp_path / "prepared.json", vocab_size=300)
    other = write_tokenizer(tmp_path / "other.json", vocab_size=200)
    digest = tokenizer_sha256(JsonTokenizer(prepared_with)._tokenizer)
    summary = {"settings": {"tokenizer": {"sha256": digest, "vocab_size": 300}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    prefix = str(tmp_path / "web_00000")

    check_prepared_tokenizer([prefix], JsonTokenizer(prepared_with))
    with pytest.raises(ConfigError, match=rf"{prefix} was tokenised with another tokenizer \(vocabulary 300, "):
        check_prepared_tokenizer([prefix], JsonTokenizer(other))
