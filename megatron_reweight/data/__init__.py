"""Data preparation: Hugging Face datasets to Megatron indexed datasets, and the offline demo corpus.

* `megatron_reweight.data.prepare`: the resumable, deterministic, parallel pipeline and its CLI
  (`python -m megatron_reweight.data.prepare --help`); see docs/data.md.
* `megatron_reweight.data.demo`: the offline multi-domain demo corpus, its tokenizer, and
  `ensure_demo_data(root)` for CPU runs and tests.

The submodules are imported explicitly, so importing this package loads neither megatron-core
nor `datasets`.
"""
