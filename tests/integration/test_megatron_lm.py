"""Megatron-LM's own pretrain_gpt.py, unmodified, with and without our drop-in, on CPU.

The Megatron-LM checkout (tag core_v0.16.1) is found through MEGATRON_LM_PATH (.ci/run points
it at the copy kept beside this project). Each launch of a tiny GPT on --mock-data is made
once per module and serves several tests; the numbers compared come from train_step's return
and the model's per-token losses, recorded by megatron_lm_rank.py.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_reweight import compute_weights
from megatron_reweight.launch import local_torchrun
from tests.helpers.distributed import torchrun

REPO = Path(__file__).resolve().parents[2]
MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")
pytestmark = pytest.mark.skipif(
    not (MEGATRON_LM and Path(MEGATRON_LM, "pretrain_gpt.py").is_file()),
    reason="set MEGATRON_LM_PATH to a Megatron-LM checkout at core_v0.16.1 (with pretrain_gpt.py)",
)

# A tiny GPT on Megatron-LM's mock data, with the flags Megatron-LM needs on CPU.
TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--lr", "1e-3", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--seed", "1234",
    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion",
]  # fmt: skip
LINUPPER = ["--reweight-strategy", "linupper", "--reweight-r", "0.3", "--reweight-r-warmup-steps", "2"]
GLOBAL = ["--reweight-window", "global-batch"]


class Run:
    """One launch: its exit code, output and each rank's record."""

    def __init__(self, result: subprocess.CompletedProcess, record_dir: Path, nproc: int):
        self.returncode, self.output = result.returncode, result.stdout + result.stderr
        files = [record_dir / f"rank{r}.pt" for r in range(nproc)]
        self.ranks = [torch.load(file, weights_only=False) if file.exists() else None for file in files]
        # The same on every rank of the last pipeline stage, where the last rank is.
        self.iterations = self.ranks[-1]["iterations"] if self.ranks[-1] else {}

    def check(self) -> Run:
        assert self.returncode == 0, self.output[-8000:]
        return self


def launch(tmp: Path, mode: str, nproc: int, *flags: str, env: dict | None = None) -> Run:
    tmp.mkdir(parents=True)
    command = local_torchrun(
        nproc, [str(Path(__file__).parent / "megatron_lm_rank.py"), mode, str(Path(MEGATRON_LM, "pretrain_gpt.py")),
                *TINY_GPT, *flags]
    )  # fmt: skip
    environment = {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
        "MEGATRON_LM_RECORD": str(tmp), **(env or {}),
    }  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp)
    (tmp / "output.txt").write_text(result.stdout + result.stderr)
    return Run(result, tmp, nproc)


def assert_same_training(run: Run, reference: Run, keys=("lm loss", "grad norm"), rel=1e-5):
    assert sorted(run.iterations) == sorted(reference.iterations)
    for iteration, expected in reference.iterations.items():
        for key in keys:
            assert run.iterations[iteration][key] == pytest.approx(expected[key], rel=rel), (iteration, key)


def gathered_sample_losses(run: Run, iteration: int, data_parallel_ranks: list[int]) -> list[torch.Tensor]:
    """Per microbatch, the per-sample losses of the DP ranks (global ranks, in DP order),
    computed here from the model's per-token losses and loss masks."""
    per_rank = []
    for rank in (run.ranks[r] for r in data_parallel_ranks):
        microbatches = [m for m in rank["microbatches"] if m["iteration"] == iteration]
        per_rank.append([(m["losses"] * m["loss_mask"]).sum(1) / m["loss_mask"].sum(1) for m in microbatches])
    return [torch.cat(losses).double() for losses in zip(*per_rank)]


# --- 1 rank: uniform equals the unmodified script; a NaN stops both the same way ---------------

NAN_AT = 2  # 0-based: the third iteration
NAN_ACTIVATION_AT = 4  # in the skip run: a NaN in a sample's activations, not only in its loss


@pytest.fixture(scope="module")
def one_rank_nan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_rank")
    env = {"MEGATRON_LM_NAN_AT": str(NAN_AT)}
    train = ["--train-iters", "6", "--check-for-spiky-loss"]  # its non-fatal check runs on every microbatch
    skip = ["--reweight-skip-nonfinite-samples", "--save", str(tmp / "skip" / "checkpoints"), "--save-interval", "5"]
    return {
        "plain": launch(tmp / "plain", "plain", 1, *train, env=env),
        "uniform": launch(tmp / "uniform", "reweighted", 1, *train, "--reweight-strategy", "uniform", env=env),
        "global": launch(tmp / "global", "reweighted", 1, *train, "--reweight-strategy", "uniform", *GLOBAL, env=env),
        "skip": launch(
            tmp / "skip", "reweighted", 1, *train, *LINUPPER, *skip,
            env={**env, "MEGATRON_LM_NAN_ACTIVATION_AT": str(NAN_ACTIVATION_AT)},
        ),  # fmt: skip
    }


def test_one_rank_uniform_equals_the_unmodified_script_until_the_nan(one_rank_nan):
    plain, uniform = one_rank_nan["plain"], one_rank_nan["uniform"]
    assert sorted(plain.iterations) == list(range(NAN_AT))
    assert_same_training(uniform, plain)


def test_a_nan_loss_stops_the_reweighted_run_as_it_stops_megatron(one_rank_nan):
    assert_same_training(one_rank_nan["global"], one_rank_nan["plain"])  # 4 micro-batches: two passes a step
    for run in (one_rank_nan["plain"], one_rank_nan["uniform"], one_rank_nan["global"]):
        assert run.returncode != 0
        assert "found NaN in local forward loss calculation" in run.output


def test_skip_mode_skips_the_update_of_a_step_with_a_nan_loss_and_reports_it(one_rank_nan):
    run = one_rank_nan["skip"].check()
    assert sorted(run.iterations) == list(range(6))
    # Megatron-LM's console numbers iterations from 1: the NaN's is NAN_AT + 1 there and here.
    assert f"skipped 1 sample(s) with a non-finite loss at iteration {NAN_AT + 1} (1 so far" in run.output
    assert f"iteration {NAN_AT + 1}: update skipped, 1 sample(s) with a non-finite loss (1 update(s)" in run.output
    # The lm loss of that iteration is the mean over the other samples' tokens.
    microbatches = [m for m in run.ranks[0]["microbatches"] if m["iteration"] == NAN_AT]
    losses = torch.cat([m["losses"] for m in microbatches]).double()
    mask = torch.cat([m["loss_mask"] for m in microbatches]).double()
    mask[0] = 0.0  # the poisoned sample
    expected_lm_loss = float(torch.where(mask.bool(), losses, 0.0).sum() / mask.sum())
    reported = run.iterations[NAN_AT]
    assert reported["lm loss"] == pytest.approx(expected_lm_loss, rel=1e-5)
    assert len(microbatches) == 4 and reported["reweight skipped samples"] == pytest.approx(1)  # the step's count
    assert reported["skipped"] and math.isnan(reported["grad norm"])  # no update: Megatron's skipped iteration


def test_skip_mode_skips_the_update_of_a_step_with_nan_activations(one_rank_nan):
    """A NaN in one sample's hidden states reaches every weight's gradient (weight 0 x NaN is NaN):
    the step's update is skipped, the parameters stay finite and training goes on."""
    run = one_rank_nan["skip"].check()
    assert f"iteration {NAN_ACTIVATION_AT + 1}: update skipped, 1 sample(s) with a non-finite loss (2 update(s)" in run.output
    assert run.iterations[NAN_ACTIVATION_AT]["skipped"]
    assert run.iterations[NAN_ACTIVATION_AT]["reweight skipped samples"] == pytest.approx(1)
    for iteration in set(range(6)) - {NAN_AT, NAN_ACTIVATION_AT}:
        values = run.iterations[iteration]
        assert not values["skipped"] and all(math.isfinite(v) for v in values.values()), (iteration, values)
    # The model after the skipped step (and the one saved at iteration 5) computes finite losses.
    last = [m["losses"] for m in run.ranks[0]["microbatches"] if m["iteration"] == 5]
    assert len(last) == 4 and all(torch.isfinite(losses).all() for losses in last)
    assert run.output.count("number of skipped iterations:   1 |") == 2  # Megatron-LM's own count (log interval 1)


# --- 2 data-parallel ranks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_ranks")
    train = ["--train-iters", "4"]
    evaluation = ["--eval-iters", "1", "--eval-interval", "4"]
    checkpoint = ["--save", str(tmp / "checkpoints"), "--save-interval", "2"]
    audit = ["--reweight-audit-dir", str(tmp / "audit")]
    runs = {
        "plain": launch(tmp / "plain", "plain", 2, *train, *evaluation),
        "uniform": launch(tmp / "uniform", "reweighted", 2, *train, *evaluation, "--reweight-strategy", "uniform"),
        "per-token": launch(tmp / "per_token", "reweighted", 2, *train, "--calculate-per-token-loss"),
        "linupper": launch(tmp / "linupper", "reweighted", 2, *train, *LINUPPER, *checkpoint, *audit),
    }
    from megatron_reweight.audit import read_audit

    runs["audit before the resume"] = read_audit(tmp / "audit")
    # The global-batch window: 2 micro-batches per step, weighted together across both ranks.
    global_checkpoint = ["--save", str(tmp / "global_checkpoints"), "--save-interval", "2"]
    runs["global"] = launch(tmp / "global", "reweighted", 2, *train, *LINUPPER, *GLOBAL, *global_checkpoint)
    # Resume the LinUpper runs from their iteration-2 checkpoints through Megatron-LM's --load.
    resume = ["--load", str(tmp / "checkpoints"), "--ckpt-step", "2"]
    runs["resumed"] = launch(tmp / "resumed", "reweighted", 2, *train, *LINUPPER, *resume, *audit)
    runs["audit"] = read_audit(tmp / "audit")
    resume = ["--load", str(tmp / "global_checkpoints"), "--ckpt-step", "2"]
    runs["global resumed"] = launch(tmp / "global_resumed", "reweighted", 2, *train, *LINUPPER, *GLOBAL, *resume)
    return {name: run.check() if isinstance(run, Run) else run for name, run in runs.items()}


def test_two_ranks_uniform_equals_the_unmodified_script(two_ranks):
    assert_same_training(two_ranks["uniform"], two_ranks["plain"])


def test_per_token_loss_mode_gives_the_same_training(two_ranks):
    assert_same_training(two_ranks["per-token"], two_ranks["uniform"])


def evaluation_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if "validation loss at iteration" in line]


def test_evaluation_reads_as_megatrons(two_ranks):
    lines = evaluation_lines(two_ranks["uniform"].output)
    assert lines and len(lines) == len(evaluation_lines(two_ranks["plain"].output))
    for line in lines:  # Megatron's own keys only: no PPL of a weight diagnostic
        assert re.findall(r"\| ([^|]+?) (?:value|PPL):", line) == ["lm loss", "lm loss"], line


def assert_linupper_weights_match(run: Run, data_parallel_ranks: list[int], global_window: bool = False):
    """The reported weight statistics are those of compute_weights on the gathered sample losses:
    of each micro-batch across DP, or (global_window) of all the step's micro-batches at once."""
    for iteration, reported in run.iterations.items():
        r = 100.0 if iteration < 2 else 0.3  # the warm-up, then --reweight-r
        microbatches = gathered_sample_losses(run, iteration, data_parallel_ranks)
        if global_window:
            microbatches = [torch.cat(microbatches)]
        weights = [compute_weights(losses, "linupper", r=r) for losses in microbatches]
        n = len(microbatches[0])
        expected = {
            "max weight x batch": sum(float(w.max()) * n for w in weights) / len(weights),
            "min weight x batch": sum(float(w.min()) * n for w in weights) / len(weights),
            "weighted loss": sum(float(w @ f) for w, f in zip(weights, microbatches)) / len(weights),
        }
        for key, value in expected.items():
            assert reported[key] == pytest.approx(value, rel=1e-5), (iteration, key)
    assert run.iterations[2]["max weight x batch"] > 1.5  # r = 0.3 spreads the weights; r = 100 did not
    assert run.iterations[1]["max weight x batch"] < 1.01


def test_linupper_weights_are_compute_weights_of_the_gathered_sample_losses(two_ranks):
    assert_linupper_weights_match(two_ranks["linupper"], data_parallel_ranks=[0, 1])


def test_global_window_weights_are_compute_weights_of_all_the_steps_losses(two_ranks):
    run = two_ranks["global"]
    assert_linupper_weights_match(run, data_parallel_ranks=[0, 1], global_window=True)
    assert all(len(gathered_sample_losses(run, i, [0, 1])) == 2 for i in run.iterations)  # 2 micro-batches a step
    assert all(values["window loss drift"] == 0 for values in run.iterations.values())
    # Not the micro-batch window's weights: those of each micro-batch on its own.
    assert run.iterations[2]["max weight x batch"] != pytest.approx(two_ranks["linupper"].iterations[2]["max weight x batch"], rel=1e-3)


@pytest.mark.parametrize("runs", [("linupper", "resumed"), ("global", "global resumed")], ids=["micro-batch", "global"])
def test_resume_through_megatrons_checkpoint_continues_the_temperature_schedule(two_ranks, runs):
    uninterrupted, resumed = (two_ranks[name] for name in runs)
    assert sorted(resumed.iterations) == [2, 3]
    for iteration in (2, 3):
        for key in ("lm loss", "grad norm", "max weight x batch", "weighted loss"):
            expected = uninterrupted.iterations[iteration][key]
            assert resumed.iterations[iteration][key] == pytest.approx(expected, rel=1e-5), (iteration, key)


def test_the_audit_holds_every_sample_once_through_a_resume(two_ranks):
    """--reweight-audit-dir in Megatron-LM: per iteration, the gathered samples' losses (from the
    model's per-token losses) and their LinUpper weights, at their places in the training order;
    the resumed run (from iteration 2) replaced the rows after 2 instead of adding to them."""
    run = two_ranks["linupper"]
    (meta, before), (_, after) = two_ranks["audit before the resume"], two_ranks["audit"]
    assert meta["documents_recorded"] and meta["dataset_domains"] == ["mock"] and meta["window_size"] == 4
    rows = after.to_pydict()
    assert rows["iteration"] == [i for i in range(1, 5) for _ in range(8)]
    assert rows["sample"] == list(range(32)) and rows["window"] == [w for _ in range(4) for w in (0, 0, 0, 0, 1, 1, 1, 1)]
    assert all(documents for documents in rows["documents"]) and set(rows["domain"]) == {"mock"}
    for iteration in range(4):  # Megatron-LM counts from 0, its log and the audit from 1
        windows = gathered_sample_losses(run, iteration, data_parallel_ranks=[0, 1])
        r = 100.0 if iteration < 2 else 0.3
        chosen = slice(8 * iteration, 8 * iteration + 8)
        assert rows["loss"][chosen] == pytest.approx(torch.cat(windows).tolist(), rel=1e-5)
        expected = torch.cat([4 * compute_weights(losses, "linupper", r=r) for losses in windows])
        assert rows["weight_x_b"][chosen] == pytest.approx(expected.tolist(), rel=1e-4)
        assert set(rows["r"][chosen]) == {r}
    # The resumed steps replay the same samples.
    assert rows["documents"] == before.to_pydict()["documents"]
    for key in ("loss", "weight_x_b"):
        assert rows[key] == pytest.approx(before.to_pydict()[key], rel=1e-5), key


def test_tensor_parallel_2_x_data_parallel_2(tmp_path):
    flags = ["--train-iters", "3", "--tensor-model-parallel-size", "2", *LINUPPER]
    run = launch(tmp_path / "tp2", "reweighted", 4, *flags, env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"}).check()
    # Megatron's rank order is TP first: global ranks 0, 2 are DP ranks 0, 1; 1 and 3 their TP peers.
    for rank, peer in ((0, 1), (2, 3)):
        for mine, theirs in zip(run.ranks[rank]["microbatches"], run.ranks[peer]["microbatches"]):
            torch.testing.assert_close(mine["losses"], theirs["losses"])
    assert_linupper_weights_match(run, data_parallel_ranks=[0, 2])


def test_global_window_uniform_equals_the_unmodified_script_at_pp2_x_dp2(tmp_path):
    """Uniform in the global window, PP=2 x DP=2 with 2 micro-batches a step: the unmodified script's
    training (lm loss and grad norm), evaluation included."""
    flags = ["--train-iters", "3", "--pipeline-model-parallel-size", "2", "--eval-iters", "1", "--eval-interval", "3"]
    plain = launch(tmp_path / "plain", "plain", 4, *flags).check()
    run = launch(tmp_path / "global", "reweighted", 4, *flags, "--reweight-strategy", "uniform", *GLOBAL).check()
    assert_same_training(run, plain)
    # Megatron's rank order puts PP last: global ranks 2, 3 are the last stage's DP ranks 0, 1.
    assert all(len(gathered_sample_losses(run, i, [2, 3])) == 2 for i in run.iterations)
    assert all(values["window loss drift"] == 0 for values in run.iterations.values())
    lines = evaluation_lines(run.output)  # evaluation is Megatron's: its own loss function and keys
    assert lines and len(lines) == len(evaluation_lines(plain.output))
    assert all(re.findall(r"\| ([^|]+?) (?:value|PPL):", line) == ["lm loss", "lm loss"] for line in lines), lines


def test_moe_gradients_match_a_single_process_reference():
    """MoE with its auxiliary loss (without --calculate-per-token-loss, which is refused)."""
    result = torchrun(2, Path(__file__).parent / "moe_rank.py")
    assert result.stdout.count("MoE gradients match the single-process reference") == 2


def test_the_launcher_refuses_a_script_that_never_calls_pretrain(tmp_path):
    """`python -m megatron_reweight.megatron_lm SCRIPT`, as the README runs it, with the real megatron.training."""
    script = tmp_path / "no_pretrain.py"
    script.write_text("import megatron.training\nprint('trained some other way')\n")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), MEGATRON_LM]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "megatron_reweight.megatron_lm", str(script)],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and "trained some other way" in result.stdout
    assert result.stderr.strip().endswith("never called megatron.training's pretrain: it trained without reweighting")


def test_dropin_refusal_is_one_line_once(tmp_path):
    run = launch(tmp_path / "refused", "reweighted", 2, "--train-iters", "1", "--reweight-strategy", "bogus")
    assert run.returncode != 0
    lines = [line for line in run.output.splitlines() if "unknown reweighting strategy" in line]
    assert len(lines) == 1 and lines[0].startswith("megatron_reweight: unknown reweighting strategy"), run.output
    assert "ValueError" not in run.output
