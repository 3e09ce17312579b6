"""Tokenisation: load a Hugging Face `tokenizers` tokenizer, pick the end-of-document token, and
encode batches of documents.

`Tokenizer.encode_batch_fast` takes a whole batch per call: one call into Rust per batch instead of
one per document, and no character offsets computed.
"""

from __future__ import annotations

import hashlib
import json
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from megatron_reweight.data.errors import DataPrepError

# Spellings of "end of document" in common tokenizer.json files (GPT-2 / Llama 3 / Llama 2 / Gemma).
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def load_tokenizer(spec: str) -> tuple[Tokenizer, Path]:
    """A tokenizer from a tokenizer.json path, a folder holding one, or a Hugging Face Hub name.

    Returns the tokenizer and the tokenizer.json it was read from."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        if spec.endswith(".json") or spec.startswith(("/", ".", "~")):
            raise DataPrepError(f"tokenizer file {path} does not exist")
        path = _download_from_hub(spec)
    try:
        return Tokenizer.from_file(str(path)), path
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise DataPrepError(f"{path} is not a Hugging Face tokenizers file (tokenizer.json): {error}") from error


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id, "tokenizer.json"))
    except Exception as error:  # offline, unknown repository, invalid name, gated model, ...
        raise DataPrepError(
            f"unknown tokenizer {repo_id!r}: not a local tokenizer.json or folder, and not loadable from the "
            f"Hugging Face Hub ({type(error).__name__}). Pass a tokenizer.json path or a hub repository id."
        ) from error
    try:  # its eos_token, when the repository has one, names the end-of-document token
        hf_hub_download(repo_id, "tokenizer_config.json")
    except Exception:
        pass
    return path


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def resolve_eod_id(tokenizer: Tokenizer, tokenizer_file: Path, eod_id: int | None) -> int:
    """`eod_id` if given, else the tokenizer's end-of-document token: the eos_token of a
    tokenizer_config.json next to tokenizer.json, else the first of `EOD_TOKENS` it knows."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if eod_id is not None:
        if not 0 <= eod_id < vocab_size:
            raise DataPrepError(f"--eod-id {eod_id} is outside the tokenizer's vocabulary (size {vocab_size})")
        return eod_id
    candidates = [*_config_eos_token(tokenizer_file), *EOD_TOKENS]
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataPrepError(
        f"the tokenizer has no end-of-document token (looked for {', '.join(candidates)}); pass --eod-id"
    )


def _config_eos_token(tokenizer_file: Path) -> list[str]:
    config_file = tokenizer_file.with_name("tokenizer_config.json")
    if not config_file.is_file():
        return []
    eos = json.loads(config_file.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return [eos] if eos else []


class DocumentEncoder:
    """Encodes a batch of documents into one flat token array (EOD after each document) plus the
    length of each document including its EOD."""

    def __init__(self, tokenizer: Tokenizer, eod_id: int, dtype: type[np.number], add_special_tokens: bool):
        self.tokenizer = tokenizer
        self.eod_id = eod_id
        self.dtype = dtype
        self.add_special_tokens = add_special_tokens

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=self.add_special_tokens)
        documents = [encoding.ids + [self.eod_id] for encoding in encodings]
        lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
        tokens = np.fromiter(chain.from_iterable(documents), dtype=self.dtype, count=int(lengths.sum()))
        return tokens, lengths
