"""A Bradley-Terry reward model as an environment: reward = the model's scalar score of prompt + response.

The model is a local Hugging Face checkpoint directory with a sequence-classification head of one
output (num_labels 1), loaded with `AutoModelForSequenceClassification` from safetensors only; a
missing, unexpected or mis-shaped weight (e.g. a causal LM checkpoint, whose head would be
random-initialized) is a `CheckpointMismatchError`. It is frozen (no grad, eval mode, inference
mode) and lives on its own `device`, e.g. "cuda:1" beside a policy on "cuda:0".

What the reward model reads. `score()` gets the user message (data.prompt_template applied) and
the decoded response. input_format="auto" (default): if the reward model's tokenizer has a chat
template, the pair is rendered as the conversation [user: prompt, assistant: response] in THAT
template (the reward model's own chat format, which chat reward models are trained on) and
tokenized without adding special tokens (the template writes them); otherwise the text
prompt + response (no separator) is tokenized with the tokenizer's special tokens.
input_format="chat" requires a chat template, "plain" always concatenates.

Batching cannot change a score. transformers' *ForSequenceClassification reads the score at the
rightmost token that is not config.pad_token_id. Rows are padded on the RIGHT with that id,
whatever the tokenizer's padding_side: every real token then has the position and the attention
it has when the sequence is scored alone. Left padding would shift positions (transformers takes
them from the row index, not the mask): harmless under rotary embeddings, which see only relative
positions, but it changes the scores of a model with absolute position embeddings (GPT-2). A
config without pad_token_id is rejected: transformers cannot batch it. Sequences are sorted by
length before batching, to pad less.

Code: a checkpoint whose configs name Python code of its own (auto_map) is refused unless
trust_remote_code=True (see `posttrain.models.loading.check_remote_code`).

Length: with max_length set, a longer sequence keeps its LAST max_length tokens (the end of the
response, where the score is read), counted in env/reward_model_truncated; None: no limit.

Reward = the raw score (a logit, in float32; unbounded, so turn grpo.reward_scaling off: it
clamps to [source_min, source_max]). There is no scale or shift option: GRPO's group baseline
removes any shift, normalize_rewards removes any scale, and in `weighted` the component weight is
the scale. A non-finite score gives 0.0 and counts as a verifier error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from posttrain.environments.base import ScoringStats, score_each

if TYPE_CHECKING:
    import torch

InputFormat = Literal["auto", "chat", "plain"]
Dtype = Literal["float32", "bfloat16"]


class RewardModelEnvironment:
    """Reward = a sequence-classification reward model's score of (prompt, response)."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int | None = None,
        dtype: Dtype = "float32",
        input_format: InputFormat = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoTokenizer

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"max_length must be an integer >= 1 or None, got {max_length!r}")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if input_format not in ("auto", "chat", "plain"):
            raise ValueError(f"input_format must be 'auto', 'chat' or 'plain', got {input_format!r}")
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f"trust_remote_code must be true or false, got {trust_remote_code!r}")
        self.device = _check_device(device)
        self.batch_size = batch_size
        self.max_length = max_length

        self.model = load_reward_model(model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
        self.model = self.model.to(self.device)
        self.pad_token_id: int = self.model.config.get_text_config().pad_token_id
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        has_template = self.tokenizer.chat_template is not None
        if input_format == "chat" and not has_template:
            raise ValueError(f"{model}: input_format='chat' but the reward model's tokenizer has no chat template")
        self.uses_chat_template = input_format == "chat" or (input_format == "auto" and has_template)
        self._stats = ScoringStats()
        self._truncated = 0

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        if not len(prompts) == len(responses) == len(metadata):
            raise ValueError(
                "score() needs one prompt and one metadata dict per response, got "
                f"{len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata dicts"
            )
        token_ids = [self.token_ids(prompt, response) for prompt, response in zip(prompts, responses)]
        scores = iter(self.forward(token_ids))
        # score_each consumes one score per response, in order: it turns non-finite ones into
        # 0.0 + env/verifier_errors and logs them like any other environment's failures.
        return score_each(lambda *_: next(scores), prompts, responses, metadata, self._stats)

    def pop_metrics(self) -> dict[str, float]:
        metrics = {**self._stats.pop(), "env/reward_model_truncated": float(self._truncated)}
        self._truncated = 0
        return metrics

    def token_ids(self, prompt: str, response: str) -> list[int]:
        """The reward model's input for one pair (see the module docstring), truncated on the left."""
        if self.uses_chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt + response)["input_ids"]
        if self.max_length is not None and len(ids) > self.max_length:
            self._truncated += 1
            ids = ids[-self.max_length :]
        return ids

    def forward(self, token_ids: list[list[int]]) -> list[float]:
        """One score per sequence (float32 logits), in the order given; an empty sequence scores NaN."""
        import torch

        scores = [float("nan")] * len(token_ids)
        order = sorted((i for i, ids in enumerate(token_ids) if ids), key=lambda i: len(token_ids[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(token_ids[i]) for i in rows)
            input_ids_BT = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            attention_mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):  # right padding: see the module docstring
                input_ids_BT[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
                attention_mask_BT[row, : len(token_ids[i])] = 1
            with torch.inference_mode():
                logits_B1 = self.model(
                    input_ids=input_ids_BT.to(self.device),
                    attention_mask=attention_mask_BT.to(self.device),
                    use_cache=False,
                ).logits
            for i, value in zip(rows, logits_B1[:, 0].float().cpu().tolist(), strict=True):
                scores[i] = value
        return scores


def load_reward_model(path: str | Path, *, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """A frozen sequence-classification model with one output, from a local safetensors checkpoint;
    the checkpoint's own code runs only with `trust_remote_code`."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.loading import (
        CheckpointMismatchError,
        _check_checkpoint_dir,
        _quiet_transformers,
        check_remote_code,
    )

    path = Path(path)
    _check_checkpoint_dir(path)
    check_remote_code(path, trust_remote_code=trust_remote_code)
    with _quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
        )
    problems = {
        kind: sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get(key) or [])
        for kind, key in [
            ("missing", "missing_keys"),
            ("unexpected", "unexpected_keys"),
            ("shape-mismatched", "mismatched_keys"),
        ]
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{len(keys)} {kind} keys: {', '.join(keys[:12])}" for kind, keys in problems.items())
        raise CheckpointMismatchError(
            f"{path}: not a {type(model).__name__} checkpoint ({listed}); a reward model needs its trained "
            "sequence-classification head"
        )
    config = model.config
    if config.num_labels != 1:
        raise ValueError(f"{path}: a reward model has one output (num_labels 1), this one has {config.num_labels}")
    if config.get_text_config().pad_token_id is None:
        raise ValueError(
            f"{path}: config.json has no pad_token_id; transformers reads the score at the last token that is not "
            "the pad token, so batched scoring needs one (set it to the tokenizer's pad token id)"
        )
    return model.requires_grad_(False).eval()


def _check_device(device: str) -> torch.device:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device: {error}") from None
    if parsed.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= available:
            raise ValueError(f"device {device!r}: this machine has {available} CUDA device(s)")
    return parsed
