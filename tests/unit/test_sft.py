"""Supervised fine-tuning: chat sources, assistant-only masking, the loss and its normalization
(micro-batch sizes, packing), the data order, and the recipe rules for algorithm sft."""

from __future__ import annotations

import copy
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Gemma4ForCausalLM

from posttrain.algorithms.sft_loss import sft_loss
from posttrain.config import ConfigError, RecipeConfig, load_config
from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig, SFTConfig
from posttrain.data.arithmetic import arithmetic_conversations, split_of
from posttrain.data.chat import TokenizedConversation, conversation_sample, load_chat, tokenize_conversations
from posttrain.data.sources import BadRows, DataError
from posttrain.loops.setup import end_of_turn_id
from posttrain.loops.sft import (
    padded_for_ranks,
    rank_share,
    step_indices,
    steps_per_epoch,
    supervised_batch,
    total_steps,
    validation_loss,
)
from posttrain.models.loading import load_policy, load_tokenizer
from posttrain.models.logprobs import token_logprobs
from posttrain.models.tiny import END_OF_TURN, tiny_gemma4_config
from posttrain.training.distributed import Distributed
from posttrain.training.trainer import PolicyTrainer, SupervisedBatch

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "Compute 12+30."},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Subtract 5."},
    {"role": "assistant", "content": "37"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def base_model(tiny_checkpoint):
    return load_policy(tiny_checkpoint)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_chat_sample(messages):
    return conversation_sample(messages, origin="hand:0")


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, stop) of each run of 1s."""
    spans, start = [], None
    for index, value in enumerate([*mask, 0]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            spans.append((start, index))
            start = None
    return spans


# ------------------------------------------------------------------------------------- masking


def test_supervised_tokens_decode_to_the_assistant_replies_and_their_end_of_turn(tokenizer):
    sample = load_chat_sample(CONVERSATION)
    [conversation] = tokenize_conversations([sample], tokenizer, max_tokens=512, end_of_turn_id=end_of_turn_id(tokenizer)).conversations
    decoded = [tokenizer.decode(conversation.token_ids[a:b]) for a, b in _spans(conversation.loss_mask)]
    assert decoded == [f"42{END_OF_TURN}", f"37{END_OF_TURN}"]
    # the rest is the template's: bos, role headers (the model's included), user and system turns, separators
    unsupervised = tokenizer.decode([t for t, m in zip(conversation.token_ids, conversation.loss_mask) if not m])
    assert unsupervised == (
        "<bos><|turn>system\nAnswer with a number.<turn|>\n<|turn>user\nCompute 12+30.<turn|>\n<|turn>model\n\n"
        "<|turn>user\nSubtract 5.<turn|>\n<|turn>model\n\n"
    )
    assert tokenizer.decode(conversation.token_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_conversation(tokenizer):
    """Like templates that drop past assistant turns' reasoning: earlier replies render shorter
    once a later turn follows, so the conversation's prefixes are not its rendering's prefixes."""
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}<turn|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
    )
    with pytest.raises(DataError, match=r"hand:0: the chat template is not prefix-stable: .*assistant message 2"):
        tokenize_conversations([load_chat_sample(CONVERSATION)], rewriting, max_tokens=512, end_of_turn_id=end_of_turn_id(tokenizer))


def test_a_template_without_the_end_of_turn_token_is_refused(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(DataError, match=r"hand:0: assistant message 2 renders without the end-of-turn token"):
        tokenize_conversations([load_chat_sample(CONVERSATION)], plain, max_tokens=512, end_of_turn_id=end_of_turn_id(tokenizer))


def test_long_conversations_are_dropped_and_counted_never_truncated(tokenizer):
    short = load_chat_sample(CONVERSATION[1:3])
    long = load_chat_sample(CONVERSATION)
    long = type(long)(long.prompt, long.ground_truth, long.metadata, origin="hand:1")
    eot = end_of_turn_id(tokenizer)
    length = len(tokenize_conversations([short], tokenizer, max_tokens=512, end_of_turn_id=eot).conversations[0].token_ids)
    kept = tokenize_conversations([short, long], tokenizer, max_tokens=length, end_of_turn_id=eot)
    assert [c.origin for c in kept.conversations] == ["hand:0"] and kept.dropped == ["hand:1"]
    with pytest.raises(DataError, match="all 1 conversations are longer than policy.max_total_sequence_length"):
        tokenize_conversations([long], tokenizer, max_tokens=length, end_of_turn_id=eot)


# --------------------------------------------------------------------------------- chat sources


def test_chat_file_rows_become_samples_named_by_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION, "id": 7}, {"messages": CONVERSATION[1:3]}])
    first, second = load_chat(str(path))
    assert first.metadata == {"messages": CONVERSATION} and first.origin == "chat.jsonl:0"
    assert (first.prompt, first.ground_truth) == ("Subtract 5.", "37")  # the last user message and reply
    assert second.origin == "chat.jsonl:1" and len(load_chat(str(path), limit=1)) == 1


BAD_ROWS = [
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"content": "hi"}]}, "'messages' message 0 must be a {role, content} dict"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "message 0 has role 'tool'; expected one of ['system', 'user', 'assistant']"),
    ({"messages": [{"role": "user", "content": None}]}, "message 0 content must be a string, got None"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "message 1 is an empty assistant reply"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "starts with an assistant message"),
    ({"messages": [{"role": "user", "content": "q"}]}, "needs a user and an assistant message (roles: ['user'])"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": [1]}]},
     "message 1 has keys ['tool_calls'] besides role and content"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "message"), BAD_ROWS, ids=range(len(BAD_ROWS)))
def test_a_bad_chat_row_is_an_error_naming_file_and_row_or_is_skipped(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}, bad])
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: ") + ".*" + re.escape(message)):
        load_chat(str(path))
    bad_rows = BadRows("skip")
    assert [s.origin for s in load_chat(str(path), bad_rows=bad_rows)] == ["chat.jsonl:0"]
    assert len(bad_rows.skipped) == 1 and message in bad_rows.skipped[0]


def test_chat_parquet_and_dotted_messages_key(tmp_path):
    import datasets

    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([{"conversation": {"turns": CONVERSATION[1:3]}}]).to_parquet(str(path))
    [sample] = load_chat(str(path), messages_key="conversation.turns")
    assert sample.metadata["messages"] == CONVERSATION[1:3] and sample.origin == "chat.parquet:0"
    with pytest.raises(DataError, match=r"no messages column 'messages'; columns present: \['conversation'\]"):
        load_chat(str(path))


def test_chat_directory_is_read_by_split_like_a_hub_download(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION[1:3]}] * 2)
    write_jsonl(tmp_path / "test.jsonl", [{"messages": CONVERSATION}])
    assert [s.origin for s in load_chat(str(tmp_path))] == [f"{tmp_path}:train:0", f"{tmp_path}:train:1"]
    [test] = load_chat(str(tmp_path), split="test")
    assert test.metadata["messages"] == CONVERSATION and test.origin == f"{tmp_path}:test:0"
    with pytest.raises(DataError, match="a file has no splits"):
        load_chat(str(tmp_path / "test.jsonl"), split="test")
    with pytest.raises(DataError, match="neither a local file or directory .* nor a hub id"):
        load_chat(str(tmp_path / "missing" / "chat.jsonl"))


def test_arithmetic_conversations_keep_a_correct_running_total_and_disjoint_splits():
    train = arithmetic_conversations(200, seed=3, max_turns=4, max_value=20)
    assert train == arithmetic_conversations(200, seed=3, max_turns=4, max_value=20)  # seeded
    turns = set()
    for sample in train:
        messages = sample.metadata["messages"]
        a, operator, b = re.fullmatch(r"Compute (\d+)([+-])(\d+)\.", messages[0]["content"]).groups()
        total = int(a) + int(b) if operator == "+" else int(a) - int(b)
        assert messages[1] == {"role": "assistant", "content": str(total)}
        for user, reply in zip(messages[2::2], messages[3::2]):
            verb, term = re.fullmatch(r"(Add|Subtract) (\d+)\.", user["content"]).groups()
            total += int(term) if verb == "Add" else -int(term)
            assert reply == {"role": "assistant", "content": str(total)}
        assert split_of(f"{a}{operator}{b}") == "train"
        turns.add(len(messages) // 2)
    assert turns == {1, 2, 3, 4}
    validation = arithmetic_conversations(50, seed=3, max_turns=4, max_value=20, split="validation")
    assert all(split_of(s.metadata["messages"][0]["content"][8:-1]) == "validation" for s in validation)


# ------------------------------------------------------------------------------ loss and steps


def test_sft_loss_hand_values():
    logprobs_BT = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, -9.0]])
    mask_BT = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])  # -9 is not supervised
    loss, metrics = sft_loss(logprobs_BT, mask_BT, global_normalizer=3.0)
    assert metrics["loss"] == pytest.approx((1 + 2 + 3) / 3)
    # one of two micro-batches of a 6-token global batch: its share of the global mean
    assert sft_loss(logprobs_BT, mask_BT, global_normalizer=6.0)[1]["loss"] == pytest.approx(1.0)
    assert loss.shape == ()


def _conversations(tokenizer) -> list[TokenizedConversation]:
    """Four conversations of 1 to 3 turns (different lengths and supervised-token counts)."""
    samples = [s for s in arithmetic_conversations(12, seed=0, max_turns=3)][:4]
    return tokenize_conversations(samples, tokenizer, max_tokens=512, end_of_turn_id=end_of_turn_id(tokenizer)).conversations


def _hand_loss(model, batch: SupervisedBatch) -> float:
    """-(sum of the supervised tokens' logprobs) / (supervised tokens), from token_logprobs:
    logprobs_BT1[b, t] scores token t + 1."""
    with torch.no_grad():
        logprobs_BT1 = token_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT)
    mask_BT1 = batch.loss_mask_BT[:, 1:].float()
    return float(-(logprobs_BT1 * mask_BT1).sum() / mask_BT1.sum())


def _step(base_model, batch, **policy) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One sft_step from the base weights: metrics, parameters after it and its gradients.

    Adam's eps is 1e-3: its first update, lr g / (|g| + eps), is then smooth in g near 0, so fp32
    summation-order noise on a gradient (~1e-8) moves a weight by ~1e-8, not by up to lr as it
    would with a tiny eps (a gradient of 3.8e-7 against eps 1e-6 measured 5e-6 apart). A wrongly
    scaled gradient still shows: g = 0.1 vs 0.2 gives updates 5e-6 apart, small g far more."""
    model = copy.deepcopy(base_model)
    fields = dict(precision="float32", train_global_batch_size=4, max_grad_norm=None, optimizer=OptimizerConfig(lr=1e-3, eps=1e-3))
    trainer = PolicyTrainer(model, PolicyConfig(**{**fields, **policy}), LossConfig(), total_optimizer_steps=1)
    metrics = trainer.sft_step(batch)
    gradients = {name: trainer.optimizer.state[p]["exp_avg"] / 0.1 for name, p in model.named_parameters()}  # (1 - beta1) g
    return metrics, {name: p.detach().clone() for name, p in model.named_parameters()}, gradients


def _assert_same_step(candidate, reference, *, base_model) -> None:
    (metrics, params, grads), (ref_metrics, ref_params, ref_grads) = candidate, reference
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-5)
    for name, param in params.items():
        expected = ref_grads[name]  # fp32 summation-order noise: ~1e-6 of a gradient's scale
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name)
        torch.testing.assert_close(param, ref_params[name], rtol=0, atol=1e-6, msg=name)
    moved = ref_params["model.layers.0.mlp.up_proj.weight"] - dict(base_model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert moved.abs().max() > 1e-4  # the step moved the weights: the comparison is not vacuous


def test_one_step_is_the_same_for_micro_batches_of_1_2_and_4(base_model, tokenizer):
    batch = supervised_batch(_conversations(tokenizer), pad_token_id=tokenizer.pad_token_id)
    assert len(set(batch.loss_mask_BT.sum(dim=-1).tolist())) == 4  # rows with different supervised-token counts
    results = {micro: _step(base_model, batch, train_micro_batch_size=micro) for micro in (1, 2, 4)}
    metrics = results[4][0]
    assert metrics["loss"] == pytest.approx(_hand_loss(base_model, batch), abs=1e-6)
    assert metrics["supervised_tokens"] == float(batch.loss_mask_BT.sum())
    for micro in (1, 2):
        _assert_same_step(results[micro], results[4], base_model=base_model)


@pytest.mark.parametrize(("micro_rows", "micro_tokens"), [(4, None), (2, None), (4, 40)])
def test_packed_micro_batches_give_the_padded_step(base_model, tokenizer, micro_rows, micro_tokens):
    """Packing (each micro-batch one sequence, attention kept within each conversation) and
    token-budget micro-batches (rows of 21, 48, 23 and 70 tokens: 40 puts each alone) give the
    padded full-batch step."""
    batch = supervised_batch(_conversations(tokenizer), pad_token_id=tokenizer.pad_token_id)
    padded = _step(base_model, batch, train_micro_batch_size=4)
    packed = _step(base_model, batch, train_micro_batch_size=micro_rows, train_micro_batch_tokens=micro_tokens, sequence_packing=True)
    _assert_same_step(packed, padded, base_model=base_model)


def test_a_non_finite_loss_skips_the_step(base_model, tokenizer):
    conversations = _conversations(tokenizer)
    batch = supervised_batch(conversations, pad_token_id=tokenizer.pad_token_id)
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = PolicyTrainer(model, PolicyConfig(precision="float32", train_global_batch_size=4), LossConfig(), total_optimizer_steps=2)
    metrics = trainer.sft_step(batch)
    assert metrics["skipped_nonfinite_steps"] == 1.0 and metrics["consecutive_nonfinite_steps"] == 1.0
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) or torch.isnan(before[name]).all(), name


def test_supervised_batch_right_pads_tokens_and_masks():
    conversations = [TokenizedConversation("a", [2, 5, 6], [0, 1, 1]), TokenizedConversation("b", [2, 7], [0, 1])]
    batch = supervised_batch(conversations, pad_token_id=0)
    assert batch.input_ids_BT.tolist() == [[2, 5, 6], [2, 7, 0]]
    assert batch.attention_mask_BT.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.loss_mask_BT.tolist() == [[0, 1, 1], [0, 1, 0]]


def test_data_order_epochs_and_step_counts():
    assert steps_per_epoch(5, 2) == 2  # the fifth conversation sits each epoch out
    assert [step_indices(step, 5, 2, seed=0, shuffle=False) for step in (1, 2, 3, 4)] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    epoch_0 = step_indices(1, 5, 2, seed=1, shuffle=True) + step_indices(2, 5, 2, seed=1, shuffle=True)
    epoch_1 = step_indices(3, 5, 2, seed=1, shuffle=True) + step_indices(4, 5, 2, seed=1, shuffle=True)
    assert len(set(epoch_0)) == 4 and len(set(epoch_1)) == 4  # no conversation twice within an epoch
    assert step_indices(3, 5, 2, seed=1, shuffle=True) == step_indices(3, 5, 2, seed=1, shuffle=True)  # from the step alone
    assert total_steps(SFTConfig(max_num_steps=100), 7) == 100
    assert total_steps(SFTConfig(max_num_steps=100, max_num_epochs=3), 7) == 21
    assert total_steps(SFTConfig(max_num_steps=10, max_num_epochs=3), 7) == 10
    with pytest.raises(ValueError, match="3 training conversations do not fill one global batch of policy.train_global_batch_size = 4"):
        steps_per_epoch(3, 4)


def test_validation_rows_are_padded_for_ranks_with_unsupervised_copies():
    conversations = [TokenizedConversation(str(i), [2, 3 + i], [0, 1]) for i in range(5)]
    padded = padded_for_ranks(conversations, 4)
    assert len(padded) == 8 and padded[:5] == conversations
    assert all(c.token_ids == [2, 3] and c.loss_mask == [0, 0] for c in padded[5:])
    assert padded_for_ranks(conversations, 1) == conversations


# ------------------------------------------------------------------------------------- recipes


TINY_TWIN = "recipes/tiny/sft-gemma4-e2b-it-tiny.yaml"
QUICKSTART = "recipes/quickstart.yaml"


def test_sft_recipes_need_conversations_and_grpo_recipes_prompts():
    cfg = load_config(TINY_TWIN, RecipeConfig)
    assert cfg.algorithm == "sft" and cfg.data.train.type == "arithmetic_chat"
    with pytest.raises(ConfigError, match=r"algorithm sft trains on conversations: data.train must be a chat source .* got type arithmetic"):
        load_config(TINY_TWIN, RecipeConfig, ["data.train={type: arithmetic, size: 10}"])
    with pytest.raises(ConfigError, match="warm_start is the supervised phase before RL"):
        load_config(TINY_TWIN, RecipeConfig, ["warm_start.enabled=true"])
    with pytest.raises(ConfigError, match="unset data.prompt_template"):
        load_config(TINY_TWIN, RecipeConfig, ["data.prompt_template='Q: {prompt}'"])
    with pytest.raises(ConfigError, match=r"data.validation: a chat source holds conversations for algorithm: sft"):
        load_config(QUICKSTART, RecipeConfig, ["data.validation={type: chat, path: x.jsonl}"])


def test_sft_ignores_the_grpo_batch_and_generation_arithmetic():
    """40 conversations per step need not divide grpo's 4 x 8 samples, and sft generates nothing."""
    overrides = ["policy.train_global_batch_size=40", "policy.train_micro_batch_size=8", "policy.max_total_sequence_length=8"]
    cfg = load_config(TINY_TWIN, RecipeConfig, overrides)
    assert cfg.policy.train_global_batch_size == 40
    with pytest.raises(ConfigError, match="must be a multiple of"):  # whole micro-batches still
        load_config(TINY_TWIN, RecipeConfig, ["policy.train_micro_batch_size=7"])
    with pytest.raises(ConfigError, match="must split into whole optimizer steps"):
        load_config(QUICKSTART, RecipeConfig, ["policy.train_global_batch_size=40", "policy.train_micro_batch_size=8"])


# --------------------------------------------------------------------------------- two processes

ROWS = 8


def _random_conversations(count: int, seed: int) -> list[TokenizedConversation]:
    """Rows of 6 to 20 random tokens, the second half supervised (unequal counts per row)."""
    gen = torch.Generator().manual_seed(seed)
    conversations = []
    for index in range(count):
        length = int(torch.randint(6, 21, (1,), generator=gen))
        token_ids = torch.randint(3, 300, (length,), generator=gen).tolist()
        conversations.append(TokenizedConversation(f"random:{index}", token_ids, [0] * (length // 2) + [1] * (length - length // 2)))
    return conversations


def distributed_sft_step(distributed: Distributed) -> dict:
    """One sft_step on this rank's share of 8 conversations, then validation/loss over 5 (padded
    to a multiple of the ranks); the full weights' gradients, gathered (on CPU)."""
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300))
    policy = PolicyConfig(
        precision="float32",
        train_global_batch_size=ROWS // distributed.world_size,
        train_micro_batch_size=2,
        max_grad_norm=None,
        optimizer=OptimizerConfig(lr=1e-3, eps=1e-3),
    )
    trainer = PolicyTrainer(model, policy, LossConfig(), total_optimizer_steps=1, distributed=distributed)
    batch = supervised_batch(rank_share(_random_conversations(ROWS, seed=0), distributed), pad_token_id=0)
    metrics = trainer.sft_step(batch)
    metrics.update(validation_loss(trainer, _random_conversations(5, seed=1), pad_token_id=0, distributed=distributed))
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()  # noqa: E731
    gradients = {name: full(trainer.optimizer.state[p]["exp_avg"]) / 0.1 for name, p in trainer.model.named_parameters()}
    return {"metrics": metrics, "gradients": gradients}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_take_the_one_process_step_and_validation_loss(tmp_path):
    """Each rank trains on half the conversations; the token count is all-reduced, so loss,
    gradient and validation/loss (5 conversations: one unsupervised filler row) are one process's."""
    expected = distributed_sft_step(Distributed())
    out = tmp_path / "rank0.pt"
    sys.path.insert(0, str(Path(__file__).parent))
    from _sft_worker import main  # noqa: PLC0415

    mp.start_processes(main, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    for key in ("loss", "supervised_tokens", "validation/loss", "validation/supervised_tokens"):
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], abs=1e-6), key
    assert got["metrics"]["grad_norm"] == pytest.approx(expected["metrics"]["grad_norm"], rel=1e-5)
    for name, gradient in got["gradients"].items():
        reference = expected["gradients"][name]
        torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()), msg=name)
