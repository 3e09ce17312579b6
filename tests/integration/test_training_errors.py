"""Bad input stops pretrain_llama.py before training with one line naming the problem,
printed once (rank 0), and a non-zero exit: in one process and under torchrun."""

import pytest

from tests.helpers import REPO
from tests.helpers.pretrain import SMALL_MODEL, data_args, make_corpus, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def error_lines(result) -> list[str]:
    assert result.returncode != 0
    assert "iteration" not in result.stdout  # nothing trained
    return [line for line in result.stderr.splitlines() if line.startswith("pretrain_llama.py: error")]


def test_unknown_preset_single_process():
    result = run(1, ["--preset", "llama-70b", "--mock-data"], check=False)
    assert result.returncode == 2
    expected = (
        "pretrain_llama.py: error: argument --preset: invalid choice: 'llama-70b' (choose from 'gpt2-medium', "
        "'gpt2-mini', 'gpt2-small', 'llama-1.4b', 'llama-7b', 'tiny')"
    )
    assert result.stderr.strip().splitlines() == [expected]


def test_corrupt_data_prefix_single_process(corpus, tmp_path):
    prefix = tmp_path / "web"
    (tmp_path / "web.idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x01" + b"\x00" * 7)  # a header cut short
    (tmp_path / "web.bin").write_bytes(b"\x00" * 64)
    result = run(1, SMALL_MODEL + ["--data-path", "1", corpus["prefixes"][0], "1", str(prefix),
                                   "--tokenizer-model", corpus["tokenizer"]], check=False)  # fmt: skip
    assert result.stderr.strip().splitlines() == [
        f"pretrain_llama.py: error: --data-path prefix {prefix}: corrupt indexed dataset ({prefix}.idx is not a Megatron index)"
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--global-batch-size", "6"],
         "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2 = 4"),
        (["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--num-query-groups", "1", "--hidden-size", "96"],
         "--tensor-model-parallel-size 2 does not divide --num-attention-heads 3"),
    ],
    ids=["batch", "tp-heads"],
)  # fmt: skip
def test_layout_errors_under_torchrun_are_printed_once(flags, message, corpus, tmp_path):
    result = run(2, SMALL_MODEL + data_args(corpus, tmp_path / "cache") + flags, check=False)
    assert error_lines(result) == [f"pretrain_llama.py: error: {message}"]


def test_layout_error_under_torchrun_is_printed_when_rank_0_finds_it_last(corpus, tmp_path):
    """torchrun stops every rank as soon as one exits with an error: the other ranks must not exit
    before rank 0 has printed. Here rank 0 starts 25 s late (a loaded node, a slow file system)."""
    (tmp_path / "sitecustomize.py").write_text("import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep(25)\n")
    flags = SMALL_MODEL + data_args(corpus, tmp_path / "cache") + ["--global-batch-size", "6"]
    result = run(2, flags, check=False, env={"PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert error_lines(result) == [
        "pretrain_llama.py: error: --global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2 = 4"
    ]


def test_save_directory_of_another_run_is_refused(corpus, tmp_path):
    """Megatron-LM would train afresh and overwrite that run's checkpoints one by one."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000003").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    result = run(1, SMALL_MODEL + data_args(corpus, tmp_path / "cache") + ["--save", str(ckpt)], check=False)
    assert error_lines(result) == [
        f"pretrain_llama.py: error: --save {ckpt} holds another run's checkpoints (up to iteration 3); "
        f"add --load {ckpt} to resume that run, or choose an empty --save directory"
    ]
    assert sorted(path.name for path in ckpt.iterdir()) == ["iter_0000003", "latest_checkpointed_iteration.txt"]
