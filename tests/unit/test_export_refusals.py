"""megatron-reweight-export refuses what is not a Llama model, naming the problem (the
exported logits and generations are compared with megatron-core in
tests/integration/test_export.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_reweight import export
from megatron_reweight.export import ExportError, check_llama_keys, llama_config

SETTINGS = {"num_attention_heads": 4, "num_query_groups": 2, "max_position_embeddings": 128,
            "norm_epsilon": 1e-5, "rotary_base": 10000}  # fmt: skip


def tensors(layers=2, hidden=64, heads=4, groups=2, ffn=96, vocab=256, fc1_rows=None):
    """The GPTModel's checkpoint tensors, shapes only (meta device)."""
    head_dim = hidden // heads
    shapes = {
        export.EMBEDDING: (vocab, hidden), export.INPUT_NORM: (layers, hidden),
        export.QKV: (layers, (heads + 2 * groups) * head_dim, hidden), export.PROJ: (layers, hidden, hidden),
        export.MLP_NORM: (layers, hidden), export.FC1: (layers, fc1_rows or 2 * ffn, hidden),
        export.FC2: (layers, hidden, ffn), export.FINAL_NORM: (hidden,), export.OUTPUT: (vocab, hidden),
    }  # fmt: skip
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def test_config_follows_the_tensors_and_the_run_settings():
    config = llama_config(tensors(layers=3, ffn=96), SETTINGS, torch.bfloat16, eod_id=0)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size) == (
        3,
        64,
        96,
        256,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.eos_token_id == 0 and config.tie_word_embeddings is False


def test_heads_that_do_not_match_the_qkv_tensor_are_refused():
    with pytest.raises(ExportError, match=r"linear_qkv has 128 rows, not \(heads 4 \+ 2 x groups 4\)"):
        llama_config(tensors(groups=2), {**SETTINGS, "num_query_groups": 4}, torch.float32, eod_id=0)


def test_a_plain_mlp_is_refused():
    with pytest.raises(ExportError, match="not a gated \\(SwiGLU\\) MLP"):
        llama_config(tensors(ffn=96, fc1_rows=96), SETTINGS, torch.float32, eod_id=0)


@pytest.mark.parametrize(
    "extra", ["decoder.layers.self_attention.linear_qkv.bias", "embedding.position_embeddings.weight",
              "decoder.layers.mlp.experts.linear_fc1.weight", "decoder.final_layernorm.bias"],
)  # fmt: skip
def test_tensors_llama_does_not_have_are_refused_by_name(extra):
    with pytest.raises(ExportError, match=f"not a Llama model: the checkpoint holds {extra} "):
        check_llama_keys([*export.LLAMA_KEYS, extra], Path("ckpt"))


def test_a_missing_tensor_is_refused_by_name():
    with pytest.raises(ExportError, match="output_layer.weight missing"):
        check_llama_keys(export.LLAMA_KEYS[:-1], Path("ckpt"))


def test_a_directory_without_checkpoint_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        export.main(["--load-dir", str(tmp_path), "--save-dir", str(tmp_path / "hf")])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == (
        f"megatron-reweight-export: error: --load-dir {tmp_path}: no latest_checkpointed_iteration.txt "
        "and no checkpoint in it\n"
    )
