"""The vision-language path is not Gemma-only: a tiny Qwen2.5-VL (transformers' implementation,
random init, tokenizer and processor built locally) runs the VLM recipe's loop through the generic
family entry: its vision tower loads the checkpoint's weights, multimodal rotary positions come
from the model, and the generator's logprobs equal the trainer's in fp32."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

# the tiny processor uses Qwen2-VL's PIL image processor (newer transformers; older ones need torchvision)
pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl", reason="Qwen2-VL's PIL image processor")

from posttrain.cli.main import RECIPES_DIR
from posttrain.config import RecipeConfig, load_config
from posttrain.data.prompts import tokenize_multimodal_prompts
from posttrain.data.shapes import shape_count_samples
from posttrain.data.types import Sample
from posttrain.loops.grpo import run_grpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics
from posttrain.models.loading import CheckpointMismatchError, load_policy, load_processor
from posttrain.models.logprobs import logprobs_from_logits, token_logprobs
from posttrain.models.registry import family_for
from posttrain.models.tiny_qwen2_5_vl import save_tiny_qwen2_5_vl
from posttrain.rollout.base import image_inputs

pytestmark = pytest.mark.integration

VLM_RECIPE = RECIPES_DIR / "vlm" / "vlm_grpo-gemma4-tiny-shapes.yaml"


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    samples = shape_count_samples(50, seed=0, max_count=3, image_sizes=[(24, 24)])
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen"), [s.prompt + " " + s.ground_truth for s in samples])


def test_the_generic_family_loads_the_real_vision_tower(qwen_checkpoint, tmp_path):
    model = load_policy(qwen_checkpoint)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and family_for(model.config).name == "generic"
    saved = load_file(qwen_checkpoint / "model.safetensors")
    visual = {k: v for k, v in saved.items() if ".visual." in k or k.startswith("visual.")}
    assert visual
    own = dict(model.named_parameters())
    for key, tensor in visual.items():
        name = key if key in own else "model." + key.removeprefix("model.")
        assert torch.equal(own[name], tensor), key
    assert type(load_processor(qwen_checkpoint)).__name__ == "Qwen2_5_VLProcessorWithoutVideo"
    # a checkpoint key that maps to nothing is an error, never a silently random tower
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in qwen_checkpoint.iterdir():
        if path.name != "model.safetensors":
            (broken / path.name).write_bytes(path.read_bytes())
    renamed = {k.replace("visual.blocks.0.", "visual.block0."): v for k, v in saved.items()}
    save_file(renamed, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="visual"):
        load_policy(broken)


def test_the_vlm_recipe_runs_a_tiny_qwen2_5_vl_with_fp32_parity(qwen_checkpoint, tmp_path):
    overrides = [
        f"policy.model_name={qwen_checkpoint}",
        "tiny_model=null",
        f"logger.log_dir={tmp_path / 'run'}",
        "logger.progress=false",
        "data.train.size=64",
        "data.validation.size=8",
        "warm_start.num_steps=3",
        "warm_start.lr=3.0e-3",  # three steps teach the answer format, so rewards vary (the demo's 3e-4 needs more)
        "grpo.num_prompts_per_step=4",
        "grpo.num_generations_per_prompt=4",
        "policy.train_global_batch_size=16",
        "policy.train_micro_batch_size=8",
        "policy.max_total_sequence_length=96",
        "grpo.max_num_steps=2",
        "grpo.val_period=2",
        "checkpointing.enabled=false",
        "checkpointing.export_final=false",
    ]
    result = run_grpo(load_config(VLM_RECIPE, RecipeConfig, overrides), console=Console(enabled=False))
    steps = [r for r in read_metrics(result.log_dir) if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:  # fp32 generator and trainer, same images and 3-D rotary positions
        assert abs(record["train/token_mult_prob_error"] - 1.0) < 1e-5
        assert abs(record["train/gen_kl_error"]) < 1e-6
        assert record["train/grad_norm"] > 0
    assert sorted(result.validation_accuracy) == [0, 2]


def test_multimodal_rotary_positions_equal_the_model_s_own(qwen_checkpoint):
    """posttrain passes Qwen2.5-VL its 3-D rotary positions (images on a grid, text after them);
    with none passed the model computes them itself: the same logprobs, for rows with images of
    two sizes and a text-only row, right-padded."""
    model = load_policy(qwen_checkpoint).eval()
    processor = load_processor(qwen_checkpoint)
    samples = [
        *shape_count_samples(2, seed=3, max_count=3, image_sizes=[(24, 24), (36, 24)]),
        Sample(prompt="How many shapes?", ground_truth="2", metadata={}, origin="text:0"),
    ]
    prompts = tokenize_multimodal_prompts(samples, processor, template="{prompt}", max_prompt_tokens=200).prompts
    assert len({p.multimodal["image_grid_thw"].prod().item() for p in prompts[:2]}) == 2  # two sizes
    width = max(len(p.token_ids) for p in prompts) + 3
    ids_BT = torch.full((3, width), processor.tokenizer.pad_token_id)
    mask_BT = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = prompt.token_ids + [11, 12, 13][: width - len(prompt.token_ids)]
        ids_BT[row, : len(ids)], mask_BT[row, : len(ids)] = torch.tensor(ids), 1
    images = image_inputs([p.multimodal for p in prompts])
    with torch.no_grad():
        ours_BT = token_logprobs(model, ids_BT, mask_BT, **images)
        types_BT = family_for(model.config).mm_token_type_ids(model.config, ids_BT)
        logits = model(input_ids=ids_BT, attention_mask=mask_BT, mm_token_type_ids=types_BT, **images).logits
        reference_BT = logprobs_from_logits(logits[:, :-1], ids_BT[:, 1:], 1.0)
    real = (mask_BT[:, 1:] * mask_BT[:, :-1]).bool()
    torch.testing.assert_close(ours_BT[real], reference_BT[real], rtol=0, atol=1e-5)
    # and they are not 1-D positions: the image rows score differently with those
    with torch.no_grad():
        flat = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=(mask_BT.cumsum(-1) - 1).clamp(min=0), **images).logits
    assert (logprobs_from_logits(flat[:, :-1], ids_BT[:, 1:], 1.0)[:2][real[:2]] - ours_BT[:2][real[:2]]).abs().max() > 1e-4
