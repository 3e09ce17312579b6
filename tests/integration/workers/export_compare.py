"""Compare an exported Hugging Face Llama with the megatron-core GPTModel of its checkpoint
(one process, CPU).

The megatron-core side builds megatron_reweight's Llama GPTModel in fp32 at TP=1 PP=1 and
loads the checkpoint through dist_checkpointing (which reshards any saved layout); the
Hugging Face side is transformers' LlamaForCausalLM.from_pretrained of the exported
directory, also in fp32. Both get the same tokens: the logits must agree to fp32 rounding
and greedy generation must produce the same tokens. Prints one JSON line with the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_reweight.cpu import enable_megatron_core_on_cpu

enable_megatron_core_on_cpu()

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from transformers import LlamaForCausalLM

from megatron_reweight.export import checkpoint_directory
from megatron_reweight.model import ModelConfig, build_llama, llama_transformer_config

NEW_TOKENS = 16


def megatron_model(directory: Path):
    common = dist_checkpointing.load_common_state_dict(str(directory))
    shape = ModelConfig(**common["train_config"]["model"])
    vocab_size = dist_checkpointing.load_tensors_metadata(str(directory))[
        "embedding.word_embeddings.weight"
    ].global_shape[0]
    model = build_llama(shape, llama_transformer_config(shape), vocab_size, use_transformer_engine=False)
    # A bf16 checkpoint loads into the fp32 parameters: both sides then hold the same values.
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load(sharded, str(directory))  # with the checkpoint's common state
    model.load_state_dict({key: loaded[key] for key in sharded}, strict=True)
    return model.eval(), shape


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None)  # [b, s, vocab] without labels


def megatron_greedy(model, prompt: torch.Tensor, eos: int) -> list[int]:
    tokens = prompt
    for _ in range(NEW_TOKENS):
        next_token = megatron_logits(model, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        if int(next_token) == eos:
            break
    return tokens[0, prompt.shape[1] :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--exported", type=Path, required=True)
    parser.add_argument("--vocab", type=int, required=True, help="token ids to draw prompts from")
    args = parser.parse_args()

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.set_num_threads(1)
    model, shape = megatron_model(checkpoint_directory(args.checkpoint, None))
    hf_model = LlamaForCausalLM.from_pretrained(args.exported).float().eval()
    eos = hf_model.config.eos_token_id

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, args.vocab, (4, shape.seq_length), generator=generator)
    with torch.no_grad():
        ours = megatron_logits(model, tokens)
        theirs = hf_model(tokens).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        generations = []
        for prompt in tokens[:, :24].split(1):
            expected = megatron_greedy(model, prompt, eos)
            produced = hf_model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False,
                eos_token_id=eos, pad_token_id=eos,
            )[0, prompt.shape[1] :].tolist()  # fmt: skip
            assert produced == expected, (produced, expected)
            generations.append(produced)
    difference = (theirs - ours).abs()
    print(json.dumps({
        "max_abs_logit_difference": difference.max().item(),
        "max_abs_logit": ours.abs().max().item(),
        "hf_dtype": str(next(hf_model.parameters()).dtype),
        "greedy_tokens": generations,
    }))  # fmt: skip
    print("exported model matches megatron-core")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
