"""Tokenisation: load a Hugging Face `tokenizers` tokenizer, pick the end-of-document token, and
encode batches of documents.

Two backends give the same ids. "hf" is `Tokenizer.encode_batch_fast` (a whole batch per call
into Rust, no character offsets). "tiktoken" (tiktoken_bpe.py) is about 4x faster per core and
is used, by default, for the byte-level BPE tokenizers on which it provably gives HF's ids; every
`VERIFY_EVERY`-th text is encoded by both and compared.

A document longer than `PIECE_CHARS` is encoded in pieces of about that size where cutting is
provably exact (`cut_is_exact`): whole, a 30 MB document peaked at over 4 GB of memory, as the
tokenizer keeps every token's string and offsets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from megatron_reweight.data.errors import DataPrepError
from megatron_reweight.data.tiktoken_bpe import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    NoExactFastPath,
    TiktokenBPE,
    exact_tiktoken,
    piece_pattern,
)

logger = logging.getLogger(__name__)

# Spellings of "end of document" in common tokenizer.json files (GPT-2 / Llama 3 / Llama 2 / Gemma /
# others), in the order they are looked for, after a tokenizer_config.json's eos_token.
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<eod>")
BACKENDS = ("auto", "tiktoken", "hf")
VERIFY_EVERY = 64  # texts: 1/64 of the text is also encoded by HF (about 6% more time on the fast path)
PIECE_CHARS = 1 << 20  # characters: longer documents are encoded in pieces of about this size
PIECES_PER_CALL = 8  # pieces encoded at once: a few MB of text in flight


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
    eod = find_eod_id(tokenizer, tokenizer_file)
    if eod is None:
        raise DataPrepError(
            f"the tokenizer has no end-of-document token (looked for {', '.join(eod_candidates(tokenizer_file))}); "
            "pass --eod-id"
        )
    return eod


def eod_candidates(tokenizer_file: Path) -> list[str]:
    """The end-of-document spellings looked for, in order: the eos_token of a tokenizer_config.json
    beside tokenizer.json, then `EOD_TOKENS`."""
    return [*_config_eos_token(tokenizer_file), *EOD_TOKENS]


def find_eod_id(tokenizer: Tokenizer, tokenizer_file: Path) -> int | None:
    """The end-of-document id, as data preparation and the trainer both resolve it."""
    for token in eod_candidates(Path(tokenizer_file)):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def _config_eos_token(tokenizer_file: Path) -> list[str]:
    config_file = tokenizer_file.with_name("tokenizer_config.json")
    if not config_file.is_file():
        return []
    eos = json.loads(config_file.read_text()).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return [eos] if eos else []


def select_backend(tokenizer: Tokenizer, backend: str, add_special_tokens: bool) -> TiktokenBPE | None:
    """The tiktoken encoder for "tiktoken", None (HF) for "hf"; for "auto" tiktoken where it is exact."""
    if backend not in BACKENDS:
        raise DataPrepError(f"unknown tokenizer backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "hf":
        return None
    try:
        fast = exact_tiktoken(tokenizer, add_special_tokens)
    except NoExactFastPath as reason:
        if backend == "tiktoken":
            raise NoExactFastPath(
                f"--tokenizer-backend tiktoken: tiktoken cannot reproduce this tokenizer exactly, as {reason}; "
                "use --tokenizer-backend hf"
            ) from reason
        logger.info(f"tokenizing with HF tokenizers (tiktoken would not be exact: {reason})")
        return None
    logger.info("tokenizing with tiktoken (checked to give the tokenizer's exact ids)")
    return fast


def cut_is_exact(tokenizer: Tokenizer, add_special_tokens: bool) -> str | None:
    """None when a text cut just before a space that follows a letter or digit (`pieces`) encodes,
    piece by piece, to the ids of the whole text; else why not.

    Why: in GPT-2's and Llama 3's piece regexes no alternative matches a non-space character
    followed by a space, so the piece holding the letter or digit ends before the space; and the
    match starting at the space depends only on the text from there on (no look-behind). So the
    whole text splits into the pieces of its two parts, and BPE merges within pieces. This also
    needs no normalizer, no added token that holds whitespace or strips it on its right (either
    could match across the cut), and no tokens added around each document."""
    spec = json.loads(tokenizer.to_str())
    try:
        pattern = piece_pattern(spec)
    except NoExactFastPath as reason:
        return str(reason)
    if pattern not in (GPT2_PATTERN, LLAMA3_PATTERN):
        return "its piece regex is neither GPT-2's nor Llama 3's"
    if spec["normalizer"] is not None:
        return f"it has a normalizer ({spec['normalizer']['type']})"
    for token in spec["added_tokens"]:
        if token["rstrip"] or any(character.isspace() for character in token["content"]):
            return f"added token {token['content']!r} can match across a space"
    probe = "a b"
    if tokenizer.encode(probe, add_special_tokens=add_special_tokens).ids != tokenizer.encode(probe, add_special_tokens=False).ids:
        return "it adds tokens around each document"
    return None


def pieces(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive parts of at least `size` characters (the last one shorter), each cut
    just before a space that follows a letter or digit; a text without such a space stays whole."""
    start = 0
    while len(text) - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and not text[cut - 1].isalnum():
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


class DocumentEncoder:
    """Encodes a batch of documents into one flat token array (EOD after each document) plus the
    length of each document including its EOD."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        eod_id: int,
        dtype: type[np.number],
        add_special_tokens: bool,
        fast: TiktokenBPE | None = None,
        piece_chars: int = PIECE_CHARS,
    ):
        self.tokenizer = tokenizer
        self.eod_id = eod_id
        self.dtype = dtype
        self.add_special_tokens = add_special_tokens
        self.fast = fast
        self.piece_chars = piece_chars if cut_is_exact(tokenizer, add_special_tokens) is None else None
        self.texts = 0  # encoded so far by this process

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        documents: list[np.ndarray | None] = [
            self._encode_in_pieces(text) if self.piece_chars and len(text) > self.piece_chars else None
            for text in texts
        ]
        whole = [i for i, document in enumerate(documents) if document is None]
        for i, ids in zip(whole, self._encode([texts[i] for i in whole])):
            documents[i] = np.array(ids, dtype=self.dtype)
        eod = np.array([self.eod_id], dtype=self.dtype)
        lengths = np.array([len(document) + 1 for document in documents], dtype=np.int64)
        tokens = np.concatenate([part for document in documents for part in (document, eod)] or [eod[:0]])
        return tokens, lengths

    def _encode_in_pieces(self, text: str) -> np.ndarray:
        parts, remaining = [], pieces(text, self.piece_chars)
        while batch := list(islice(remaining, PIECES_PER_CALL)):  # a batch: HF encodes its pieces in parallel
            parts.extend(np.array(ids, dtype=self.dtype) for ids in self._encode(batch))
        return np.concatenate(parts)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self.fast is None:
            ids = self._hf_ids(texts)
        else:
            ids = self.fast.encode_batch(texts)
            checked = slice(-self.texts % VERIFY_EVERY, None, VERIFY_EVERY)
            self._verify(texts[checked], ids[checked])
        self.texts += len(texts)
        return ids

    def _hf_ids(self, texts: list[str]) -> list[list[int]]:
        return [
            encoding.ids
            for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=self.add_special_tokens)
        ]

    def _verify(self, texts: list[str], ids: list[list[int]]) -> None:
        for text, fast, hf in zip(texts, ids, self._hf_ids(texts)):
            if fast != hf:
                at = next((i for i, (a, b) in enumerate(zip(fast, hf)) if a != b), min(len(fast), len(hf)))
                raise DataPrepError(
                    f"tiktoken and HF tokenizers disagree on the document starting {text[:60]!r} (first at "
                    f"token {at}); shards written by this run may be affected. Rerun into a new --output-dir "
                    "with --tokenizer-backend hf, and please report the tokenizer"
                )
