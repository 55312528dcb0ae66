"""A plain PyTorch rollout engine: batched sampling with a KV cache on a copy of the policy.

Correctness first: one batch of left-padded prompts, one decode step per token for the whole
batch, finished rows keep decoding padding until all rows end. It runs transformers' own model
forward, so every architecture transformers supports (Gemma 4's mixed head sizes, sliding
windows, KV sharing) is handled by the reference implementation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from transformers import DynamicCache

from posttrain.models.logprobs import position_ids_from_mask
from posttrain.rollout.base import Rollout, SamplingParams


def truncate_logits(logits_BV: torch.Tensor, top_p: float, top_k: int | None) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf. The most likely token is always kept."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_value_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_value_B1, float("-inf"))
    if top_p < 1.0:
        sorted_logits_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        sorted_probs_BV = torch.softmax(sorted_logits_BV, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        mass_before_BV = sorted_probs_BV.cumsum(dim=-1) - sorted_probs_BV
        drop_sorted_BV = mass_before_BV >= top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


class TorchRolloutEngine:
    """Holds its own copy of the policy in `dtype` and samples from it."""

    def __init__(self, model: torch.nn.Module, *, pad_token_id: int, dtype: torch.dtype, max_batch_size: int = 256):
        self.model = copy.deepcopy(model).to(dtype).eval()
        self.model.requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size

    @torch.no_grad()
    def refresh_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        own = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            own[name].copy_(tensor)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        generator = torch.Generator(device=self._device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()  # non-deterministic, and leaves torch's global RNG alone
        rollouts: list[Rollout] = []
        for start in range(0, len(prompts), self.max_batch_size):
            rollouts += self._generate_batch(prompts[start : start + self.max_batch_size], params, generator)
        return rollouts

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Rollout]:
        batch_size, prompt_width = len(prompts), max(len(p) for p in prompts)
        input_ids_BT = torch.full((batch_size, prompt_width), self.pad_token_id, dtype=torch.long)
        attention_mask_BT = torch.zeros((batch_size, prompt_width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row's next token is at the end
            input_ids_BT[row, prompt_width - len(prompt) :] = torch.tensor(prompt)
            attention_mask_BT[row, prompt_width - len(prompt) :] = 1
        input_ids_BT, attention_mask_BT = input_ids_BT.to(self._device), attention_mask_BT.to(self._device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self._device)

        cache = DynamicCache(config=self.model.config)
        step_input_BT, step_positions_BT = input_ids_BT, position_ids_from_mask(attention_mask_BT)
        finished_B = torch.zeros(batch_size, dtype=torch.bool, device=self._device)
        stopped_B = torch.zeros(batch_size, dtype=torch.bool, device=self._device)
        tokens, logprobs = [], []
        for step in range(params.max_new_tokens):
            # The cache goes in 4th position: transformers renamed the keyword from
            # `past_key_values` (<= 5.23) to `cache` (5.24+); the position is the same in both.
            logits_BV = self.model(
                step_input_BT, attention_mask_BT, step_positions_BT, cache, use_cache=True
            ).logits[:, -1].float() / params.temperature
            logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
            sampling_logits_BV = truncate_logits(logits_BV, params.top_p, params.top_k)
            if step < params.min_new_tokens and len(stop_ids):
                sampling_logits_BV[:, stop_ids] = float("-inf")
            probs_BV = torch.softmax(sampling_logits_BV, dim=-1)
            next_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
            next_B = next_B.masked_fill(finished_B, self.pad_token_id)
            tokens.append(next_B)
            logprobs.append(logprobs_BV.gather(-1, next_B.unsqueeze(-1)).squeeze(-1))
            is_stop_B = torch.isin(next_B, stop_ids) & ~finished_B
            stopped_B |= is_stop_B
            finished_B |= is_stop_B
            if bool(finished_B.all()):
                break
            attention_mask_BT = torch.cat([attention_mask_BT, (~finished_B | is_stop_B).long().unsqueeze(-1)], dim=-1)
            step_positions_BT = step_positions_BT[:, -1:] + 1
            step_input_BT = next_B.unsqueeze(-1)

        tokens_BN = torch.stack(tokens, dim=1).cpu()
        logprobs_BN = torch.stack(logprobs, dim=1).cpu()
        return [
            self._to_rollout(prompt, tokens_BN[row], logprobs_BN[row], bool(stopped_B[row]), params.stop_token_ids)
            for row, prompt in enumerate(prompts)
        ]

    @staticmethod
    def _to_rollout(
        prompt: list[int], tokens_N: torch.Tensor, logprobs_N: torch.Tensor, stopped: bool, stop_ids: tuple[int, ...]
    ) -> Rollout:
        token_ids = tokens_N.tolist()
        if stopped:
            length = next(i for i, t in enumerate(token_ids) if t in stop_ids) + 1
        else:
            length = len(token_ids)
        return Rollout(
            prompt_token_ids=list(prompt),
            token_ids=token_ids[:length],
            logprobs=logprobs_N[:length].tolist(),
            finish_reason="stop" if stopped else "length",
        )
