"""Pretrain a Llama model with megatron-core and dynamic loss-based sample reweighting.

    python pretrain_llama.py                                   # tiny preset, CPU, demo corpus, LinUpper
    torchrun --nproc-per-node 8 pretrain_llama.py --preset llama-1.4b \\
        --data-path 0.5 /data/web 0.5 /data/code --tokenizer-model tokenizer.json \\
        --tensor-model-parallel-size 2 --use-distributed-optimizer --save ckpt --load ckpt

Flags: `python pretrain_llama.py --help` and docs/training.md. The trainer lives in
megatron_reweight/training/.
"""

import os
import sys
import warnings

# Megatron's requirement for tensor/sequence-parallel communication ordering on GPUs;
# must be set before CUDA is initialised.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _run() -> int:
    import torch

    if not torch.cuda.is_available():
        # Transformer Engine and Apex need CUDA: megatron-core's fallback notices say nothing on CPU.
        warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)

    from megatron_reweight.training.trainer import main

    return main()


if __name__ == "__main__":
    try:
        sys.exit(_run())
    except KeyboardInterrupt:  # Ctrl-C while starting (the imports take seconds), before the loop's handler
        if os.environ.get("RANK", "0") == "0":
            print("pretrain_llama.py: interrupted (Ctrl-C) before training began; nothing saved", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as after a Ctrl-C in training
