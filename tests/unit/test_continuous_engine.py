"""The continuous-batching engine's own parts: slot cache, masks, scheduling, precision layout and
parity with the trainer's logprobs on every tiny Gemma 4 variant and a Llama-style family.
(Behaviour shared with the torch engine is tested for both in test_rollout_engine.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from posttrain.models.logprobs import token_logprobs
from posttrain.models.tiny import tiny_gemma4_config, tiny_gemma4_multimodal_config
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.continuous_engine import (
    ContinuousBatchingEngine,
    key_length_bucket,
    slot_bucket,
)
from posttrain.rollout.sampling import first_stop_string_end
from posttrain.rollout.slot_attention import bidirectional_blocks, decode_mask, prefill_mask
from posttrain.rollout.slot_cache import ring_positions

pytestmark = pytest.mark.unit

TEMPERATURE = 0.9
# 12 prompts of 6..127 tokens: the longest cross the sliding window (8) many times over, and
# with 150 new tokens the sequences cross the 128 and 256 key-length buckets
LONG_PROMPTS = [[2] + [(7 * i + 3 * j) % 250 + 10 for j in range(5 + 11 * i)] for i in range(12)]


# -------------------------------------------------------------------------------- pure parts


def test_ring_positions_hold_the_latest_position_of_each_index():
    # ring 4, prompt of 6 tokens (positions 0..5): index 0 <- 4, 1 <- 5, 2 <- 2, 3 <- 3
    # prompt of 2 tokens: index 0 <- 0, 1 <- 1, indices 2 and 3 hold nothing yet (clamped to 0, masked)
    assert ring_positions(torch.tensor([6, 2]), 4).tolist() == [[4, 5, 2, 3], [0, 1, 0, 0]]


def test_decode_mask_sees_written_indices_only_until_the_ring_wraps():
    # position 2 in a ring of 4: indices 0..2; position 9: every index (the ring has wrapped)
    assert decode_mask(torch.tensor([2, 9]), 4)[:, 0, 0].tolist() == [
        [True, True, True, False],
        [True, True, True, True],
    ]


def test_prefill_mask_is_causal_windowed_and_inside_the_prompt():
    mask = prefill_mask(torch.tensor([4]), 5, window=2)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0],  # padding query: sees the window's prompt keys only
    ]


def test_prefill_mask_opens_bidirectional_blocks():
    is_image = torch.tensor([[False, True, True, False, True]])
    blocks = bidirectional_blocks(is_image)
    assert blocks.tolist() == [[0, 1, 1, 0, 2]]
    mask = prefill_mask(torch.tensor([5]), 5, window=None, bidirectional_blocks_NT=blocks)[0, 0].int().tolist()
    assert mask[1] == [1, 1, 1, 0, 0]  # the first image token sees the second (same block)
    assert mask[3] == [1, 1, 1, 1, 0]  # a text token stays causal
    assert mask[4] == [1, 1, 1, 1, 1]


def test_buckets():
    assert [slot_bucket(n, 256) for n in (1, 2, 3, 64, 65, 300)] == [1, 2, 4, 64, 128, 256]
    assert [key_length_bucket(p, 384) for p in (0, 127, 128, 300, 383)] == [128, 128, 256, 384, 384]


def test_first_stop_string_end_is_the_token_completing_the_string():
    pieces = {1: "The", 2: " answer", 3: " is", 4: " 4", 5: "2", 6: ".", 7: " Done"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert first_stop_string_end([1, 2, 3, 4, 5, 6, 7], decode, ("42.",)) == 6
    assert first_stop_string_end([1, 2, 3, 4, 5, 6, 7], decode, ("Done", "is")) == 3
    assert first_stop_string_end([1, 2, 3], decode, ("42",)) is None


# -------------------------------------------------------------------------------- parity


def _assert_parity(model, rollouts, temperature=TEMPERATURE, atol=1e-5):
    for rollout in rollouts:
        ids = rollout.prompt_token_ids + rollout.token_ids
        with torch.no_grad():
            lp_T1 = token_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), temperature=temperature)
        torch.testing.assert_close(
            torch.tensor(rollout.logprobs), lp_T1[0, len(rollout.prompt_token_ids) - 1 :], rtol=0, atol=atol
        )


@pytest.mark.parametrize("variant", ["basic", "dense", "moe", "e_series"])
def test_logprobs_equal_the_trainer_s_across_windows_buckets_and_admissions(variant):
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant=variant)).eval()
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="float32", max_batch_size=4, sync_every=5)
    stop_ids = (1, 17, 29)
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=150, stop_token_ids=stop_ids, seed=3)
    rollouts = engine.generate(LONG_PROMPTS, params)
    stats = engine.last_stats
    # preconditions: later prompts joined freed slots, the tail moved into fewer slots, and
    # decoding crossed key-length buckets
    assert stats.prefill_calls > 1
    assert stats.compactions >= 1
    assert stats.key_lengths[:2] == [128, 256]
    reasons = {r.finish_reason for r in rollouts}
    assert reasons == {"stop", "length"}
    for r in rollouts:
        assert (r.token_ids[-1] in stop_ids) == (r.finish_reason == "stop")
        assert r.finish_reason == "stop" or len(r.token_ids) == 150
    _assert_parity(model, rollouts)


def test_sliding_layers_keep_a_window_sized_ring_and_shared_layers_none():
    torch.manual_seed(0)
    config = tiny_gemma4_config(300, variant="e_series")
    engine = ContinuousBatchingEngine(Gemma4ForCausalLM(config), pad_token_id=0, precision="float32")
    engine.generate([[2, 3, 4]], SamplingParams(max_new_tokens=40, seed=0))
    cache = engine.cache
    for index, layer_type in enumerate(config.layer_types):
        if index >= config.num_hidden_layers - config.num_kv_shared_layers:
            assert index not in cache.keys  # KV-shared: reads the last non-shared layer's ring
        elif layer_type == "sliding_attention":
            assert cache.keys[index].shape[2] == config.sliding_window
        else:
            assert cache.keys[index].shape[2] == cache.max_len == 43


def test_a_llama_style_family_runs_through_the_generic_stack():
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config).eval()
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="float32", max_batch_size=4, sync_every=4)
    rollouts = engine.generate(LONG_PROMPTS[:7], SamplingParams(temperature=TEMPERATURE, max_new_tokens=20, seed=1))
    _assert_parity(model, rollouts)


# -------------------------------------------------------------------------------- weights


def test_bfloat16_autocast_layout_and_tied_head_refresh():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant="e_series"))
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="bfloat16_autocast")
    own = engine.model
    # matmul weights bf16; embeddings (incl. per-layer), norms fp32; the head untied, bf16
    assert own.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert own.model.embed_tokens.weight.dtype == torch.float32
    assert own.model.embed_tokens_per_layer.weight.dtype == torch.float32
    assert own.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert own.lm_head.weight.dtype == torch.bfloat16
    assert own.lm_head.weight.data_ptr() != own.model.embed_tokens.weight.data_ptr()
    # fp32 tensors are the trainer's own (not held twice), matmul weights are copies; the trainer
    # keeps training all of them
    shared = lambda name: own.get_parameter(name).data_ptr() == model.get_parameter(name).data_ptr()  # noqa: E731
    assert shared("model.embed_tokens_per_layer.weight") and shared("model.layers.0.input_layernorm.weight")
    assert not shared("model.layers.0.mlp.gate_proj.weight")
    assert all(p.requires_grad for p in model.parameters())
    # the trainer's tied embedding (named once) refreshes both the engine's embedding and its head
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
        model.model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    assert "lm_head.weight" not in dict(model.named_parameters())
    engine.refresh_weights(model.named_parameters())
    assert torch.equal(own.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(own.lm_head.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    assert torch.equal(own.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight.bfloat16())
    # the trainer's model is untouched: its attention is still transformers' own
    assert model.config._attn_implementation != engine.model.config._attn_implementation


def test_a_float32_engine_shares_every_weight_and_follows_an_optimizer_step():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant="e_series"))
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="float32", max_batch_size=4)
    trainer_ptrs = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in engine.model.parameters()} == trainer_ptrs
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=12, seed=0)
    before = engine.generate(LONG_PROMPTS[:3], params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([LONG_PROMPTS[2]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    engine.refresh_weights(model.named_parameters())  # nothing left to copy
    after = engine.generate(LONG_PROMPTS[:3], params)
    assert [r.logprobs for r in after] != [r.logprobs for r in before]
    _assert_parity(model.eval(), after)


def test_bfloat16_autocast_engine_matches_the_autocast_trainer_within_bf16_noise():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant="dense")).eval()
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="bfloat16_autocast", max_batch_size=4)
    rollouts = engine.generate(LONG_PROMPTS[:6], SamplingParams(temperature=1.0, max_new_tokens=12, seed=0))
    for rollout in rollouts:
        ids = rollout.prompt_token_ids + rollout.token_ids
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lp_T1 = token_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        torch.testing.assert_close(
            torch.tensor(rollout.logprobs), lp_T1[0, len(rollout.prompt_token_ids) - 1 :], rtol=0, atol=2e-2
        )


def test_text_only_engine_copies_no_tower_and_never_the_audio_tower():
    torch.manual_seed(0)
    text_config = tiny_gemma4_config(300, variant="e_series")
    model = Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(text_config))
    text_only = ContinuousBatchingEngine(model, pad_token_id=0, precision="float32")
    assert text_only.model.model.vision_tower is None and text_only.model.model.audio_tower is None
    with_images = ContinuousBatchingEngine(model, pad_token_id=0, precision="float32", language_model_only=False)
    assert with_images.model.model.vision_tower is not None and with_images.model.model.audio_tower is None
    # the trainer's model keeps both towers
    assert model.model.vision_tower is not None and model.model.audio_tower is not None
    # refresh skips what the engine does not hold
    text_only.refresh_weights(model.named_parameters())


# -------------------------------------------------------------------------------- stop strings, errors


def test_stop_strings_end_a_response_at_the_completing_token():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300)).eval()
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="float32", decode_text=decode, sync_every=4)
    free = engine.generate(LONG_PROMPTS[:4], SamplingParams(max_new_tokens=30, seed=5))
    # stop at the 5th token of each free-running response, via its text
    stops = tuple(f"<{r.token_ids[4]}>" for r in free)
    stopped = engine.generate(LONG_PROMPTS[:4], SamplingParams(max_new_tokens=30, seed=5, stop_strings=stops))
    for before, after in zip(free, stopped, strict=True):
        end = first_stop_string_end(before.token_ids, decode, stops)
        assert end is not None and end <= 5
        assert after.token_ids == before.token_ids[:end]
        assert after.logprobs == before.logprobs[:end]
        assert after.finish_reason == "stop"


def test_bad_requests_fail_clearly():
    model = Gemma4ForCausalLM(tiny_gemma4_config(300))
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="float32")
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[2, 3], []], SamplingParams())
    with pytest.raises(ValueError, match="decode_text"):
        engine.generate([[2, 3]], SamplingParams(stop_strings=("x",)))
    assert engine.generate([], SamplingParams()) == []


def test_released_weights_come_back_with_the_refresh():
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant="e_series"))
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="bfloat16_autocast", max_batch_size=4)
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=12, seed=0)
    before = engine.generate(LONG_PROMPTS[:3], params)
    shared = engine.model.model.embed_tokens_per_layer.weight
    engine.release_weights()
    # the bf16 copies are gone, the trainer's shared fp32 tensors stay
    assert engine.model.model.layers[0].mlp.gate_proj.weight.numel() == 0
    assert engine.model.lm_head.weight.numel() == 0
    assert shared.numel() > 0 and shared.data_ptr() == model.model.embed_tokens_per_layer.weight.data_ptr()
    with pytest.raises(RuntimeError, match="refresh_weights first"):
        engine.generate(LONG_PROMPTS[:3], params)
    with torch.no_grad():  # the trainer's step
        for parameter in model.parameters():
            parameter.mul_(1.5)
    engine.refresh_weights(model.named_parameters())
    gate = engine.model.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(gate, model.model.layers[0].mlp.gate_proj.weight.bfloat16())
    assert gate.storage_offset() % 64 == 0  # a 128-byte aligned view of the flat buffer
    after = engine.generate(LONG_PROMPTS[:3], params)
    fresh = ContinuousBatchingEngine(model, pad_token_id=0, precision="bfloat16_autocast", max_batch_size=4)
    assert [r.logprobs for r in after] == [r.logprobs for r in fresh.generate(LONG_PROMPTS[:3], params)]
    assert [r.logprobs for r in after] != [r.logprobs for r in before]
