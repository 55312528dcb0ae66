"""Vision-language GRPO end to end on CPU: the tiny VLM recipe (a tiny multimodal Gemma 4
counting shapes drawn with Pillow) through processor, rollout, scoring, logprobs and training;
groups of image and text-only prompts side by side; recipes that cannot take images fail before
any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# transformers < 5.21 imports Gemma 4's torchvision image processor from its processor module;
# torchvision must not be installed beside CPU torch. Newer transformers need only Pillow.
pytest.importorskip("transformers.models.gemma4.processing_gemma4", reason="Gemma 4 image processing needs torchvision on transformers < 5.21")

from posttrain.cli.main import RECIPES_DIR
from posttrain.config import RecipeConfig, load_config
from posttrain.config.schema import GRPOConfig
from posttrain.data.prompts import tokenize_multimodal_prompts
from posttrain.data.shapes import shape_count_samples
from posttrain.data.types import Sample
from posttrain.environments import build
from posttrain.loops.grpo import run_grpo, to_train_batch
from posttrain.loops.rollouts import PromptImages, generate_and_score
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics
from posttrain.models.loading import load_policy, load_processor
from posttrain.models.tiny import save_tiny_gemma4, train_tokenizer
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.torch_engine import TorchRolloutEngine
from posttrain.training.trainer import aligned_token_logprobs

pytestmark = pytest.mark.integration

VLM_RECIPE = RECIPES_DIR / "vlm" / "vlm_grpo-gemma4-tiny-shapes.yaml"


def vlm_config(log_dir: Path, *overrides: str) -> RecipeConfig:
    small = [
        f"logger.log_dir={log_dir}",
        "logger.progress=false",
        "data.train.size=200",
        "data.validation.size=16",
        "warm_start.num_steps=5",
        "grpo.max_num_steps=2",
        "grpo.val_period=2",
        "checkpointing.enabled=false",
        "checkpointing.export_final=false",
    ]
    return load_config(VLM_RECIPE, RecipeConfig, [*small, *overrides])


def test_vlm_recipe_trains_with_images_and_the_generator_matches_the_trainer(tmp_path):
    result = run_grpo(vlm_config(tmp_path / "run"), console=Console(enabled=False))
    steps = [r for r in read_metrics(result.log_dir) if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:  # fp32 generator and trainer on the same images: the same logprobs
        assert abs(record["train/token_mult_prob_error"] - 1.0) < 1e-5
        assert abs(record["train/gen_kl_error"]) < 1e-6
        assert record["train/grad_norm"] > 0
    assert sorted(result.validation_accuracy) == [0, 2]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tiny_model.multimodal=false"], "has no vision tower; use a multimodal checkpoint"),
        (["policy.sequence_packing=true"], "policy.sequence_packing is text-only"),
    ],
)
def test_image_data_with_a_text_model_or_packing_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_grpo(vlm_config(tmp_path / "run", *overrides), console=Console(enabled=False))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def multimodal_checkpoint(tmp_path_factory):
    samples = shape_count_samples(50, seed=0, max_count=3, image_sizes=[(24, 24)])
    tokenizer = train_tokenizer([s.prompt + " " + s.ground_truth for s in samples] + ["What is 2+3?"], vocab_size=300, multimodal=True)
    return save_tiny_gemma4(tmp_path_factory.mktemp("vlm"), tokenizer, seed=0, multimodal=True, audio=False)


def test_groups_mixing_image_and_text_prompts_train_on_their_own_images(multimodal_checkpoint):
    """Rows of image prompts (two sizes) and a text-only prompt: every row's training logprobs,
    with the images the groups name, equal what the generator reported."""
    model = load_policy(multimodal_checkpoint)
    processor = load_processor(multimodal_checkpoint)
    samples = [
        *shape_count_samples(2, seed=1, max_count=3, image_sizes=[(24, 24), (36, 24)]),
        Sample(prompt="What is 2+3?", ground_truth="5", metadata={}, origin="text:0"),
    ]
    prompts = tokenize_multimodal_prompts(samples, processor, template="{prompt}", max_prompt_tokens=60).prompts
    images = PromptImages(prompts)
    engine = TorchRolloutEngine(model, pad_token_id=processor.tokenizer.pad_token_id, dtype=torch.float32)
    groups, _ = generate_and_score(
        prompts,
        engine=engine,
        params=SamplingParams(temperature=1.0, max_new_tokens=5, seed=0),
        env=build("math"),
        tokenizer=processor.tokenizer,
        grpo=GRPOConfig(),
        num_generations=2,
        width=72,
        images=images,
    )
    assert groups["image_index"].tolist() == [[0, 0], [1, 1], [-1, -1]]
    cfg = load_config(VLM_RECIPE, RecipeConfig)
    batch = to_train_batch(groups, cfg, images)
    assert [m is not None for m in batch.images] == [True, True, True, True, False, False]
    assert batch.images[2] is prompts[1].multimodal
    with torch.no_grad():
        logprobs_BT = aligned_token_logprobs(model, batch, temperature=1.0)
    mask = batch.loss_mask_BT.bool()
    torch.testing.assert_close(logprobs_BT[mask], batch.gen_logprobs_BT[mask], rtol=0, atol=1e-5)
    # the images matter: a batch whose image rows see each other's images scores differently
    swapped = type(batch)(*batch._tensors(), images=(batch.images[2], batch.images[3], batch.images[0], batch.images[1], None, None))
    with torch.no_grad():
        other_BT = aligned_token_logprobs(model, swapped, temperature=1.0)
    assert float((other_BT[mask] - logprobs_BT[mask]).abs().max()) > 1e-4


def test_the_final_export_of_a_vision_run_carries_its_processor(tmp_path):
    """The exported directory loads as a multimodal policy with a processor that prepares images
    as the run's did."""
    cfg = vlm_config(tmp_path / "run", "grpo.max_num_steps=1", "grpo.val_period=0", "grpo.val_at_end=false", "checkpointing.export_final=true")
    run_grpo(cfg, console=Console(enabled=False))
    exported = tmp_path / "run" / "final_model"
    image = shape_count_samples(1, seed=5, max_count=3, image_sizes=[(36, 24)])[0].images[0]
    ours = load_processor(exported).image_processor([image], return_tensors="pt")
    theirs = load_processor(tmp_path / "run" / "init_model").image_processor([image], return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=0)
    assert getattr(load_policy(exported).config, "vision_config", None) is not None
