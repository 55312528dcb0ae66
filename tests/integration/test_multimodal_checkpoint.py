"""A multimodal Gemma 4 checkpoint (vision + audio towers) trained on text by the DAPO loop:
as the multimodal model with its towers frozen, and text-only (only the language model loaded)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from posttrain.checkpoint.store import checkpoint_steps
from posttrain.cli.main import QUICKSTART_RECIPE
from posttrain.config import RecipeConfig, load_config
from posttrain.data.arithmetic import arithmetic_samples
from posttrain.loops.grpo import run_grpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics
from posttrain.models.tiny import save_tiny_gemma4, train_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def multimodal_checkpoint(tmp_path_factory):
    samples = arithmetic_samples(300, seed=0, operation="max")
    corpus = [f"{s.prompt} {s.ground_truth}" for s in samples] + ["user model"]
    tokenizer = train_tokenizer(corpus, vocab_size=300, multimodal=True)
    path = tmp_path_factory.mktemp("mm")
    save_tiny_gemma4(path, tokenizer, seed=0, variant="e_series", multimodal=True)
    return path


@pytest.mark.parametrize("text_only", [False, True])
def test_dapo_on_a_multimodal_checkpoint(multimodal_checkpoint, tmp_path, text_only):
    overrides = [
        f"policy.model_name={multimodal_checkpoint}",
        "tiny_model=null",
        f"policy.text_only={str(text_only).lower()}",
        f"logger.log_dir={tmp_path}",
        "logger.progress=false",
        "warm_start.num_steps=5",
        "grpo.max_num_steps=2",
        "grpo.use_dynamic_sampling=false",
        "grpo.val_period=0",
        "grpo.val_at_end=false",
        "checkpointing.save_period=2",
    ]
    run_grpo(load_config(QUICKSTART_RECIPE, RecipeConfig, overrides), console=Console(enabled=False))
    steps = [r for r in read_metrics(tmp_path) if "train/reward" in r]
    assert len(steps) == 2
    assert all(abs(r["train/token_mult_prob_error"] - 1.0) < 1e-3 for r in steps)

    saved = load_file(tmp_path / "checkpoints" / f"step_{checkpoint_steps(tmp_path / 'checkpoints')[-1]}" / "model.safetensors")
    original = {}
    for file in multimodal_checkpoint.glob("*.safetensors"):
        original |= load_file(file)
    # the final export is a complete Hugging Face directory: a multimodal policy's processor beside it
    assert (tmp_path / "final_model" / "processor_config.json").is_file() is not text_only
    if text_only:  # only the language model was loaded and trained
        assert not any("tower" in k for k in saved)
        assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], original["model.language_model.layers.0.mlp.up_proj.weight"])
    else:  # the towers were frozen (the recipe freezes both) and the language model trained
        towers = [k for k in original if k.startswith(("model.vision_tower.", "model.audio_tower."))]
        assert towers and all(torch.equal(saved[k], original[k]) for k in towers)
        key = "model.language_model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(saved[key], original[key])
