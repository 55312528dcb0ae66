"""TRL's GRPOTrainer on dapo_step.py's workload, for the comparison a user would make.

Benchmark-only: TRL is never a posttrain dependency. On the device it is carried as wheels (with
`datasets`' missing dependencies); here `pip install trl` beside posttrain.

The same checkpoint (fp32 master weights, bf16 autocast through accelerate), the same prompts
(chat-rendered arithmetic, the math reward), 8 prompts x 8 generations x 256 new tokens with stop
tokens ignored (`min_new_tokens`), beta 0, DAPO's loss and clip-higher (`loss_type="dapo"`,
epsilon 0.2 / 0.28), gradient checkpointing, one optimizer step per generation batch (micro-batches
of `micro_batch` rows accumulated), transformers' `generate` for rollouts (TRL's default without
vLLM). Differences that remain are TRL's own: no sequence packing, no truncated importance-sampling
correction (it has no generator logprobs without vLLM), no overlong shaping; none of them is
expensive, and posttrain does each of them on top.

A step is timed from TrainerCallback.on_step_begin to on_step_end with the device synchronized at
both ends: generation, reward, logprobs, the accumulated backward passes and the optimizer step.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from posttrain.data.arithmetic import arithmetic_samples
from posttrain.environments.math import math_verify_reward

GIB = 2**30


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_trl_grpo(checkpoint: Path, output_dir: Path, *, prompts: int, generations: int, new_tokens: int, micro_batch: int, steps: int) -> dict:
    """TRL's GRPO steps on `checkpoint`; returns step seconds, peak memory and TRL's version."""
    import trl  # noqa: PLC0415 (benchmark-only dependency)
    from datasets import Dataset  # noqa: PLC0415
    from transformers import AutoTokenizer, TrainerCallback  # noqa: PLC0415

    samples = arithmetic_samples(prompts * (steps + 1), seed=0, operation="max", num_terms=2, max_value=99)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": s.prompt}], "answer": str(s.ground_truth)} for s in samples]
    )

    def reward(completions, answer, **_):
        return [math_verify_reward(c[0]["content"], a, timeout_s=None) for c, a in zip(completions, answer, strict=True)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize()
            self.seconds.append(time.perf_counter() - self.start)

    on_gpu = torch.cuda.is_available()
    rows = prompts * generations
    config = trl.GRPOConfig(
        output_dir=str(output_dir),
        model_init_kwargs={"dtype": torch.float32},
        bf16=on_gpu,
        use_cpu=not on_gpu,
        learning_rate=1e-6,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=rows // micro_batch,  # one optimizer step per generation batch
        num_generations=generations,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},  # stop tokens ignored, as in posttrain's run
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = trl.GRPOTrainer(
        model=str(checkpoint),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / GIB if on_gpu else None
    logged = [record for record in trainer.state.log_history if "completions/mean_length" in record]
    del trainer
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return {
        "trl_version": trl.__version__,
        "step_seconds": timer.seconds,
        "peak_gib": peak,
        # the workload check: every completion new_tokens long, as in posttrain's run
        "completion_mean_length": [record["completions/mean_length"] for record in logged],
        "loss": [record.get("loss") for record in logged],
    }
