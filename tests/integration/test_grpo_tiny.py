"""End to end on CPU: a tiny Gemma 4 warm-started, then trained with DAPO/GRPO.

These run the real loop (rollout engine, math-verify environment, trainer, checkpoints) on the
quickstart recipe with fewer steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli.main import QUICKSTART_RECIPE, RECIPES_DIR, main
from posttrain.config import RecipeConfig, load_config
from posttrain.loops.grpo import run_grpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics

pytestmark = pytest.mark.integration


def quickstart_config(log_dir: Path, *overrides: str) -> RecipeConfig:
    return load_config(QUICKSTART_RECIPE, RecipeConfig, [f"logger.log_dir={log_dir}", "logger.progress=false", *overrides])


def test_dapo_improves_reward_and_generator_matches_trainer(tmp_path):
    cfg = quickstart_config(tmp_path / "run", "warm_start.num_steps=400", "grpo.max_num_steps=30", "grpo.val_period=30")
    result = run_grpo(cfg, console=Console(enabled=False))
    records = read_metrics(result.log_dir)
    steps = [r for r in records if "train/reward" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))

    # fp32 generator and trainer compute the same logprobs: the mismatch metrics are ~exact.
    for record in steps:
        assert abs(record["train/token_mult_prob_error"] - 1.0) < 1e-3
        assert record["train/gen_kl_error"] < 1e-5

    # The policy improves on the training prompts and on held-out ones.
    first, last = steps[:5], steps[-5:]
    mean = lambda rs: sum(r["train/reward"] for r in rs) / len(rs)  # noqa: E731
    assert mean(last) > mean(first) + 0.05, (mean(first), mean(last))
    accuracy = result.validation_accuracy
    assert sorted(accuracy) == [0, 30]
    assert accuracy[30] > accuracy[0] + 0.10, accuracy


def test_resume_continues_from_the_latest_checkpoint_exactly(tmp_path):
    common = ["warm_start.num_steps=20", "grpo.use_dynamic_sampling=false", "grpo.val_period=0", "grpo.val_at_end=false", "checkpointing.save_period=2"]
    uninterrupted = run_grpo(quickstart_config(tmp_path / "a", *common, "grpo.max_num_steps=4"), console=Console(enabled=False))

    interrupted_dir = tmp_path / "b"
    run_grpo(quickstart_config(interrupted_dir, *common, "grpo.max_num_steps=3"), console=Console(enabled=False))
    # Steps 1-3 ran and step 2 was checkpointed (and step 3, the last); drop step 3's checkpoint to
    # stand in for a run killed after step 3 but before its checkpoint.
    import shutil

    shutil.rmtree(interrupted_dir / "checkpoints" / "step_3")
    run_grpo(quickstart_config(interrupted_dir, *common, "grpo.max_num_steps=4"), console=Console(enabled=False))

    resumed = read_metrics(interrupted_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]  # step 3's stale record was replaced
    reference = read_metrics(uninterrupted.log_dir)
    for key in ("train/reward", "train/loss", "train/grad_norm"):
        assert [r[key] for r in resumed[1:]] == pytest.approx([r[key] for r in reference[1:]], rel=1e-5, abs=1e-7), key


def test_cli_validate_and_train_tiny_grpo_recipe(tmp_path, capsys):
    recipe = RECIPES_DIR / "tiny" / "grpo-gemma4-tiny.yaml"
    assert main(["validate", str(recipe)]) == 0
    assert "num_generations_per_prompt: 8" in capsys.readouterr().out

    out = tmp_path / "grpo"
    overrides = [f"logger.log_dir={out}", "logger.progress=false", "warm_start.num_steps=5", "grpo.max_num_steps=2"]
    assert main(["train", str(recipe), *overrides]) == 0
    printed = capsys.readouterr().out  # not a terminal: plain lines, one per step, no ANSI escapes
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("step ")] == ["0/2", "1/2", "2/2"]
    assert "\x1b" not in printed and "done in" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "step_2" / "model.safetensors").is_file()
    assert any((out / "tensorboard").iterdir())


def test_kl_penalty_to_the_policy_as_rl_starts(tmp_path):
    cfg = quickstart_config(
        tmp_path,
        "warm_start.num_steps=20",
        "grpo.use_dynamic_sampling=false",
        "grpo.max_num_steps=3",
        "grpo.val_period=0",
        "grpo.val_at_end=false",
        "loss_fn.reference_policy_kl_penalty=0.05",
    )
    run_grpo(cfg, console=Console(enabled=False))
    records = [r for r in read_metrics(tmp_path) if "train/kl_penalty" in r]
    assert records[0]["train/kl_penalty"] == pytest.approx(0.0, abs=1e-9)  # step 1: policy == reference
    assert records[-1]["train/kl_penalty"] > 0.0  # after two updates the policy has moved
    assert (tmp_path / "reference_policy.safetensors").is_file()


def test_train_from_a_local_jsonl_file(tmp_path):
    rows = [{"prompt": f"Compute max({a}, {b}).", "answer": str(max(a, b)), "source": "hand"} for a, b in [(3, 9), (41, 14), (7, 70), (55, 5)]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = quickstart_config(
        tmp_path / "run",
        f"data.train={{type: file, path: {data}}}",
        f"data.validation={{type: file, path: {data}}}",
        "warm_start.num_steps=5",
        "grpo.use_dynamic_sampling=false",
        "grpo.num_prompts_per_step=4",
        "policy.train_global_batch_size=32",
        "policy.train_micro_batch_size=8",
        "grpo.max_num_steps=1",
    )
    result = run_grpo(cfg, console=Console(enabled=False))
    step = read_metrics(result.log_dir)[-1]
    assert step["step"] == 1 and step["train/num_generated_samples"] == 32.0
    assert step["env/scored"] == 32.0 and step["env/verifier_errors"] == 0.0


def test_cli_reports_a_bad_data_row_without_a_traceback(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "Compute max(1, 2).", "answer": "2"}\n{"prompt": null, "answer": "3"}\n')
    code = main(["train", str(QUICKSTART_RECIPE), f"logger.log_dir={tmp_path / 'run'}", f"data.train={{type: file, path: {data}}}"])
    err = capsys.readouterr().err
    assert code == 1
    assert "DataError" in err and "train.jsonl" in err and "row 1" in err and "Traceback" not in err


def test_cli_reports_a_freeze_pattern_that_matches_nothing_without_a_traceback(tmp_path, capsys):
    code = main(
        ["train", str(QUICKSTART_RECIPE), f"logger.log_dir={tmp_path / 'run'}", "policy.freeze_config.patterns=[model.layer.0.*]"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "FreezeConfigError" in err and "model.layer.0.*" in err and "model.layers.0" in err and "Traceback" not in err


def test_the_continuous_engine_and_packed_training_keep_logprobs_exact(tmp_path):
    """policy.generation.backend: continuous (the default on CUDA) on CPU, with the trainer packing
    sequences into token-budget micro-batches: the fp32 engine's logprobs equal the trainer's."""
    cfg = quickstart_config(
        tmp_path / "run",
        "policy.generation.backend=continuous",
        "policy.sequence_packing=true",
        "policy.train_micro_batch_tokens=600",
        "policy.train_micro_batch_size=64",
        "warm_start.num_steps=60",
        "grpo.use_dynamic_sampling=false",
        "grpo.max_num_steps=4",
        "grpo.val_period=0",
    )
    result = run_grpo(cfg, console=Console(enabled=False))
    steps = [r for r in read_metrics(result.log_dir) if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        assert abs(record["train/token_mult_prob_error"] - 1.0) < 1e-3
        assert record["train/gen_kl_error"] < 1e-5
