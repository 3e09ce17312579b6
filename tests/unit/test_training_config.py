"""pretrain_llama.py's configuration in one process: presets, flags, Megatron's blend syntax,
the resumable sampler, and the start-up checks of bad input."""

import argparse
import re
from pathlib import Path

import pytest

from megatron_reweight.arguments import StrategyOptions
from megatron_reweight.loss import ReweightConfig
from megatron_reweight.model import transformer_engine_available
from megatron_reweight.settings import flag_of, setting_fields, values_of
from megatron_reweight.training import PRESETS, ConfigError, build_parser, config_from_args, preset_config
from megatron_reweight.training.arguments import settings_from_args
from megatron_reweight.training.config import SECTIONS, TrainConfig
from megatron_reweight.training.data import (
    PretrainingSampler,
    padded_vocab_size,
    parse_blend,
    prepare_data,
)
from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def config(argv, world_size=1):
    return config_from_args(build_parser().parse_args(argv), world_size=world_size)


def error(argv, world_size=1) -> str:
    with pytest.raises(ConfigError) as info:
        config(argv, world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def data_error(argv) -> str:
    """The error of the run's data step (parsing reads no data)."""
    data = config(argv).data
    with pytest.raises(ConfigError) as info:
        prepare_data(data)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- presets
def test_presets_follow_the_paper_tables():
    # Table 6 (GPT-2 widths 768: the table's 786 is a typo) and Table 7.
    expected = {
        # name: (layers, hidden, heads, seq, global batch, lr, min lr, warm-up, r, steps)
        "gpt2-mini": (12, 768, 12, 512, 32, 5e-4, 1e-4, 500, 0.4, 20_000),
        "gpt2-small": (24, 768, 16, 512, 48, 5e-4, 1e-4, 500, 0.4, 20_000),
        "gpt2-medium": (36, 768, 24, 512, 48, 5e-4, 1e-4, 500, 0.4, 20_000),
        "llama-1.4b": (24, 2048, 16, 8192, 128, 3e-4, 3e-5, 2000, 1.0, 100_000),
        "llama-7b": (32, 4096, 32, 8192, 128, 3e-4, 3e-5, 2000, 2.0, 170_000),
    }
    for name, row in expected.items():
        p = preset_config(name)
        m, o, t = p.model, p.optim, p.reweight.temperature
        got = (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, o.global_batch_size, o.lr,
               o.min_lr, o.lr_warmup_iters, t.r, o.train_iters)  # fmt: skip
        assert got == row, name
        assert (o.weight_decay, o.clip_grad, t.warmup_steps) == (0.01, 1.0, o.lr_warmup_iters)
    seven = preset_config("llama-7b").model
    assert seven.ffn_hidden_size == 11008 and seven.num_query_groups == 32


def test_a_preset_overrides_declared_settings_only():
    # Every override names a flag; what a preset leaves out keeps the declared default.
    flags = {action.dest for action in build_parser()._actions}
    for name, preset in PRESETS.items():
        assert set(preset.overrides) <= flags, name
    assert preset_config("gpt2-mini").optim.adam_eps == preset_config("tiny").optim.adam_eps == 1e-8
    assert preset_config("tiny").model.num_layers == 4  # the declared defaults are the tiny model


def test_llama_presets_have_the_advertised_size():
    # Untied embeddings with a 32000-token vocabulary; SwiGLU has three FFN matrices.
    def parameters(name, vocab=32000):
        p = preset_config(name).model
        head_dim = p.hidden_size // p.num_attention_heads
        attention = p.hidden_size * (p.hidden_size + 2 * p.num_query_groups * head_dim) + p.hidden_size**2
        layer = attention + 3 * p.hidden_size * p.ffn_hidden_size + 2 * p.hidden_size
        return p.num_layers * layer + 2 * vocab * p.hidden_size + p.hidden_size

    assert 6.6e9 < parameters("llama-7b") < 6.8e9  # Llama-2-7B: 6.74B
    assert 1.3e9 < parameters("llama-1.4b") < 1.5e9


def test_preset_defaults_and_overrides(corpus, tmp_path):
    c = config(["--preset", "gpt2-small", "--mock-data"], world_size=8)
    assert (c.model.hidden_size, c.model.num_layers, c.optim.global_batch_size, c.optim.lr_decay_iters) == (
        768,
        24,
        48,
        20_000,
    )
    assert (c.reweight.strategy, c.reweight.temperature.r, c.reweight.temperature.warmup_steps) == (
        "linupper",
        0.4,
        500,
    )
    assert c.reweight.temperature.warmup_r == 100.0 and c.optim.adam_beta2 == 0.999
    c = config(["--preset", "llama-7b", "--mock-data", "--hidden-size", "1024", "--num-attention-heads", "8",
                "--lr", "1e-4", "--reweight-strategy", "uniform", "--reweight-r", "3"], world_size=8)  # fmt: skip
    assert (c.model.hidden_size, c.model.num_attention_heads, c.model.num_query_groups) == (1024, 8, 8)
    assert (c.optim.lr, c.reweight.strategy, c.reweight.temperature.r) == (1e-4, "uniform", 3.0)
    c = config(SMALL_MODEL + data_args(corpus, tmp_path) + ["--save", str(tmp_path / "ck")])
    data = prepare_data(c.data)
    assert data.domains == ["repeat", "markov", "noise"] and data.weights == [1.0, 1.0, 1.0]
    assert c.logging.metrics_file == tmp_path / "ck" / "metrics.jsonl"
    assert c.device.device == "cpu" and c.device.bf16 is False and c.device.transformer_impl == "local"


def test_data_cache_defaults_to_the_save_directory(corpus, tmp_path):
    """On prepared data, megatron-core's index cache goes to the run's folder, not beside the data."""
    save = tmp_path / "run"
    assert config(data_args(corpus, None) + ["--save", str(save)]).data.data_cache_path == save / "data-cache"
    given = tmp_path / "cache"
    assert config(data_args(corpus, given) + ["--save", str(save)]).data.data_cache_path == given
    assert config(data_args(corpus, None)).data.data_cache_path is None  # the run says so when it starts
    assert config(["--save", str(save)]).data.data_cache_path is None  # the demo corpus keeps its own


# --------------------------------------------------------------------------- declared settings
def test_every_setting_is_one_flag():
    parser = build_parser()
    flags = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    settings = [
        (f, kind) for _, section in SECTIONS for f, kind in setting_fields(type(getattr(TrainConfig(), section)))
    ]
    settings += setting_fields(ReweightConfig) + setting_fields(StrategyOptions)
    assert len(flags) == len(set(flags))
    for f, _ in settings:
        action = next(a for a in parser._actions if flag_of(f) in a.option_strings)
        assert action.help, flag_of(f)
    # Megatron-LM's names, including its --no-... switches.
    for flag in ("--no-load-optim", "--no-load-rng", "--dist-ckpt-optim-fully-reshardable", "--calculate-per-token-loss",
                 "--exit-signal-handler", "--reweight-r-warmup-value"):  # fmt: skip
        assert flag in flags, flag


def _help_default(action):
    """The value the help states as a flag's default ("(default X" or "(default X;"), in the flag's
    type; None where it states none (or a resolved one, "default: ...")."""
    found = re.search(r"\(default ([^:;)][^;)]*)[;)]", action.help)
    if found is None:
        return None
    text = found[1]
    if isinstance(action, argparse.BooleanOptionalAction):
        assert text in ("on", "off"), action.help
        return text == "on"
    return action.type(text) if action.type is not None else text


def test_help_default_of_every_flag_is_the_value_of_a_plain_run():
    """What --help calls each flag's default is what a run without flags uses (the tiny preset's,
    the trainer's strategy), not the declared default a preset replaces."""
    parser = build_parser()
    plain = settings_from_args(parser.parse_args([]))
    values = values_of(plain)
    values.update({"reweight_" + name: value for name, value in plain.reweight.strategy_kwargs.items()})
    checked = 0
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = plain.preset if action.dest == "preset" else values.get(action.dest)
        if value is None:  # resolved at start-up, or unused: no stated value
            assert _help_default(action) is None, action.help
            continue
        assert _help_default(action) == value, (action.option_strings[0], action.help, value)
        checked += 1
    assert checked > 50
    # Flags a preset changes name the preset whose value the help shows.
    for flag in ("--reweight-r", "--reweight-r-warmup-steps", "--num-layers"):
        assert "the tiny preset's" in next(a for a in parser._actions if flag in a.option_strings).help


def test_a_value_comes_from_the_flag_then_the_preset_then_the_trainer_then_the_declaration():
    c = config(["--preset", "gpt2-mini", "--mock-data", "--reweight-r", "3"])
    assert c.reweight.temperature.r == 3.0  # the flag over the preset's 0.4
    assert c.optim.adam_beta2 == 0.999  # the preset over the declared 0.95
    assert c.reweight.strategy == "linupper"  # the trainer's default over the plugin's
    assert c.optim.adam_eps == 1e-8 and c.reweight.temperature.warmup_r == 100.0  # declared
    assert ReweightConfig().strategy == "uniform"  # the plugin's own default is untouched
    c = config(["--mock-data", "--no-load-optim", "--no-exit-signal-handler", "--calculate-per-token-loss"])
    assert (c.checkpoint.load_optim, c.checkpoint.load_rng, c.checkpoint.exit_signal_handler) == (False, True, False)
    assert c.optim.calculate_per_token_loss is True


def test_declared_checks_name_the_flag():
    assert error(["--mock-data", "--lr", "-1"]) == "--lr must be > 0, got -1.0"
    assert error(["--mock-data", "--eval-iters", "-1"]) == "--eval-iters must be >= 0, got -1"
    assert error(["--mock-data", "--num-layers", "0"]) == "--num-layers must be > 0, got 0"
    assert error(["--mock-data", "--vocab-size", "0"]) == "--vocab-size must be > 0, got 0"
    assert error(["--mock-data", "--reweight-r-warmup-steps", "-1"]) == "--reweight-r-warmup-steps must be >= 0, got -1"


def test_parsing_reads_and_writes_no_data(tmp_path, monkeypatch):
    """Without --data-path the run builds the demo corpus; parsing only records where."""
    monkeypatch.chdir(tmp_path)
    c = config([])
    assert c.data.data_path is None and c.data.mock_data is False and c.data.demo_data_root == Path("data/demo")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- data pieces
def test_megatron_blend_syntax():
    assert parse_blend(["/d/a"]) == (["/d/a"], None)
    assert parse_blend(["0.3", "/d/a", "0.7", "/d/b"]) == (["/d/a", "/d/b"], [0.3, 0.7])
    assert parse_blend(["/d/a", "/d/b"]) == (["/d/a", "/d/b"], None)
    with pytest.raises(ConfigError, match="WEIGHT1 PREFIX1"):
        parse_blend(["0.3", "/d/a", "/d/b"])
    with pytest.raises(ConfigError, match="weights must be positive"):
        parse_blend(["-1", "/d/a", "2", "/d/b"])


def test_vocab_padding_is_megatrons():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(256, 128, 2) == 256


def test_sampler_splits_each_block_over_dp_ranks_in_order():
    mbs, dp = 3, 4
    for rank in range(dp):
        batches = list(PretrainingSampler(100, 12, mbs, rank, dp))
        assert len(batches) == (100 - 12) // (mbs * dp)
        for step, batch in enumerate(batches):
            start = 12 + step * mbs * dp + rank * mbs
            assert batch == list(range(start, start + mbs))


def test_sampler_resumes_exactly_where_it_stopped():
    full = list(PretrainingSampler(200, 0, 2, 1, 3))
    for consumed_steps in (0, 1, 7, 20):
        resumed = list(PretrainingSampler(200, consumed_steps * 2 * 3, 2, 1, 3))
        assert resumed == full[consumed_steps:]


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_naming_the_problem(corpus, tmp_path):
    data = data_args(corpus, tmp_path)
    assert "invalid choice: 'llama-70b'" in error(["--preset", "llama-70b", "--mock-data"])
    message = error(SMALL_MODEL + data + ["--global-batch-size", "6"], world_size=2)
    assert "--global-batch-size 6" in message and "--micro-batch-size 2" in message
    message = error(SMALL_MODEL + data + ["--tensor-model-parallel-size", "2", "--num-attention-heads", "6",
                                          "--num-query-groups", "3", "--hidden-size", "96"], world_size=2)  # fmt: skip
    assert "--tensor-model-parallel-size 2 does not divide --num-attention-heads 6" not in message
    assert "--num-query-groups 3" in message
    message = error(SMALL_MODEL + data + ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3",
                                          "--num-query-groups", "3", "--hidden-size", "96"], world_size=2)  # fmt: skip
    assert "--tensor-model-parallel-size 2 does not divide --num-attention-heads 3" in message
    assert "not divisible by 2 x --context-parallel-size" in error(
        SMALL_MODEL + data + ["--context-parallel-size", "2", "--seq-length", "66"], world_size=2
    )
    assert "world size 3 is not divisible by TP x PP x CP" in error(
        SMALL_MODEL + data + ["--tensor-model-parallel-size", "2"], world_size=3
    )
    assert "does not divide --num-layers 2" in error(
        SMALL_MODEL + data + ["--pipeline-model-parallel-size", "4"], world_size=4
    )
    assert "needs --tensor-model-parallel-size > 1" in error(SMALL_MODEL + data + ["--sequence-parallel"])
    if not transformer_engine_available():
        assert "--sequence-parallel needs Transformer Engine's layers" in error(
            SMALL_MODEL + data + ["--sequence-parallel", "--tensor-model-parallel-size", "2"], world_size=2
        )
    assert "needs --tokenizer-model" in error(SMALL_MODEL + ["--data-path", corpus["prefixes"][0]])
    assert "--min-lr 0.1 is above --lr" in error(SMALL_MODEL + data + ["--min-lr", "0.1"])
    assert "unknown reweighting strategy" in error(SMALL_MODEL + data + ["--reweight-strategy", "nope"]).lower()


def test_missing_and_corrupt_data_prefixes_are_named(corpus, tmp_path):
    missing = str(tmp_path / "nowhere" / "web")
    args = SMALL_MODEL + [
        "--data-path",
        "1",
        corpus["prefixes"][0],
        "1",
        missing,
        "--tokenizer-model",
        corpus["tokenizer"],
    ]
    assert data_error(args) == f"--data-path prefix {missing}: missing {missing}.idx and {missing}.bin"

    # A .bin cut short (an interrupted copy) and an index that is not one.
    source = Path(corpus["prefixes"][1])
    truncated = tmp_path / "truncated"
    (tmp_path / "truncated.idx").write_bytes(source.with_suffix(".idx").read_bytes())
    (tmp_path / "truncated.bin").write_bytes(source.with_suffix(".bin").read_bytes()[:-10])
    args = SMALL_MODEL + ["--data-path", str(truncated), "--tokenizer-model", corpus["tokenizer"]]
    assert f"--data-path prefix {truncated}: corrupt indexed dataset" in data_error(args)

    garbage = tmp_path / "garbage"
    (tmp_path / "garbage.idx").write_bytes(b"not an index at all")
    (tmp_path / "garbage.bin").write_bytes(b"")
    args = SMALL_MODEL + ["--data-path", str(garbage), "--tokenizer-model", corpus["tokenizer"]]
    assert f"--data-path prefix {garbage}: corrupt indexed dataset" in data_error(args)

    bad_tokenizer = tmp_path / "tokenizer.json"
    bad_tokenizer.write_text("{}")
    args = SMALL_MODEL + ["--data-path", corpus["prefixes"][0], "--tokenizer-model", str(bad_tokenizer)]
    assert "not a Hugging Face tokenizer.json" in data_error(args)


def test_recomputation_and_fusion_flags_follow_megatrons_rules():
    mock = ["--mock-data", "--device", "cpu"]
    assert "--recompute-granularity full needs --recompute-method" in error(mock + ["--recompute-granularity", "full"])
    assert "--recompute-method is for --recompute-granularity full, not selective" in error(
        mock + ["--recompute-granularity", "selective", "--recompute-method", "block"]
    )
    assert "--recompute-num-layers is for --recompute-granularity full, not none" in error(
        mock + ["--recompute-num-layers", "2"]
    )
    assert "--recompute-num-layers 3 is above the 2 layers per pipeline stage" in error(
        mock + ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3",
                "--pipeline-model-parallel-size", "2"], world_size=2,
    )  # fmt: skip
    full = config(mock + ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"])
    assert (full.parallel.recompute_granularity, full.parallel.recompute_method) == ("full", "uniform")
    # On the CPU Megatron-LM's fusions are off, and asking for one names what it needs.
    device = config(mock).device
    assert not any((device.bias_swiglu_fusion, device.rope_fusion, device.gradient_accumulation_fusion))
    assert "--rope-fusion needs Transformer Engine's layers" in error(mock + ["--rope-fusion"])
    assert "--bias-swiglu-fusion needs CUDA" in error(mock + ["--bias-swiglu-fusion"])
