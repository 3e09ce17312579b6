"""A Llama-architecture GPTModel from megatron-core: RMSNorm, SwiGLU, RoPE, GQA,
untied embeddings, no biases, no dropout.

Transformer Engine's layer spec when it is installed and a GPU is used; megatron-core's
local spec otherwise. Without Transformer Engine, context parallelism (which megatron-core
implements only in Transformer Engine's attention) uses `cpu.ContextParallelCoreAttention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megatron_reweight.settings import positive, setting


@dataclass
class ModelConfig:
    """The model's shape (the defaults: the tiny preset's CPU-sized model)."""

    num_layers: int = setting(4, "transformer layers", check=positive)
    hidden_size: int = setting(128, "embedding width", check=positive)
    ffn_hidden_size: int = setting(384, "SwiGLU FFN width", check=positive)
    num_attention_heads: int = setting(4, "query heads", check=positive)
    num_query_groups: int = setting(
        2,
        "key/value heads (GQA); when only --num-attention-heads changes, the preset's heads per group",
        check=positive,
    )
    seq_length: int = setting(128, "tokens per sample", check=positive)
    max_position_embeddings: int | None = setting(None, "default: --seq-length", check=positive)
    rotary_base: int = setting(10000, "RoPE base", check=positive)
    norm_epsilon: float = setting(1e-5, "RMSNorm epsilon", check=positive)
    init_method_std: float = setting(0.02, "standard deviation of the initial weights", check=positive)
    make_vocab_size_divisible_by: int = setting(128, "pad the vocabulary to a multiple of this x TP", check=positive)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def llama_transformer_config(
    shape: ModelConfig, *, bf16: bool = False, sequence_parallel: bool = False, calculate_per_token_loss: bool = False
) -> TransformerConfig:
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.init_method_std,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        calculate_per_token_loss=calculate_per_token_loss,
        use_cpu_initialization=not torch.cuda.is_available(),
        masked_softmax_fusion=torch.cuda.is_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # megatron's default "full" only warns that it is deprecated
    )


def build_llama(
    shape: ModelConfig,
    config: TransformerConfig,
    vocab_size: int,
    *,
    use_transformer_engine: bool,
    vp_stage: int | None = None,
) -> GPTModel:
    """`vocab_size`: the padded vocabulary (`training.data.padded_vocab_size`)."""
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        if config.context_parallel_size > 1:
            from megatron_reweight.cpu import ContextParallelCoreAttention

            layer_spec.submodules.self_attention.submodules.core_attention = ContextParallelCoreAttention
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size,
        max_sequence_length=shape.max_position_embeddings or shape.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=shape.rotary_base,
        vp_stage=vp_stage,
    )
