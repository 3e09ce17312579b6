"""Data: tokenizer, Megatron indexed-dataset blends, per-domain validation sets, and the
resumable pretraining sampler.

* Training data is megatron-core's `GPTDataset` over `IndexedDataset` files, blended with
  `BlendedMegatronDatasetBuilder` from Megatron's `--data-path` syntax
  (`PREFIX` | `W1 PREFIX1 W2 PREFIX2 ...` | `PREFIX1 PREFIX2 ...`), or `MockGPTDataset`.
* `--split` carves every prefix's documents into train/valid/test exactly as Megatron does.
  The training blend is built from the train part only; each domain also gets its own
  validation set from its prefixes' valid parts, for per-domain validation loss. A domain is
  the input's domain whatever the sharding (`megatron_reweight.data.domains`).
* `PretrainingSampler` is Megatron's sequential pretraining sampler: the datasets are
  already shuffled, so the run's position is the number of consumed samples. Each
  micro-batch step takes the next micro_batch_size x DP samples and DP rank d keeps
  samples [d * mbs, (d + 1) * mbs) of them; resuming at the same count replays exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_reweight.data.domains import prefix_domains
from megatron_reweight.data.indexed import index_inconsistency
from megatron_reweight.training.errors import ConfigError


# ----------------------------------------------------------------------------- tokenizers
class JsonTokenizer(MegatronTokenizerBase):
    """A Hugging Face `tokenizers` tokenizer.json with the attributes megatron-core's
    datasets use: `eod`, `vocab_size`, `unique_identifiers`.

    The end-of-document token is resolved as data preparation resolves it
    (`megatron_reweight.data.encoding.find_eod_id`)."""

    def __init__(self, path: Path | str):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--tokenizer-model {path}: no such file")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
            raise ConfigError(f"--tokenizer-model {path}: not a Hugging Face tokenizer.json ({error})") from None
        super().__init__(str(path), {})
        self._vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._eod = self._find_eod(path)
        self.unique_identifiers = {"class": type(self).__name__, "path": str(path.resolve())}

    def _find_eod(self, path: Path) -> int:
        from megatron_reweight.data.encoding import eod_candidates, find_eod_id

        eod = find_eod_id(self._tokenizer, path)
        if eod is None:
            raise ConfigError(
                f"--tokenizer-model {path}: no end-of-document token found (looked for "
                f"{', '.join(eod_candidates(path))})"
            )
        return eod

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def vocab(self):
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pretraining tokenizer: no chat template")


class NullTokenizer(MegatronTokenizerBase):
    """Megatron's NullTokenizer for `--mock-data` without a tokenizer: ids 0..vocab_size-2
    are text, vocab_size-1 is end-of-document."""

    def __init__(self, vocab_size: int):
        super().__init__("", {})
        self._vocab_size = vocab_size
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    @property
    def vocab(self):
        return {}

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(i) for i in ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's --make-vocab-size-divisible-by: round up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


# ----------------------------------------------------------------------------- blends
def parse_blend(tokens: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path syntax: one prefix, `W1 P1 W2 P2 ...`, or `P1 P2 ...`."""
    if not tokens:
        raise ConfigError("--data-path needs at least one dataset prefix")
    if len(tokens) % 2 == 0:
        weights = []
        for token in tokens[0::2]:
            try:
                weights.append(float(token))
            except ValueError:
                weights = None
                break
        if weights is not None:
            prefixes = [p.strip() for p in tokens[1::2]]
            for prefix in prefixes:
                try:
                    float(prefix)
                except ValueError:
                    continue
                raise ConfigError(f"--data-path: expected a dataset prefix after a weight, got the number {prefix}")
            for weight, prefix in zip(weights, prefixes):
                if not (weight > 0 and numpy.isfinite(weight)):
                    raise ConfigError(
                        f"--data-path: weight {weight:g} for {prefix}: blend weights must be positive and finite "
                        "(megatron-core's blend has no weight 0); leave the prefix out of --data-path to exclude it"
                    )
            return prefixes, weights
    for token in tokens:
        try:
            float(token)
        except ValueError:
            continue
        raise ConfigError(
            f"--data-path: cannot read {' '.join(tokens)!r}: give `PREFIX`, `PREFIX1 PREFIX2 ...` or "
            f"`WEIGHT1 PREFIX1 WEIGHT2 PREFIX2 ...`"
        )
    return [p.strip() for p in tokens], None


def check_indexed_dataset(prefix: str) -> int:
    """Read the .idx of a Megatron indexed dataset and check the .bin length against it,
    without megatron-core (whose reader prints noise on a bad file). Returns the number of
    documents; a ConfigError names what is wrong."""
    import struct

    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, get_bin_path, get_idx_path

    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"--data-path prefix {prefix}: missing {' and '.join(missing)}")

    def corrupt(reason: str) -> ConfigError:
        return ConfigError(f"--data-path prefix {prefix}: corrupt indexed dataset ({reason})")

    header_size = len(_INDEX_HEADER) + 8 + 1 + 8 + 8
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size or header[: len(_INDEX_HEADER)] != _INDEX_HEADER:
        raise corrupt(f"{idx_path} is not a Megatron index")
    version, dtype_code, sequences, documents = struct.unpack("<QBQQ", header[len(_INDEX_HEADER) :])
    if version != 1:
        raise corrupt(f"{idx_path} has index version {version}, expected 1")
    try:
        itemsize = numpy.dtype(DType.dtype_from_code(dtype_code)).itemsize
    except (KeyError, ValueError):
        raise corrupt(f"{idx_path} has an unknown token dtype code {dtype_code}") from None
    if sequences == 0 or documents < 2:
        raise ConfigError(f"--data-path prefix {prefix}: the dataset holds no documents")
    needed = header_size + 4 * sequences + 8 * sequences + 8 * documents
    if idx_size < needed:
        raise corrupt(f"{idx_path} has {idx_size} bytes, its header needs {needed}")
    lengths = numpy.memmap(idx_path, dtype=numpy.int32, mode="r", offset=header_size, shape=(sequences,))
    pointers = numpy.memmap(
        idx_path, dtype=numpy.int64, mode="r", offset=header_size + 4 * sequences, shape=(sequences,)
    )
    document_indices = numpy.memmap(
        idx_path, dtype=numpy.int64, mode="r", offset=header_size + 12 * sequences, shape=(documents,)
    )
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize
    actual = os.path.getsize(bin_path)
    if actual != expected:
        raise corrupt(f"{bin_path} has {actual} bytes, its index expects {expected}")
    problem = index_inconsistency(lengths, pointers, document_indices, itemsize, actual)
    if problem:
        raise corrupt(f"{idx_path}: {problem}; rebuild it")
    return documents - 1


# ----------------------------------------------------------------------------- the run's data
@dataclass
class TrainingData:
    """What the run reads, resolved from its DataConfig by `prepare_data`."""

    tokenizer: MegatronTokenizerBase
    prefixes: list[str] | None  # the blend's dataset prefixes; None with --mock-data
    weights: list[float] | None
    domains: list[str]  # the domains' names (["mock"] with --mock-data)
    cache_path: Path | None
    # The domain (index into `domains`) of each prefix: the shards of one prepared domain are that domain.
    domain_of_prefix: list[int] | None = None

    def prefixes_of(self, domain: int) -> tuple[list[str], list[float] | None]:
        """A domain's prefixes and their blend weights."""
        chosen = [i for i, owner in enumerate(self.domain_of_prefix) if owner == domain]
        weights = None if self.weights is None else [self.weights[i] for i in chosen]
        return [self.prefixes[i] for i in chosen], weights


def prepare_data(data) -> TrainingData:
    """The run's first step: build the offline demo corpus when no data is given (safe from
    several ranks at once), check every dataset prefix's files, load the tokenizer.
    `data` is the run's DataConfig; raises ConfigError on unusable data."""
    if data.mock_data:
        tokenizer = JsonTokenizer(data.tokenizer_model) if data.tokenizer_model else NullTokenizer(data.vocab_size)
        return TrainingData(tokenizer, None, None, ["mock"], data.data_cache_path)
    data_path, tokenizer_model, cache_path = data.data_path, data.tokenizer_model, data.data_cache_path
    if data_path is None:
        demo = _demo_data(data.demo_data_root)
        data_path = list(demo.data_path)
        tokenizer_model = tokenizer_model or Path(demo.tokenizer_path)
        cache_path = cache_path or Path(data.demo_data_root) / "cache"
    prefixes, weights = parse_blend(data_path)
    for prefix in prefixes:
        check_indexed_dataset(prefix)
    names = prefix_domains(prefixes)
    domains = list(dict.fromkeys(names))
    tokenizer = JsonTokenizer(tokenizer_model)
    check_prepared_tokenizer(prefixes, tokenizer)
    return TrainingData(tokenizer, prefixes, weights, domains, cache_path, [domains.index(name) for name in names])


def _demo_data(root: Path):
    from megatron_reweight.data.demo import ensure_demo_data  # the `data` extra, checked at start-up

    return ensure_demo_data(root)


def check_prepared_tokenizer(prefixes: list[str], tokenizer: JsonTokenizer) -> None:
    """Data made by megatron_reweight.data.prepare records its tokenizer (summary.json beside the
    prefixes): its ids mean other tokens under another tokenizer, and may exceed the vocabulary."""
    from megatron_reweight.data.encoding import tokenizer_sha256

    for prefix in prefixes:
        summary_file = Path(prefix).parent / "summary.json"
        if not summary_file.is_file():
            continue
        recorded = json.loads(summary_file.read_text())["settings"]["tokenizer"]
        if recorded["sha256"] != tokenizer_sha256(tokenizer._tokenizer):
            raise ConfigError(
                f"--data-path prefix {prefix} was tokenised with another tokenizer (vocabulary "
                f"{recorded['vocab_size']}, {summary_file}) than --tokenizer-model "
                f"{tokenizer.unique_identifiers['path']} (vocabulary {tokenizer.vocab_size}); pass the tokenizer "
                "the data was prepared with, or prepare the data again with this one"
            )


def check_token_ids(batch: dict, vocab_size: int, dataset_names: list[str]) -> None:
    """Token ids beyond the tokenizer's vocabulary (data tokenised with another tokenizer): below the
    padded vocabulary they train silently, above it the embedding fails. Checked on the host copy;
    `dataset_names` names the domain of each blend dataset_id."""
    tokens = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)
    if int(tokens.max()) < vocab_size and int(tokens.min()) >= 0:
        return
    bad = (tokens >= vocab_size) | (tokens < 0)
    sample = int(bad.any(dim=1).nonzero()[0])
    dataset_id = batch.get("dataset_id")
    domain = f" of domain {dataset_names[int(dataset_id[sample])]}" if dataset_id is not None else ""
    raise ConfigError(
        f"token id {int(tokens[sample][bad[sample]][0])} in a sample{domain} is outside the tokenizer's vocabulary "
        f"(ids 0..{vocab_size - 1}): the data was tokenised with another tokenizer; pass the one it was made with "
        "as --tokenizer-model, or prepare the data again"
    )


def _sequence_count(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER

    with open(f"{prefix}.idx", "rb") as file:
        file.seek(len(_INDEX_HEADER) + 8 + 1)
        return int(numpy.frombuffer(file.read(8), dtype="<u8")[0])


def check_splits(source: TrainingData, split: str, with_validation: bool) -> None:
    """Every prefix must give each split it is built for at least one document: megatron-core
    waits forever building a split of 0 tokens (gpt_dataset's _get_num_epochs)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    needed = [("training", matrix[0])] + ([("validation", matrix[1])] if with_validation else [])
    for prefix, domain in zip(source.prefixes, source.domain_of_prefix):
        name, count = source.domains[domain], _sequence_count(prefix)
        for split_name, bounds in needed:
            # megatron-core's split of `count` sequences (blended_megatron_dataset_builder)
            if bounds is not None and int(round(bounds[1] * count)) - int(round(bounds[0] * count)) < 1:
                fix = " or --eval-iters 0 to train without validation" if split_name == "validation" else ""
                raise ConfigError(
                    f"--data-path prefix {prefix} (domain {name}): its {count} documents leave the {split_name} "
                    f"split empty with --split {split}; give the domain more documents or the "
                    f"{split_name} split a larger share of --split{fix}"
                )


# ----------------------------------------------------------------------------- datasets
@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    valid: dict[str, torch.utils.data.Dataset]  # domain name -> its validation dataset


def _dataset_config(source: TrainingData, split: str | None, seq_length: int, seed: int, blend):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=str(source.cache_path) if source.cache_path else None,
        tokenizer=source.tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def _only_split(config, index: int):
    """Keep one split of the split matrix: the other splits are neither built nor read."""
    config.split_matrix = [bounds if i == index else None for i, bounds in enumerate(config.split_matrix)]
    return config


def build_datasets(
    source: TrainingData, split: str, seq_length: int, seed: int, train_samples: int, eval_samples: int
) -> Datasets:
    """Build on every rank (rank 0 first, so others hit its index cache); megatron-core
    synchronises the ranks itself."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.core.datasets.utils import Split

    built_on_every_rank = lambda: True
    if source.prefixes is None:
        config = _dataset_config(source, None, seq_length, seed, None)
        sizes = [train_samples, eval_samples, 0]
        train, valid, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, built_on_every_rank, config).build()
        return Datasets(train=train, valid={"mock": valid} if eval_samples else {})

    check_splits(source, split, with_validation=eval_samples > 0)
    blend = (source.prefixes, source.weights)
    config = _only_split(_dataset_config(source, split, seq_length, seed, blend), Split.train.value)
    if config.split_matrix[Split.train.value] is None:
        raise ConfigError(f"--split {split} leaves no training documents")
    train = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, 0, 0], built_on_every_rank, config).build()[0]

    valid = {}
    if eval_samples:
        for domain, name in enumerate(source.domains):
            blend = source.prefixes_of(domain)
            config = _only_split(_dataset_config(source, split, seq_length, seed, blend), Split.valid.value)
            sizes = [0, eval_samples, 0]
            try:
                valid[name] = BlendedMegatronDatasetBuilder(GPTDataset, sizes, built_on_every_rank, config).build()[1]
            except (AssertionError, IndexError, ValueError) as error:
                raise ConfigError(
                    f"--data-path prefix {' '.join(blend[0])}: too few documents for a validation split with --split "
                    f"{split} ({error or type(error).__name__})"
                ) from None
    return Datasets(train=train, valid=valid)


# ----------------------------------------------------------------------------- sampling
class PretrainingSampler:
    """Megatron's MegatronPretrainingSampler: yields this DP rank's micro-batch indices.

    Samples are consumed in order from `consumed_samples`; every block of
    micro_batch_size x data_parallel_size samples is one micro-batch step, of which DP rank
    d takes [d * mbs, (d + 1) * mbs). An incomplete last block is dropped."""

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
        data_parallel_size: int,
    ):  # fmt: skip
        if total_samples <= 0:
            raise ValueError(f"no samples to draw (total_samples={total_samples})")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.block = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return max(0, (self.total_samples - self.consumed_samples) // self.block)

    def __iter__(self):
        start = self.data_parallel_rank * self.micro_batch_size
        for block_start in range(self.consumed_samples, self.total_samples - self.block + 1, self.block):
            yield list(range(block_start + start, block_start + start + self.micro_batch_size))


def data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int):
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
