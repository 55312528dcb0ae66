"""DPO: the loss and its gradients against hand-computed values, preference sources (layouts, bad
rows, the generated pairs), response masking, the step's invariance to micro-batching, packing and
processes, the reference logprobs (the initial policy's: loss log 2 at the start), and the recipe
rules for algorithm dpo."""

from __future__ import annotations

import copy
import json
import math
import re
import socket
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Gemma4ForCausalLM

from posttrain.algorithms.dpo_loss import dpo_loss, sequence_logprobs
from posttrain.config import ConfigError, RecipeConfig, load_config
from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig
from posttrain.data.arithmetic import split_of
from posttrain.data.chat import TokenizedConversation
from posttrain.data.preferences import (
    PreferencePair,
    TokenizedPair,
    arithmetic_preferences,
    load_preferences,
    tokenize_preferences,
)
from posttrain.data.sources import BadRows, DataError
from posttrain.loops.dpo import data_fingerprint, pair_logprobs, preference_batch, rank_pairs, validation_metrics
from posttrain.loops.setup import end_of_turn_id
from posttrain.models.loading import load_policy, load_tokenizer
from posttrain.models.logprobs import token_logprobs
from posttrain.models.tiny import END_OF_TURN, tiny_gemma4_config
from posttrain.planning.memory import micro_batch_tokens, plan_memory
from posttrain.training.distributed import Distributed
from posttrain.training.trainer import PolicyTrainer, PreferenceBatch

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def base_model(tiny_checkpoint):
    return load_policy(tiny_checkpoint)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------------- the loss


def test_dpo_loss_metrics_and_gradients_by_hand():
    """Two pairs, beta 0.5, sft_weight 0.1 over 5 chosen tokens:
        pair 0: pc - rc = -1 - (-2) = 1,  pr - rr = -3 - (-2) = -1: margin = 0.5 (1 - (-1)) = 1
        pair 1: pc - rc = -4 - (-3) = -1, pr - rr = -2 - (-2) = 0:  margin = 0.5 (-1 - 0) = -0.5
        preference loss = (log(1 + e^-1) + log(1 + e^0.5)) / 2 = (0.3132617 + 0.9740770) / 2 = 0.6436693
        sft loss = -(-1 - 4) / 5 = 1;  loss = 0.6436693 + 0.1 x 1 = 0.7436693
        d/d pc_p = -beta sigmoid(-margin_p) / 2 - 0.1 / 5:
            pair 0: -0.5 x 0.2689414 / 2 - 0.02 = -0.0872354;  pair 1: -0.5 x 0.6224593 / 2 - 0.02 = -0.1756148
        d/d pr_p = +beta sigmoid(-margin_p) / 2: 0.0672354, 0.1556148
    """
    policy_chosen = torch.tensor([-1.0, -4.0], requires_grad=True)
    policy_rejected = torch.tensor([-3.0, -2.0], requires_grad=True)
    reference_chosen, reference_rejected = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -2.0])
    loss, metrics = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5, sft_weight=0.1, global_pairs=2, global_chosen_tokens=5
    )
    assert float(loss.detach()) == pytest.approx(0.7436693, abs=1e-6)
    expected = {
        "loss": 0.7436693,
        "preference_loss": 0.6436693,
        "sft_loss": 1.0,
        "rewards/chosen": (0.5 - 0.5) / 2,
        "rewards/rejected": (-0.5 + 0.0) / 2,
        "rewards/margin": (1.0 - 0.5) / 2,
        "rewards/accuracy": 0.5,
        "logps/chosen": -2.5,
        "logps/rejected": -2.5,
    }
    assert metrics == pytest.approx(expected, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(policy_chosen.grad, torch.tensor([-0.0872354, -0.1756148]), atol=1e-6, rtol=0)
    torch.testing.assert_close(policy_rejected.grad, torch.tensor([0.0672354, 0.1556148]), atol=1e-6, rtol=0)


def test_dpo_loss_shares_sum_to_the_global_batch_and_ties_count_half():
    """Each pair alone, divided by the global counts, sums to the two-pair loss and metrics; equal
    logprobs everywhere give log 2, no reward and accuracy 1/2 (a tie, as at the start of a run)."""
    values = [torch.tensor(v) for v in ([-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.0], [-2.0, -2.0])]
    kwargs = dict(beta=0.5, sft_weight=0.1, global_pairs=2, global_chosen_tokens=5)
    _, whole = dpo_loss(*values, **kwargs)
    shares = [dpo_loss(*(v[p : p + 1] for v in values), **kwargs)[1] for p in (0, 1)]
    assert {key: shares[0][key] + shares[1][key] for key in whole} == pytest.approx(whole, abs=1e-6)
    same = torch.tensor([-3.0, -7.0])
    loss, metrics = dpo_loss(same, same, same, same, beta=0.1, sft_weight=0.0, global_pairs=2, global_chosen_tokens=4)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margin"] == 0.0 and metrics["rewards/accuracy"] == 0.5


def test_a_batch_without_chosen_tokens_has_an_sft_loss_of_0_not_nan():
    """T counts at least 1 inside dpo_loss, for the trainer and validation alike: 0 chosen tokens
    (sums of nothing, 0) give sft_loss 0 and the preference loss alone, log 2 at equal logprobs."""
    zero, same = torch.zeros(2), torch.tensor([-3.0, -7.0])
    loss, metrics = dpo_loss(zero, same, zero, same, beta=0.1, sft_weight=0.5, global_pairs=2, global_chosen_tokens=0)
    assert metrics["sft_loss"] == 0.0 and float(loss) == pytest.approx(math.log(2), abs=1e-7)


def test_sequence_logprobs_sum_the_masked_tokens():
    logprobs_BT = torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, -3.0, float("-inf"), 0.0]])
    mask_BT = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])  # -9 and -inf are outside the responses
    assert sequence_logprobs(logprobs_BT, mask_BT).tolist() == [-3.0, -3.0]


# --------------------------------------------------------------------------------- the sources

PROMPT = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "Compute 12+30."}]


def test_the_three_row_layouts_give_the_same_pairs(tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "Compute 12+30.", "chosen": "42", "rejected": "41"}])
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "42"}], "rejected": [{"role": "assistant", "content": "41"}]}],
    )
    implicit = write_jsonl(
        tmp_path / "implicit.jsonl",
        [{"chosen": [*PROMPT, {"role": "assistant", "content": "42"}], "rejected": [*PROMPT, {"role": "assistant", "content": "41"}]}],
    )
    [from_text] = load_preferences(str(text))
    assert from_text == PreferencePair(prompt=[PROMPT[1]], chosen="42", rejected="41", origin="text.jsonl:0")
    [from_chat] = load_preferences(str(chat))
    [from_implicit] = load_preferences(str(implicit), prompt_key=None)
    assert (from_chat.prompt, from_chat.chosen, from_chat.rejected) == (PROMPT, "42", "41")
    assert (from_implicit.prompt, from_implicit.chosen, from_implicit.rejected) == (PROMPT, "42", "41")
    assert from_implicit.origin == "implicit.jsonl:0"


def test_parquet_dotted_keys_and_directories_by_split(tmp_path):
    import datasets

    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list([{"pair": {"q": "Compute 1+1.", "good": "2", "bad": "3"}}]).to_parquet(str(path))
    [pair] = load_preferences(str(path), prompt_key="pair.q", chosen_key="pair.good", rejected_key="pair.bad")
    assert (pair.chosen, pair.rejected, pair.origin) == ("2", "3", "prefs.parquet:0")
    with pytest.raises(DataError, match=r"no prompt column 'prompt'; columns present: \['pair'\]"):
        load_preferences(str(path))
    folder = tmp_path / "hub_download"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2)
    write_jsonl(folder / "test.jsonl", [{"prompt": "q", "chosen": "c", "rejected": "d"}])
    assert [p.origin for p in load_preferences(str(folder))] == [f"{folder}:train:0", f"{folder}:train:1"]
    assert load_preferences(str(folder), split="test")[0].chosen == "c"


BAD_ROWS = [
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is an empty prompt"),
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a non-empty list"),
    ({"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"}, "message 0 has role 'tool'"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
     "'prompt' must end with a user message"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "'chosen' must be a string or a list of one assistant message, got None"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "'rejected' is an empty response"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "'chosen' must hold one {role: assistant, content} message"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same response"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "message"), BAD_ROWS, ids=range(len(BAD_ROWS)))
def test_a_bad_row_is_an_error_naming_file_and_row_or_is_skipped(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: ") + ".*" + re.escape(message)):
        load_preferences(str(path))
    bad_rows = BadRows("skip")
    assert [p.origin for p in load_preferences(str(path), bad_rows=bad_rows)] == ["prefs.jsonl:0"]
    assert len(bad_rows.skipped) == 1 and message in bad_rows.skipped[0]


def test_implicit_prompts_must_be_shared(tmp_path):
    row = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "b"}]}  # fmt: skip
    path = write_jsonl(tmp_path / "prefs.jsonl", [row])
    with pytest.raises(DataError, match=r"prefs.jsonl row 0: 'chosen' and 'rejected' must share every message but their last"):
        load_preferences(str(path), prompt_key=None)
    with pytest.raises(DataError, match=r"no prompt column 'prompt'.* set prompt_key: null"):
        load_preferences(str(path))


def test_arithmetic_preferences_prefer_the_right_answer_and_keep_the_splits_apart():
    pairs = arithmetic_preferences(300, seed=2, max_value=20)
    assert pairs == arithmetic_preferences(300, seed=2, max_value=20)  # seeded
    for pair in pairs:
        a, b = map(int, re.fullmatch(r"Compute max\((\d+), (\d+)\)\.", pair.prompt[0]["content"]).groups())
        assert (pair.chosen, pair.rejected) == (str(max(a, b)), str(min(a, b))) and a != b
        assert split_of(f"max({a}, {b})") == "train"
    for pair in arithmetic_preferences(100, seed=2, operation="sum", split="validation"):
        a, operator, b = re.fullmatch(r"Compute (\d+)([+-])(\d+)\.", pair.prompt[0]["content"]).groups()
        value = int(a) + int(b) if operator == "+" else int(a) - int(b)
        assert pair.chosen == str(value) and 1 <= abs(int(pair.rejected) - value) <= 10
        assert split_of(f"{a}{operator}{b}") == "validation"


# ------------------------------------------------------------------------------------- masking


def test_each_response_scores_its_reply_and_end_of_turn_only(tokenizer):
    """A multi-turn prompt's earlier reply is context: only the final response is scored."""
    prompt = [*PROMPT, {"role": "assistant", "content": "42"}, {"role": "user", "content": "Subtract 5."}]
    pair = PreferencePair(prompt=prompt, chosen="37", rejected="38", origin="hand:0")
    [tokenized] = tokenize_preferences([pair], tokenizer, max_tokens=512, end_of_turn_id=end_of_turn_id(tokenizer)).pairs
    for sequence, reply in ((tokenized.chosen, "37"), (tokenized.rejected, "38")):
        scored = [t for t, m in zip(sequence.token_ids, sequence.loss_mask) if m]
        assert tokenizer.decode(scored) == f"{reply}{END_OF_TURN}"
        start = sequence.loss_mask.index(1)
        assert sum(sequence.loss_mask) == len(scored) and all(sequence.loss_mask[start : start + len(scored)])  # one span
        prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(sequence.token_ids[:start]) == prefix  # the prompt, through the model's role header
    assert tokenized.chosen.token_ids[:start] == tokenized.rejected.token_ids[:start]


def test_pairs_with_a_long_sequence_are_dropped_and_counted(tokenizer):
    short = PreferencePair(prompt=[{"role": "user", "content": "Compute 1+1."}], chosen="2", rejected="3", origin="a")
    long = PreferencePair(prompt=short.prompt, chosen="2", rejected="3 " * 40, origin="b")
    eot = end_of_turn_id(tokenizer)
    length = len(tokenize_preferences([short], tokenizer, max_tokens=512, end_of_turn_id=eot).pairs[0].rejected.token_ids)
    kept = tokenize_preferences([short, long], tokenizer, max_tokens=length, end_of_turn_id=eot)
    assert [p.origin for p in kept.pairs] == ["a"] and kept.dropped == ["b"]
    with pytest.raises(DataError, match="all 1 preference pairs are longer than policy.max_total_sequence_length"):
        tokenize_preferences([long], tokenizer, max_tokens=length, end_of_turn_id=eot)


def test_preference_batch_interleaves_chosen_and_rejected_rows():
    pairs = [
        TokenizedPair("a", TokenizedConversation("a", [2, 5, 6], [0, 1, 1]), TokenizedConversation("a", [2, 5], [0, 1])),
        TokenizedPair("b", TokenizedConversation("b", [2, 7], [0, 1]), TokenizedConversation("b", [2, 8, 9, 4], [0, 1, 1, 1])),
    ]
    batch = preference_batch(pairs, torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]), pad_token_id=0)
    assert batch.sequences.input_ids_BT.tolist() == [[2, 5, 6, 0], [2, 5, 0, 0], [2, 7, 0, 0], [2, 8, 9, 4]]
    assert batch.sequences.loss_mask_BT.tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1]]
    assert batch.pair_lengths() == [5, 6]
    second = batch.rows(1, 2)
    assert second.sequences.input_ids_BT.tolist() == [[2, 7, 0, 0], [2, 8, 9, 4]] and second.reference_logprobs_P2.tolist() == [[-3.0, -4.0]]
    assert data_fingerprint(pairs) != data_fingerprint(pairs[:1]) and data_fingerprint(pairs) == data_fingerprint(list(pairs))


# ------------------------------------------------------------------------------------- the step


def _pairs(tokenizer, count: int = 4) -> list[TokenizedPair]:
    return tokenize_preferences(
        arithmetic_preferences(count, seed=0, operation="sum"), tokenizer, max_tokens=512, end_of_turn_id=end_of_turn_id(tokenizer)
    ).pairs


def _trainer(model, **policy) -> PolicyTrainer:
    fields = dict(precision="float32", train_global_batch_size=4, max_grad_norm=None, optimizer=OptimizerConfig(lr=1e-3, eps=1e-3))
    return PolicyTrainer(model, PolicyConfig(**{**fields, **policy}), LossConfig(), total_optimizer_steps=2)


def _offset_reference(model, pairs, pad_token_id) -> torch.Tensor:
    """The model's own logprobs moved by fixed offsets: margins away from 0, so sigmoid(-margin) differs per pair."""
    reference = pair_logprobs(_trainer(copy.deepcopy(model)), pairs, pad_token_id=pad_token_id, distributed=Distributed())
    return reference + torch.tensor([[0.5, -1.0], [-2.0, 0.3], [1.5, 1.0], [0.0, -0.7]])[: len(pairs)]


def _step(base_model, batch, *, sft_weight=0.3, **policy):
    """One dpo_step from the base weights: metrics, parameters after it and its gradients (see
    test_sft._step for why Adam's eps is 1e-3)."""
    model = copy.deepcopy(base_model)
    trainer = _trainer(model, **policy)
    metrics = trainer.dpo_step(batch, beta=0.7, sft_weight=sft_weight)
    gradients = {name: trainer.optimizer.state[p]["exp_avg"] / 0.1 for name, p in model.named_parameters()}  # (1 - beta1) g
    return metrics, {name: p.detach().clone() for name, p in model.named_parameters()}, gradients


def _assert_same_step(candidate, reference, *, base_model) -> None:
    (metrics, params, grads), (ref_metrics, ref_params, ref_grads) = candidate, reference
    for key in ("loss", "preference_loss", "sft_loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-5), key
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-5)
    for name, param in params.items():
        expected = ref_grads[name]
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name)
        torch.testing.assert_close(param, ref_params[name], rtol=0, atol=1e-6, msg=name)
    moved = ref_params["model.layers.0.mlp.up_proj.weight"] - dict(base_model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert moved.abs().max() > 1e-4  # the step moved the weights: the comparison is not vacuous


def _hand_loss(model, batch: PreferenceBatch, *, beta: float, sft_weight: float) -> float:
    """The DPO loss from token_logprobs (logprobs_BT1[b, t] scores token t + 1), written out."""
    rows = batch.sequences
    with torch.no_grad():
        logprobs_BT1 = token_logprobs(model, rows.input_ids_BT, rows.attention_mask_BT)
    summed_B = (logprobs_BT1 * rows.loss_mask_BT[:, 1:]).sum(dim=-1)
    chosen, rejected = summed_B[0::2], summed_B[1::2]
    reference = batch.reference_logprobs_P2
    margin = beta * ((chosen - reference[:, 0]) - (rejected - reference[:, 1]))
    nll = -chosen.sum() / rows.loss_mask_BT[0::2].sum()
    return float(torch.nn.functional.softplus(-margin).mean() + sft_weight * nll)


def test_one_step_is_the_same_for_micro_batches_of_1_2_and_4_pairs(base_model, tokenizer):
    pairs = _pairs(tokenizer)
    batch = preference_batch(pairs, _offset_reference(base_model, pairs, tokenizer.pad_token_id), pad_token_id=tokenizer.pad_token_id)
    results = {micro: _step(base_model, batch, train_micro_batch_size=micro) for micro in (1, 2, 4)}
    metrics = results[4][0]
    assert metrics["loss"] == pytest.approx(_hand_loss(base_model, batch, beta=0.7, sft_weight=0.3), abs=1e-5)
    assert metrics["pairs"] == 4 and metrics["chosen_tokens"] == float(batch.sequences.loss_mask_BT[0::2].sum())
    assert 0 < metrics["rewards/accuracy"] < 1  # the offsets put pairs on both sides
    for micro in (1, 2):
        _assert_same_step(results[micro], results[4], base_model=base_model)


@pytest.mark.parametrize(("micro_pairs", "micro_tokens"), [(4, None), (2, None), (4, 40)])
def test_packed_micro_batches_give_the_padded_step(base_model, tokenizer, micro_pairs, micro_tokens):
    """Packing, and a token budget (40 tokens: each pair, 44 to 46 tokens, goes alone), give the padded
    full-batch step."""
    pairs = _pairs(tokenizer)
    batch = preference_batch(pairs, _offset_reference(base_model, pairs, tokenizer.pad_token_id), pad_token_id=tokenizer.pad_token_id)
    padded = _step(base_model, batch, train_micro_batch_size=4)
    packed = _step(base_model, batch, train_micro_batch_size=micro_pairs, train_micro_batch_tokens=micro_tokens, sequence_packing=True)
    _assert_same_step(packed, padded, base_model=base_model)


def test_reference_logprobs_are_the_initial_policys_so_the_first_loss_is_log_2(base_model, tokenizer):
    """Reference logprobs from the policy itself (no second model): before any update every margin
    is 0 up to float rounding, the loss log 2; after a step the validation margin is not."""
    pairs = _pairs(tokenizer)
    trainer = _trainer(copy.deepcopy(base_model), train_micro_batch_size=2)
    reference = pair_logprobs(trainer, pairs, pad_token_id=tokenizer.pad_token_id, distributed=Distributed())
    assert reference.shape == (4, 2) and (reference < 0).all()
    metrics = trainer.dpo_step(preference_batch(pairs, reference, pad_token_id=tokenizer.pad_token_id), beta=0.1, sft_weight=0.0)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics["rewards/margin"]) < 1e-6
    after = validation_metrics(trainer, pairs, reference, beta=0.1, sft_weight=0.0, pad_token_id=tokenizer.pad_token_id, distributed=Distributed())
    assert after["validation/loss"] != pytest.approx(math.log(2), abs=1e-4) and after["validation/rewards/margin"] != 0


def test_validation_and_the_step_agree_on_pairs_without_chosen_tokens(base_model, tokenizer):
    """With sft_weight > 0 and no scored chosen token, validation (no gradient) gives the loss the
    step computes from the same weights, finite (it once divided by 0 chosen tokens: nan)."""
    pairs = [replace(p, chosen=replace(p.chosen, loss_mask=[0] * len(p.chosen.loss_mask))) for p in _pairs(tokenizer)]
    pad = tokenizer.pad_token_id
    trainer = _trainer(copy.deepcopy(base_model), train_micro_batch_size=2)
    reference = _offset_reference(base_model, pairs, pad)
    val = validation_metrics(trainer, pairs, reference, beta=0.7, sft_weight=0.3, pad_token_id=pad, distributed=Distributed())
    step = trainer.dpo_step(preference_batch(pairs, reference, pad_token_id=pad), beta=0.7, sft_weight=0.3)
    assert step["chosen_tokens"] == 0 and math.isfinite(val["validation/loss"])
    for key in ("loss", "preference_loss", "sft_loss", "rewards/margin"):
        assert val[f"validation/{key}"] == pytest.approx(step[key], abs=1e-6), key


def test_pair_logprobs_reports_the_pairs_it_scored(base_model, tokenizer, monkeypatch):
    """The reference pass's progress: one call per chunk of pairs, adding up to all of them."""
    pairs, done = _pairs(tokenizer), []
    trainer = _trainer(copy.deepcopy(base_model))
    whole = pair_logprobs(trainer, pairs, pad_token_id=tokenizer.pad_token_id, distributed=Distributed())
    monkeypatch.setattr("posttrain.loops.dpo.REFERENCE_CHUNK_PAIRS", 3)
    chunked = pair_logprobs(trainer, pairs, pad_token_id=tokenizer.pad_token_id, distributed=Distributed(), on_pairs=done.append)
    assert done == [3, 1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_a_non_finite_loss_skips_the_step(base_model, tokenizer):
    pairs = _pairs(tokenizer)
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    metrics = _trainer(model).dpo_step(preference_batch(pairs, torch.zeros((4, 2)), pad_token_id=0), beta=0.1, sft_weight=0.0)
    assert metrics["skipped_nonfinite_steps"] == 1.0 and metrics["consecutive_nonfinite_steps"] == 1.0
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) or torch.isnan(before[name]).all(), name


# ------------------------------------------------------------------------------------- recipes

TINY_TWIN = "recipes/tiny/dpo-gemma4-e2b-it-tiny.yaml"
QUICKSTART = "recipes/quickstart.yaml"


def test_dpo_recipes_need_preference_pairs_and_grpo_recipes_prompts():
    cfg = load_config(TINY_TWIN, RecipeConfig)
    assert cfg.algorithm == "dpo" and cfg.data.train.type == "arithmetic_preferences" and cfg.dpo.beta == 0.1
    with pytest.raises(ConfigError, match=r"algorithm dpo trains on preference pairs: data.train must be a preference source .* got type chat"):
        load_config(TINY_TWIN, RecipeConfig, ["data.train={type: chat, path: x.jsonl}"])
    with pytest.raises(ConfigError, match="warm_start is the supervised phase before RL; algorithm dpo"):
        load_config(TINY_TWIN, RecipeConfig, ["warm_start.enabled=true"])
    with pytest.raises(ConfigError, match="unset data.prompt_template"):
        load_config(TINY_TWIN, RecipeConfig, ["data.prompt_template='Q: {prompt}'"])
    with pytest.raises(ConfigError, match=r"data.validation: a preferences source holds preference pairs for algorithm: dpo"):
        load_config(QUICKSTART, RecipeConfig, ["data.validation={type: preferences, path: x.jsonl}"])


def test_wrong_dpo_settings_fail_at_load_time_with_their_key():
    with pytest.raises(ConfigError, match=r"dpo\.beta: .*greater than 0"):
        load_config(TINY_TWIN, RecipeConfig, ["dpo.beta=0"])
    with pytest.raises(ConfigError, match=r"dpo\.sft_weight: .*greater than or equal to 0"):
        load_config(TINY_TWIN, RecipeConfig, ["dpo.sft_weight=-1"])
    with pytest.raises(ConfigError, match=r"dpo.beat: unknown key.*did you mean 'beta'"):
        load_config(TINY_TWIN, RecipeConfig, ["dpo.beat=0.2"])
    with pytest.raises(ConfigError, match=r"data.train.chosen: unknown key.*did you mean 'chosen_key'"):
        load_config(TINY_TWIN, RecipeConfig, ["data.train={type: preferences, path: x.jsonl, chosen: good}"])


def test_the_planner_counts_two_sequences_per_pair_and_no_reference_copy():
    cfg = load_config(TINY_TWIN, RecipeConfig, ["policy.train_micro_batch_size=4", "loss_fn.reference_policy_kl_penalty=0.1"])
    assert micro_batch_tokens(cfg.policy, sequences_per_sample=2) == 2 * micro_batch_tokens(cfg.policy) == 2 * 4 * 48
    plan = plan_memory(cfg, gpus=1)
    assert plan.tokens_per_micro_batch == 2 * 4 * 48 and plan.reference_policy == 0 and plan.generation_slots >= 0


# --------------------------------------------------------------------------------- two processes

PAIRS = 8


def _random_pairs(count: int, seed: int) -> list[TokenizedPair]:
    """Pairs sharing a 3 to 8 token prompt, responses of 2 to 9 random tokens (unequal lengths)."""
    gen = torch.Generator().manual_seed(seed)
    random_ids = lambda low, high: torch.randint(3, 300, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen).tolist()  # noqa: E731
    pairs = []
    for index in range(count):
        prompt = random_ids(3, 9)
        chosen, rejected = (random_ids(2, 10) for _ in range(2))
        sequences = [TokenizedConversation(f"random:{index}", prompt + r, [0] * len(prompt) + [1] * len(r)) for r in (chosen, rejected)]
        pairs.append(TokenizedPair(f"random:{index}", *sequences))
    return pairs


def distributed_dpo_step(distributed: Distributed) -> dict:
    """Reference logprobs of 5 pairs (padded to a multiple of the ranks), one dpo_step on this rank's
    share of 8 pairs, and the full weights' gradients, gathered (on CPU)."""
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300))
    policy = PolicyConfig(
        precision="float32",
        train_global_batch_size=PAIRS // distributed.world_size,
        train_micro_batch_size=2,
        max_grad_norm=None,
        optimizer=OptimizerConfig(lr=1e-3, eps=1e-3),
    )
    trainer = PolicyTrainer(model, policy, LossConfig(), total_optimizer_steps=1, distributed=distributed)
    reference = pair_logprobs(trainer, _random_pairs(5, seed=1), pad_token_id=0, distributed=distributed)
    pairs = _random_pairs(PAIRS, seed=0)
    offsets = torch.linspace(-1.0, 1.0, 2 * PAIRS).view(PAIRS, 2)
    share = torch.tensor([i for i in range(PAIRS)])[distributed.rank :: distributed.world_size]
    batch = preference_batch(rank_pairs(pairs, distributed), offsets[share] - 20.0, pad_token_id=0)
    metrics = trainer.dpo_step(batch, beta=0.5, sft_weight=0.2)
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()  # noqa: E731
    gradients = {name: full(trainer.optimizer.state[p]["exp_avg"]) / 0.1 for name, p in trainer.model.named_parameters()}
    return {"metrics": metrics, "gradients": gradients, "reference": reference}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_take_the_one_process_step_and_reference_logprobs(tmp_path):
    """Each rank scores its share of the reference pairs (one filler copy, dropped) and trains on
    half the pairs; pair and token counts are all-reduced, so reference, loss, metrics and gradient
    are one process's."""
    expected = distributed_dpo_step(Distributed())
    out = tmp_path / "rank0.pt"
    sys.path.insert(0, str(Path(__file__).parent))
    from _dpo_worker import main  # noqa: PLC0415

    mp.start_processes(main, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    torch.testing.assert_close(got["reference"], expected["reference"], rtol=0, atol=1e-5)
    for key in ("loss", "preference_loss", "sft_loss", "rewards/margin", "rewards/accuracy", "pairs", "chosen_tokens"):
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], abs=1e-5), key
    assert got["metrics"]["grad_norm"] == pytest.approx(expected["metrics"]["grad_norm"], rel=1e-5)
    for name, gradient in got["gradients"].items():
        reference = expected["gradients"][name]
        torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()), msg=name)
