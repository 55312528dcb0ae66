"""Atomic checkpoints (checkpoint/store.py): round trip, temporary directories, pruning."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.checkpoint.store import checkpoint_steps, latest_checkpoint, load_checkpoint, save_checkpoint
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
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, loop_state=LOOP_STATE, keep_top_k=None)
    state = torch.load(path / "trainer_state.pt", weights_only=True)  # raises if arbitrary objects were pickled
    assert set(state) == {"optimizer", "optimizer_parameter_names", "scheduler", "rng", "loop"}
    assert (path / "model.safetensors").is_file()


def test_temporary_directories_are_never_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / ".tmp-step_9-4242").mkdir()  # a save that crashed before its rename
    (tmp_path / ".tmp-step_9-4242" / "meta.json").write_text('{"step": 9}')
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_10").mkdir()
    (tmp_path / "step_x").mkdir()
    (tmp_path / "step_11").write_text("a file, not a checkpoint")
    assert checkpoint_steps(tmp_path) == [2, 10]  # numeric order, not string order
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"


def test_keep_top_k_keeps_the_newest(tiny_checkpoint, tmp_path):
    model, optimizer, scheduler = _trainer_parts(tiny_checkpoint)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, scheduler=scheduler, loop_state={"step": step}, keep_top_k=2)
    assert checkpoint_steps(tmp_path) == [2, 3]
    assert not (tmp_path / "step_1").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]  # no temporary left behind
    assert load_checkpoint(tmp_path / "step_3", model=model, optimizer=optimizer, scheduler=scheduler) == {"step": 3}


def test_resaving_a_step_replaces_it(tiny_checkpoint, tmp_path):
    model, optimizer, scheduler = _trainer_parts(tiny_checkpoint)
    save_checkpoint(tmp_path, 5, model=model, optimizer=optimizer, scheduler=scheduler, loop_state={"v": 1}, keep_top_k=None)
    save_checkpoint(tmp_path, 5, model=model, optimizer=optimizer, scheduler=scheduler, loop_state={"v": 2}, keep_top_k=None)
    assert checkpoint_steps(tmp_path) == [5]
    assert load_checkpoint(tmp_path / "step_5", model=model, optimizer=optimizer, scheduler=scheduler) == {"v": 2}
