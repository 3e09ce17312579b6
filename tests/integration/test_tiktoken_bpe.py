"""The tiktoken fast path against Hugging Face tokenizers itself: the same ids on real and hostile
text for GPT-2- and Llama-3-shaped tokenizers, the same character classes in both regex engines
over all of Unicode, tokenizers on which tiktoken would differ refused, a long document encoded in
pieces to the whole document's ids, and a disagreement found while a run writes shards stopping it."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from megatron_reweight.data.encoding import DocumentEncoder, cut_is_exact, pieces, select_backend
from megatron_reweight.data.errors import DataPrepError
from megatron_reweight.data.prepare import OutputConfig, PrepareConfig, TokenizerConfig, main, prepare
from megatron_reweight.data.sources import InputConfig
from megatron_reweight.data.tiktoken_bpe import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    NoExactFastPath,
    TiktokenBPE,
    byte_of_character,
    exact_tiktoken,
)

CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
# The character classes and the contraction group the two piece patterns are made of.
PATTERN_ATOMS = {
    "gpt2": [r"\p{L}", r"\p{N}", r"\s", r"[^\s\p{L}\p{N}]", CONTRACTIONS],
    "llama3": [r"\p{L}", r"\p{N}", r"\s", r"[\r\n]", r"[^\r\n\p{L}\p{N}]", f"(?i:{CONTRACTIONS})"],
}
HOSTILE = [
    "Hello <|endoftext|> world<|endoftext|><|endoftext|>",
    "<|begin_of_text|>x<|end_of_text|> <|end_of_text",
    "naïve café ☕ — ünïcödé 日本語 한국어 العربية עברית ไทย",
    "👩‍👩‍👧‍👦 🇺🇸 e\u0301 \u200b\u200d\ufeff \U0001f600\U0001f9ea",
    "  leading, trailing  \n\n\t\t mixed \r\n\r\n whitespace   \n",
    "1234567890 3.14159 ١٢٣ ²³ ½ 10,000,000",
    "don't I'LL we'Re 'S 'ſ 'K they've o'clock ''s",
    "\x00\x01\x7f\ufffd\u2028\u2029\x85",
    "İstanbul ǅ ß ﬀ ΣΑΣ",
    "x" * 50_000,
    "a" + " " * 5000 + "b" + "\n" * 3000,
    " " * 1_000_000,  # past fancy-regex's backtracking stack: encoded by HF instead
]


def stdlib_documents(first: int, count: int) -> list[str]:
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[first : first + count]
    return [path.read_text(encoding="utf-8", errors="replace") for path in paths]


def train(pre_tokenizer, special_tokens: list[str], ignore_merges: bool = False) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(stdlib_documents(0, 60), trainer)
    return Tokenizer.from_str(tokenizer.to_str())  # as loaded from a tokenizer.json


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    gpt2 = train(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
    llama3 = train(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        ["<|begin_of_text|>", "<|end_of_text|>"],
        ignore_merges=True,
    )
    bos = llama3.token_to_id("<|begin_of_text|>")
    llama3.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return {"gpt2": gpt2, "llama3": llama3}


def hf_ids(tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=add_special_tokens).ids for text in texts]


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("add_special_tokens", [False, True])
@pytest.mark.parametrize("shape", ["gpt2", "llama3"])
def test_fast_path_gives_hf_ids_on_real_and_hostile_text(tokenizers, shape, add_special_tokens):
    tokenizer = tokenizers[shape]
    texts = stdlib_documents(60, 80) + HOSTILE  # not the training text
    fast = exact_tiktoken(tokenizer, add_special_tokens)
    assert fast.encode_batch(texts) == hf_ids(tokenizer, texts, add_special_tokens)
    if shape == "llama3":
        assert fast.prefix == ([tokenizer.token_to_id("<|begin_of_text|>")] if add_special_tokens else [])


@pytest.mark.parametrize("backend", ["hf", "tiktoken"])
@pytest.mark.parametrize("shape", ["gpt2", "llama3"])
def test_long_document_encoded_in_pieces_gives_the_whole_documents_ids(tokenizers, shape, backend):
    """A long document is encoded in pieces (here of 200 characters, in production 1 MiB) cut
    before a space that follows a letter or digit: the ids equal HF's on the whole document. The
    control: cutting every 200 characters instead changes them."""
    tokenizer = tokenizers[shape]
    text = " ".join(stdlib_documents(60, 20) + HOSTILE[:-3])  # not the training text
    fast = exact_tiktoken(tokenizer, False) if backend == "tiktoken" else None
    encoder = DocumentEncoder(tokenizer, eod_id=0, dtype=numpy.uint16, add_special_tokens=False, fast=fast, piece_chars=200)
    tokens, lengths = encoder([text, "short"])
    whole = hf_ids(tokenizer, [text, "short"], False)
    assert lengths.tolist() == [len(whole[0]) + 1, len(whole[1]) + 1]
    assert tokens.tolist() == whole[0] + [0] + whole[1] + [0]
    assert len(list(pieces(text, 200))) > 500
    naive = [i for start in range(0, len(text), 200) for i in hf_ids(tokenizer, [text[start : start + 200]], False)[0]]
    assert naive != whole[0]


def test_documents_stay_whole_where_cutting_is_not_exact(tokenizers):
    llama3 = tokenizers["llama3"]
    assert cut_is_exact(llama3, add_special_tokens=True) == "it adds tokens around each document"
    normalized = edited(tokenizers["gpt2"], normalizer=json.loads(normalizers.NFKC().__getstate__()))
    assert cut_is_exact(normalized, False) == "it has a normalizer (NFKC)"
    encoder = DocumentEncoder(normalized, eod_id=0, dtype=numpy.uint16, add_special_tokens=False, piece_chars=10)
    assert encoder.piece_chars is None


@pytest.mark.parametrize("shape", ["gpt2", "llama3"])
def test_regex_engines_classify_every_character_alike(shape):
    """HF runs the piece regex with Oniguruma, tiktoken with fancy-regex: each class the pattern
    uses must hold the same characters in both, over all of Unicode."""
    characters = "".join(chr(point) for point in range(0x110000) if not 0xD800 <= point < 0xE000)
    # Every character after an apostrophe and before or after each contraction letter.
    contraction_probes = "\n".join(
        f"'{c} '{c}e 'r{c} '{c}l 'l{c}" for c in characters if c not in "\n'" and not c.isspace()
    )
    byte_ranks = {bytes([byte]): byte for byte in range(256)}
    for atom in PATTERN_ATOMS[shape]:
        text = contraction_probes if "'" in atom else characters
        # tiktoken encodes only what its regex matches; an Encoding of bare bytes returns it verbatim.
        matched_by_tiktoken = tiktoken.Encoding("probe", pat_str=atom, mergeable_ranks=byte_ranks, special_tokens={})
        tiktoken_text = matched_by_tiktoken.decode_bytes(matched_by_tiktoken.encode_ordinary(text)).decode()
        matches = pre_tokenizers.Split(Regex(atom), behavior="removed", invert=True).pre_tokenize_str(text)
        hf_text = "".join(piece for piece, _ in matches)
        assert tiktoken_text == hf_text, f"the engines disagree on {atom}"
        assert hf_text, atom  # the probe reached the atom


# ----------------------------------------------------------------------------- refused tokenizers
def toy_tokenizer(tokens: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """A byte-level BPE over bytes 0..255 (id = byte) plus `tokens` (the next ids) made by `merges`."""
    character_of = {byte: character for character, byte in byte_of_character().items()}
    vocab = {character_of[byte]: byte for byte in range(256)} | {token: 256 + i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizer


def naive_tiktoken(tokenizer: Tokenizer) -> tiktoken.Encoding:
    """tiktoken built from the vocabulary without the checks."""
    byte_of = byte_of_character()
    vocab = tokenizer.get_vocab()
    ranks = {bytes(byte_of[character] for character in token): token_id for token, token_id in vocab.items()}
    return tiktoken.Encoding("naive", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.mark.parametrize(
    "tokens, merges, reason",
    [
        # "bc" merges first, so HF can never make "abc" from (ab, c): it stops at [a, bc]
        (["bc", "ab", "abc"], [("b", "c"), ("a", "b"), ("ab", "c")], "do not turn the bytes of token 'abc'"),
        # ids against merge order: tiktoken would merge "bc" (lower id) before HF's first merge "ab"
        (["bc", "ab"], [("a", "b"), ("b", "c")], "increasing id order"),
    ],
)
def test_refuses_tokenizers_on_which_tiktoken_would_differ(tokens, merges, reason):
    tokenizer = toy_tokenizer(tokens, merges)
    assert naive_tiktoken(tokenizer).encode_ordinary("abc") != tokenizer.encode("abc").ids  # the danger is real
    with pytest.raises(NoExactFastPath, match=reason):
        exact_tiktoken(tokenizer, add_special_tokens=False)


def test_refuses_a_vocabulary_without_every_byte():
    spec = json.loads(toy_tokenizer(["ab"], [("a", "b")]).to_str())
    del spec["model"]["vocab"]["ÿ"]  # byte 0xFF: HF would drop it, tiktoken cannot encode it
    with pytest.raises(NoExactFastPath, match="lacks some of the 256 single bytes"):
        exact_tiktoken(Tokenizer.from_str(json.dumps(spec)), add_special_tokens=False)


def edited(tokenizer: Tokenizer, **fields) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(json.loads(tokenizer.to_str()) | fields))


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"normalizer": json.loads(normalizers.NFC().__getstate__())}, "normalizer"),
        (
            {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}},
            "pre-tokenizer",
        ),
        (
            {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}},
            "pre-tokenizer",
        ),
    ],
)
def test_unsupported_tokenizers_fall_back_to_hf_or_fail_when_tiktoken_is_asked_for(tokenizers, change, reason):
    tokenizer = edited(tokenizers["gpt2"], **change)
    with pytest.raises(NoExactFastPath, match=reason):
        exact_tiktoken(tokenizer, add_special_tokens=False)
    assert select_backend(tokenizer, "auto", add_special_tokens=False) is None
    with pytest.raises(DataPrepError, match="--tokenizer-backend hf"):
        select_backend(tokenizer, "tiktoken", add_special_tokens=False)
    with pytest.raises(DataPrepError, match="unknown tokenizer backend"):
        select_backend(tokenizer, "fast", add_special_tokens=False)


def test_a_sentencepiece_style_model_is_refused(tokenizers):
    spec = json.loads(tokenizers["gpt2"].to_str())
    spec["model"]["byte_fallback"] = True
    with pytest.raises(NoExactFastPath, match="byte_fallback"):
        exact_tiktoken(Tokenizer.from_str(json.dumps(spec)), add_special_tokens=False)


# ----------------------------------------------------------------------------- in a run
@pytest.fixture
def corpus(tmp_path) -> list[str]:
    path = tmp_path / "corpus.parquet"
    chunks = [
        source[start : start + 3000] for source in stdlib_documents(130, 40) for start in range(0, len(source), 3000)
    ]
    pq.write_table(pa.table({"text": chunks + HOSTILE[:9]}), path)
    return [str(path)]


def run(corpus, tokenizer_file: Path, output_dir: Path, backend: str, add_special_tokens=False, batch_chars=1_000_000):
    tokenizer = TokenizerConfig(str(tokenizer_file), add_special_tokens=add_special_tokens, backend=backend)
    config = PrepareConfig(
        InputConfig(files=corpus),
        tokenizer,
        OutputConfig(output_dir=output_dir),
        batch_chars=batch_chars,
        progress=False,
    )
    return prepare(config)


@pytest.mark.parametrize("shape, add_special_tokens", [("gpt2", False), ("llama3", True)])
def test_backends_write_identical_datasets(tokenizers, corpus, tmp_path, shape, add_special_tokens):
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizers[shape].save(str(tokenizer_file))
    outputs = {}
    for backend in ("hf", "tiktoken"):
        assert run(corpus, tokenizer_file, tmp_path / backend, backend, add_special_tokens).tokenizer_backend == backend
        outputs[backend] = {path.name: path.read_bytes() for path in (tmp_path / backend).glob("*.[bi][id][nx]")}
    assert outputs["hf"] == outputs["tiktoken"] and len(outputs["hf"]) == 2


@pytest.mark.parametrize("wrong_document", [0, 128])
def test_a_disagreement_on_a_checked_document_stops_the_run_and_keeps_nothing(
    tokenizers, corpus, tmp_path, monkeypatch, wrong_document
):
    """Documents 0, 64, 128, ... are encoded by both backends; a fault injected into one of them is caught."""
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizers["gpt2"].save(str(tokenizer_file))
    encoded = []  # documents per batch
    encode_batch = TiktokenBPE.encode_batch

    def faulty(self, texts):
        documents = encode_batch(self, texts)
        if 0 <= wrong_document - sum(encoded) < len(texts):
            documents[wrong_document - sum(encoded)][0] += 1
        encoded.append(len(texts))
        return documents

    monkeypatch.setattr(TiktokenBPE, "encode_batch", faulty)
    with pytest.raises(DataPrepError, match="tiktoken and HF tokenizers disagree"):
        run(corpus, tokenizer_file, tmp_path / "out", "tiktoken", batch_chars=5_000)
    assert sum(encoded[:-1]) <= wrong_document < sum(encoded)  # stopped at the faulty batch
    assert not list((tmp_path / "out").glob("*.bin"))


def test_cli_backend_flag(tokenizers, corpus, tmp_path, capsys):
    unsupported = tmp_path / "nfc.json"
    edited(tokenizers["gpt2"], normalizer=json.loads(normalizers.NFC().__getstate__())).save(str(unsupported))
    arguments = ["--input", *corpus, "--tokenizer", str(unsupported), "--no-progress"]
    assert main([*arguments, "--output-dir", str(tmp_path / "a"), "--tokenizer-backend", "tiktoken"]) == 2
    error = capsys.readouterr().err
    assert "has a normalizer" in error and "--tokenizer-backend hf" in error and "Traceback" not in error
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    assert main([*arguments, "--output-dir", str(tmp_path / "b")]) == 0  # auto: HF
    assert (tmp_path / "b" / "summary.json").is_file()
