"""Megatron-LM's own arguments for a `pretrain_gpt.py` command, built on CPU without a model:
its parse_args and validate_args, with the Megatron-LM checkout (MEGATRON_LM_PATH) on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")
AVAILABLE = bool(MEGATRON_LM and Path(MEGATRON_LM, "megatron", "training", "arguments.py").is_file())
REASON = "set MEGATRON_LM_PATH to a Megatron-LM checkout at core_v0.16.1"


def megatron_lm_args(flags: list[str], world_size: int, monkeypatch):
    """Megatron-LM's validated arguments for `pretrain_gpt.py FLAGS` on `world_size` GPUs. Megatron-LM
    asks CUDA for the GPU's architecture: answered 9 (Hopper). Undo with monkeypatch.undo()."""
    monkeypatch.syspath_prepend(MEGATRON_LM)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # validate_args asserts it with TP/CP
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *flags])
    from megatron.training import arguments

    monkeypatch.setattr(arguments, "get_device_arch_version", lambda: 9)
    args = arguments.parse_args()
    arguments.validate_args(args, {})
    return args


def llama_flags(shape, *, micro_batch: int, global_batch: int, vocab_size: int) -> list[str]:
    """pretrain_gpt.py's flags for a Llama model of this shape (RMSNorm, SwiGLU, RoPE, untied
    embeddings, no biases, no dropout) on mock data."""
    flags = [
        "--num-layers", shape.num_layers, "--hidden-size", shape.hidden_size, "--ffn-hidden-size", shape.ffn_hidden_size,
        "--num-attention-heads", shape.num_attention_heads, "--group-query-attention",
        "--num-query-groups", shape.num_query_groups, "--seq-length", shape.seq_length,
        "--max-position-embeddings", shape.max_position_embeddings or shape.seq_length,
        "--position-embedding-type", "rope", "--rotary-base", shape.rotary_base, "--normalization", "RMSNorm",
        "--norm-epsilon", shape.norm_epsilon, "--swiglu", "--untie-embeddings-and-output-weights",
        "--disable-bias-linear", "--hidden-dropout", 0, "--attention-dropout", 0,
        "--init-method-std", shape.init_method_std, "--make-vocab-size-divisible-by", shape.make_vocab_size_divisible_by,
        "--micro-batch-size", micro_batch, "--global-batch-size", global_batch,
        "--tokenizer-type", "NullTokenizer", "--vocab-size", vocab_size, "--mock-data",
    ]  # fmt: skip
    return [str(flag) for flag in flags]
