import pytest
import torch

from posttrain.algorithms.dynamic_sampling import (
    DynamicSamplingBuffer,
    DynamicSamplingExhausted,
    informative_groups,
)

pytestmark = pytest.mark.unit


def _batch(first_id: int, num_prompts: int) -> dict[str, torch.Tensor]:
    ids_P = torch.arange(first_id, first_id + num_prompts)
    return {"prompt_id_P": ids_P, "rewards_PG": ids_P.float().unsqueeze(-1).repeat(1, 2)}


def test_informative_groups():
    rewards_PG = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert informative_groups(rewards_PG).tolist() == [False, True, False]


def test_fills_takes_target_and_carries_over_the_rest():
    buffer = DynamicSamplingBuffer(target_prompts=3, max_gen_batches=3)
    buffer.add(_batch(0, 4), torch.tensor([True, False, True, False]))  # keeps 0, 2
    assert not buffer.is_full
    assert buffer.gen_batches_this_step == 1
    buffer.add(_batch(4, 4), torch.tensor([True, True, True, False]))  # keeps 4, 5, 6
    assert buffer.is_full
    taken = buffer.take()
    assert taken["prompt_id_P"].tolist() == [0, 2, 4]
    assert taken["rewards_PG"].shape == (3, 2)
    assert buffer.gen_batches_this_step == 0
    # carry-over 5, 6 plus one new group 8
    assert buffer.num_groups == 2 and not buffer.is_full
    buffer.add(_batch(8, 2), torch.tensor([True, False]))
    assert buffer.take()["prompt_id_P"].tolist() == [5, 6, 8]
    assert buffer.num_groups == 0


def test_exhausted_error_says_what_to_do():
    buffer = DynamicSamplingBuffer(target_prompts=4, max_gen_batches=2)
    keep_P = torch.tensor([True, False, False, False])
    buffer.add(_batch(0, 4), keep_P)
    with pytest.raises(DynamicSamplingExhausted) as error:
        buffer.add(_batch(4, 4), keep_P)
    message = str(error.value)
    assert "kept 2 of 8" in message
    assert "max_gen_batches" in message and "num_prompts_per_step" in message
    assert isinstance(error.value, RuntimeError)


def test_filling_on_the_last_allowed_batch_is_fine():
    buffer = DynamicSamplingBuffer(target_prompts=2, max_gen_batches=2)
    buffer.add(_batch(0, 2), torch.tensor([True, False]))
    buffer.add(_batch(2, 2), torch.tensor([True, False]))
    assert buffer.take()["prompt_id_P"].tolist() == [0, 2]


def test_state_dict_round_trip_keeps_carry_over():
    buffer = DynamicSamplingBuffer(target_prompts=2, max_gen_batches=3)
    buffer.add(_batch(0, 3), torch.tensor([True, True, True]))
    buffer.take()  # carry-over: group 2
    restored = DynamicSamplingBuffer(target_prompts=2, max_gen_batches=3)
    restored.load_state_dict(buffer.state_dict())
    assert restored.num_groups == 1
    restored.add(_batch(3, 1), torch.tensor([True]))
    assert restored.take()["prompt_id_P"].tolist() == [2, 3]


def test_add_rejects_mismatched_first_dimension():
    buffer = DynamicSamplingBuffer(target_prompts=2, max_gen_batches=3)
    with pytest.raises(ValueError, match="first dimension"):
        buffer.add(_batch(0, 3), torch.tensor([True, False]))
