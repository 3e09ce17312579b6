"""Export a checkpoint of pretrain_llama.py to a Hugging Face Llama checkpoint.

    megatron-reweight-export --load-dir /ckpt/1.4b --save-dir /hf/1.4b [--ckpt-step 100000]

The checkpoint is megatron-core's dist_checkpointing format, saved by any TP/PP layout: each
tensor is stored once with its global shape, so megatron-core reads it whole in one process
(no GPU, no model build). The GPTModel's tensors are renamed and split into LlamaForCausalLM's,
and the directory gets what `from_pretrained` and lm-evaluation-harness read: config.json
(transformers' LlamaConfig), model.safetensors (sharded with an index past 5 GB) and the
tokenizer files. A checkpoint whose tensors do not form a Llama model (biases, learned
position embeddings, MoE layers, a norm with a bias) is refused, naming the tensor. As the
trainer does, the exporter verifies the checkpoint's checksums first and refuses a damaged or
incomplete checkpoint, naming the complete ones to export instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from megatron_reweight.extras import MissingExtraError, require_extra

with warnings.catch_warnings():  # megatron.core's import warns about GPU-only extras the export does not use
    warnings.simplefilter("ignore")
    from megatron_reweight.training.checkpointing import (
        INCOMPLETE_SUFFIX,
        READ_ERRORS,
        TRACKER_FILENAME,
        checkpoint_name,
        checksum_problems,
        damaged_checkpoint,
        older_checkpoints,
        unwritable,
    )
    from megatron_reweight.training.data import JsonTokenizer
    from megatron_reweight.training.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The GPTModel's checkpoint keys (Transformer Engine names, which the local layer spec maps
# its norms to) and the Llama model's. Layers are stacked: dimension 0 is the layer number.
EMBEDDING = "embedding.word_embeddings.weight"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LLAMA_KEYS = (EMBEDDING, INPUT_NORM, QKV, PROJ, MLP_NORM, FC1, FC2, FINAL_NORM, OUTPUT)


class ExportError(ValueError):
    """A checkpoint that cannot be exported, with the reason and the fix."""


def checkpoint_directory(load_dir: Path, step: int | None) -> Path:
    """The dist_checkpointing directory: --load-dir itself, or its iter_NNNNNNN (the tracker's
    latest, or --ckpt-step). An incomplete save (iter_NNNNNNN.incomplete) is refused."""
    if load_dir.name.endswith(INCOMPLETE_SUFFIX):
        iteration = _iteration_of(load_dir.name.removesuffix(INCOMPLETE_SUFFIX))
        raise ExportError(
            f"--load-dir {load_dir}: an incomplete save (the run stopped while writing it); "
            f"{older_checkpoints(load_dir.parent, iteration)}"
        )
    if (load_dir / "metadata.json").is_file():
        return load_dir
    if step is None:
        tracker = load_dir / TRACKER_FILENAME
        if not tracker.is_file():
            raise ExportError(f"--load-dir {load_dir}: no {TRACKER_FILENAME} and no checkpoint in it")
        step = _iteration_of(tracker.read_text().strip())
        if step is None:
            raise ExportError(f"--load-dir {load_dir}: {TRACKER_FILENAME} does not hold an iteration")
    directory = checkpoint_name(load_dir, step)
    if not (directory / "metadata.json").is_file():
        incomplete = directory.with_name(directory.name + INCOMPLETE_SUFFIX).exists()
        raise ExportError(
            f"--load-dir {load_dir}: no {'complete ' if incomplete else ''}checkpoint of iteration {step} "
            f"({directory} is missing{', only an incomplete save' if incomplete else ''}); "
            f"{older_checkpoints(load_dir, None)}"
        )
    return directory


def _iteration_of(name: str) -> int | None:
    """The iteration of `iter_0000100` (or of a tracker's text), None if it names none."""
    try:
        return int(name.removeprefix("iter_"))
    except ValueError:
        return None


def verify_checkpoint(directory: Path) -> None:
    """The trainer's verification: every file against the checksums recorded at save."""
    problems = checksum_problems(directory, contents=True)
    if not problems:
        return
    iteration = _iteration_of(directory.name)
    if iteration is None:  # --load-dir is the checkpoint itself, not one of a run's iter_*
        raise ExportError(f"--load-dir {directory}: the checkpoint is damaged: {'; '.join(problems)}")
    raise ExportError(damaged_checkpoint(directory.parent, iteration, problems, flag="--load-dir"))


def _init_single_process_group() -> None:
    """dist_checkpointing reads through torch.distributed: a world of one, no network."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)


def check_llama_keys(keys, directory: Path) -> None:
    """Refuse a checkpoint whose model tensors are not exactly a Llama model's."""
    unexpected = sorted(set(keys) - set(LLAMA_KEYS))
    if unexpected:
        raise ExportError(
            f"{directory}: not a Llama model: the checkpoint holds {', '.join(unexpected)} "
            "(Llama has no biases, no learned position embeddings, RMSNorm without bias, dense MLPs)"
        )
    missing = [key for key in LLAMA_KEYS if key not in keys]
    if missing:
        raise ExportError(f"{directory}: not a Llama model checkpoint: {', '.join(missing)} missing")


def load_model_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's tensors at their global shapes (optimizer state left on disk), and the
    checkpoint's common state (the run's configuration)."""
    from megatron.core import dist_checkpointing

    _init_single_process_group()
    common = dist_checkpointing.load_common_state_dict(str(directory))
    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    model = {key: sharded for key, sharded in metadata.items() if not key.startswith("optimizer.")}
    check_llama_keys(model, directory)
    with warnings.catch_warnings():  # a deprecation inside megatron-core's own torch_dist reader
        warnings.simplefilter("ignore", FutureWarning)
        loaded = dist_checkpointing.load(model, str(directory), validate_access_integrity=False)
    return loaded, common


def llama_config(tensors: dict[str, torch.Tensor], model_settings: dict, dtype: torch.dtype, eod_id: int):
    """transformers' LlamaConfig for the checkpoint's tensors; the attention heads, RoPE base,
    norm epsilon and context length come from the run's configuration."""
    from transformers import LlamaConfig

    vocab_size, hidden = tensors[EMBEDDING].shape
    num_layers, qkv_rows, _ = tensors[QKV].shape
    heads, groups = model_settings["num_attention_heads"], model_settings["num_query_groups"]
    if heads % groups:
        raise ExportError(f"{heads} attention heads do not split into {groups} query groups")
    head_dim = model_settings.get("kv_channels") or hidden // heads
    if qkv_rows != (heads + 2 * groups) * head_dim:
        raise ExportError(
            f"linear_qkv has {qkv_rows} rows, not (heads {heads} + 2 x groups {groups}) x head dim {head_dim}: "
            "the configuration does not describe this checkpoint"
        )
    fc1_rows, fc2_columns = tensors[FC1].shape[1], tensors[FC2].shape[2]
    if fc1_rows != 2 * fc2_columns:
        raise ExportError(
            f"linear_fc1 has {fc1_rows} rows for an FFN of {fc2_columns}: not a gated (SwiGLU) MLP, which Llama needs"
        )
    if tensors[OUTPUT].shape != tensors[EMBEDDING].shape:
        raise ExportError(f"output layer {tuple(tensors[OUTPUT].shape)} and embedding differ in shape")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=fc2_columns,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=model_settings.get("max_position_embeddings") or model_settings["seq_length"],
        rms_norm_eps=model_settings["norm_epsilon"],
        rope_theta=float(model_settings["rotary_base"]),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=eod_id,
        eos_token_id=eod_id,
        torch_dtype=dtype,
    )


def llama_state_dict(tensors: dict[str, torch.Tensor], config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's tensors. Megatron's fused QKV interleaves per query group
    [q heads of the group, k, v]; its fused FC1 is [gate; up]. Megatron's RoPE
    (non-interleaved) rotates halves as Llama does, so q and k need no permutation."""
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    head_dim, hidden = config.head_dim, config.hidden_size
    ffn = config.intermediate_size
    qkv = tensors[QKV].view(config.num_hidden_layers, config.num_key_value_heads, heads_per_group + 2, head_dim, hidden)
    out = {
        "model.embed_tokens.weight": tensors[EMBEDDING],
        "model.norm.weight": tensors[FINAL_NORM],
        "lm_head.weight": tensors[OUTPUT],
    }
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        out[prefix + "input_layernorm.weight"] = tensors[INPUT_NORM][i]
        out[prefix + "self_attn.q_proj.weight"] = qkv[i, :, :heads_per_group].reshape(-1, hidden)
        out[prefix + "self_attn.k_proj.weight"] = qkv[i, :, heads_per_group].reshape(-1, hidden)
        out[prefix + "self_attn.v_proj.weight"] = qkv[i, :, heads_per_group + 1].reshape(-1, hidden)
        out[prefix + "self_attn.o_proj.weight"] = tensors[PROJ][i]
        out[prefix + "post_attention_layernorm.weight"] = tensors[MLP_NORM][i]
        out[prefix + "mlp.gate_proj.weight"] = tensors[FC1][i, :ffn]
        out[prefix + "mlp.up_proj.weight"] = tensors[FC1][i, ffn:]
        out[prefix + "mlp.down_proj.weight"] = tensors[FC2][i]
    return {name: tensor.to(dtype).contiguous() for name, tensor in out.items()}


def _add_legacy_config_keys(path: Path, config) -> None:
    """transformers 5 writes `dtype` and `rope_parameters`; readers before it look for
    `torch_dtype` and `rope_theta` (and would silently take RoPE base 10000 without it)."""
    written = json.loads(path.read_text())
    written.setdefault("torch_dtype", str(written.get("dtype", "")).removeprefix("torch.") or None)
    written.setdefault(
        "rope_theta", written.get("rope_parameters", {}).get("rope_theta", getattr(config, "rope_theta", None))
    )
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def save_weights(state_dict: dict[str, torch.Tensor], save_dir: Path, max_shard_size: str = "5GB") -> None:
    """model.safetensors, or shards with model.safetensors.index.json as transformers writes them."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state_dict[name] for name in names}, str(save_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (save_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_tokenizer(tokenizer_model: Path, eod_id: int, max_length: int, save_dir: Path) -> None:
    """tokenizer.json with its tokenizer_config.json, end of document as the EOS token."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_model), model_max_length=max_length)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eod_id)
    tokenizer.save_pretrained(str(save_dir))


def _run_tokenizer(directory: Path, data_settings: dict) -> Path:
    """The run's --tokenizer-model, or the demo corpus's tokenizer for a run without --data-path."""
    if data_settings.get("tokenizer_model"):
        return Path(data_settings["tokenizer_model"])
    if (
        not data_settings.get("mock_data")
        and not data_settings.get("data_path")
        and data_settings.get("demo_data_root")
    ):
        return Path(data_settings["demo_data_root"]) / "tokenizer.json"
    raise ExportError(f"{directory}: the run had no tokenizer (--mock-data); pass --tokenizer-model tokenizer.json")


def export(load_dir: Path, save_dir: Path, *, step: int | None = None, tokenizer_model: Path | None = None,
           dtype: str | None = None) -> Path:  # fmt: skip
    """Write the Hugging Face checkpoint of `load_dir`'s checkpoint to `save_dir`; returns the
    dist_checkpointing directory it read."""
    from transformers import GenerationConfig

    directory = checkpoint_directory(Path(load_dir), step)
    verify_checkpoint(directory)
    save_dir = Path(save_dir)
    problem = unwritable(save_dir)
    if problem:
        raise ExportError(f"--save-dir {save_dir} {problem}; choose a writable directory")
    try:
        tensors, common = load_model_tensors(directory)
    except READ_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        raise ExportError(f"--load-dir {load_dir}: {directory} cannot be read ({reason})") from None
    train_config = common.get("train_config")
    if not isinstance(train_config, dict) or "model" not in train_config:
        raise ExportError(f"{directory}: no run configuration in the checkpoint (not saved by pretrain_llama.py)")
    model_settings, data_settings = train_config["model"], train_config.get("data", {})
    tokenizer_model = Path(tokenizer_model or _run_tokenizer(directory, data_settings))
    eod_id = JsonTokenizer(tokenizer_model).eod  # the trainer's end-of-document rule
    torch_dtype = DTYPES[dtype] if dtype else tensors[EMBEDDING].dtype

    config = llama_config(tensors, model_settings, torch_dtype, eod_id)
    state_dict = llama_state_dict(tensors, config, torch_dtype)
    try:
        config.save_pretrained(str(save_dir))
        _add_legacy_config_keys(save_dir / "config.json", config)
        GenerationConfig(bos_token_id=eod_id, eos_token_id=eod_id).save_pretrained(str(save_dir))
        save_weights(state_dict, save_dir)
        save_tokenizer(tokenizer_model, eod_id, config.max_position_embeddings, save_dir)
    except OSError as error:  # e.g. the disk filled up
        raise ExportError(f"--save-dir {save_dir}: writing the export failed ({error.strerror or error})") from None
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="megatron-reweight-export",
        description="Export a pretrain_llama.py checkpoint (any TP/PP layout) to a Hugging Face Llama checkpoint.",
    )
    parser.add_argument("--load-dir", type=Path, required=True, help="the run's --save directory, or one iter_* in it")
    parser.add_argument("--ckpt-step", type=int, default=None, help="iteration to export (default: the latest)")
    parser.add_argument("--save-dir", type=Path, required=True, help="output directory for from_pretrained")
    parser.add_argument("--tokenizer-model", type=Path, default=None, help="default: the run's --tokenizer-model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's")
    args = parser.parse_args(argv)
    try:
        require_extra("export", "megatron-reweight-export")
    except MissingExtraError as error:
        parser.exit(2, f"megatron-reweight-export: error: {error}\n")
    try:
        directory = export(args.load_dir, args.save_dir, step=args.ckpt_step, tokenizer_model=args.tokenizer_model,
                           dtype=args.dtype)  # fmt: skip
    except (ExportError, ConfigError) as error:
        parser.exit(2, f"megatron-reweight-export: error: {error}\n")
    print(f"exported {directory} to {args.save_dir}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
