"""Build everything a run needs from a validated recipe: model, tokenizer, data, env, engine."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.checkpoint.export import FINAL_MODEL_DIR, export_hf
from posttrain.config.loader import dump_config
from posttrain.config.schema import RecipeConfig
from posttrain.data.prompts import Prompt, PromptIterator, load_samples, tokenize_multimodal_prompts, tokenize_prompts
from posttrain.data.sources import BadRows
from posttrain.data.templates import render, resolve_template
from posttrain.data.types import Sample
from posttrain.environments import Environment, build
from posttrain.loops.rollouts import PromptImages
from posttrain.loops.warm_start import warm_start
from posttrain.metrics.console import Console
from posttrain.metrics.run_info import write_run_info
from posttrain.metrics.sinks import check_logger_packages
from posttrain.models.activation_checkpointing import enable_activation_checkpointing
from posttrain.models.freezing import apply_freeze_config
from posttrain.models.loading import has_vision_tower, load_policy, load_processor, load_tokenizer, stop_token_ids
from posttrain.models.registry import family_for
from posttrain.models.tiny import END_OF_TURN, save_random_preset, save_tiny_gemma4, train_tokenizer
from posttrain.rollout.base import RolloutEngine, SamplingParams
from posttrain.rollout.continuous_engine import ContinuousBatchingEngine
from posttrain.rollout.torch_engine import TorchRolloutEngine
from posttrain.training.distributed import Distributed, barrier

# generation.dtype -> (weight dtype of the generator copy, bf16 autocast)
GENERATOR_PRECISION = {
    "float32": (torch.float32, False),
    "bfloat16": (torch.bfloat16, False),
    "bfloat16_autocast": (torch.float32, True),
}


@dataclass
class RunParts:
    cfg: RecipeConfig
    log_dir: Path
    checkpoint_dir: Path
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    train_prompts: PromptIterator
    val_prompts: list[Prompt]
    env: Environment
    engine: RolloutEngine
    sampling_params: SamplingParams
    console: Console
    data_metrics: dict[str, float] = field(default_factory=dict)  # data/*: logged with the run's first record
    images: PromptImages | None = None  # the training prompts' images; None for text-only data
    processor: Any = None  # a multimodal policy's processor (prepares images; exported with the model)
    warm_start_losses: list[float] = field(default_factory=list)

    def run_warm_start(self) -> None:
        """Supervised warm start on the training prompts' answers (when enabled; SFT steps on a
        trainer and optimizer of its own, loops/warm_start.py), then sync the generator."""
        ws = self.cfg.warm_start
        if not ws.enabled:
            return
        end_of_turn = end_of_turn_id(self.tokenizer)
        self.console.start_progress("warm start (SFT)", total=ws.num_steps)
        self.warm_start_losses = warm_start(
            self.model,
            self.train_prompts.prompts,
            lambda prompt: str(prompt.sample.ground_truth),
            self.tokenizer,
            ws,
            self.cfg.policy,
            end_of_turn_id=end_of_turn,
            seed=self.cfg.grpo.seed,
            max_consecutive_nonfinite_steps=self.cfg.grpo.max_consecutive_nonfinite_steps,
            on_step=lambda step, loss: self.console.advance(f"loss {loss:.3f}"),
        )
        self.console.stop_progress()
        self.console.note(f"warm start: loss {self.warm_start_losses[0]:.3f} -> {self.warm_start_losses[-1]:.3f}")
        self.engine.refresh_weights(self.model.named_parameters())


def prompt_corpus(samples: list[Sample], template: str) -> list[str]:
    """The text of prompts and answers, for training a tiny model's tokenizer."""
    return [render(template, s.prompt) + " " + str(s.ground_truth) for s in samples]


def prepare_tiny_model(cfg: RecipeConfig, corpus: list[str], out_dir: Path) -> Path:
    """Train a tokenizer on the task's text (`corpus`) and save a random-init tiny Gemma 4 (once per run dir).

    Written to a temporary directory and renamed into place, so a process killed mid-write never
    leaves a half-written model that every later resume would trip over."""
    if (out_dir / "config.json").is_file():
        return out_dir
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tiny = cfg.tiny_model
    corpus = [*corpus, "user model"]  # the chat template's role names
    tokenizer = train_tokenizer(corpus, vocab_size=tiny.tokenizer_vocab_size(), multimodal=tiny.multimodal)
    if tiny.preset is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"  # initializing billions of weights on a CPU takes minutes
        save_random_preset(
            tmp_dir, tokenizer, tiny.preset, seed=tiny.seed, multimodal=tiny.multimodal, num_hidden_layers=tiny.preset_layers, device=device
        )
        os.replace(tmp_dir, out_dir)
        return out_dir
    save_tiny_gemma4(tmp_dir, tokenizer, seed=tiny.seed, multimodal=tiny.multimodal, **tiny.dimensions())
    os.replace(tmp_dir, out_dir)
    return out_dir


@dataclass(frozen=True)
class LoadedData:
    """Every sample of the run, read before any model is built so that data problems fail fast."""

    template: str  # data.prompt_template, or the file data.prompt_template_file names
    train: list[Sample]
    validation: list[Sample]  # the first max_val_samples of the algorithm's section
    skipped_rows: list[str]  # messages of the malformed rows skipped (data.on_bad_row: skip)


def load_data(cfg: RecipeConfig) -> LoadedData:
    data = cfg.data
    template = resolve_template(data.prompt_template, data.prompt_template_file)
    bad_rows = BadRows(data.on_bad_row)
    train = load_samples(data.train, split="train", bad_rows=bad_rows)
    validation: list[Sample] = []
    if data.validation is not None:
        max_val_samples = {"grpo": cfg.grpo, "sft": cfg.sft}[cfg.algorithm].max_val_samples
        validation = load_samples(data.validation, split="validation", bad_rows=bad_rows)[:max_val_samples]
    return LoadedData(template=template, train=train, validation=validation, skipped_rows=bad_rows.skipped)


def prepare_run_dir(cfg: RecipeConfig, distributed: Distributed) -> tuple[Path, Path]:
    """The run directory (created, with the resolved recipe as config.yaml and what it runs on as
    environment.json) and the checkpoint directory. An enabled logger's missing package fails here."""
    check_logger_packages(cfg.logger)
    log_dir = Path(cfg.logger.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main:
        (log_dir / "config.yaml").write_text(dump_config(cfg))
        write_run_info(log_dir, distributed.world_size)
    return log_dir, Path(cfg.checkpointing.checkpoint_dir or log_dir / "checkpoints")


def model_directory(
    cfg: RecipeConfig,
    train_samples: list[Sample],
    log_dir: Path,
    distributed: Distributed,
    *,
    corpus_of: Callable[[list[Sample]], list[str]],
) -> Path:
    """The checkpoint the policy loads from: policy.model_name, or the run's tiny model, built
    once (by rank 0) with a tokenizer trained on `corpus_of(the first training samples)`."""
    if cfg.policy.model_name:
        return Path(cfg.policy.model_name)
    model_dir = log_dir / "init_model"
    if distributed.is_main:
        prepare_tiny_model(cfg, corpus_of(train_samples[: cfg.tiny_model.tokenizer_corpus_size]), model_dir)
    barrier(distributed)
    return model_dir


def load_trainable_policy(
    cfg: RecipeConfig, model_dir: Path, console: Console, distributed: Distributed
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """The policy on its device (frozen parts and activation checkpointing as the recipe says),
    its tokenizer, and the device."""
    device = cfg.policy.device if cfg.policy.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and distributed.enabled:
        device = f"cuda:{torch.cuda.current_device()}"  # init_distributed set this rank's device
    trust = cfg.policy.trust_remote_code
    model = load_policy(model_dir, text_only=cfg.policy.text_only, trust_remote_code=trust).to(device)
    console.note(apply_freeze_config(model, cfg.policy.freeze_config).describe())
    if cfg.policy.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model, load_tokenizer(model_dir, trust_remote_code=trust), device


def tokenize_data(
    cfg: RecipeConfig, data: LoadedData, tokenizer: PreTrainedTokenizerBase, console: Console, processor=None
) -> tuple[list[Prompt], list[Prompt], dict[str, float]]:
    """Training and validation prompts, and the data/* metrics; skipped rows and prompts dropped
    for length are noted on the console. With a `processor` (data with images) prompts go through
    it: images become soft-token placeholders and pixel tensors."""
    max_prompt = cfg.policy.max_total_sequence_length - cfg.policy.generation.max_new_tokens
    if processor is not None:
        tokenize = partial(tokenize_multimodal_prompts, processor=processor, template=data.template, max_prompt_tokens=max_prompt)
    else:
        tokenize = partial(tokenize_prompts, tokenizer=tokenizer, template=data.template, max_prompt_tokens=max_prompt)
    train, val = tokenize(data.train), tokenize(data.validation)
    note_skipped_rows(data, console)
    dropped = train.dropped + val.dropped
    if dropped:
        console.note(
            f"data: dropped {len(train.dropped)} training and {len(val.dropped)} validation prompts longer than "
            f"{max_prompt} tokens (policy.max_total_sequence_length - policy.generation.max_new_tokens), first: "
            f"{', '.join(dropped[:5])}"
        )
    metrics = {
        "data/train_prompts": float(len(train.prompts)),
        "data/validation_prompts": float(len(val.prompts)),
        "data/dropped_long_prompts": float(len(dropped)),
        "data/skipped_bad_rows": float(len(data.skipped_rows)),
    }
    return train.prompts, val.prompts, metrics


def export_final_model(parts: Any, cfg: RecipeConfig, console: Console) -> None:
    """The run's final weights (and tokenizer, and processor if any) as a Hugging Face directory
    <log_dir>/final_model: this run's own, so a resumed or re-run run replaces it. `parts`: any
    loop's parts (model, tokenizer, processor, log_dir)."""
    out = parts.log_dir / FINAL_MODEL_DIR
    export_hf(parts.model, parts.tokenizer, out, dtype=cfg.checkpointing.export_dtype, overwrite=True, processor=parts.processor)
    console.note(f"final weights exported to {out} (a Hugging Face directory)")


def note_skipped_rows(data: LoadedData, console: Console) -> None:
    if data.skipped_rows:
        first = "; ".join(data.skipped_rows[:3])
        console.note(f"data: skipped {len(data.skipped_rows)} malformed rows (data.on_bad_row: skip), first: {first}")


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an assistant turn: Gemma 4's `<turn|>` where the vocabulary has it, else
    the tokenizer's eos (Qwen's `<|im_end|>`)."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return token_id if token_id is not None and token_id != tokenizer.unk_token_id else tokenizer.eos_token_id


def build_engine(
    cfg: RecipeConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: str, *, images: bool = False
) -> RolloutEngine:
    """The recipe's rollout engine (policy.generation.backend; auto: continuous on CUDA, torch on
    CPU). `images`: the data has images, so the generator keeps the vision tower."""
    gen = cfg.policy.generation
    backend = gen.backend if gen.backend != "auto" else ("continuous" if device.startswith("cuda") else "torch")
    family = family_for(model.config)
    if images and backend == "continuous" and not family.continuous_engine_images:
        if gen.backend == "continuous":
            raise ValueError(
                f"policy.generation.backend: the continuous engine takes images for Gemma 4 only, not {type(model).__name__} "
                f"(family {family.name}); use backend torch (or auto)"
            )
        backend = "torch"  # auto: the engine that takes this family's images
    decode_text = partial(tokenizer.decode, skip_special_tokens=False)
    if backend == "continuous":
        return ContinuousBatchingEngine(
            model,
            pad_token_id=tokenizer.pad_token_id,
            precision="bfloat16_autocast" if gen.dtype == "auto" else gen.dtype,
            max_batch_size=gen.max_batch_size,
            language_model_only=not images,
            compile=gen.compile,
            decode_text=decode_text,
        )
    weight_dtype, autocast = GENERATOR_PRECISION["bfloat16" if gen.dtype == "auto" else gen.dtype]
    return TorchRolloutEngine(
        model,
        pad_token_id=tokenizer.pad_token_id,
        dtype=weight_dtype,
        autocast=autocast,
        max_batch_size=gen.max_batch_size,
        decode_text=decode_text,
    )


def build_run(cfg: RecipeConfig, *, console: Console, distributed: Distributed | None = None) -> RunParts:
    """Everything a run needs. Under torchrun every rank builds the same parts (rank 0 writes the
    run directory's files; the others wait for them) on its own device."""
    distributed = distributed or Distributed()
    log_dir, checkpoint_dir = prepare_run_dir(cfg, distributed)
    torch.manual_seed(cfg.grpo.seed)

    data = load_data(cfg)
    model_dir = model_directory(cfg, data.train, log_dir, distributed, corpus_of=partial(prompt_corpus, template=data.template))
    model, tokenizer, device = load_trainable_policy(cfg, model_dir, console, distributed)
    trust = cfg.policy.trust_remote_code
    with_images = any(s.images for s in (*data.train, *data.validation))
    if with_images:
        check_image_recipe(cfg, model)
    # a multimodal policy's processor: it prepares the images, and the final export carries it
    processor = load_processor(model_dir, trust_remote_code=trust) if has_vision_tower(model) else None
    train, val, data_metrics = tokenize_data(cfg, data, tokenizer, console, processor if with_images else None)

    engine = build_engine(cfg, model, tokenizer, device, images=with_images)
    gen = cfg.policy.generation
    sampling = SamplingParams(
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens,
        stop_token_ids=tuple(gen.stop_token_ids) if gen.stop_token_ids is not None else stop_token_ids(model),
        stop_strings=tuple(gen.stop_strings),
    )
    return RunParts(
        cfg=cfg,
        log_dir=log_dir,
        checkpoint_dir=checkpoint_dir,
        model=model,
        tokenizer=tokenizer,
        train_prompts=PromptIterator(train, seed=cfg.grpo.seed, shuffle=cfg.data.shuffle),
        val_prompts=val,
        env=build(cfg.env.name, **cfg.env.options),
        engine=engine,
        sampling_params=sampling,
        console=console,
        data_metrics=data_metrics,
        images=PromptImages(train) if with_images else None,
        processor=processor,
    )


def check_image_recipe(cfg: RecipeConfig, model: torch.nn.Module) -> None:
    """Data with images needs a model that sees them and padded rows (packing is text-only)."""
    if not has_vision_tower(model):
        hint = (
            "set policy.text_only: false" if cfg.policy.text_only else "use a multimodal checkpoint (or tiny_model.multimodal: true)"
        )
        raise ValueError(f"the data has images but the policy {type(model).__name__} has no vision tower; {hint}")
    if cfg.policy.sequence_packing:
        raise ValueError("the data has images: policy.sequence_packing is text-only; set it to false")
