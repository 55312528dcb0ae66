"""The recipe schema: every key a recipe may set, typed, constrained and documented.

Key names follow NeMo-RL where they mean the same thing (`grpo.num_prompts_per_step`,
`policy.train_global_batch_size`, `loss_fn.ratio_clip_max`, ...). Cross-field rules are named
validators that run at load time, before any model is built. This module imports without torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from posttrain.config.loss import LossConfig


class Section(BaseModel):
    # nan/inf are never a meaningful setting (a nan reward bound would poison every reward silently).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------- policy


class OptimizerConfig(Section):
    name: Literal["adamw"] = Field("adamw", description="torch.optim.AdamW on fp32 master weights.")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")


class SchedulerConfig(Section):
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 to the peak lr over this many optimizer steps.")
    decay: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Shape after warm-up; linear and cosine decay to 0 at the run's last optimizer step."
    )


class GenerationConfig(Section):
    backend: Literal["auto", "continuous", "torch"] = Field(
        "auto",
        description=(
            "Rollout engine, colocated with the trainer. continuous: posttrain's continuous-batching engine (slot "
            "KV cache, CUDA graphs; docs/rollout.md). torch: the plain correctness-first engine (transformers' "
            "forward with a DynamicCache). auto: continuous on CUDA, torch on CPU."
        ),
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the trainer's logprobs use the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1.0 disables).")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens (null disables).")
    max_new_tokens: int = Field(512, ge=1, description="Maximum response length in tokens.")
    stop_token_ids: list[int] | None = Field(
        None, description="Token ids that end a response; null: the model config's eos ids."
    )
    stop_strings: list[str] = Field(
        default_factory=list,
        description="Texts that end a response (the token completing one is kept); checked on decoded text.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "bfloat16_autocast"] = Field(
        "auto",
        description=(
            "The generator's weights, refreshed from the fp32 master after each step. bfloat16: bf16 weights and "
            "activations. bfloat16_autocast: the trainer's own numerics (bf16 matmuls, fp32 residual stream and "
            "norms) for a smaller train/generate mismatch; the continuous engine stores matmul weights in bf16 "
            "and the rest in fp32, the torch engine keeps an fp32 copy. auto: bfloat16_autocast for the "
            "continuous engine, bfloat16 for the torch engine (docs/rollout.md has measurements)."
        ),
    )
    compile: bool = Field(
        True,
        description=(
            "continuous engine on CUDA: compile the decode step with torch.compile (fuses Gemma 4's many small "
            "kernels; about 2.5x faster decoding, minutes of one-time compilation for a real model)."
        ),
    )
    max_batch_size: int = Field(256, ge=1, description="Sequences decoded together.")
    release_weights_during_training: bool = Field(
        True,
        description=(
            "continuous engine: free its own weight copies (bf16 matmul weights under bfloat16_autocast; 3.5 GiB "
            "for E2B) while the trainer runs, and allocate them again at the refresh, which overwrites them anyway. "
            "Costs a CUDA-graph recapture when they come back at another address (E2B on an H200: the same step "
            "time either way, 4.2 GiB lower peak; docs/benchmarks.md)."
        ),
    )


class FreezeConfig(Section):
    """Parameters kept out of the optimizer (requires_grad=False): the family's towers and module-path patterns."""

    freeze_vision_tower: bool = Field(
        False, description="Freeze the vision tower and its projection (embed_vision); a no-op on a model without one."
    )
    freeze_audio_tower: bool = Field(
        True, description="Freeze the audio tower and its projection (embed_audio); a no-op on a model without one."
    )
    freeze_language_model: bool = Field(
        False,
        description=(
            "Freeze the language model and lm_head, to train only the towers; on a text-only model that is every "
            "parameter, an error."
        ),
    )
    patterns: list[str] = Field(
        default_factory=list,
        description=(
            "fnmatch patterns matched against parameter names and module paths, e.g. `model.language_model.layers.0.*` "
            "or `*.embed_tokens`; a pattern that matches nothing is an error. Tied weights freeze under either name."
        ),
    )


class PolicyConfig(Section):
    model_name: str | None = Field(
        None, description="Local Hugging Face checkpoint directory. Leave null when `tiny_model` builds one."
    )
    text_only: bool = Field(
        False,
        description="Load only the language model of a multimodal checkpoint (its real weights; towers dropped).",
    )
    trust_remote_code: bool = Field(
        False,
        description=(
            "Allow the checkpoint's own Python code (auto_map) to run; off unless you trust the checkpoint. Off, a "
            "checkpoint that names custom code is refused with an error."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where trainer and generator run; auto: cuda if available.")
    precision: Literal["float32", "bfloat16"] = Field(
        "bfloat16", description="Compute dtype of forward/backward (autocast). Master weights are always fp32."
    )
    train_global_batch_size: int = Field(
        512, ge=1, description="Samples per optimizer step (sft: conversations; dpo: preference pairs, two sequences each)."
    )
    train_micro_batch_size: int = Field(
        1, ge=1, description="Samples per forward/backward pass (dpo: pairs; a pair's two sequences share a pass)."
    )
    logprob_batch_size: int | None = Field(None, ge=1, description="Samples per no-grad logprob pass; null: micro batch size.")
    train_micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "Token budget per micro-batch (dynamic batching): consecutive samples are grouped while their real "
            "tokens fit (and at most train_micro_batch_size / logprob_batch_size of them); a longer sample goes alone. "
            "null: by sample count only."
        ),
    )
    fsdp_param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description=(
            "Under torchrun (several processes): the dtype FSDP2 gathers parameters in. float32: the one-process "
            "arithmetic exactly (bf16 autocast compute); bfloat16: half the communication, bf16 norms."
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile each decoder layer for training and scoring (fuses norms and elementwise work; measured "
            "1.37x on a packed E2B step). The first steps pay the compilation."
        ),
    )
    optimizer_offload: bool = Field(
        False,
        description=(
            "Keep AdamW's two moments in host memory (8 bytes per trainable parameter, in one page-locked buffer) and "
            "stream them through the GPU in chunks for each step: 8 bytes per parameter less on the GPU, the same "
            "update bit for bit; the step then moves 16 bytes per parameter over PCIe. Under torchrun each rank "
            "offloads its shards."
        ),
    )
    parameter_offload: bool = Field(
        False,
        description=(
            "Under torchrun (FSDP2): keep each rank's shards of the fp32 parameters, their gradients and AdamW's "
            "state in pinned host memory (FSDP2's CPUOffloadPolicy); each decoder layer's parameters come to the GPU "
            "for its forward and backward only and the optimizer step runs on the CPU. For models whose shards do "
            "not fit beside the activations; slower (every step moves weights and gradients over PCIe). Includes "
            "what optimizer_offload does."
        ),
    )
    sequence_packing: bool = Field(
        False,
        description=(
            "Run each micro-batch as one packed sequence (samples concatenated, positions restarting, attention "
            "kept within each sample) instead of padded rows: no compute on padding; same loss and gradients. "
            "Text-only batches."
        ),
    )
    attention: Literal["auto", "document", "sdpa", "eager"] = Field(
        "auto",
        description=(
            "Attention kernel for training and scoring (text models). document: each packed sequence or padded row "
            "attends over its own tokens, in causal mode, never a dense mask over the whole batch (SDPA; blocked GEMMs "
            "for heads wider than 256). sdpa / eager: transformers' implementations. auto: document on CUDA for text models, otherwise the "
            "implementation the model loaded with. Rollout engines keep their own attention."
        ),
    )
    max_total_sequence_length: int = Field(
        4096,
        ge=2,
        description=(
            "Prompt + response tokens; prompts longer than this minus generation.max_new_tokens are dropped (counted). "
            "sft: conversations longer than this are dropped (counted), never truncated; dpo: the same for pairs with "
            "a longer prompt + response."
        ),
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (null: no clipping). The pre-clip norm is logged.")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward (non-reentrant: exact; less memory, slower).",
    )
    freeze_config: FreezeConfig = FreezeConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def one_offload(self) -> PolicyConfig:
        if self.parameter_offload and self.optimizer_offload:
            raise ValueError(
                "parameter_offload already keeps AdamW's state in host memory (with the parameters); "
                "set optimizer_offload: false"
            )
        return self


class TinyModelConfig(Section):
    """Build a random-init tiny Gemma 4 text model and train its tokenizer locally (no downloads)."""

    hidden_size: int = Field(64, ge=8, description="Model width.")
    num_hidden_layers: int = Field(2, ge=1, description="Decoder layers, alternating sliding and full attention (the last is full).")
    num_attention_heads: int = Field(2, ge=1, description="Query heads per layer.")
    num_key_value_heads: int = Field(1, ge=1, description="Key/value heads per layer (grouped-query attention).")
    head_dim: int = Field(32, ge=4, description="Head size of sliding and full layers alike (passed as global_head_dim too).")
    intermediate_size: int = Field(128, ge=8, description="MLP width.")
    vocab_size: int = Field(128, ge=16, description="BPE merges beyond the 256 byte symbols and special tokens.")
    tokenizer_corpus_size: int = Field(2000, ge=1, description="Training prompts + answers used to train the tokenizer.")
    seed: int = Field(0, description="Seed of the random initialization.")
    multimodal: bool = Field(
        False,
        description=(
            "Build a tiny multimodal Gemma 4 (vision and audio towers, and Gemma 4's processor: one image soft "
            "token per 12 x 12 pixels, image sides multiples of 12) for data with images."
        ),
    )
    preset: Literal["e2b", "e4b", "26b-a4b", "31b"] | None = Field(
        None,
        description=(
            "Instead of the tiny dimensions above: a random-init model at a released Gemma 4's shape (262k vocabulary, "
            "attention tempered, saved in bf16), for GPU runs at the real shape without the weights. With multimodal, "
            "its vision (and audio) towers and a processor sized for them."
        ),
    )
    preset_layers: int | None = Field(
        None, ge=1, description="With preset: keep only its first layers (each at its real shape), to fit one GPU."
    )

    def dimensions(self) -> dict[str, int]:
        """The keyword arguments of `tiny_gemma4_config` (and `save_tiny_gemma4`) these settings give."""
        names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
        return {name: getattr(self, name) for name in names}

    def tokenizer_vocab_size(self) -> int:
        """What the BPE trainer is asked for: 256 bytes + 6 special tokens + the merges (a small
        corpus may give fewer)."""
        return 256 + 6 + self.vocab_size

    @model_validator(mode="after")
    def heads_divide(self) -> TinyModelConfig:
        if self.preset_layers is not None and self.preset is None:
            raise ValueError("preset_layers cuts a preset's layers: set preset too")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        return self


# ------------------------------------------------------------------------------------------ data


class ArithmeticSource(Section):
    """Procedurally generated arithmetic prompts; train and validation never share an expression."""

    type: Literal["arithmetic"] = Field(description="Selects this source.")
    size: int = Field(ge=1, description="Number of prompts.")
    seed: int = Field(0, description="Generator seed.")
    num_terms: int = Field(2, ge=2, description="Integers per expression.")
    max_value: int = Field(99, ge=1, description="Integers are drawn from [0, max_value].")
    operation: Literal["sum", "max"] = Field("sum", description='"sum": 37+48-5; "max": max(37, 48, 5).')


class ShapesSource(Section):
    """Procedurally rendered images: count the shapes (Pillow, offline); one image per prompt."""

    type: Literal["shapes"] = Field(description="Selects this source.")
    size: int = Field(ge=1, description="Number of prompts.")
    seed: int = Field(0, description="Generator seed (train and validation also differ by split).")
    max_count: int = Field(6, ge=1, le=64, description="Counts are uniform in [1, max_count].")
    image_sizes: list[tuple[int, int]] = Field(
        default_factory=lambda: [(48, 48)],
        min_length=1,
        description="Image (width, height) in pixels, cycled through; multiples of 12 with at least max_count 12-px cells.",
    )
    style: Literal["varied", "solid"] = Field(
        "varied",
        description=(
            "varied: circles, squares and triangles in six colors, inset in their cells; solid: the same shapes in "
            "black, edge to edge (a signal a tiny random-init vision tower learns to count quickly)."
        ),
    )


class ReasoningGymSource(Section):
    """Prompts from one of reasoning-gym's procedural tasks (generated offline)."""

    type: Literal["reasoning_gym"] = Field(description="Selects this source.")
    task: str = Field(description="A reasoning-gym dataset name, e.g. chain_sum.")
    size: int = Field(ge=1, description="Number of prompts.")
    seed: int = Field(0, description="reasoning-gym's dataset seed.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="The task's own options, e.g. chain_sum's {min_terms: 2, max_terms: 2, max_digits: 1}."
    )


class FileSource(Section):
    """Prompts from a local JSONL or Parquet file with any columns (read with `datasets`)."""

    type: Literal["file"] = Field(description="Selects this source.")
    path: str = Field(description="Local .jsonl/.json or .parquet file; relative paths are resolved against the working directory.")
    prompt_key: str = Field(
        "prompt",
        description=(
            "Column with the prompt text, or a chat `messages` list whose last user message is the prompt. A dotted "
            "key descends into nested columns: `prompt.0.content`."
        ),
    )
    answer_key: str | None = Field(
        "answer",
        description="Column with the ground-truth answer, dotted as prompt_key (verl data: `reward_model.ground_truth`); null: none.",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first rows.")


DatasetName = Literal["dapo_math_17k", "aime_2024", "gsm8k", "math_500", "openmathinstruct2", "geometry3k"]


class DatasetSource(Section):
    """A public math dataset read in its published format (docs/data.md lists the formats)."""

    type: Literal["dataset"] = Field(description="Selects this source.")
    name: DatasetName = Field(description="Which dataset; its format, default split and hub id are in docs/data.md.")
    path: str | None = Field(
        None,
        description=(
            "A local file in the dataset's format, a local directory holding a download of its hub repository, or a "
            "hub id (read with datasets.load_dataset); null: the dataset's own hub id. Relative to the working directory."
        ),
    )
    split: str | None = Field(
        None, description="Split read from a directory or the hub; null: the dataset's default. Leave null when path is a file."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first rows.")

    @model_validator(mode="after")
    def split_exists(self) -> DatasetSource:
        from posttrain.data.datasets import DATASETS

        splits = sorted(DATASETS[self.name].files)
        if self.split is not None and self.split not in splits:
            raise ValueError(f"dataset {self.name} has no split {self.split!r}; its splits: {splits}")
        return self


class ChatSource(Section):
    """Conversations for supervised fine-tuning: rows holding a list of {role, content} messages."""

    type: Literal["chat"] = Field(description="Selects this source.")
    path: str = Field(
        description=(
            "A local .jsonl/.json or .parquet file; or a local directory of such files, or a hub id, read with "
            "datasets.load_dataset(path, split=split) (the hub needs network access). Relative to the working directory."
        )
    )
    messages_key: str = Field(
        "messages",
        description=(
            "Column holding each row's messages: a list of {role, content} with roles system, user and assistant "
            "(the first not an assistant's, at least one user and one assistant message). Dotted keys descend as "
            "in `type: file`."
        ),
    )
    split: str | None = Field(
        None, description="Split read from a directory or the hub; null: train. Leave null when path is a file."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first rows.")


class ArithmeticChatSource(Section):
    """Procedurally generated multi-turn arithmetic conversations (a running total), for SFT on CPU."""

    type: Literal["arithmetic_chat"] = Field(description="Selects this source.")
    size: int = Field(ge=1, description="Number of conversations.")
    seed: int = Field(0, description="Generator seed; train and validation never share a first expression.")
    max_turns: int = Field(
        3,
        ge=1,
        description=(
            "Assistant turns per conversation, uniform in [1, max_turns]: the first answers a+b or a-b, each later "
            "one adds or subtracts another integer from the running total."
        ),
    )
    max_value: int = Field(99, ge=1, description="Integers are drawn from [0, max_value].")


class PreferenceSource(Section):
    """Preference pairs for DPO: rows holding a prompt, a chosen and a rejected response (the common
    Hugging Face layouts; docs/data.md)."""

    type: Literal["preferences"] = Field(description="Selects this source.")
    path: str = Field(
        description=(
            "A local .jsonl/.json or .parquet file; or a local directory of such files, or a hub id, read with "
            "datasets.load_dataset(path, split=split) (the hub needs network access). Relative to the working directory."
        )
    )
    prompt_key: str | None = Field(
        "prompt",
        description=(
            "Column holding the prompt: a string (the user message) or a list of {role, content} messages ending in a "
            "user turn. null: the rows have no prompt column and chosen and rejected are whole conversations sharing "
            "everything but their last (assistant) message. Dotted keys descend as in `type: file`."
        ),
    )
    chosen_key: str = Field(
        "chosen", description="Column holding the preferred response: a string or a list with one assistant message."
    )
    rejected_key: str = Field(
        "rejected", description="Column holding the dispreferred response: a string or a list with one assistant message."
    )
    split: str | None = Field(
        None, description="Split read from a directory or the hub; null: train. Leave null when path is a file."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first rows.")


class ArithmeticPreferenceSource(Section):
    """Procedurally generated preference pairs on arithmetic prompts (chosen: the right answer,
    rejected: a wrong one), for DPO on CPU."""

    type: Literal["arithmetic_preferences"] = Field(description="Selects this source.")
    size: int = Field(ge=1, description="Number of pairs.")
    seed: int = Field(0, description="Generator seed; train and validation never share an expression.")
    num_terms: int = Field(2, ge=2, description="Integers per expression.")
    max_value: int = Field(99, ge=1, description="Integers are drawn from [0, max_value].")
    operation: Literal["sum", "max"] = Field(
        "max",
        description=(
            'The prompt "Compute max(37, 48)." (rejected: the smallest term, 37) or "Compute 37+48." (rejected: the sum '
            "off by 1 to 10)."
        ),
    )


PromptSource = Annotated[
    ArithmeticSource
    | ShapesSource
    | ReasoningGymSource
    | FileSource
    | DatasetSource
    | ChatSource
    | ArithmeticChatSource
    | PreferenceSource
    | ArithmeticPreferenceSource,
    Field(discriminator="type"),
]
CHAT_SOURCES = (ChatSource, ArithmeticChatSource)  # conversations, for algorithm sft
PREFERENCE_SOURCES = (PreferenceSource, ArithmeticPreferenceSource)  # preference pairs, for algorithm dpo
SOURCES_OF = {"sft": CHAT_SOURCES, "dpo": PREFERENCE_SOURCES}  # the others hold prompts, for grpo


class DataConfig(Section):
    train: PromptSource = Field(
        description=(
            "Where training prompts (grpo), conversations (sft: chat, arithmetic_chat) or preference pairs (dpo: "
            "preferences, arithmetic_preferences) come from (a source with a `type`)."
        )
    )
    validation: PromptSource | None = Field(
        None,
        description=(
            "Held-out prompts (validation/accuracy), conversations (validation/loss) or preference pairs "
            "(validation/rewards/accuracy); null: no validation."
        ),
    )
    prompt_template: str = Field(
        "{prompt}",
        description=(
            "Text around each prompt before the chat template: {prompt} is replaced by the prompt, everything else is "
            "literal (no brace escaping); must contain {prompt}."
        ),
    )
    prompt_template_file: str | None = Field(
        None,
        description=(
            "The template from a file instead: a built-in name (math_cot_boxed, dapo_answer, geo3k_think_answer) or a path to a text file "
            "(containing '/' or ending in .txt, relative to the working directory). Excludes a prompt_template."
        ),
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A malformed data row: error naming its file and row, or skip it (counted as data/skipped_bad_rows).",
    )
    shuffle: bool = Field(
        True, description="Reshuffle training prompts every epoch (seeded by grpo.seed, sft.seed or dpo.seed)."
    )

    @model_validator(mode="after")
    def template_has_prompt(self) -> DataConfig:
        if "{prompt}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain '{prompt}'")
        return self

    @model_validator(mode="after")
    def one_template(self) -> DataConfig:
        if self.prompt_template_file is not None and self.prompt_template != "{prompt}":
            raise ValueError("set data.prompt_template or data.prompt_template_file, not both")
        return self

    @model_validator(mode="after")
    def template_file_known(self) -> DataConfig:
        """A built-in name is checked here; a file is read when the run is built."""
        from posttrain.data.templates import check_builtin_name

        if self.prompt_template_file is not None:
            check_builtin_name(self.prompt_template_file)
        return self


class EnvConfig(Section):
    name: str = Field(
        "math",
        description=(
            "Environment name: math, reasoning_gym, reward_model, format, answer_math, weighted, geometry3k, or custom "
            "(with options.import_path). docs/environments.md lists each one's options."
        ),
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the environment; null: none (a recipe switching environments drops its base's).",
    )

    @field_validator("options", mode="before")
    @classmethod
    def null_is_no_options(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def options_fit_environment(self) -> EnvConfig:
        """Unknown names and options fail at load time, not when the first batch is scored."""
        import inspect

        from posttrain.environments import builtin_environment

        if self.name == "custom":
            if "import_path" not in self.options:
                raise ValueError("env.name 'custom' needs env.options.import_path: 'package.module:ClassName'")
            return self
        environment = builtin_environment(self.name)
        signature = inspect.signature(environment)
        try:
            signature.bind(**self.options)
        except TypeError as error:
            raise ValueError(f"env.options do not fit environment {self.name!r} {signature}: {error}") from None
        if self.name == "weighted":  # its components' names and options, without building any of them
            environment.check_options(self.options["components"])
        return self


# ----------------------------------------------------------------------------------------- grpo


class RewardScalingConfig(Section):
    """Linear map of rewards from [source_min, source_max] to [target_min, target_max] (clamped first)."""

    enabled: bool = Field(False, description="Apply the map.")
    source_min: float = Field(0.0, description="Rewards are clamped to [source_min, source_max] first.")
    source_max: float = Field(1.0, description="Upper end of the source range.")
    target_min: float = Field(-1.0, description="source_min maps here.")
    target_max: float = Field(1.0, description="source_max maps here.")


class RewardShapingConfig(Section):
    """DAPO's soft overlong punishment."""

    enabled: bool = Field(False, description="Add the penalty to the reward.")
    overlong_buffer_length: int = Field(
        128, ge=1, description="The penalty ramps linearly over the last this many tokens before max_response_length."
    )
    overlong_buffer_penalty: float = Field(1.0, ge=0, description="Penalty at max_response_length.")
    max_response_length: int | None = Field(None, ge=1, description="null: policy.generation.max_new_tokens.")


class GRPOConfig(Section):
    num_prompts_per_step: int = Field(32, ge=1, description="Prompt groups trained on per step.")
    num_generations_per_prompt: int = Field(16, ge=1, description="Responses sampled per prompt (the group size).")
    max_num_steps: int = Field(100, ge=1, description="RL steps (one rollout batch each).")
    normalize_rewards: bool = Field(True, description="Divide advantages by the group's reward std.")
    use_leave_one_out_baseline: bool = Field(False, description="Baseline each response by the mean of the others in its group.")
    use_dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards all agree, resample until the batch is full.")
    batch_multiplier: int = Field(1, ge=1, description="With dynamic sampling, each generation batch has this many times the prompts.")
    dynamic_sampling_max_gen_batches: int = Field(
        10, ge=1, description="Give up with a clear error when this many generation batches did not fill a step."
    )
    dynamic_sampling_carry_over: bool = Field(
        False,
        description=(
            "Keep informative groups beyond num_prompts_per_step for the next step. They were sampled by older "
            "weights (off-policy, corrected only by importance sampling); false drops them, as verl does."
        ),
    )
    overlong_filtering: bool = Field(False, description="Mask truncated responses out of the loss.")
    reward_scaling: RewardScalingConfig = RewardScalingConfig()
    reward_shaping: RewardShapingConfig = RewardShapingConfig()
    val_period: int = Field(10, ge=0, description="Validate every this many steps (0: never).")
    val_at_start: bool = Field(True, description="Validate before the first RL step (logged as step 0).")
    val_at_end: bool = Field(True, description="Validate after the last step.")
    max_val_samples: int | None = Field(None, ge=1, description="Use only the first validation prompts; null: all.")
    val_temperature: float | None = Field(None, ge=0, description="Sampling temperature for validation; 0 greedy; null: generation's.")
    seed: int = Field(42, description="Seeds sampling, data order and initialization; runs are reproducible from it.")
    max_consecutive_nonfinite_steps: int = Field(
        3,
        ge=1,
        description=(
            "An optimizer step whose loss or gradient norm is NaN/inf is skipped (no update, counted in "
            "train/skipped_nonfinite_steps); stop with an error after this many skipped in a row."
        ),
    )


class WarmStartConfig(Section):
    """A short supervised phase before RL: SFT steps on solved training prompts (loss on the answer), own AdamW.

    The warm start's AdamW is discarded before RL: RL starts with fresh moments (loops/warm_start.py).
    """

    enabled: bool = Field(False, description="Run the warm start before RL (skipped when resuming).")
    num_steps: int = Field(100, ge=1, description="AdamW steps (gradients clipped at norm 1, no weight decay).")
    batch_size: int = Field(64, ge=1, description="Prompts per step, drawn from the training data.")
    lr: float = Field(1e-3, gt=0, description="Constant learning rate.")
    label_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Share of warm-start examples whose answer is replaced by another prompt's answer: an imperfect "
            "teacher, so that the warm-started policy knows the format but is often wrong, as real SFT models are."
        ),
    )


# ------------------------------------------------------------------------------------------ sft


class SFTConfig(Section):
    """Supervised fine-tuning (algorithm: sft): cross-entropy on the assistant turns of chat data.

    The loss of an optimizer step is -(sum of the log-probabilities of its supervised tokens) / (its
    supervised tokens, counted over the whole global batch and every rank), so micro-batch size,
    packing and the number of processes change neither loss nor gradient. Supervised tokens: each
    assistant turn's content and its end-of-turn token, never the role header.
    """

    max_num_steps: int = Field(1000, ge=1, description="Optimizer steps of policy.train_global_batch_size conversations each.")
    max_num_epochs: int | None = Field(
        None,
        ge=1,
        description=(
            "Also stop after this many passes over the training conversations, when that comes first. An epoch is "
            "floor(conversations / train_global_batch_size) steps over an order reshuffled per epoch (data.shuffle); "
            "the remainder sits that epoch out. null: max_num_steps alone."
        ),
    )
    val_period: int = Field(50, ge=0, description="Compute validation/loss every this many steps (0: never).")
    val_at_start: bool = Field(True, description="Compute validation/loss before the first step (logged as step 0).")
    val_at_end: bool = Field(True, description="Compute validation/loss after the last step.")
    max_val_samples: int | None = Field(None, ge=1, description="Use only the first validation conversations; null: all.")
    seed: int = Field(42, description="Seeds data order and initialization; runs are reproducible from it.")
    max_consecutive_nonfinite_steps: int = Field(
        3,
        ge=1,
        description=(
            "An optimizer step whose loss or gradient norm is NaN/inf is skipped (no update, counted in "
            "train/skipped_nonfinite_steps); stop with an error after this many skipped in a row."
        ),
    )


# ------------------------------------------------------------------------------------------ dpo


class DPOConfig(Section):
    """Direct preference optimization (algorithm: dpo; Rafailov et al. 2023) on preference pairs.

    Per pair, with sequence logprobs summed over the response tokens (response and end-of-turn
    token, at temperature 1) under the policy (pc, pr) and under the initial policy (rc, rr, the
    reference, computed once before training):
        loss = -log sigmoid(beta ((pc - rc) - (pr - rr)))   averaged over the global batch's pairs
             + sft_weight * (-(pc summed over the pairs) / (chosen tokens of the global batch))
    Both denominators are counted over the whole global batch and every rank, so micro-batch size,
    packing and the number of processes change neither loss nor gradient.
    """

    beta: float = Field(
        0.1, gt=0, description="Inverse temperature of the implicit reward beta (logpi - logpi_ref): higher keeps closer to the reference."
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description=(
            "Weight of an added NLL term on the chosen responses, per chosen token (RPO-style regularizer that keeps "
            "the chosen responses likely); 0: pure DPO."
        ),
    )
    max_num_steps: int = Field(1000, ge=1, description="Optimizer steps of policy.train_global_batch_size pairs each.")
    max_num_epochs: int | None = Field(
        None,
        ge=1,
        description=(
            "Also stop after this many passes over the training pairs, when that comes first. An epoch is "
            "floor(pairs / train_global_batch_size) steps over an order reshuffled per epoch (data.shuffle); the "
            "remainder sits that epoch out. null: max_num_steps alone."
        ),
    )
    val_period: int = Field(50, ge=0, description="Compute the validation/* preference metrics every this many steps (0: never).")
    val_at_start: bool = Field(True, description="Compute them before the first step (logged as step 0: accuracy 0.5, margins 0).")
    val_at_end: bool = Field(True, description="Compute them after the last step.")
    max_val_samples: int | None = Field(None, ge=1, description="Use only the first validation pairs; null: all.")
    seed: int = Field(42, description="Seeds data order and initialization; runs are reproducible from it.")
    max_consecutive_nonfinite_steps: int = Field(
        3,
        ge=1,
        description=(
            "An optimizer step whose loss or gradient norm is NaN/inf is skipped (no update, counted in "
            "train/skipped_nonfinite_steps); stop with an error after this many skipped in a row."
        ),
    )


# ----------------------------------------------------------------------------- run bookkeeping


class WandbConfig(Section):
    """Weights & Biases (`pip install "posttrain[wandb]"`); offline by default: no account, no network.

    `wandb sync <dir>/wandb/offline-run-*` uploads an offline run later."""

    enabled: bool = Field(False, description="Also log metrics, the resolved config and sample generations to W&B.")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under <dir>/wandb only; online: stream to the W&B server (needs a login)."
    )
    project: str = Field("posttrain", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; null: the login's default.")
    name: str | None = Field(None, description="Run name; null: the run directory's name.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    dir: str | None = Field(None, description="Where W&B writes its wandb/ folder; null: the run directory.")


class MLflowConfig(Section):
    """MLflow tracking (`pip install "posttrain[mlflow]"`, the mlflow-skinny client).

    Metric names keep their `/`; characters MLflow rejects (anything but letters, digits, `_ - . : /`
    and space) become `_`."""

    enabled: bool = Field(False, description="Also log metrics, the config (params and config.yaml) and samples to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description=(
            "Where runs are tracked: an http(s) server, a database URI (needs the full mlflow package) or a local "
            "directory; null: the file store <log_dir>/mlruns (MLflow's file store: no server, no database)."
        ),
    )
    experiment_name: str = Field("posttrain", min_length=1, description="MLflow experiment (created when absent).")
    run_name: str | None = Field(None, description="Run name; null: the run directory's name.")


class SampleGenerationsConfig(Section):
    """GRPO rollouts shown as text: prompt, response, reward (sft and dpo generate nothing)."""

    period: int = Field(
        10,
        ge=0,
        description=(
            "Every this many GRPO steps, log sample generations of the step's training batch to "
            "<log_dir>/samples.jsonl and every enabled logger (W&B table, MLflow artifact, TensorBoard text); 0: never."
        ),
    )
    count: int = Field(
        4,
        ge=1,
        description=(
            "Responses per logged step: the first of the training batch, whole prompt groups first "
            "(count = grpo.num_generations_per_prompt shows one prompt's group)."
        ),
    )


class LoggerConfig(Section):
    """metrics.jsonl is always written (`posttrain check` and `report` read it); the other loggers are optional."""

    log_dir: str = Field(
        "runs/posttrain",
        description="Run directory: metrics.jsonl, config.yaml, environment.json, samples.jsonl, TensorBoard, checkpoints.",
    )
    tensorboard_enabled: bool = Field(True, description="Also write TensorBoard event files under <log_dir>/tensorboard.")
    wandb: WandbConfig = WandbConfig()
    mlflow: MLflowConfig = MLflowConfig()
    sample_generations: SampleGenerationsConfig = SampleGenerationsConfig()
    num_val_samples_to_print: int = Field(0, ge=0, description="Print this many validation prompts and responses.")
    progress: bool = Field(
        True,
        description=(
            "On a terminal, show live progress bars (the run, the current phase of each step) above the per-step "
            "lines; false, or stdout not a terminal: plain per-step lines and warnings only."
        ),
    )


class CheckpointingConfig(Section):
    enabled: bool = Field(True, description="Save checkpoints; `posttrain train` resumes from the latest one.")
    checkpoint_dir: str | None = Field(None, description="null: <log_dir>/checkpoints.")
    save_period: int = Field(10, ge=1, description="Save every this many steps (and at the end).")
    keep_top_k: int | None = Field(2, ge=1, description="Keep the newest k checkpoints.")
    export_final: bool = Field(
        True,
        description="At the end of the run, write the weights as a Hugging Face directory <log_dir>/final_model.",
    )
    export_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weight dtype of that export; float32: the trainer's master weights, exactly."
    )


Algorithm = Literal["grpo", "sft", "dpo"]  # each has its section (grpo:, sft:, dpo:) and its loop in posttrain.loops


class RecipeConfig(Section):
    algorithm: Algorithm = Field(
        "grpo",
        description=(
            "What the run trains with: grpo (GRPO / DAPO: rollouts, rewards, the grpo and loss_fn sections), sft "
            "(supervised fine-tuning on chat data: the sft section) or dpo (direct preference optimization on "
            "preference pairs: the dpo section); sft and dpo leave env, grpo, loss_fn and warm_start unused."
        ),
    )
    policy: PolicyConfig = PolicyConfig()
    tiny_model: TinyModelConfig | None = None
    data: DataConfig
    env: EnvConfig = EnvConfig()
    grpo: GRPOConfig = GRPOConfig()
    loss_fn: LossConfig = LossConfig()
    warm_start: WarmStartConfig = WarmStartConfig()
    sft: SFTConfig = SFTConfig()
    dpo: DPOConfig = DPOConfig()
    logger: LoggerConfig = LoggerConfig()
    checkpointing: CheckpointingConfig = CheckpointingConfig()
    gates: list[str] = Field(
        default_factory=list,
        description=(
            "Checks `posttrain check RUN_DIR` runs on the run's metrics.jsonl, e.g. "
            "'median(train/token_mult_prob_error) < 1.05' or 'train/reward[20] > 0.1 and max(train/reward) > 0.45': "
            "a function (count, first, last, max, mean, median, min) of a metric's logged values, or its value at a "
            "step, compared (<, <=, >, >=, ==, !=) with a number or another such value; combined with and, or and "
            "parentheses. A metric never logged, a missing step or a nan fails the gate."
        ),
    )

    @field_validator("gates")
    @classmethod
    def gates_parse(cls, gates: list[str]) -> list[str]:
        """A gate with a syntax error fails at load time, not after the run it was meant to check."""
        from posttrain.metrics.gates import parse_gate  # here, not at the top: gates.py imports this schema

        for gate in gates:
            parse_gate(gate)
        return gates

    @model_validator(mode="after")
    def exactly_one_model_source(self) -> RecipeConfig:
        if (self.policy.model_name is None) == (self.tiny_model is None):
            raise ValueError(
                "set exactly one of policy.model_name (a local checkpoint directory) and tiny_model "
                "(build a tiny random-init Gemma 4)"
            )
        return self

    @model_validator(mode="after")
    def data_fits_algorithm(self) -> RecipeConfig:
        """Conversations train with sft, preference pairs with dpo, prompts with grpo; sft and dpo
        have no use for the RL-only settings."""
        sources = {"data.train": self.data.train, "data.validation": self.data.validation}
        kinds = {"sft": ("conversations", "a chat source (type chat or arithmetic_chat)"),
                 "dpo": ("preference pairs", "a preference source (type preferences or arithmetic_preferences)")}  # fmt: skip
        if self.algorithm in SOURCES_OF:
            what, source_kind = kinds[self.algorithm]
            for key, source in sources.items():
                if source is not None and not isinstance(source, SOURCES_OF[self.algorithm]):
                    raise ValueError(
                        f"algorithm {self.algorithm} trains on {what}: {key} must be {source_kind}, got type {source.type}"
                    )
            if self.data.prompt_template != "{prompt}" or self.data.prompt_template_file is not None:
                raise ValueError(
                    f"algorithm {self.algorithm} trains on the {what} as written: unset data.prompt_template(_file)"
                )
            if self.warm_start.enabled:
                raise ValueError(
                    f"warm_start is the supervised phase before RL; algorithm {self.algorithm} does not run it: "
                    "set warm_start.enabled: false"
                )
            return self
        for key, source in sources.items():
            for algorithm, kinds_of in SOURCES_OF.items():
                if isinstance(source, kinds_of):
                    hint = " (chat data: {type: file, prompt_key: messages})" if algorithm == "sft" else ""
                    raise ValueError(
                        f"{key}: a {source.type} source holds {kinds[algorithm][0]} for algorithm: {algorithm}; "
                        f"GRPO reads prompts{hint}"
                    )
        return self

    @model_validator(mode="after")
    def batch_arithmetic(self) -> RecipeConfig:
        samples = self.grpo.num_prompts_per_step * self.grpo.num_generations_per_prompt
        global_batch, micro_batch = self.policy.train_global_batch_size, self.policy.train_micro_batch_size
        if self.algorithm == "grpo" and samples % global_batch:
            raise ValueError(
                f"each step produces grpo.num_prompts_per_step x grpo.num_generations_per_prompt = "
                f"{self.grpo.num_prompts_per_step} x {self.grpo.num_generations_per_prompt} = {samples} samples, "
                f"which must split into whole optimizer steps of policy.train_global_batch_size = {global_batch}; "
                f"set train_global_batch_size to a divisor of {samples} (e.g. {samples})"
            )
        if global_batch % micro_batch:
            raise ValueError(
                f"policy.train_global_batch_size ({global_batch}) must be a multiple of "
                f"policy.train_micro_batch_size ({micro_batch}): each optimizer step accumulates whole micro-batches"
            )
        return self

    @model_validator(mode="after")
    def sequence_budget(self) -> RecipeConfig:
        if self.algorithm != "grpo":  # sft and dpo generate nothing
            return self
        if self.policy.generation.max_new_tokens >= self.policy.max_total_sequence_length:
            raise ValueError(
                f"policy.generation.max_new_tokens ({self.policy.generation.max_new_tokens}) leaves no room for the "
                f"prompt within policy.max_total_sequence_length ({self.policy.max_total_sequence_length})"
            )
        shaping = self.grpo.reward_shaping
        max_response = shaping.max_response_length or self.policy.generation.max_new_tokens
        if shaping.enabled and shaping.overlong_buffer_length > max_response:
            raise ValueError(
                f"grpo.reward_shaping.overlong_buffer_length ({shaping.overlong_buffer_length}) exceeds the maximum "
                f"response length ({max_response})"
            )
        return self

    @model_validator(mode="after")
    def dynamic_sampling_needs_groups(self) -> RecipeConfig:
        if self.grpo.use_dynamic_sampling and self.grpo.num_generations_per_prompt < 2:
            raise ValueError("grpo.use_dynamic_sampling needs grpo.num_generations_per_prompt >= 2 (a group of one never varies)")
        return self
