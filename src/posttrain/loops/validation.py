"""Held-out accuracy: one sampled response per validation prompt, scored by the run's environment."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from posttrain.config.schema import RecipeConfig
from posttrain.environments import scoring_metadata

if TYPE_CHECKING:
    from posttrain.loops.setup import RunParts


def validate(parts: RunParts, cfg: RecipeConfig, *, step: int) -> dict[str, float]:
    start = time.perf_counter()
    temperature = cfg.grpo.val_temperature
    params = replace(parts.sampling_params, seed=cfg.grpo.seed + 7_919)  # the same draws at every validation
    if temperature is not None:
        # Greedy (0) is sampling at a vanishing temperature: the argmax token, always.
        params = replace(params, temperature=temperature if temperature > 0 else 1e-6)
    prompts = parts.val_prompts
    multimodal = [p.multimodal for p in prompts] if parts.images is not None else None
    parts.console.phase("validation", total=len(prompts))
    rollouts = parts.engine.generate(
        [p.token_ids for p in prompts], params, multimodal, on_finished=lambda _, r: parts.console.phase_advance(tokens=len(r.token_ids))
    )
    responses = [parts.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rollouts]
    rewards = torch.tensor(
        parts.env.score([p.text for p in prompts], responses, [scoring_metadata(p.sample) for p in prompts]),
        dtype=torch.float32,
    )
    parts.env.pop_metrics()
    for prompt, response, reward in list(zip(prompts, responses, rewards.tolist()))[: cfg.logger.num_val_samples_to_print]:
        parts.console.note(f"[val step {step}] {prompt.text!r} -> {response!r} (reward {reward:g})")
    return {
        "validation/accuracy": float((rewards >= 1.0).float().mean()),
        "validation/mean_reward": float(rewards.mean()),
        "validation/mean_gen_tokens": sum(len(r.token_ids) for r in rollouts) / len(rollouts),
        "timing/validation": time.perf_counter() - start,
    }
