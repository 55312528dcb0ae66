"""Reliability end to end on CPU: exact resume, non-finite steps, export.

- A run killed after step k and restarted gives, at every later step, the metrics and weights of
  an uninterrupted run: data position, RNG, lr schedule, Adam moments and the dynamic-sampling
  carry-over (a group generated before the checkpoint and trained on after it) all come back.
- NaN losses are skipped, the run stops after N in a row with a clear message (CLI: exit 1), and
  the last checkpoint holds the last good weights and resumes.
- `posttrain export` rebuilds a run's policy from a checkpoint and writes what the run's own
  final export wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import posttrain.loops.grpo as grpo_loop
from posttrain.cli.main import QUICKSTART_RECIPE, main
from posttrain.config import RecipeConfig, load_config
from posttrain.loops.grpo import run_grpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics

pytestmark = pytest.mark.integration

STEPS = 5
# A CPU-sized DAPO: generation batches of 16 prompts for 4 kept groups, so informative groups
# beyond the 4 are carried over to the next step (and across the checkpoint the run is killed after).
SMALL = [
    "logger.progress=false",
    "logger.tensorboard_enabled=false",
    "tiny_model.hidden_size=64",
    "tiny_model.num_hidden_layers=2",
    "tiny_model.intermediate_size=128",
    "tiny_model.tokenizer_corpus_size=500",
    "warm_start.num_steps=60",
    "warm_start.batch_size=32",
    "grpo.val_period=0",
    "grpo.val_at_start=false",
    "grpo.val_at_end=false",
    "grpo.num_prompts_per_step=4",
    "grpo.num_generations_per_prompt=8",
    "grpo.batch_multiplier=4",
    "grpo.dynamic_sampling_max_gen_batches=8",
    "grpo.use_dynamic_sampling=true",
    "grpo.dynamic_sampling_carry_over=true",
    "policy.train_global_batch_size=16",  # two optimizer steps per RL step
    "policy.train_micro_batch_size=8",
    "policy.scheduler.decay=linear",  # the lr depends on the step: a wrong schedule position shows
    "checkpointing.save_period=1",
    "checkpointing.keep_top_k=null",
]


class Killed(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


def config(log_dir: Path, *overrides: str) -> RecipeConfig:
    return load_config(QUICKSTART_RECIPE, RecipeConfig, [f"logger.log_dir={log_dir}", *SMALL, f"grpo.max_num_steps={STEPS}", *overrides])


def comparable(record: dict) -> dict:
    """A metrics record without wall-clock timings and the data/* counts logged with a process's first record."""
    return {k: v for k, v in record.items() if not k.startswith(("timing/", "data/"))}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit


def carried_groups(checkpoint: Path) -> int:
    groups = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["loop"]["dynamic_sampling"]["groups"]
    return int(groups["rewards"].shape[0]) if groups else 0


@pytest.fixture(scope="module")
def stop_after_and_runs(tmp_path_factory) -> tuple[int, Path, Path]:
    """(the step the run is killed after, uninterrupted run, run killed after that step's checkpoint
    and restarted). The kill step is the first of steps 2..STEPS-1 whose checkpoint holds a
    carried-over group (which step that is depends on the sampled trajectory)."""
    root = tmp_path_factory.mktemp("resume")
    uninterrupted, interrupted = root / "a", root / "b"
    run_grpo(config(uninterrupted), console=Console(enabled=False))
    carrying = [s for s in range(2, STEPS) if carried_groups(uninterrupted / "checkpoints" / f"step_{s}")]
    assert carrying, "the test needs a carried-over group across a checkpoint before the last step"
    stop_after = carrying[0]

    real_save = grpo_loop.save

    def save_then_die(parts, trainer, buffer, step):
        real_save(parts, trainer, buffer, step)
        if step == stop_after:
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo_loop, "save", save_then_die)
        with pytest.raises(Killed):
            run_grpo(config(interrupted), console=Console(enabled=False))
    assert not (interrupted / "final_model").exists()
    run_grpo(config(interrupted), console=Console(enabled=False))
    return stop_after, uninterrupted, interrupted


@pytest.fixture(scope="module")
def runs(stop_after_and_runs) -> tuple[Path, Path]:
    return stop_after_and_runs[1:]


def test_resume_equals_the_uninterrupted_run(stop_after_and_runs):
    stop_after, uninterrupted, interrupted = stop_after_and_runs
    runs = uninterrupted, interrupted
    assert carried_groups(interrupted / "checkpoints" / f"step_{stop_after}") > 0  # what the killed run saved

    reference, resumed = read_metrics(uninterrupted), read_metrics(interrupted)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]  # exact, every metric
    assert len({r["train/lr"] for r in reference}) == STEPS  # the schedule really moved every step

    for step in range(stop_after + 1, STEPS + 1):
        a, b = (run / "checkpoints" / f"step_{step}" for run in runs)
        assert_same_weights(weights(a / "model.safetensors"), weights(b / "model.safetensors"))
        state_a, state_b = (torch.load(c / "trainer_state.pt", weights_only=True) for c in (a, b))
        for index, moments in state_a["optimizer"]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, state_b["optimizer"]["state"][index][key]), (step, index, key)
        assert state_a["loop"]["data"] == state_b["loop"]["data"]
    assert_same_weights(
        weights(uninterrupted / "final_model" / "model.safetensors"), weights(interrupted / "final_model" / "model.safetensors")
    )


def test_cli_export_rebuilds_what_the_run_exported(runs, tmp_path, capsys):
    uninterrupted, _ = runs
    final = weights(uninterrupted / "final_model" / "model.safetensors")
    assert main(["export", str(uninterrupted), "--out", str(tmp_path / "latest")]) == 0
    assert_same_weights(weights(tmp_path / "latest" / "model.safetensors"), final)

    step_3 = uninterrupted / "checkpoints" / "step_3"
    assert main(["export", str(step_3), "--out", str(tmp_path / "step3")]) == 0
    assert main(["export", str(step_3), "--out", str(tmp_path / "step3-bf16"), "--dtype", "bfloat16"]) == 0
    fp32, bf16 = (weights(tmp_path / name / "model.safetensors") for name in ("step3", "step3-bf16"))
    assert not all(torch.equal(fp32[name], final[name]) for name in final)  # step 3, not the latest
    assert bf16.keys() == fp32.keys() and {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[name], fp32[name].to(torch.bfloat16)) for name in bf16)

    capsys.readouterr()
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
    assert main(["export", str(uninterrupted), "--out", str(tmp_path / "latest")]) == 1  # not empty
    err = capsys.readouterr().err
    assert "ExportError" in err and "neither a run directory" in err and "not empty" in err and "Traceback" not in err


def test_nan_steps_stop_the_run_and_the_last_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    """Advantages turn NaN from step 3 on: steps 3 and 4 are skipped, the run stops at step 4
    (limit 2) with exit code 1, step 3's checkpoint holds step 2's weights, and a restart with a
    lower lr resumes from it and finishes."""
    run_dir = tmp_path / "run"
    limits = ["grpo.max_num_steps=5", "grpo.max_consecutive_nonfinite_steps=2", "policy.train_global_batch_size=32"]
    overrides = [f"logger.log_dir={run_dir}", *SMALL, *limits]  # one optimizer step per RL step
    calls = []
    real = grpo_loop.to_train_batch

    def poisoned(groups, cfg, images=None):
        batch = real(groups, cfg, images)
        calls.append(None)
        if len(calls) >= 3:
            batch.advantages_B = torch.full_like(batch.advantages_B, float("nan"))
        return batch

    monkeypatch.setattr(grpo_loop, "to_train_batch", poisoned)
    assert main(["train", str(QUICKSTART_RECIPE), *overrides]) == 1
    err = capsys.readouterr().err
    assert "NonFiniteTrainingError" in err and "step 4" in err and "Traceback" not in err
    assert f"the latest checkpoint is {run_dir / 'checkpoints' / 'step_3'}" in err
    records = read_metrics(run_dir)
    assert [r["train/skipped_nonfinite_steps"] for r in records] == [0.0, 0.0, 1.0, 1.0]
    assert [r["train/consecutive_nonfinite_steps"] for r in records] == [0.0, 0.0, 1.0, 2.0]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_1", "step_2", "step_3"]
    assert_same_weights(weights(checkpoints / "step_2" / "model.safetensors"), weights(checkpoints / "step_3" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights(checkpoints / "step_3" / "model.safetensors").values())
    assert not (run_dir / "final_model").exists()

    monkeypatch.setattr(grpo_loop, "to_train_batch", real)
    assert main(["train", str(QUICKSTART_RECIPE), *overrides, "policy.optimizer.lr=1e-4"]) == 0
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["train/skipped_nonfinite_steps"] for r in records[3:]] == [0.0, 0.0]
    assert records[3]["train/lr"] < 1e-4  # the new peak lr, linearly decayed
