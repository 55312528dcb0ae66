"""Export trained weights as a Hugging Face model directory that plain transformers loads.

    export_hf(model, tokenizer, "out/", dtype="bfloat16")   # config.json, model.safetensors, tokenizer files
    export_run("runs/quickstart-1", "out/")                  # a run's latest checkpoint, rebuilt from its config

The directory holds `config.json`, `generation_config.json` (when the model generates), the
safetensors weights (sharded by transformers when large) and the tokenizer files. Weights are the
trainer's fp32 masters unless `dtype` says otherwise; tied weights (Gemma's lm_head and embeddings)
are saved once and stay tied on load. The directory is written under a temporary name and renamed
into place, so an interrupted export never leaves a directory that looks complete.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from posttrain.checkpoint.store import MODEL_FILE, STEP_PREFIX, checkpoint_problem, latest_checkpoint
from posttrain.config.loader import load_config
from posttrain.config.schema import RecipeConfig
from posttrain.models.loading import has_vision_tower, load_policy, load_processor, load_tokenizer

FINAL_MODEL_DIR = "final_model"  # under the run directory, written at the end of a run (checkpointing.export_final)
RUN_CONFIG = "config.yaml"  # the resolved recipe every run writes into its directory
ExportDtype = Literal["float32", "bfloat16"]
EXPORT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ExportError(ValueError):
    """The path to export is not a run directory or a complete checkpoint, or the output is taken."""


def _taken(out_dir: Path) -> bool:
    return out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))


def _cast_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors in `dtype`. Tensors that share storage (tied
    weights) share one converted tensor too, so that transformers still sees them as tied and
    saves them once."""
    converted: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    state_dict = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            state_dict[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in converted:
            converted[key] = tensor.to(dtype)
        state_dict[name] = converted[key]
    return state_dict


def export_hf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    dtype: ExportDtype = "float32",
    overwrite: bool = False,
    processor: ProcessorMixin | None = None,
) -> Path:
    """Write `model` (left unchanged) and `tokenizer` to `out_dir` as a Hugging Face directory;
    with a multimodal `processor`, its files too (what turns images into the model's inputs).

    `overwrite=False` refuses an `out_dir` that exists and is not empty; `True` replaces it (a
    run's own `final_model`, re-exported by a resumed run).
    """
    out_dir = Path(out_dir)
    if _taken(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; choose a new directory or remove it")
    torch_dtype = EXPORT_DTYPES[dtype]
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    state_dict = None if torch_dtype == torch.float32 else _cast_state_dict(model, torch_dtype)
    model.save_pretrained(tmp, state_dict=state_dict)
    if state_dict is not None:
        # save_pretrained records the dtype of the model it is called on (fp32 masters); the
        # weights written are `dtype`, and config.json says so, as from_pretrained(dtype="auto") reads it.
        config = copy.deepcopy(model.config)
        config.dtype = dtype
        config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def resolve_run(path: str | Path) -> tuple[Path, RecipeConfig, Path]:
    """(run directory, its recipe, checkpoint) for a run directory (its latest complete checkpoint)
    or for a `step_<n>` checkpoint in a run's default `checkpoints/` directory."""
    path = Path(path)
    if (path / RUN_CONFIG).is_file():
        cfg = load_config(path / RUN_CONFIG, RecipeConfig)
        checkpoint_dir = Path(cfg.checkpointing.checkpoint_dir or path / "checkpoints")
        checkpoint = latest_checkpoint(checkpoint_dir)
        if checkpoint is None:
            final = path / FINAL_MODEL_DIR
            also = f"; the run's final weights are already exported in {final}" if final.is_dir() else ""
            raise ExportError(f"{path}: no complete checkpoint under {checkpoint_dir}{also}")
        return path, cfg, checkpoint
    if path.name.startswith(STEP_PREFIX) and (path.parent.parent / RUN_CONFIG).is_file():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ExportError(f"{path} is not a complete checkpoint: {problem}")
        return path.parent.parent, load_config(path.parent.parent / RUN_CONFIG, RecipeConfig), path
    raise ExportError(
        f"{path} is neither a run directory (with {RUN_CONFIG}) nor a {STEP_PREFIX}<n> checkpoint in a run's "
        "checkpoints/ directory; for a checkpoint saved elsewhere (checkpointing.checkpoint_dir), pass the run directory"
    )


def export_run(path: str | Path, out_dir: str | Path, *, dtype: ExportDtype = "float32") -> tuple[Path, Path]:
    """Rebuild a run's policy from its saved recipe and initial model, load the checkpoint's
    weights and export it. Returns (the checkpoint exported, the output directory)."""
    out_dir = Path(out_dir)
    if _taken(out_dir):  # checked before loading anything
        raise ExportError(f"{out_dir} exists and is not empty; choose a new directory or remove it")
    run_dir, cfg, checkpoint = resolve_run(path)
    # As the run built it (loops/setup.py): a local checkpoint, or the tiny model saved in the run directory.
    model_dir = Path(cfg.policy.model_name) if cfg.policy.model_name else run_dir / "init_model"
    trust = cfg.policy.trust_remote_code
    model = load_policy(model_dir, text_only=cfg.policy.text_only, trust_remote_code=trust)
    load_model(model, str(checkpoint / MODEL_FILE), strict=True)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust)
    # a multimodal policy keeps its processor, as the run's own final export does (loops/setup.py)
    processor = load_processor(model_dir, trust_remote_code=trust) if has_vision_tower(model) else None
    return checkpoint, export_hf(model, tokenizer, out_dir, dtype=dtype, processor=processor)
