"""A plain PyTorch rollout engine: batched sampling with a KV cache on a copy of the policy.

Correctness first: one batch of left-padded prompts, one decode step per token for the whole
batch, finished rows keep decoding padding until all rows end. It runs transformers' own model
forward, so every architecture transformers supports (Gemma 4's mixed head sizes, sliding
windows, KV sharing) is handled by the reference implementation. Multimodal prompts (images)
go through the prefill step; the multimodal placeholder tokens of the model's family are never
sampled.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable

import torch
from transformers import DynamicCache

from posttrain.models.document_attention import is_document_attention
from posttrain.models.logprobs import forward_inputs
from posttrain.models.registry import family_for
from posttrain.rollout.base import MultimodalPrompt, Rollout, SamplingParams, check_request, image_inputs
from posttrain.rollout.sampling import first_stop_string_end, truncate_logits


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's KV-cache keyword: transformers 5.24 renamed `past_key_values` to `cache`
    (the old name is deprecated until 5.40); the device image runs 5.17."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class TorchRolloutEngine:
    """Holds its own copy of the policy in `dtype` and samples from it."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        dtype: torch.dtype,
        autocast: bool = False,
        max_batch_size: int = 256,
        decode_text: Callable[[list[int]], str] | None = None,
    ):
        """`dtype`: the weight copy's dtype. `autocast`: sample under bf16 autocast (with fp32 weights,
        the trainer's numerics: bf16 matmuls, fp32 residual stream and norms)."""
        self.decode_text = decode_text  # token ids -> text, for stop strings
        self.model = copy.deepcopy(model).to(dtype).eval()
        if is_document_attention(self.model.config.get_text_config()._attn_implementation):  # training-only kernels
            self.model.set_attn_implementation("sdpa")
        self.autocast = autocast
        self.model.requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.cache_keyword = cache_keyword(self.model)
        self.never_sampled_ids = family_for(self.model.config).placeholder_token_ids(self.model.config)

    @torch.no_grad()
    def refresh_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        own = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if hasattr(tensor, "full_tensor"):  # an FSDP2 shard: gather it in this copy's dtype
                tensor = tensor.to(own[name].dtype).full_tensor()
            own[name].copy_(tensor)

    def release_weights(self) -> None:
        """Nothing: the correctness-first engine keeps its copy."""

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        multimodal: list[MultimodalPrompt | None] | None = None,
        on_finished: Callable[[int, Rollout], None] | None = None,
    ) -> list[Rollout]:
        """One response per prompt, in order. `multimodal[i]` holds prompt i's images (None: text
        only); `on_finished(i, rollout)` runs for each response at the end (a static batch)."""
        check_request(prompts, params, multimodal, self.decode_text)
        generator = torch.Generator(device=self._device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()  # non-deterministic, and leaves torch's global RNG alone
        rollouts: list[Rollout] = []
        for start in range(0, len(prompts), self.max_batch_size):
            stop = start + self.max_batch_size
            batch_multimodal = multimodal[start:stop] if multimodal is not None else None
            with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self.autocast):
                rollouts += self._generate_batch(prompts[start:stop], params, generator, batch_multimodal)
        if params.stop_strings:
            rollouts = [self._cut_at_stop_string(r, params.stop_strings) for r in rollouts]
        for index, rollout in enumerate(rollouts):
            if on_finished is not None:
                on_finished(index, rollout)
        return rollouts

    def _cut_at_stop_string(self, rollout: Rollout, stop_strings: tuple[str, ...]) -> Rollout:
        """Stop strings are applied after decoding (this engine decodes to max_new_tokens or a stop token)."""
        end = first_stop_string_end(rollout.token_ids, self.decode_text, stop_strings)
        if end is None:
            return rollout
        return Rollout(rollout.prompt_token_ids, rollout.token_ids[:end], rollout.logprobs[:end], "stop")

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _generate_batch(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator,
        multimodal: list[MultimodalPrompt | None] | None,
    ) -> list[Rollout]:
        batch_size, prompt_width = len(prompts), max(len(p) for p in prompts)
        input_ids_BT = torch.full((batch_size, prompt_width), self.pad_token_id, dtype=torch.long)
        attention_mask_BT = torch.zeros((batch_size, prompt_width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row's next token is at the end
            input_ids_BT[row, prompt_width - len(prompt) :] = torch.tensor(prompt)
            attention_mask_BT[row, prompt_width - len(prompt) :] = 1
        input_ids_BT, attention_mask_BT = input_ids_BT.to(self._device), attention_mask_BT.to(self._device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self._device)
        never_sampled_ids = torch.tensor(self.never_sampled_ids, dtype=torch.long, device=self._device)

        cache = DynamicCache(config=self.model.config)
        step_inputs = forward_inputs(
            self.model, input_ids_BT, attention_mask_BT, self._batch_multimodal(multimodal)
        )
        step_positions_BT = step_inputs["position_ids"]
        finished_B = torch.zeros(batch_size, dtype=torch.bool, device=self._device)
        stopped_B = torch.zeros(batch_size, dtype=torch.bool, device=self._device)
        tokens, logprobs = [], []
        for step in range(params.max_new_tokens):
            step_inputs[self.cache_keyword] = cache
            logits_BV = self.model(**step_inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
            logits_BV = logits_BV.float() / params.temperature
            logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
            sampling_logits_BV = truncate_logits(logits_BV, params.top_p, params.top_k)
            if len(never_sampled_ids):
                sampling_logits_BV[:, never_sampled_ids] = float("-inf")
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
            step_positions_BT = step_positions_BT[..., -1:] + 1  # [B, 1], or [3, B, 1] multimodal rotary positions
            # Decode steps are text: no images, and no mm_token_type_ids (Gemma 4 reads them by
            # position for the bidirectional image mask, which only the prefill needs).
            step_inputs = {
                "input_ids": next_B.unsqueeze(-1),
                "attention_mask": attention_mask_BT,
                "position_ids": step_positions_BT,
            }

        tokens_BN = torch.stack(tokens, dim=1).cpu()
        logprobs_BN = torch.stack(logprobs, dim=1).cpu()
        return [
            self._to_rollout(prompt, tokens_BN[row], logprobs_BN[row], bool(stopped_B[row]), params.stop_token_ids)
            for row, prompt in enumerate(prompts)
        ]

    def _batch_multimodal(self, multimodal: list[MultimodalPrompt | None] | None) -> dict:
        """The rows' images concatenated in row order (the order of their placeholders in the batch)."""
        return image_inputs(multimodal or [], device=self._device, dtype=self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

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
