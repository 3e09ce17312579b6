"""A Llama-architecture GPTModel from megatron-core: RMSNorm, SwiGLU, RoPE, GQA,
untied embeddings, no biases, no dropout.

Transformer Engine's layer spec when it is installed and a GPU is used; megatron-core's
local spec otherwise. Without Transformer Engine, context parallelism (which megatron-core
implements only in Transformer Engine's attention) uses `cpu.ContextParallelCoreAttention`.
The fused kernels are Megatron-LM's defaults, on where they exist (`Kernels`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

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


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Megatron-LM's fusions: the setting (Megatron's flag --no-<name> turns it off) -> its TransformerConfig field.
FUSIONS = {
    "bias_swiglu_fusion": "bias_activation_fusion",
    "bias_dropout_fusion": "bias_dropout_fusion",
    "masked_softmax_fusion": "masked_softmax_fusion",
    "persist_layer_norm": "persist_layer_norm",
    "rope_fusion": "apply_rope_fusion",
    "gradient_accumulation_fusion": "gradient_accumulation_fusion",
}


@dataclass(frozen=True)
class Kernels:
    """The fused kernels a run can use. Megatron-LM turns every fusion on by default; each needs
    CUDA, and some a library: RoPE fusion Transformer Engine's kernel, gradient-accumulation fusion
    apex's `fused_weight_gradient_mlp_cuda` (megatron-core's own linear layers, such as the output
    layer, refuse it otherwise), and the masked softmax of the local layer spec apex's softmax
    kernels (Transformer Engine's attention has its own)."""

    cuda: bool = False
    transformer_engine: bool = False
    apex_gradient_accumulation: bool = False
    apex_softmax: bool = False

    @classmethod
    def detect(cls, cuda: bool, use_transformer_engine: bool) -> Kernels:
        if not cuda:
            return cls()
        return cls(
            cuda=True,
            transformer_engine=use_transformer_engine,
            apex_gradient_accumulation=_importable("fused_weight_gradient_mlp_cuda"),
            apex_softmax=_importable("scaled_upper_triang_masked_softmax_cuda"),
        )

    def available(self) -> dict[str, bool]:
        """Fusion setting (a key of FUSIONS) -> whether its kernel exists here (Megatron-LM's default: on)."""
        return {
            "bias_swiglu_fusion": self.cuda,
            "bias_dropout_fusion": self.cuda,
            "masked_softmax_fusion": self.transformer_engine or self.apex_softmax,
            "persist_layer_norm": self.cuda,
            "rope_fusion": self.transformer_engine,
            "gradient_accumulation_fusion": self.apex_gradient_accumulation,
        }

    # What each fusion needs, for the error of one asked for without it.
    NEEDS = {
        "bias_swiglu_fusion": "CUDA", "bias_dropout_fusion": "CUDA", "persist_layer_norm": "CUDA",
        "masked_softmax_fusion": "CUDA with Transformer Engine's layers or apex's softmax kernels",
        "rope_fusion": "Transformer Engine's layers (--transformer-impl transformer_engine)",
        "gradient_accumulation_fusion": "apex's fused_weight_gradient_mlp_cuda extension",
    }  # fmt: skip


@dataclass(frozen=True)
class Recompute:
    """Megatron's activation recomputation (`--recompute-granularity`, `--recompute-method`,
    `--recompute-num-layers`): "full" recomputes whole layers in the backward pass, "selective"
    the core attention only; None keeps every activation."""

    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None


@dataclass(frozen=True)
class Layout:
    """The model-parallel sizes (default: those of megatron-core's parallel_state)."""

    tensor: int = field(default_factory=lambda: parallel_state.get_tensor_model_parallel_world_size())
    pipeline: int = field(default_factory=lambda: parallel_state.get_pipeline_model_parallel_world_size())
    context: int = field(default_factory=lambda: parallel_state.get_context_parallel_world_size())


def llama_config_kwargs(
    shape: ModelConfig,
    *,
    layout: Layout,
    bf16: bool = False,
    sequence_parallel: bool = False,
    calculate_per_token_loss: bool = False,
    fusions: dict[str, bool] | None = None,
    recompute: Recompute = Recompute(),
    use_cpu_initialization: bool = False,
    transformer_impl: str = "local",
) -> dict:
    """The TransformerConfig arguments of a Llama model, as Megatron-LM's
    `core_transformer_config_from_args` builds them from the equivalent `pretrain_gpt.py` flags
    (the differences are listed in docs/training.md). `fusions`: fusion setting (a key of
    FUSIONS) -> on; the rest are off."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = dict(
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
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        calculate_per_token_loss=calculate_per_token_loss,
        use_cpu_initialization=use_cpu_initialization,
        attention_softmax_in_fp32=False,  # Megatron-LM's default; TE's attention and fp32 runs ignore it
        deallocate_pipeline_outputs=True,
        recompute_granularity=recompute.granularity,
        recompute_method=recompute.method,
        recompute_num_layers=recompute.num_layers,
        cuda_graph_scope=[],  # megatron's default "full" only warns that it is deprecated
        cp_comm_type="p2p",  # Megatron-LM's default
        transformer_impl=transformer_impl,
        **{name: False for name in FUSIONS.values()},
    )
    kwargs.update({FUSIONS[name]: on for name, on in (fusions or {}).items()})
    return kwargs


def llama_transformer_config(
    shape: ModelConfig,
    *,
    bf16: bool = False,
    sequence_parallel: bool = False,
    calculate_per_token_loss: bool = False,
    fusions: dict[str, bool] | None = None,
    recompute: Recompute = Recompute(),
) -> TransformerConfig:
    """The TransformerConfig of `llama_config_kwargs` at megatron-core's parallel_state layout."""
    return TransformerConfig(
        **llama_config_kwargs(
            shape, layout=Layout(), bf16=bf16, sequence_parallel=sequence_parallel,
            calculate_per_token_loss=calculate_per_token_loss, fusions=fusions, recompute=recompute,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
    )  # fmt: skip


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
