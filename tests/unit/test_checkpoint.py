"""Atomic checkpoints (checkpoint/store.py): round trip, verification, temporary directories, pruning."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from posttrain.checkpoint import store
from posttrain.checkpoint.store import (
    checkpoint_problem,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from posttrain.models.loading import load_policy

pytestmark = pytest.mark.unit

LOOP_STATE = {
    "step": 3,
    "prompts": {"epoch": 1, "position": 17},
    "carry_over": [[2, 4, 40], [2, 4, 41]],
    "best_accuracy": 0.25,
    "name": "run-a",
}


def _trainer_parts(tiny_checkpoint):
    model = load_policy(tiny_checkpoint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def _train_steps(model, optimizer, scheduler, steps: int) -> None:
    ids_BT = torch.tensor([[2, 4, 40, 41, 22, 23]])
    for _ in range(steps):
        logits = model(input_ids=ids_BT, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids_BT[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def test_round_trip_restores_everything(tiny_checkpoint, tmp_path):
    model, optimizer, scheduler = _trainer_parts(tiny_checkpoint)
    _train_steps(model, optimizer, scheduler, 2)
    torch.manual_seed(1234)
    random.seed(99)
    path = save_checkpoint(
        tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler, loop_state=LOOP_STATE, keep_top_k=None
    )
    assert path == tmp_path / "step_3"
    expected_torch_draw = torch.rand(5)
    expected_python_draw = random.random()

    fresh_model, fresh_optimizer, fresh_scheduler = _trainer_parts(tiny_checkpoint)
    # preconditions: the fresh parts really are different
    assert not torch.equal(fresh_model.model.norm.weight, model.model.norm.weight)
    assert fresh_scheduler.last_epoch == 0 and not fresh_optimizer.state
    torch.manual_seed(0)
    random.seed(0)

    loop_state = load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler)

    assert loop_state == LOOP_STATE
    for (name, param), (_, restored) in zip(model.named_parameters(), fresh_model.named_parameters()):
        assert torch.equal(param, restored), name
    # tied embeddings stay tied after loading
    assert fresh_model.lm_head.weight.data_ptr() == fresh_model.model.embed_tokens.weight.data_ptr()
    saved_state, restored_state = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved_state["param_groups"] == restored_state["param_groups"]
    assert saved_state["state"].keys() == restored_state["state"].keys()
    for index, state in saved_state["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], restored_state["state"][index][key]), (index, key)
    assert fresh_scheduler.last_epoch == 2
    assert fresh_scheduler.get_last_lr() == pytest.approx([1e-2 / 3])
    assert torch.equal(torch.rand(5), expected_torch_draw)
    assert random.random() == expected_python_draw

    # training on from the restored state matches training on from the original
    _train_steps(model, optimizer, scheduler, 1)
    _train_steps(fresh_model, fresh_optimizer, fresh_scheduler, 1)
    for (name, param), (_, restored) in zip(model.named_parameters(), fresh_model.named_parameters()):
        assert torch.equal(param, restored), name


def test_trainer_state_loads_with_weights_only(tiny_checkpoint, tmp_path):
    model, optimizer, scheduler = _trainer_parts(tiny_checkpoint)
    _train_steps(model, optimizer, scheduler, 1)
    path = save_checkpoint(
        tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, loop_state=LOOP_STATE, keep_top_k=None
    )
    state = torch.load(path / "trainer_state.pt", weights_only=True)  # raises if arbitrary objects were pickled
    assert set(state) == {"optimizer", "optimizer_parameter_names", "scheduler", "rng", "loop"}
    assert (path / "model.safetensors").is_file()


def test_keep_top_k_keeps_the_newest(tiny_checkpoint, tmp_path):
    model, optimizer, scheduler = _trainer_parts(tiny_checkpoint)
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path,
            step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            loop_state={"step": step},
            keep_top_k=2,
        )
    assert checkpoint_steps(tmp_path) == [2, 3]
    assert not (tmp_path / "step_1").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]  # no temporary left behind
    assert load_checkpoint(tmp_path / "step_3", model=model, optimizer=optimizer, scheduler=scheduler) == {"step": 3}


def test_resaving_a_step_replaces_it(tiny_checkpoint, tmp_path):
    model, optimizer, scheduler = _trainer_parts(tiny_checkpoint)
    save_checkpoint(
        tmp_path, 5, model=model, optimizer=optimizer, scheduler=scheduler, loop_state={"v": 1}, keep_top_k=None
    )
    save_checkpoint(
        tmp_path, 5, model=model, optimizer=optimizer, scheduler=scheduler, loop_state={"v": 2}, keep_top_k=None
    )
    assert checkpoint_steps(tmp_path) == [5]
    assert load_checkpoint(tmp_path / "step_5", model=model, optimizer=optimizer, scheduler=scheduler) == {"v": 2}


# Store mechanics on a 15-parameter linear layer: fast, and no model code involved.


def _linear_parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _save(root, step, parts, keep_top_k=None):
    model, optimizer, scheduler = parts
    with torch.no_grad():
        model.weight.fill_(float(step))  # tells the checkpoints apart
    return save_checkpoint(
        root,
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loop_state={"step": step},
        keep_top_k=keep_top_k,
    )


def _names(root):
    return sorted(p.name for p in root.iterdir())


def test_a_checkpoint_holds_a_manifest_of_sizes_and_hashes(tmp_path):
    path = _save(tmp_path, 4, _linear_parts())
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 4
    assert set(manifest["files"]) == {"model.safetensors", "trainer_state.pt"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (path / name).stat().st_size
        assert len(entry["sha256"]) == 64
    assert checkpoint_problem(path) is None
    assert _names(tmp_path) == ["step_4"]


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_a_truncated_file_falls_back_to_the_previous_checkpoint(tmp_path, caplog, name):
    parts = _linear_parts()
    _save(tmp_path, 2, parts)
    newest = _save(tmp_path, 4, parts)
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="posttrain.checkpoint.store"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    assert f"skipping checkpoint {newest}: {name} has {len(data) // 2} bytes" in caplog.text
    model, optimizer, scheduler = _linear_parts()
    assert load_checkpoint(tmp_path / "step_2", model=model, optimizer=optimizer, scheduler=scheduler) == {"step": 2}
    assert torch.all(model.weight == 2.0)


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_a_corrupted_file_of_the_right_size_is_caught_by_its_hash(tmp_path, caplog, name):
    parts = _linear_parts()
    _save(tmp_path, 2, parts)
    newest = _save(tmp_path, 4, parts)
    data = bytearray((newest / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / name).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="posttrain.checkpoint.store"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    assert f"{name} does not match its sha256" in caplog.text
    assert checkpoint_problem(newest, check_hashes=False) is None  # sizes alone cannot tell


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (None, "no manifest.json"),
        ("{not json", "unreadable manifest.json"),
        ('{"step": 4}', "unreadable manifest.json"),
        ('{"step": 3, "files": {}}', "manifest.json is for step 3"),
        ('{"step": 4, "files": {}}', "manifest.json lists []"),
    ],
)
def test_a_missing_or_bad_manifest_makes_a_checkpoint_incomplete(tmp_path, manifest, problem):
    parts = _linear_parts()
    _save(tmp_path, 2, parts)
    newest = _save(tmp_path, 4, parts)
    (newest / "manifest.json").unlink()
    if manifest is not None:
        (newest / "manifest.json").write_text(manifest)
    assert checkpoint_problem(newest).startswith(problem)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"


def test_temporary_and_other_directories_are_never_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    parts = _linear_parts()
    _save(tmp_path, 2, parts)
    _save(tmp_path, 10, parts)
    complete = tmp_path / "step_10"
    (tmp_path / ".tmp-step_12-4242").mkdir()  # a save killed before its rename, even with all its files
    for name in ("model.safetensors", "trainer_state.pt", "manifest.json"):
        (tmp_path / ".tmp-step_12-4242" / name).write_bytes((complete / name).read_bytes())
    (tmp_path / "step_x").mkdir()
    (tmp_path / "step_11").write_text("a file, not a checkpoint")
    assert checkpoint_steps(tmp_path) == [2, 10]  # numeric order, not string order
    assert latest_checkpoint(tmp_path) == complete


def test_the_next_save_removes_leftover_temporaries(tmp_path):
    parts = _linear_parts()
    _save(tmp_path, 2, parts)
    (tmp_path / ".tmp-step_4-4242").mkdir()  # killed while writing step 4
    (tmp_path / ".tmp-step_4-4242" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-discard-step_1-4242").mkdir()  # killed while pruning step 1
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    _save(tmp_path, 4, parts)
    assert _names(tmp_path) == ["step_2", "step_4"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"


def test_a_failed_save_leaves_the_old_checkpoints_untouched(tmp_path, monkeypatch):
    parts = _linear_parts()
    _save(tmp_path, 2, parts, keep_top_k=1)
    _save(tmp_path, 4, parts, keep_top_k=1)
    before = {name: (tmp_path / "step_4" / name).read_bytes() for name in _names(tmp_path / "step_4")}

    def disk_full(tmp, step):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_manifest", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 6, parts, keep_top_k=1)
    assert checkpoint_steps(tmp_path) == [4]  # not pruned: the new one never completed
    assert {name: (tmp_path / "step_4" / name).read_bytes() for name in _names(tmp_path / "step_4")} == before
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == [f".tmp-step_6-{store.os.getpid()}"]

    monkeypatch.undo()
    _save(tmp_path, 6, parts, keep_top_k=1)
    assert _names(tmp_path) == ["step_6"]


def test_pruning_starts_only_once_the_new_checkpoint_is_in_place(tmp_path, monkeypatch):
    parts = _linear_parts()
    _save(tmp_path, 2, parts, keep_top_k=1)
    seen = []
    prune = store._prune

    def watching_prune(root, *, keep_top_k, newest):
        seen.append((_names(root), checkpoint_problem(root / f"step_{newest}")))
        prune(root, keep_top_k=keep_top_k, newest=newest)

    monkeypatch.setattr(store, "_prune", watching_prune)
    _save(tmp_path, 4, parts, keep_top_k=1)
    assert seen == [(["step_2", "step_4"], None)]
    assert _names(tmp_path) == ["step_4"]


def test_pruning_keeps_complete_checkpoints_and_never_later_ones(tmp_path):
    parts = _linear_parts()
    for step in (2, 4, 6, 10):
        _save(tmp_path, step, parts)
    (tmp_path / "step_6" / "manifest.json").unlink()  # incomplete: does not count as one of the kept
    (tmp_path / "step_10" / "manifest.json").unlink()  # unusable, later than the new one: not this run's to delete
    _save(tmp_path, 8, parts, keep_top_k=2)
    assert checkpoint_steps(tmp_path) == [4, 8, 10]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_8"


def test_resaving_a_step_replaces_an_unusable_copy(tmp_path):
    parts = _linear_parts()
    _save(tmp_path, 2, parts)
    first = _save(tmp_path, 4, parts)
    (first / "trainer_state.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    _save(tmp_path, 4, parts)
    assert _names(tmp_path) == ["step_2", "step_4"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"
