"""Per-GPU peak memory of a GRPO/DAPO recipe, and the fewest GPUs it fits on (`posttrain plan`).

Every GPU holds the trainer's state and the rollout engine colocated with it, and a step passes
through two phases (three under torchrun):

    generation  trainer parameters + AdamW state (+ reference policy) + engine weights + KV cache
                + the engine's logits buffer + sampling and prefill workspace
    training    the same trainer state + gradients + FSDP2's gathered parameters + activations
                + the chunked head's workspace, beside the engine's weights and KV cache
    refresh     (FSDP2 only) trainer state and engine, plus one parameter gathered whole and copied

Each component is a pure function of shapes and recipe settings, in bytes, and names the code
whose memory it models: when that code changes, change the function. Parameters are counted
exactly, on the meta device; activations and workspaces are estimates that list their terms.

SFT and DPO recipes have the training phase only; a DPO micro-batch holds train_micro_batch_size
pairs, two sequences each, and no reference model (its reference logprobs are computed once).

Not modeled: vision/audio tower activations, the warm-start (SFT) phase, the no-grad logprob
pass (smaller than training's; DPO's reference pass is one), the CUDA context and NCCL buffers. The safety margin covers those
and the caching allocator: the measured E2B DAPO step reserved 82.85 GiB for an allocated peak of
79.86 GiB (benchmarks/results/dapo_step-h200-development.json), 3.7% more.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from posttrain.config.loader import ConfigError, load_config
from posttrain.config.schema import (
    ChatSource,
    DatasetSource,
    FileSource,
    PolicyConfig,
    RecipeConfig,
    ShapesSource,
)
from posttrain.data.datasets import DATASETS
from posttrain.models.blocked_attention import DEFAULT_BLOCK as ATTENTION_BLOCK
from posttrain.models.chunked_logprobs import default_chunk_tokens
from posttrain.models.document_attention import WIDE_HEAD_DIM
from posttrain.models.freezing import apply_freeze_config
from posttrain.models.gemma4_presets import gemma4_preset_config
from posttrain.models.loading import check_remote_code
from posttrain.models.registry import family_for
from posttrain.models.tiny import tiny_gemma4_config, tiny_gemma4_multimodal_config
from posttrain.rollout.continuous_engine import slot_bucket
from posttrain.rollout.decoder_stack import decoder_stack
from posttrain.rollout.slot_cache import LayerCacheSpec, ring_size
from posttrain.training.distributed import decoder_layers

GIB = 2**30
FP32, BF16 = 4, 2  # bytes per element
ADAMW_STATE_BYTES = 2 * FP32  # exp_avg and exp_avg_sq per trainable scalar

# What torch reports as total memory on the device (the H200 run: 139 GiB of its 141 GB).
GPU_USABLE_GIB = {"h200": 139.0, "h100": 79.1}
# Plan to fill at most 95% of it: allocator caching and fragmentation (3.7% measured, see above),
# the CUDA context and NCCL buffers are not in the components.
SAFETY_MARGIN = 0.05

# ContinuousBatchingEngine's prefill_token_budget default (build_engine keeps it).
PREFILL_TOKEN_BUDGET = 32768
# Copies of the [slots, vocab] fp32 logits while a token is sampled (_record, sample_with_noise):
# exponential noise, scaled logits, the truncated copy, noisy scores; top-p adds the sorted
# values, their int64 order (2 fp32-sized), the probabilities and their cumulative sum.
SAMPLING_COPIES, NUCLEUS_COPIES = 4, 5
# Hidden-size fp32 tensors per token outside the decoder layers during training: the scaled
# embedding, the final norm's input and output, the head's gathered hidden states, and the two
# residual-stream gradients in flight between layers in backward.
STACK_HIDDEN_TENSORS = 6
# Gemma 4 E-series per-layer inputs ([tokens, layers, width], fp32): the table lookup, the
# projection's output, its RMSNorm's input and output, and their sum fed to the layers.
PER_LAYER_INPUT_TENSORS = 5

Part = Literal["language", "vision", "audio"]
Kind = Literal["embedding", "matmul", "other"]
PARTS: tuple[Part, ...] = ("language", "vision", "audio")
KINDS: tuple[Kind, ...] = ("embedding", "matmul", "other")


class PlanningError(ValueError):
    """The model's structure is not one the planner knows (Gemma 4 and Llama-style decoder layers)."""


# ------------------------------------------------------------------------- the model, on meta


@dataclass(frozen=True)
class ParameterCount:
    scalars: int  # elements, not bytes
    trainable: int


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as the activation estimate sees it (read from the built modules)."""

    num_heads: int
    head_dim: int
    num_kv_heads: int  # 0: a KV-shared layer (reuses another layer's K/V)
    mlp_width: int  # the dense MLP's intermediate size (E2B doubles it on KV-shared layers)
    routed_width: int  # MoE: top_k x expert intermediate size (a token passes k experts); else 0
    per_layer_input_width: int  # Gemma 4 E-series per-layer-input size; else 0
    hidden_norms: int  # RMSNorms over the hidden size
    scalars: int  # parameters of the layer: one FSDP2 unit
    trainable: int


@dataclass(frozen=True)
class ModelInventory:
    """What the plan needs to know about the policy model: exact parameter counts by (part, kind)
    and the shapes of its decoder layers and of the engine's KV cache."""

    model_class: str
    multimodal: bool  # towers loaded: training attention stays the loaded implementation
    hidden_size: int
    vocab_size: int
    tied_head: bool  # lm_head is the embedding table (Gemma): the engine unties it
    head_trainable: bool
    groups: dict[tuple[str, str], ParameterCount]
    layers: tuple[LayerShape, ...]
    cache_specs: tuple[LayerCacheSpec, ...]
    largest_matmul_parameter: int  # scalars of the largest Linear / expert weight
    largest_other_parameter: int  # scalars of the largest other parameter (an embedding table)

    def count(self, *, parts: tuple[str, ...] = PARTS, kinds: tuple[str, ...] = KINDS, trainable_only: bool = False) -> int:
        selected = [c for (part, kind), c in self.groups.items() if part in parts and kind in kinds]
        return sum(c.trainable if trainable_only else c.scalars for c in selected)


def build_meta_model(config: PretrainedConfig, *, text_only: bool) -> torch.nn.Module:
    """The class posttrain would load for `config` (its family's choice: text-only or with the
    towers, as load_policy), instantiated on the meta device: real shapes, no storage."""
    model_class, model_config = family_for(config).model_class_and_config(config, text_only=text_only)
    with torch.device("meta"):
        if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
            return model_class(model_config)
        return model_class.from_config(model_config)  # the generic family's Auto classes


def unique_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.nn.Parameter]]:
    """(name, owning module, parameter), each parameter once, owned by the first module holding it
    in `model.modules()` order: the order generation_copy decides its casts in (a tied head
    belongs to the embedding)."""
    seen, found = set(), []
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                found.append((f"{module_name}.{name}" if module_name else name, module, parameter))
    return found


def parameter_kind(module: torch.nn.Module, parameter: torch.nn.Parameter) -> Kind:
    """generation_copy's rule: Linear and 3-D (MoE expert) parameters are the matmul weights it
    casts to bf16 under bfloat16_autocast; embedding tables and the rest it shares."""
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear) or parameter.dim() == 3:
        return "matmul"
    return "other"


def parameter_part(name: str, tower_prefixes: dict[str, tuple[str, ...]]) -> Part:
    for part, prefixes in tower_prefixes.items():
        if prefixes and name.startswith(prefixes):
            return part
    return "language"


def parameter_groups(model: torch.nn.Module) -> dict[tuple[str, str], ParameterCount]:
    """Scalars by (part, kind); the parts are the family's towers (ModelFamily.towers) and the rest."""
    towers = family_for(model.config).towers
    prefixes = {"vision": towers.get("vision_tower", ()), "audio": towers.get("audio_tower", ())}
    scalars: dict[tuple[str, str], list[int]] = {(part, kind): [0, 0] for part in PARTS for kind in KINDS}
    for name, module, parameter in unique_parameters(model):
        group = scalars[(parameter_part(name, prefixes), parameter_kind(module, parameter))]
        group[0] += parameter.numel()
        group[1] += parameter.numel() if parameter.requires_grad else 0
    return {key: ParameterCount(total, trainable) for key, (total, trainable) in scalars.items()}


def layer_shape(layer: torch.nn.Module, spec: LayerCacheSpec, text_config: PretrainedConfig) -> LayerShape:
    """`layer`'s shape from its modules; head size and KV heads from the engine's cache spec
    (Gemma 4's full-attention layers have their own, KV-shared layers none)."""
    hidden = text_config.hidden_size
    try:
        attention, mlp_width = layer.self_attn, layer.mlp.gate_proj.out_features
        num_heads = attention.q_proj.out_features // attention.head_dim
    except AttributeError as error:
        raise PlanningError(
            f"{type(layer).__name__}: the memory plan knows Gemma 4 and Llama-style decoder layers "
            f"(self_attn.q_proj, mlp.gate_proj): {error}"
        ) from None
    owned = unique_parameters(layer)
    # Optional Gemma 4 features, read as decoder_stack does (0 / False on configs without them).
    routed = text_config.top_k_experts * text_config.moe_intermediate_size if getattr(text_config, "enable_moe_block", False) else 0
    return LayerShape(
        num_heads=num_heads,
        head_dim=spec.head_dim,
        num_kv_heads=spec.num_kv_heads,
        mlp_width=mlp_width,
        routed_width=routed,
        per_layer_input_width=getattr(text_config, "hidden_size_per_layer_input", 0) or 0,
        # norm weights: the 1-D hidden-size parameters that are not a Linear's bias
        hidden_norms=sum(
            1 for _, m, p in owned if p.dim() == 1 and p.numel() == hidden and not isinstance(m, torch.nn.Linear)
        ),
        scalars=sum(p.numel() for _, _, p in owned),
        trainable=sum(p.numel() for _, _, p in owned if p.requires_grad),
    )


def model_inventory(config: PretrainedConfig, policy: PolicyConfig) -> ModelInventory:
    """Count `config`'s model on the meta device, with the recipe's freeze config applied (the
    trainable set exactly as the run's; a pattern matching nothing raises FreezeConfigError)."""
    model = build_meta_model(config, text_only=policy.text_only)
    apply_freeze_config(model, policy.freeze_config)
    text_config = model.config.get_text_config()
    specs = tuple(decoder_stack(model).cache_specs())  # the engine's own cache layout
    layers = tuple(layer_shape(layer, spec, text_config) for layer, spec in zip(decoder_layers(model), specs, strict=True))
    head = model.get_output_embeddings().weight
    named = unique_parameters(model)
    kinds = [(parameter_kind(m, p), p.numel()) for _, m, p in named]
    return ModelInventory(
        model_class=type(model).__name__,
        multimodal=text_config is not model.config,
        hidden_size=text_config.hidden_size,
        vocab_size=head.shape[0],
        tied_head=head is model.get_input_embeddings().weight,
        head_trainable=head.requires_grad,
        groups=parameter_groups(model),
        layers=layers,
        cache_specs=specs,
        largest_matmul_parameter=max((n for kind, n in kinds if kind == "matmul"), default=0),
        largest_other_parameter=max((n for kind, n in kinds if kind != "matmul"), default=0),
    )


def recipe_model_config(cfg: RecipeConfig) -> PretrainedConfig:
    """The policy's config as the run builds it: the tiny model's (save_tiny_gemma4's arguments), a
    random-init preset's (`tiny_model.preset`), or the checkpoint's config.json (no weights read)."""
    tiny = cfg.tiny_model
    if tiny is not None and tiny.preset is not None:  # save_random_preset: the released shape, maybe cut
        return gemma4_preset_config(tiny.preset, text_only=not tiny.multimodal, num_hidden_layers=tiny.preset_layers)
    if tiny is not None:
        text_config = tiny_gemma4_config(tiny.tokenizer_vocab_size(), **tiny.dimensions())
        return tiny_gemma4_multimodal_config(text_config) if tiny.multimodal else text_config
    trust = cfg.policy.trust_remote_code
    if not (Path(cfg.policy.model_name) / "config.json").is_file():
        raise PlanningError(
            f"policy.model_name {cfg.policy.model_name!r} has no config.json; plan a released Gemma 4 shape "
            "without the checkpoint with --preset NAME"
        )
    check_remote_code(cfg.policy.model_name, trust_remote_code=trust)
    return AutoConfig.from_pretrained(cfg.policy.model_name, trust_remote_code=trust)


# ---------------------------------------------------------------------------- the recipe's shapes


def micro_batch_tokens(policy: PolicyConfig, *, sequences_per_sample: int = 1) -> int:
    """Tokens of the largest training micro-batch (training/batching.py): train_micro_batch_size
    full-length samples, or the token budget, which a single longer sample may exceed. A DPO sample
    is a pair: `sequences_per_sample` 2 (both sequences run in the same micro-batch)."""
    sample_tokens = sequences_per_sample * policy.max_total_sequence_length
    by_count = policy.train_micro_batch_size * sample_tokens
    if policy.train_micro_batch_tokens is None:
        return by_count
    return min(by_count, max(policy.train_micro_batch_tokens, sample_tokens))


def sequences_per_sample(cfg: RecipeConfig) -> int:
    """Sequences a sample of the recipe's batches holds: two for a DPO pair, one otherwise."""
    return 2 if cfg.algorithm == "dpo" else 1


def validation_prompt_count(cfg: RecipeConfig) -> int:
    """Prompts `validate` hands the engine at once (all of them, one response each); 0 when the
    recipe never validates. A file or dataset without `limit` counts as the engine's slot cap."""
    grpo, source = cfg.grpo, cfg.data.validation
    if cfg.algorithm != "grpo" or source is None or not (grpo.val_period or grpo.val_at_start or grpo.val_at_end):
        return 0  # sft and dpo generate nothing
    if isinstance(source, FileSource | DatasetSource | ChatSource):
        size = source.limit or cfg.policy.generation.max_batch_size
    else:
        size = source.size
    return min(size, grpo.max_val_samples or size)


def generation_sequences(cfg: RecipeConfig, gpus: int) -> int:
    """Sequences one rank's engine decodes at once: its share of a generation batch's prompts
    times the group size (collect_step_groups), or the validation prompts if more."""
    grpo = cfg.grpo
    prompts = grpo.num_prompts_per_step * (grpo.batch_multiplier if grpo.use_dynamic_sampling else 1)
    return max(math.ceil(prompts / gpus) * grpo.num_generations_per_prompt, validation_prompt_count(cfg))


def recipe_has_images(cfg: RecipeConfig) -> bool:
    """Whether prompts carry images (build_run: the engine then keeps the vision tower)."""
    sources = [cfg.data.train, cfg.data.validation]
    return any(
        isinstance(s, ShapesSource) or (isinstance(s, DatasetSource) and "images" in DATASETS[s.name].columns)
        for s in sources
    )


def rollout_backend(cfg: RecipeConfig, config: PretrainedConfig, *, images: bool) -> str:
    """build_engine's choice on a GPU: auto is the continuous engine, unless the prompts have
    images and the family's continuous engine takes none."""
    backend = cfg.policy.generation.backend
    if backend != "auto":
        return backend
    return "torch" if images and not family_for(config).continuous_engine_images else "continuous"


def engine_precision(cfg: RecipeConfig, backend: str) -> str:
    dtype = cfg.policy.generation.dtype
    if dtype != "auto":
        return dtype
    return "bfloat16_autocast" if backend == "continuous" else "bfloat16"


# --------------------------------------------------------------------------- trainer components


def parameter_bytes(scalars: int, *, gpus: int, on_host: bool = False) -> int:
    """fp32 master weights (always: trainer.py asserts them), every loaded parameter, frozen ones
    too; FSDP2 shards them 1/gpus; parameter_offload keeps the shards on the host."""
    return 0 if on_host else math.ceil(FP32 * scalars / gpus)


def gradient_bytes(trainable: int, *, gpus: int, on_host: bool = False) -> int:
    """fp32 gradients of the trainable parameters, sharded like them. One process: embedding
    tables get a dense zero .grad that their sparse gradients add into in place
    (embedding_grads.py), so no second table-sized gradient."""
    return 0 if on_host else math.ceil(FP32 * trainable / gpus)


def optimizer_state_bytes(trainable: int, *, gpus: int, on_host: bool = False) -> int:
    """AdamW's two fp32 moments per trainable scalar, sharded like the parameters; none on the GPU
    with optimizer_offload or parameter_offload (offload.py, FSDP2's CPUOffloadPolicy)."""
    return 0 if on_host else math.ceil(ADAMW_STATE_BYTES * trainable / gpus)


def fsdp_gathered_bytes(
    *, root_scalars: int, root_trainable: int, layer_scalars: int, layer_trainable: int, gpus: int, param_bytes: int
) -> int:
    """FSDP2's unsharded parameters and gradients while training (distributed.shard_policy), on
    top of the shards. The root unit (everything outside the decoder layers: embeddings,
    per-layer embeddings, towers) is not resharded after forward (FSDP2 keeps the root's
    parameters for backward), and its full fp32 gradients exist before their reduce-scatter.
    Decoder layers: the largest layer gathered twice (the running one and the prefetched next)
    and its full fp32 gradient. One process: nothing."""
    if gpus == 1:
        return 0
    root = param_bytes * root_scalars + FP32 * root_trainable
    return root + 2 * param_bytes * layer_scalars + FP32 * layer_trainable


def host_bytes(*, scalars: int, trainable: int, gpus: int, optimizer_offload: bool, parameter_offload: bool) -> int:
    """Pinned host memory per process. optimizer_offload (HostAdamW): AdamW's two moments (8 bytes a
    trainable scalar of this rank's shards). parameter_offload: the fp32 shards, their gradients and
    AdamW's moments."""
    if parameter_offload:
        return math.ceil((FP32 * scalars + (FP32 + ADAMW_STATE_BYTES) * trainable) / gpus)
    if optimizer_offload:
        return math.ceil(ADAMW_STATE_BYTES * trainable / gpus)
    return 0


def reference_policy_bytes(scalars: int, *, kl_penalty: float) -> int:
    """loops/grpo.reference_policy: a deepcopy of the whole fp32 policy on every rank, made before
    sharding, when the loss has a KL term."""
    return FP32 * scalars if kl_penalty > 0 else 0


# ---------------------------------------------------------------------------------- activations


def layer_activation_elements(layer: LayerShape, hidden: int) -> tuple[int, int]:
    """(compute-dtype elements, fp32 elements) one token keeps for a decoder layer's backward
    (estimate). Compute dtype (bf16 under autocast): q, k, v and the attention output; o_proj's
    output; the copies of the normed hidden state autocast casts for the attention and MLP
    projections; gate, up and act(gate) * up of the dense MLP and the routed experts; the
    per-layer-input gate and its activation. fp32: every hidden-size RMSNorm's input and normed
    output (Gemma4RMSNorm computes in fp32)."""
    attention = 2 * layer.num_heads * layer.head_dim + 2 * layer.num_kv_heads * layer.head_dim
    projections = 3 * hidden
    mlp = 3 * (layer.mlp_width + layer.routed_width)
    per_layer_input = 2 * layer.per_layer_input_width
    return attention + projections + mlp + per_layer_input, 2 * layer.hidden_norms * hidden


def attention_score_bytes(layer: LayerShape, *, tokens: int, seq_len: int, implementation: str) -> tuple[int, int]:
    """(saved, transient) bytes of attention scores in a layer. posttrain's document attention
    (models/document_attention.py) runs heads wider than 256 as blocked GEMMs: nothing quadratic is
    saved, but a block's fp32 scores, probabilities and their gradient exist in its backward.
    SDPA with such heads falls back to PyTorch's math path (transformers #46960) and eager always
    materializes: fp32 scores and probabilities are saved per head. Narrower heads under SDPA use
    fused kernels: nothing. `tokens` of `seq_len`-token sequences."""
    wide = layer.head_dim > WIDE_HEAD_DIM
    if implementation == "document":
        return 0, (3 * FP32 * layer.num_heads * tokens * min(ATTENTION_BLOCK, seq_len) if wide else 0)
    if implementation == "eager" or wide:
        return 2 * FP32 * layer.num_heads * tokens * seq_len, 0
    return 0, 0


def activation_bytes(
    layers: tuple[LayerShape, ...],
    *,
    hidden: int,
    tokens: int,
    seq_len: int,
    compute_bytes: int,
    residual_bytes: int,
    implementation: str,
    checkpointing: bool,
) -> int:
    """Activations of one micro-batch of `tokens` tokens at their peak (in backward). With
    activation checkpointing (non-reentrant, models/activation_checkpointing.py) each layer keeps
    only its input (the residual stream) and one layer's activations are recomputed at a time;
    without it every layer's activations live. Both: what lives outside the layers (embeddings,
    final norm, the residual gradients, Gemma 4's per-layer inputs)."""
    per_layer = []
    for layer in layers:
        compute, fp32 = layer_activation_elements(layer, hidden)
        saved_scores, _ = attention_score_bytes(layer, tokens=tokens, seq_len=seq_len, implementation=implementation)
        per_layer.append(tokens * (compute * compute_bytes + fp32 * FP32) + saved_scores)
    transient = max(
        attention_score_bytes(layer, tokens=tokens, seq_len=seq_len, implementation=implementation)[1] for layer in layers
    )
    per_layer_inputs = PER_LAYER_INPUT_TENSORS * len(layers) * layers[0].per_layer_input_width
    outside = tokens * FP32 * (STACK_HIDDEN_TENSORS * hidden + per_layer_inputs)
    if checkpointing:
        return outside + len(layers) * tokens * hidden * residual_bytes + max(per_layer) + transient
    return outside + sum(per_layer) + transient


def logprob_workspace_bytes(*, tokens: int, vocab: int, hidden: int, head_trainable: bool) -> int:
    """The chunked head (models/chunked_logprobs.py) in backward: one chunk of
    default_chunk_tokens(vocab) tokens' logits in fp32 and their gradient in fp32 (compiled on
    CUDA these fuse into fewer, bf16 tensors: an upper bound), the gradient of its input hidden
    states (fp32, tokens x hidden) and, when the head trains, its fp32 weight gradient
    `grad_weight_VH` (vocab x hidden), added into the embedding's own gradient afterwards."""
    chunk = min(tokens, default_chunk_tokens(vocab))
    head = FP32 * vocab * hidden if head_trainable else 0
    return 2 * FP32 * chunk * vocab + FP32 * tokens * hidden + head


# --------------------------------------------------------------------------------------- engine


def kept_parts(*, backend: str, images: bool) -> tuple[str, ...]:
    """The continuous engine copies no audio tower, and the vision tower only for prompts with
    images (ContinuousBatchingEngine's language_model_only); the torch engine deep-copies all."""
    if backend == "torch":
        return PARTS
    return ("language", "vision") if images else ("language",)


def engine_weight_bytes(inventory: ModelInventory, *, backend: str, precision: str, images: bool, gpus: int) -> int:
    """The rollout engine's own weights on every GPU (never sharded).

    continuous (generation_copy), bfloat16_autocast: bf16 copies of the matmul weights (Linear,
    MoE experts) and of a tied head (untied: lm_head gets its own bf16 copy); embeddings and norms
    are the trainer's own fp32 tensors in one process (shared: no memory). Under FSDP2 the trainer
    keeps only shards, and the engine the full fp32 tensors it shared before sharding (then
    storage of its own from the first refresh_weights). float32: all shared in one process, a
    full fp32 copy under FSDP2. bfloat16: a bf16 copy of everything kept.
    torch (TorchRolloutEngine): a deepcopy of the whole model in bf16 (bfloat16), else fp32."""
    parts = kept_parts(backend=backend, images=images)
    everything = inventory.count(parts=parts)
    if backend == "torch":
        return (BF16 if precision == "bfloat16" else FP32) * everything
    if precision == "bfloat16":
        return BF16 * everything
    unshared = 0 if gpus == 1 else FP32 * inventory.count(parts=parts, kinds=("embedding", "other"))
    if precision == "float32":
        return FP32 * everything if gpus > 1 else 0
    untied_head = BF16 * inventory.vocab_size * inventory.hidden_size if inventory.tied_head else 0
    return BF16 * inventory.count(parts=parts, kinds=("matmul",)) + untied_head + unshared


def kv_cache_bytes(specs: tuple[LayerCacheSpec, ...], *, slots: int, max_len: int, element_bytes: int) -> int:
    """SlotKVCache: for each layer that owns a cache, K and V of [slots, kv_heads, ring, head_dim]
    (ring: max_len on full-attention layers, min(window, max_len) on sliding ones); KV-shared
    layers own none."""
    return sum(
        2 * slots * spec.num_kv_heads * ring_size(spec.window, max_len) * spec.head_dim * element_bytes
        for spec in specs
        if spec.owns_cache
    )


def logits_buffer_bytes(*, slots: int, vocab: int) -> int:
    """The continuous engine's persistent fp32 logits buffer (ContinuousBatchingEngine._allocate)."""
    return slots * vocab * FP32


def sampling_workspace_bytes(*, slots: int, vocab: int, nucleus: bool) -> int:
    """Transient fp32 [slots, vocab] copies while a token is sampled (see SAMPLING_COPIES)."""
    return slots * vocab * FP32 * (SAMPLING_COPIES + (NUCLEUS_COPIES if nucleus else 0))


def prefill_workspace_bytes(
    layers: tuple[LayerShape, ...], *, tokens: int, width: int, hidden: int, compute_bytes: int
) -> int:
    """A no-grad prefill of `tokens` prompt tokens in rows of `width` (one group of at most
    PREFILL_TOKEN_BUDGET tokens). Nothing is kept between ops, so the peak is inside one layer:
    the MLP's gate, up and activation outputs, four hidden-size fp32 tensors (residual, norm input
    and output, layer output), the per-layer inputs (lookup and projection) and, for heads wider
    than 256, the scores and probabilities of SDPA's math path (slot_attention passes a mask)."""
    mlp = 3 * max(layer.mlp_width + layer.routed_width for layer in layers) * compute_bytes
    scores = max(2 * layer.num_heads * width * compute_bytes if layer.head_dim > WIDE_HEAD_DIM else 0 for layer in layers)
    per_layer_inputs = 2 * FP32 * len(layers) * layers[0].per_layer_input_width
    return tokens * (mlp + 4 * FP32 * hidden + per_layer_inputs + scores)


def refresh_transient_bytes(inventory: ModelInventory, *, precision: str, gpus: int) -> int:
    """refresh_weights under FSDP2: each parameter is gathered whole in the engine's dtype
    (full_tensor) and copied into storage of the engine's own, one at a time: twice the largest
    parameter. One process copies in place: nothing."""
    if gpus == 1:
        return 0
    matmul_bytes = BF16 if precision in ("bfloat16", "bfloat16_autocast") else FP32
    other_bytes = BF16 if precision == "bfloat16" else FP32
    return 2 * max(matmul_bytes * inventory.largest_matmul_parameter, other_bytes * inventory.largest_other_parameter)


# ------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryPlan:
    """Memory per GPU of a recipe on `gpus` GPUs, in GiB (2**30 bytes)."""

    gpus: int
    parameters: float
    gradients: float
    optimizer_state: float
    fsdp_gathered: float
    activations_checkpointed: float
    activations_full: float
    activation_checkpointing: bool  # which of the two the recipe uses
    logprob_workspace: float
    reference_policy: float
    engine_weights: float
    engine_weights_in_training: float  # 0 when release_weights_during_training frees them
    kv_cache: float
    kv_cache_in_training: float  # the torch engine frees its cache after generating
    engine_logits: float
    sampling_workspace: float
    refresh_transient: float
    generation_peak: float
    training_peak: float
    refresh_peak: float  # 0 in one process (no refresh phase of its own)
    host_memory: float  # pinned host memory per process (offload), not GPU
    tokens_per_micro_batch: int
    generation_slots: int
    engine: str  # "continuous bfloat16_autocast", ...

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.activation_checkpointing else self.activations_full

    @property
    def peak(self) -> float:
        return max(self.generation_peak, self.training_peak, self.refresh_peak)

    @property
    def peak_phase(self) -> str:
        phases = {"generation": self.generation_peak, "training": self.training_peak, "weight refresh": self.refresh_peak}
        return max(phases, key=phases.__getitem__)


def training_attention(policy: PolicyConfig, inventory: ModelInventory) -> str:
    """resolve_training_attention on CUDA: auto is document attention for text models, the loaded
    implementation (SDPA) for multimodal ones."""
    if policy.attention == "auto":
        return "sdpa" if inventory.multimodal else "document"
    return policy.attention


def trainer_bytes(cfg: RecipeConfig, inventory: ModelInventory, gpus: int) -> dict[str, int]:
    """The trainer's components on one GPU, in bytes."""
    policy = cfg.policy
    scalars, trainable = inventory.count(), inventory.count(trainable_only=True)
    layer_scalars = sum(layer.scalars for layer in inventory.layers)
    layer_trainable = sum(layer.trainable for layer in inventory.layers)
    tokens, seq_len = micro_batch_tokens(policy, sequences_per_sample=sequences_per_sample(cfg)), policy.max_total_sequence_length
    compute_bytes = BF16 if policy.precision == "bfloat16" else FP32
    half_gathers = gpus > 1 and policy.fsdp_param_dtype == "bfloat16"  # bf16 parameters and residual stream
    activations = {
        checkpointing: activation_bytes(
            inventory.layers,
            hidden=inventory.hidden_size,
            tokens=tokens,
            seq_len=seq_len,
            compute_bytes=compute_bytes,
            residual_bytes=BF16 if half_gathers else FP32,
            implementation=training_attention(policy, inventory),
            checkpointing=checkpointing,
        )
        for checkpointing in (True, False)
    }
    return {
        "parameters": parameter_bytes(scalars, gpus=gpus, on_host=policy.parameter_offload),
        "gradients": gradient_bytes(trainable, gpus=gpus, on_host=policy.parameter_offload),
        "optimizer_state": optimizer_state_bytes(
            trainable, gpus=gpus, on_host=policy.optimizer_offload or policy.parameter_offload
        ),
        "fsdp_gathered": fsdp_gathered_bytes(
            root_scalars=scalars - layer_scalars,
            root_trainable=trainable - layer_trainable,
            layer_scalars=max(layer.scalars for layer in inventory.layers),
            layer_trainable=max(layer.trainable for layer in inventory.layers),
            gpus=gpus,
            param_bytes=BF16 if half_gathers else FP32,
        ),
        "activations_checkpointed": activations[True],
        "activations_full": activations[False],
        "logprob_workspace": logprob_workspace_bytes(
            tokens=tokens, vocab=inventory.vocab_size, hidden=inventory.hidden_size, head_trainable=inventory.head_trainable
        ),
        # dpo's reference is the policy's own logprobs, computed once: no second copy (loops/dpo.py)
        "reference_policy": reference_policy_bytes(scalars, kl_penalty=cfg.loss_fn.reference_policy_kl_penalty if cfg.algorithm == "grpo" else 0.0),
        "host_memory": host_bytes(
            scalars=scalars,
            trainable=trainable,
            gpus=gpus,
            optimizer_offload=policy.optimizer_offload,
            parameter_offload=policy.parameter_offload,
        ),
    }


def generation_slots(cfg: RecipeConfig, gpus: int, *, backend: str) -> int:
    """Rows the engine allocates: the continuous engine rounds up to a power of two (slot_bucket),
    the torch engine runs batches of at most max_batch_size; both capped by max_batch_size."""
    sequences, cap = generation_sequences(cfg, gpus), cfg.policy.generation.max_batch_size
    return slot_bucket(sequences, cap) if backend == "continuous" else min(sequences, cap)


def engine_bytes(
    cfg: RecipeConfig, inventory: ModelInventory, gpus: int, *, backend: str, images: bool
) -> dict[str, int]:
    """The rollout engine's components on one GPU, in bytes."""
    gen, precision = cfg.policy.generation, engine_precision(cfg, backend)
    continuous = backend == "continuous"
    slots = generation_slots(cfg, gpus, backend=backend)
    max_len = cfg.policy.max_total_sequence_length  # longest prompt kept + max_new_tokens
    autocast = precision == "bfloat16_autocast"
    weights = engine_weight_bytes(inventory, backend=backend, precision=precision, images=images, gpus=gpus)
    kv = kv_cache_bytes(
        inventory.cache_specs, slots=slots, max_len=max_len, element_bytes=BF16 if autocast or precision == "bfloat16" else FP32
    )
    logits = logits_buffer_bytes(slots=slots, vocab=inventory.vocab_size) if continuous else 0
    max_prompt = max_len - gen.max_new_tokens
    prefill = prefill_workspace_bytes(
        inventory.layers,
        tokens=min(PREFILL_TOKEN_BUDGET, slots * max_prompt),
        width=max_prompt,
        hidden=inventory.hidden_size,
        compute_bytes=FP32 if precision == "float32" else BF16,
    )
    return {
        "engine_weights": weights,
        "engine_weights_in_training": 0 if continuous and gen.release_weights_during_training else weights,
        "kv_cache": kv,
        "kv_cache_in_training": kv if continuous else 0,
        "engine_logits": logits,
        "sampling_workspace": sampling_workspace_bytes(slots=slots, vocab=inventory.vocab_size, nucleus=gen.top_p < 1) + prefill,
        "refresh_transient": refresh_transient_bytes(inventory, precision=precision, gpus=gpus),
    }


def plan_from_inventory(
    cfg: RecipeConfig, inventory: ModelInventory, gpus: int, *, backend: str = "continuous", images: bool = False
) -> MemoryPlan:
    """Add the components up per phase (see the module docstring), as if each phase's components
    were all live at once. Under FSDP2 that is an upper bound for training: the root's full
    gradients appear at the end of backward, when most activations are already freed."""
    t = trainer_bytes(cfg, inventory, gpus)
    e = engine_bytes(cfg, inventory, gpus, backend=backend, images=images)
    if cfg.algorithm != "grpo":  # SFT and DPO generate nothing: no engine, no KV cache, no generation phase
        e = dict.fromkeys(e, 0)
    activations = t["activations_checkpointed"] if cfg.policy.activation_checkpointing else t["activations_full"]
    resident = t["parameters"] + t["optimizer_state"] + t["reference_policy"]
    engine_held = e["engine_weights"] + e["kv_cache"] + e["engine_logits"]
    generation = resident + engine_held + e["sampling_workspace"]
    training = (
        resident
        + t["gradients"]
        + t["fsdp_gathered"]
        + activations
        + t["logprob_workspace"]
        + e["engine_weights_in_training"]
        + e["kv_cache_in_training"]
        + e["engine_logits"]
    )
    refresh = resident + engine_held + e["refresh_transient"] if gpus > 1 else 0
    gib = {key: value / GIB for key, value in {**t, **e}.items()}
    return MemoryPlan(
        gpus=gpus,
        activation_checkpointing=cfg.policy.activation_checkpointing,
        generation_peak=generation / GIB,
        training_peak=training / GIB,
        refresh_peak=refresh / GIB,
        tokens_per_micro_batch=micro_batch_tokens(cfg.policy, sequences_per_sample=sequences_per_sample(cfg)),
        generation_slots=generation_slots(cfg, gpus, backend=backend),
        engine=f"{backend} {engine_precision(cfg, backend)}",
        **gib,
    )


def plan_for_recipe(cfg: RecipeConfig, gpus: int, *, config: PretrainedConfig, inventory: ModelInventory) -> MemoryPlan:
    images = recipe_has_images(cfg)
    backend = rollout_backend(cfg, config, images=images)
    return plan_from_inventory(cfg, inventory, gpus, backend=backend, images=images)


def plan_memory(cfg: RecipeConfig, *, gpus: int, model_config: PretrainedConfig | None = None) -> MemoryPlan:
    """Per-GPU memory of `cfg` on `gpus` GPUs (one process, or torchrun with FSDP2). The model comes
    from `model_config` (e.g. gemma4_preset_config("e2b")) or else from the recipe itself (its
    tiny model, or its checkpoint's config.json)."""
    config = model_config if model_config is not None else recipe_model_config(cfg)
    return plan_for_recipe(cfg, gpus, config=config, inventory=model_inventory(config, cfg.policy))


# ---------------------------------------------------------------------------- fitting on GPUs


def usable_gib(gpu: str) -> float:
    if gpu not in GPU_USABLE_GIB:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPU_USABLE_GIB)}")
    return GPU_USABLE_GIB[gpu]


def fits(plan: MemoryPlan, capacity_gib: float) -> bool:
    return plan.peak <= capacity_gib * (1 - SAFETY_MARGIN)


def batch_problems(cfg: RecipeConfig, gpus: int) -> list[str]:
    """Why `gpus` processes cannot split the recipe's batches (the algorithm's loop's torchrun check,
    its checkpointing rule left out: a setting, not a shape); parameter_offload needs 2 or more."""
    # imported here: the loops may import this module
    from posttrain.loops.grpo import DistributedRecipeError, check_distributed_recipe

    if gpus == 1:
        return ["policy.parameter_offload needs torchrun with 2 or more processes"] if cfg.policy.parameter_offload else []
    unchecked = cfg.checkpointing.model_copy(update={"enabled": False, "export_final": False})
    try:
        check_distributed_recipe(cfg.model_copy(update={"checkpointing": unchecked}), gpus)
    except DistributedRecipeError as error:
        return [str(error)]
    return []


def launch_notes(cfg: RecipeConfig, gpus: int) -> list[str]:
    """Settings a launch on `gpus` processes would refuse besides the batch arithmetic
    (check_distributed_recipe's checkpointing rule, PolicyTrainer's token-budget rule)."""
    if gpus == 1:
        return []
    notes = []
    if cfg.checkpointing.enabled or cfg.checkpointing.export_final:
        notes.append("checkpointing.enabled and checkpointing.export_final must be false for a multi-process run")
    if cfg.policy.train_micro_batch_tokens is not None:
        notes.append("policy.train_micro_batch_tokens is one-process only")
    return notes


def smallest_fitting_count(
    cfg: RecipeConfig, *, capacity_gib: float, max_gpus: int, plan_on: Callable[[int], MemoryPlan]
) -> int | None:
    """The fewest GPUs, among the counts the recipe's batches split into, whose plan fits."""
    for gpus in range(1, max_gpus + 1):
        if not batch_problems(cfg, gpus) and fits(plan_on(gpus), capacity_gib):
            return gpus
    return None


def smallest_gpu_count(
    cfg: RecipeConfig, *, gpu: str, model_config: PretrainedConfig | None = None, max_gpus: int = 64
) -> int | None:
    """The fewest `gpu` GPUs (up to max_gpus) on which `cfg`'s peak stays within the usable memory
    less SAFETY_MARGIN; None when no count does (every GPU holds the engine's full weight copy:
    more GPUs do not always help)."""
    config = model_config if model_config is not None else recipe_model_config(cfg)
    inventory = model_inventory(config, cfg.policy)
    return smallest_fitting_count(
        cfg,
        capacity_gib=usable_gib(gpu),
        max_gpus=max_gpus,
        plan_on=lambda gpus: plan_for_recipe(cfg, gpus, config=config, inventory=inventory),
    )


def warn_if_unfit(
    cfg: RecipeConfig, gpus: int, *, gpu: str | None = None, model_config: PretrainedConfig | None = None
) -> str | None:
    """Before a CUDA launch: a warning when the plan does not fit `gpus` GPUs (None when it does).
    The capacity is `gpu`'s, or the current CUDA device's total memory."""
    capacity = usable_gib(gpu) if gpu is not None else torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    try:
        config = model_config if model_config is not None else recipe_model_config(cfg)
        inventory = model_inventory(config, cfg.policy)
    except PlanningError as error:
        return f"memory plan unavailable: {error}"
    plan = plan_for_recipe(cfg, gpus, config=config, inventory=inventory)
    if fits(plan, capacity):
        return None
    smallest = smallest_fitting_count(
        cfg, capacity_gib=capacity, max_gpus=64, plan_on=lambda n: plan_for_recipe(cfg, n, config=config, inventory=inventory)
    )
    return unfit_message(plan, capacity, smallest)


def unfit_message(plan: MemoryPlan, capacity_gib: float, smallest: int | None) -> str:
    where = f"{smallest} GPUs" if smallest is not None else "no GPU count up to 64"
    return (
        f"this recipe is planned to need {plan.peak:.1f} GiB per GPU on {plan.gpus} GPU(s) ({plan.peak_phase} phase), "
        f"more than {capacity_gib * (1 - SAFETY_MARGIN):.1f} GiB ({capacity_gib:.1f} GiB less a {SAFETY_MARGIN:.0%} "
        f"margin); it fits on {where} (`posttrain plan RECIPE --gpus N` shows the breakdown)"
    )


# ------------------------------------------------------------------------------------ the command


def plan_rows(plan: MemoryPlan) -> list[tuple[str, float]]:
    """(component, GiB per GPU) in the order the table prints them."""
    chosen = "checkpointing" if plan.activation_checkpointing else "no checkpointing"
    return [
        ("parameters (fp32 masters)", plan.parameters),
        ("gradients (fp32)", plan.gradients),
        ("optimizer state (AdamW, fp32)", plan.optimizer_state),
        ("FSDP2 gathered parameters + gradients", plan.fsdp_gathered),
        (f"activations, checkpointed{' *' if chosen == 'checkpointing' else ''}", plan.activations_checkpointed),
        (f"activations, not checkpointed{' *' if chosen != 'checkpointing' else ''}", plan.activations_full),
        ("logprob workspace (chunked head)", plan.logprob_workspace),
        ("reference policy (fp32)", plan.reference_policy),
        (f"engine weights ({plan.engine})", plan.engine_weights),
        (f"KV cache ({plan.generation_slots} slots)", plan.kv_cache),
        ("engine logits buffer", plan.engine_logits),
        ("sampling + prefill workspace", plan.sampling_workspace),
        ("generation phase", plan.generation_peak),
        ("training phase", plan.training_peak),
        ("weight refresh phase (FSDP2)", plan.refresh_peak),
    ]


def format_plan(plan: MemoryPlan, inventory: ModelInventory, *, recipe: str, gpu: str, smallest: int | None) -> str:
    capacity = usable_gib(gpu)
    limit = capacity * (1 - SAFETY_MARGIN)
    millions = {kind: inventory.count(kinds=(kind,)) / 1e6 for kind in KINDS}
    towers = {part: inventory.count(parts=(part,)) / 1e6 for part in ("vision", "audio")}
    lines = [
        f"memory plan: {recipe} on {plan.gpus} x {gpu} ({capacity:.1f} GiB, {limit:.1f} GiB within a {SAFETY_MARGIN:.0%} margin)",
        f"model: {inventory.model_class}, {inventory.count() / 1e6:,.1f}M parameters "
        f"({inventory.count(trainable_only=True) / 1e6:,.1f}M trainable): embeddings {millions['embedding']:,.1f}M, "
        f"matmul {millions['matmul']:,.1f}M, other {millions['other']:,.1f}M, of which vision tower "
        f"{towers['vision']:,.1f}M, audio tower {towers['audio']:,.1f}M",
        f"micro-batch: {plan.tokens_per_micro_batch:,} tokens; rollout: {plan.generation_slots} slots; * = in use",
        "",
        f"{'component':<44}{'GiB per GPU':>12}",
    ]
    for label, gib in plan_rows(plan):
        lines.append(f"{label:<44}{gib:>12.2f}")
    lines.append(f"{'peak (' + plan.peak_phase + ' phase)':<44}{plan.peak:>12.2f}")
    if plan.host_memory:
        lines.append(f"{'host memory per process (offload)':<44}{plan.host_memory:>12.2f}")
    lines.append("")
    lines.append(f"smallest {gpu} count that fits: {smallest if smallest is not None else 'none up to 64'}")
    if fits(plan, capacity):
        lines.append(f"fits on {plan.gpus} x {gpu}: peak {plan.peak:.2f} of {limit:.2f} GiB")
    else:
        lines.append(f"WARNING: does not fit on {plan.gpus} x {gpu}: {unfit_message(plan, capacity, smallest)}")
    return "\n".join(lines)


def plan_command(recipe: str, overrides: list[str], *, gpus: int | None, gpu: str, preset: str | None) -> int:
    """`posttrain plan RECIPE [--gpus N] [--gpu h200|h100] [--preset NAME]`: print the per-GPU
    table for `gpus` GPUs (default 1: a recipe states no world size of its own) and the smallest
    count that fits. `preset` (a Gemma 4 name) replaces the recipe's model, so no checkpoint is
    needed. Returns 0 when it fits, 1 when not, 2 for an invalid recipe, preset or GPU."""
    try:
        cfg = load_config(recipe, RecipeConfig, overrides)
        capacity = usable_gib(gpu)
        config = gemma4_preset_config(preset) if preset is not None else recipe_model_config(cfg)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    gpus = gpus or 1
    inventory = model_inventory(config, cfg.policy)

    def plan_on(count: int) -> MemoryPlan:
        return plan_for_recipe(cfg, count, config=config, inventory=inventory)

    plan = plan_on(gpus)
    smallest = smallest_fitting_count(cfg, capacity_gib=capacity, max_gpus=64, plan_on=plan_on)
    print(format_plan(plan, inventory, recipe=recipe, gpu=gpu, smallest=smallest))
    for problem in batch_problems(cfg, gpus) + launch_notes(cfg, gpus):
        print(f"note: a launch on {gpus} GPU(s) would be refused: {problem}")
    return 0 if fits(plan, capacity) else 1
