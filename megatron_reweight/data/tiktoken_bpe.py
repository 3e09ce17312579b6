"""The same token ids as a Hugging Face byte-level BPE tokenizer, computed by tiktoken (about 4x
faster per core), for the tokenizers where the two provably agree.

Both split the text at the added tokens, then into pieces with one regex (GPT-2's for
`ByteLevel(use_regex=True)`, or the pattern of a `Split` before `ByteLevel(use_regex=False)`,
as in Llama 3), then merge each piece's bytes. They merge differently: HF merges the listed
pair (a, b) of lowest merge index, tiktoken any adjacent pair whose concatenation is a token of
lowest id. `exact_tiktoken` checks, from the tokenizer.json, three conditions under which the
two merge identically on every piece:

1. all 256 bytes are tokens, and each merge makes a token with a larger id than the merges
   before it (so "lowest id" orders merges as "lowest merge index" does);
2. no two merges make the same token;
3. HF's merges turn the bytes of every vocabulary token into that one token.

Why: take any state of HF's merging with adjacent symbols x, y whose concatenation t is a
token. No merge has yet crossed the ends of t's span, so the merges inside it were exactly the
first merges of HF's merging of t's bytes alone, which by (3) ends in [t]; from [x, y] that
needs the merge (x, y). So the pairs tiktoken may merge are HF's listed pairs, (1) orders them
alike, both take the leftmost of equals, and by induction every step is the same. (3) also
makes tiktoken's shortcut (a piece that is a token is that token) agree with HF.

The regexes are run by two engines (Oniguruma in HF, fancy-regex in tiktoken), which must
classify every character alike; tests/integration/test_tiktoken_bpe.py checks all of Unicode, and the
encoder re-checks every 64th document against HF while it runs (encoding.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

from tokenizers import Tokenizer, models

from megatron_reweight.data.errors import DataPrepError

# tokenizers' ByteLevel pre-tokenizer regex (use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's Split pattern.
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Post-processors that add the same tokens around every document (or none).
_CONSTANT_POST_PROCESSORS = {"ByteLevel", "TemplateProcessing", "BertProcessing", "RobertaProcessing"}


class NoExactFastPath(DataPrepError):
    """The tokenizer is not one on which tiktoken provably gives HF's tokens; the message says why."""


@cache
def byte_of_character() -> dict[str, int]:
    """ByteLevel's alphabet: the printable character that stands for each byte (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + n): byte for n, byte in enumerate(others)}


@dataclass
class TiktokenBPE:
    """Encodes documents as `tokenizer.encode_batch_fast(texts, add_special_tokens).ids` would."""

    tokenizer: Tokenizer  # for the documents tiktoken cannot take
    encoding: object  # tiktoken.Encoding
    prefix: list[int]  # what the post-processor adds around each document
    suffix: list[int]
    add_special_tokens: bool

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encode = self.encoding.encode
        allowed = self.encoding.special_tokens_set  # HF splits at every added token found in the text
        documents = []
        for text in texts:
            try:
                documents.append(self.prefix + encode(text, allowed_special=allowed) + self.suffix)
            except ValueError:  # fancy-regex ran out of backtracking stack (a ~1M-character whitespace run)
                documents.append(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids)
        return documents


def exact_tiktoken(tokenizer: Tokenizer, add_special_tokens: bool) -> TiktokenBPE:
    """A tiktoken encoder with the same output as `tokenizer`, or `NoExactFastPath` saying why not."""
    try:
        import tiktoken
    except ImportError as error:
        raise NoExactFastPath("tiktoken is not installed (pip install 'tiktoken>=0.11')") from error
    if tuple(int(part) for part in tiktoken.__version__.split(".")[:2]) < (0, 11):
        # before 0.11 a regex overflow panics instead of raising ValueError (see encode_batch)
        raise NoExactFastPath(f"tiktoken {tiktoken.__version__} is older than 0.11 (pip install 'tiktoken>=0.11')")
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    pattern = piece_pattern(spec)
    _check_model(model)
    if spec["normalizer"] is not None:
        raise NoExactFastPath(f"it has a normalizer ({spec['normalizer']['type']})")
    added = _added_tokens(spec)
    byte_of = byte_of_character()
    ranks = {}
    for token, token_id in model["vocab"].items():
        if token in added:
            continue
        if any(character not in byte_of for character in token):
            raise NoExactFastPath(f"vocabulary token {token!r} is not written in ByteLevel's byte alphabet")
        ranks[bytes(byte_of[character] for character in token)] = token_id
    if not all(bytes([byte]) in ranks for byte in range(256)):
        raise NoExactFastPath("its vocabulary lacks some of the 256 single bytes")
    _check_merges(model, added)
    encoding = tiktoken.Encoding(
        "hf-" + model["type"].lower(), pat_str=pattern, mergeable_ranks=ranks, special_tokens=added
    )
    prefix, suffix = _post_processor_tokens(tokenizer, spec, add_special_tokens)
    return TiktokenBPE(tokenizer, encoding, prefix, suffix, add_special_tokens)


def piece_pattern(spec: dict) -> str:
    """The regex that splits text into the pieces BPE merges within, or `NoExactFastPath`."""
    pre = spec["pre_tokenizer"] or {}
    if pre.get("type") == "ByteLevel" and pre["use_regex"] and not pre["add_prefix_space"]:
        return GPT2_PATTERN
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0]["type"] == "Split"
        and "Regex" in steps[0]["pattern"]
        and steps[0]["behavior"] == "Isolated"
        and not steps[0]["invert"]
        and steps[1]["type"] == "ByteLevel"
        and not steps[1]["use_regex"]
        and not steps[1]["add_prefix_space"]
    ):
        return steps[0]["pattern"]["Regex"]
    raise NoExactFastPath(
        "its pre-tokenizer is neither ByteLevel(use_regex=True, add_prefix_space=False) nor an isolating "
        "regex Split followed by ByteLevel(use_regex=False, add_prefix_space=False)"
    )


def _check_model(model: dict) -> None:
    unsupported = {
        "dropout": model.get("dropout"),
        "continuing_subword_prefix": model.get("continuing_subword_prefix"),
        "end_of_word_suffix": model.get("end_of_word_suffix"),
        "byte_fallback": model.get("byte_fallback"),
    }
    if model["type"] != "BPE" or any(unsupported.values()):
        used = ", ".join(name for name, value in unsupported.items() if value)
        raise NoExactFastPath(
            f"its model is {model['type']}{' with ' + used if used else ''}, not plain byte-level BPE"
        )


def _added_tokens(spec: dict) -> dict[str, int]:
    """The added tokens, which HF finds in the text first; tiktoken finds them the same way when
    they match as plain substrings and none holds another."""
    tokens = spec["added_tokens"]
    for token in tokens:
        if token["lstrip"] or token["rstrip"] or token["single_word"]:
            raise NoExactFastPath(f"added token {token['content']!r} matches with lstrip, rstrip or single_word")
    contents = [token["content"] for token in tokens]
    for content in contents:
        if any(content != other and content in other for other in contents):
            raise NoExactFastPath(f"added token {content!r} is part of another added token")
    return {token["content"]: token["id"] for token in tokens}


def _check_merges(model: dict, added: dict[str, int]) -> None:
    """Conditions 1 to 3 of the module docstring."""
    vocab = model["vocab"]
    pairs = [_pair(merge) for merge in model["merges"]]
    made = [vocab.get(first + second) for first, second in pairs]
    if None in made:
        raise NoExactFastPath("a merge makes a string that is not in the vocabulary")
    if any(later <= earlier for earlier, later in zip(made, made[1:])):
        raise NoExactFastPath("its merges do not make tokens in increasing id order")
    if len(set(made)) != len(made):
        raise NoExactFastPath("two merges make the same token")
    merging = models.BPE(vocab=vocab, merges=pairs, ignore_merges=False)  # _check_model allows no other options
    for token, token_id in vocab.items():
        if token not in added and [piece.id for piece in merging.tokenize(token)] != [token_id]:
            raise NoExactFastPath(f"its merges do not turn the bytes of token {token!r} into that token")


def _pair(merge: str | list[str]) -> tuple[str, str]:
    first, second = merge.split(" ") if isinstance(merge, str) else merge
    return first, second


def _post_processor_tokens(tokenizer: Tokenizer, spec: dict, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    processor = spec["post_processor"]
    if not add_special_tokens or processor is None:
        return [], []
    kinds = {step["type"] for step in processor.get("processors", [processor])}
    if not kinds <= _CONSTANT_POST_PROCESSORS:
        raise NoExactFastPath(f"with --add-special-tokens, its post-processor ({processor['type']}) is not supported")
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    processed = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(processed) - len(plain) + 1):
        if processed[start : start + len(plain)] == plain:
            return processed[:start], processed[start + len(plain) :]
    raise NoExactFastPath("its post-processor changes the document's own tokens")
