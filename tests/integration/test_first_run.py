"""A new user's first runs: data prepared in shards, a --load that finds nothing, then a resume."""

from __future__ import annotations

import json

import numpy

from megatron_reweight.data.prepare import OutputConfig, PrepareConfig, TokenizerConfig, prepare
from megatron_reweight.data.sources import InputConfig
from tests.helpers.pretrain import SMALL_MODEL, VOCAB, read_metrics, run, write_tokenizer

USER_WARNINGS = {"PYTHONWARNINGS": ""}  # Python's default warning filters, as a user has them
DOMAINS = {"web": (1, 80), "code": (80, 160), "books": (160, VOCAB)}  # token range of each domain


def test_sharded_domains_missing_load_default_data_cache_and_a_quiet_resume(tmp_path):
    # Two input files mixing three domains: six shards (web_00000, web_00001, code_00000, ...).
    rng = numpy.random.default_rng(0)
    files = []
    for part in range(2):
        files.append(str(tmp_path / f"part-{part}.jsonl"))
        with open(files[-1], "w") as file:
            for index in range(180):
                domain = list(DOMAINS)[index % 3]
                words = rng.integers(*DOMAINS[domain], size=int(rng.integers(60, 150)))
                file.write(json.dumps({"text": " ".join(f"t{w}" for w in words), "domain": domain}) + "\n")
    tokenizer = write_tokenizer(tmp_path / "tokenizer.json")
    prepared = prepare(
        PrepareConfig(
            InputConfig(files=files, domain_field="domain"), TokenizerConfig(str(tokenizer)),
            OutputConfig(output_dir=tmp_path / "data"), progress=False,
        )
    )  # fmt: skip
    assert len(prepared.data_path) == 2 * 6
    prepared_files = sorted((tmp_path / "data").rglob("*"))

    ckpt, nothing = tmp_path / "ckpt", tmp_path / "no-such-checkpoint"
    args = SMALL_MODEL + [
        "--data-path", *prepared.data_path, "--tokenizer-model", str(tokenizer), "--split", "80,20,0",
        "--log-interval", "1", "--eval-interval", "2",
        "--eval-iters", "1", "--lr-decay-iters", "8", "--save", str(ckpt), "--save-interval", "2",
    ]  # fmt: skip
    first = run(1, args + ["--train-iters", "2", "--load", str(nothing)], env=USER_WARNINGS)
    assert (
        f"warning: --load {nothing}: no checkpoint found (no latest_checkpointed_iteration.txt); "
        "training starts from random" in first.stdout.splitlines()
    )
    assert "domains web, code, books" in first.stdout
    assert "RerunStateMachine" not in first.stderr  # megatron-core's notice of a feature that is off
    # No --data-cache-path: the indices are cached in the run's folder, not beside the data (and
    # megatron-core has no "path_to_cache is None" to say).
    assert "path_to_cache" not in first.stderr, first.stderr
    assert any((ckpt / "data-cache").glob("*-GPTDataset-train-sample_index.npy"))
    assert any((ckpt / "data-cache").glob("*-BlendedDataset-valid-dataset_index.npy"))  # a domain's shards
    assert sorted((tmp_path / "data").rglob("*")) == prepared_files
    train, evals = read_metrics(ckpt / "metrics.jsonl")
    assert sorted(train) == [1, 2]  # from iteration 0
    assert set(evals[2]["domains"]) == set(DOMAINS)
    per_domain = {key.split("/")[1] for key in train[2] if key.startswith("weight x batch/")}
    assert per_domain == set(DOMAINS)

    # A longer run keeps the checkpoint's LR schedule, as Megatron-LM asks for when --train-iters grows.
    longer = ["--train-iters", "3", "--use-checkpoint-opt-param-scheduler", "--load", str(ckpt)]
    resumed = run(1, args + longer, env=USER_WARNINGS)
    assert f"resumed from {ckpt / 'iter_0000002'}" in resumed.stdout
    assert "Warning:" not in resumed.stderr, resumed.stderr  # torch's and megatron-core's FutureWarnings
