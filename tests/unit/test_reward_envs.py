"""Reward-model, format, answer_math, weighted and geometry3k environments."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
)

from posttrain.cli.main import QUICKSTART_RECIPE
from posttrain.config import RecipeConfig, load_config
from posttrain.config.loader import ConfigError
from posttrain.environments import (
    BUILTIN_ENVIRONMENTS,
    Environment,
    FormatEnvironment,
    Geometry3kEnvironment,
    RewardModelEnvironment,
    WeightedEnvironment,
    build,
)
from posttrain.environments.composite import THINK_ANSWER_PATTERN, last_tagged
from posttrain.models.loading import CheckpointMismatchError, CheckpointNotFoundError
from posttrain.models.tiny import train_tokenizer

pytestmark = pytest.mark.unit

PROMPTS = [
    "Compute max(3, 9).",
    "Compute max(41, 14).",
    "hi",
    "Compute max(7, 70). Show your work.",
    "x",
    "Compute max(5, 55).",
]
RESPONSES = ["9", "The answer is 41, since 41 > 14.", "hello there", "", "70 70 70 70 70 70 70 70 70 70", "55"]


def save_tiny_reward_model(
    path: Path,
    *,
    seed: int = 0,
    chat_template: bool = True,
    padding_side: str = "left",
    num_labels: int = 1,
    pad_token_id: bool = True,
    causal_lm: bool = False,
    arch: str = "qwen3",
) -> Path:
    """A random-init 2-layer reward model (one output) with a locally trained tokenizer.

    arch="qwen3" has rotary positions (a uniform shift of positions changes nothing), "gpt2"
    absolute ones (left padding without position ids changes its scores).
    """
    tokenizer = train_tokenizer([f"{p} {r}" for p, r in zip(PROMPTS, RESPONSES)] + ["user model"], vocab_size=300)
    tokenizer.padding_side = padding_side
    if not chat_template:
        tokenizer.chat_template = None
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id if pad_token_id else None,
    )
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=256,
            num_labels=num_labels,
            pad_token_id=config.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    torch.manual_seed(seed)
    if causal_lm:
        model = Qwen3ForCausalLM(config)
    else:
        model = (GPT2ForSequenceClassification if arch == "gpt2" else Qwen3ForSequenceClassification)(config)
    if not causal_lm:
        torch.nn.init.normal_(model.score.weight, std=1.0)  # scores of order 1, not 1e-2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm"))


def metadata(n: int, ground_truth: str | None = None) -> list[dict]:
    return [{"ground_truth": ground_truth, "origin": f"test:{i}"} for i in range(n)]


def unbatched_score(model, tokenizer, prompt: str, response: str, *, chat: bool = True) -> float:
    """The model's own score of one conversation, with no padding and no batch."""
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt + response)["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def reference_scores(path: Path, *, chat: bool = True) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return [unbatched_score(model, tokenizer, p, r, chat=chat) for p, r in zip(PROMPTS, RESPONSES)]


# --- reward_model ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_reward_model_scores_equal_the_models_own_unbatched_logits(reward_model_dir, batch_size):
    env = build("reward_model", model=str(reward_model_dir), batch_size=batch_size)
    expected = reference_scores(reward_model_dir)
    assert len(set(expected)) == len(expected) and max(map(abs, expected)) > 0.1  # distinct, not ~0
    assert env.score(PROMPTS, RESPONSES, metadata(6)) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    metrics = env.pop_metrics()
    assert (metrics["env/scored"], metrics["env/verifier_errors"], metrics["env/reward_model_truncated"]) == (
        6.0,
        0.0,
        0.0,
    )


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_reward_model_pads_right_whatever_the_tokenizer_says(tmp_path, arch):
    left = save_tiny_reward_model(tmp_path / "left", padding_side="left", arch=arch)
    right = save_tiny_reward_model(tmp_path / "right", padding_side="right", arch=arch)
    expected = reference_scores(left)
    if arch == "gpt2":  # the tokenizer's own (left) padding would change this model's scores
        model, tokenizer = AutoModelForSequenceClassification.from_pretrained(left), AutoTokenizer.from_pretrained(left)
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            for p, r in zip(PROMPTS, RESPONSES)
        ]
        with torch.no_grad():
            naive = model(**tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")).logits[:, 0]
        assert naive.tolist() != pytest.approx(expected, rel=1e-3)
    for path in (left, right):
        env = RewardModelEnvironment(str(path), batch_size=6)  # one batch: every row but the longest is padded
        assert env.score(PROMPTS, RESPONSES, metadata(6)) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Scores do not depend on which other sequences share the batch.
    env = RewardModelEnvironment(str(left), batch_size=2)
    alone = [env.score([p], [r], metadata(1))[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert alone == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_reward_model_renders_its_own_chat_template_or_concatenates(tmp_path, reward_model_dir):
    env = RewardModelEnvironment(str(reward_model_dir))
    assert env.uses_chat_template
    text = env.tokenizer.decode(env.token_ids("Compute max(3, 9).", "9"))
    assert text == "<bos><|turn>user\nCompute max(3, 9).<turn|>\n<|turn>model\n9<turn|>\n"  # Gemma 4 format, as trained

    plain_dir = save_tiny_reward_model(tmp_path / "plain", chat_template=False)
    plain = RewardModelEnvironment(str(plain_dir))
    assert not plain.uses_chat_template
    assert plain.score(PROMPTS, RESPONSES, metadata(6)) == pytest.approx(
        reference_scores(plain_dir, chat=False), rel=1e-5, abs=1e-6
    )
    forced = RewardModelEnvironment(str(reward_model_dir), input_format="plain")
    assert forced.tokenizer.decode(forced.token_ids("ab", "cd")) == "abcd"
    with pytest.raises(ValueError, match="has no chat template"):
        RewardModelEnvironment(str(plain_dir), input_format="chat")


def test_reward_model_is_frozen_and_scoring_changes_nothing(reward_model_dir):
    env = RewardModelEnvironment(str(reward_model_dir))
    before = {name: p.clone() for name, p in env.model.state_dict().items()}
    env.score(PROMPTS, RESPONSES, metadata(6))
    assert not env.model.training
    assert not any(p.requires_grad for p in env.model.parameters())
    assert all(torch.equal(before[name], p) for name, p in env.model.state_dict().items())


def test_reward_model_device_and_dtype_options(reward_model_dir):
    env = RewardModelEnvironment(str(reward_model_dir), device="cpu", dtype="bfloat16", batch_size=3)
    assert {p.device.type for p in env.model.parameters()} == {"cpu"}
    assert {p.dtype for p in env.model.parameters()} == {torch.bfloat16}
    rewards = env.score(PROMPTS, RESPONSES, metadata(6))
    assert all(isinstance(r, float) for r in rewards)
    assert rewards == pytest.approx(reference_scores(reward_model_dir), abs=0.1)  # bf16 round-off only
    with pytest.raises(ValueError, match="CUDA device"):
        RewardModelEnvironment(str(reward_model_dir), device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ValueError, match="not a torch device"):
        RewardModelEnvironment(str(reward_model_dir), device="gpu0")


def test_reward_model_truncates_on_the_left(reward_model_dir):
    env = RewardModelEnvironment(str(reward_model_dir), max_length=12)
    full = RewardModelEnvironment(str(reward_model_dir))
    rewards = env.score(PROMPTS, RESPONSES, metadata(6))
    expected = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            ids = full.token_ids(p, r)[-12:]
            expected.append(float(full.model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert rewards == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert env.pop_metrics()["env/reward_model_truncated"] == 6.0  # the chat template alone is 11 tokens


def test_non_finite_scores_are_verifier_errors(tmp_path, caplog):
    path = save_tiny_reward_model(tmp_path / "nan")
    tokenizer = AutoTokenizer.from_pretrained(path)
    [poisoned] = tokenizer("hello", add_special_tokens=False)["input_ids"][:1]
    model = Qwen3ForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[poisoned] = float("nan")  # any sequence with this token scores NaN
    model.save_pretrained(path)

    env = RewardModelEnvironment(str(path), batch_size=6)
    rewards = env.score(PROMPTS, RESPONSES, metadata(6))
    assert rewards[2] == 0.0  # "hello there"
    others = [r for i, r in enumerate(rewards) if i != 2]
    assert all(math.isfinite(r) for r in others) and others == pytest.approx(
        [r for i, r in enumerate(reference_scores(path)) if i != 2], rel=1e-5, abs=1e-6
    )  # NaN in one row does not leak into the others of its batch
    metrics = env.pop_metrics()
    assert metrics["env/scored"] == 6.0 and metrics["env/verifier_errors"] == 1.0
    assert "test:2 (batch index 2)" in caplog.text


def test_reward_model_rejects_bad_checkpoints_and_options(tmp_path, reward_model_dir):
    with pytest.raises(ValueError, match="num_labels 1"):
        RewardModelEnvironment(str(save_tiny_reward_model(tmp_path / "two", num_labels=2)))
    with pytest.raises(ValueError, match="no pad_token_id"):
        RewardModelEnvironment(str(save_tiny_reward_model(tmp_path / "nopad", pad_token_id=False)))
    with pytest.raises(CheckpointMismatchError, match="missing keys: score.weight"):
        RewardModelEnvironment(str(save_tiny_reward_model(tmp_path / "lm", causal_lm=True)))
    with pytest.raises(CheckpointNotFoundError):
        RewardModelEnvironment(str(tmp_path / "nowhere"))
    for options, message in [
        ({"batch_size": 0}, "batch_size"),
        ({"max_length": 0}, "max_length"),
        ({"dtype": "float16"}, "dtype"),
        ({"input_format": "jinja"}, "input_format"),
    ]:
        with pytest.raises(ValueError, match=message):
            RewardModelEnvironment(str(reward_model_dir), **options)
    env = RewardModelEnvironment(str(reward_model_dir))
    with pytest.raises(ValueError, match="one prompt and one metadata dict per response"):
        env.score(["p"], ["a", "b"], metadata(2))


# --- format / answer_math -----------------------------------------------------------------------


def test_format_default_is_think_then_answer():
    env = FormatEnvironment()
    responses = {
        "<think>x</think><answer>0.5</answer>": 1.0,
        "  <think>\nline 1\nline 2\n</think>\n<answer>\\frac{1}{2}</answer>\n": 1.0,  # DOTALL, whitespace around
        "<think></think><answer></answer>": 1.0,  # empty blocks still have the format
        "<answer>0.5</answer>": 0.0,  # no think block
        "<think>x</think>": 0.0,  # no answer block
        "<answer>0.5</answer><think>x</think>": 0.0,  # wrong order
        "Sure! <think>x</think><answer>0.5</answer>": 0.0,  # text before
        "<think>x</think><answer>0.5</answer> done": 0.0,  # text after
        "<think>x</think> so <answer>0.5</answer>": 0.0,  # text between
        "<think>x</think><answer>1</answer><answer>2</answer>": 0.0,  # two answers
        "<think>a <answer>1</answer></think><answer>2</answer>": 0.0,  # a tag inside a block
        "<think>x<answer>0.5</answer>": 0.0,  # unclosed think
    }
    assert env.score([""] * len(responses), list(responses), metadata(len(responses))) == list(responses.values())
    assert env.pop_metrics()["env/scored"] == len(responses)
    assert env.pattern == THINK_ANSWER_PATTERN


def test_format_custom_pattern_fullmatch_or_search():
    full = build("format", pattern=r"Answer: \d+")
    search = build("format", pattern=r"Answer: \d+", match="search")
    responses = ["Answer: 12", "so... Answer: 12", "Answer: x"]
    assert full.score([""] * 3, responses, metadata(3)) == [1.0, 0.0, 0.0]
    assert search.score([""] * 3, responses, metadata(3)) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        build("format", pattern="(unclosed")
    with pytest.raises(ValueError, match="match must be"):
        build("format", match="prefix")


def test_last_tagged_answer():
    assert last_tagged("<answer> 1 </answer> then <answer>2</answer>", "answer") == "2"
    assert last_tagged("<answer>\n3\n</answer>", "answer") == "3"
    assert last_tagged("<answer>3", "answer") is None
    assert last_tagged("<answer></answer>", "answer") == ""
    assert last_tagged("<final>7</final>", "final") == "7"


def test_answer_math_boxes_the_tagged_answer():
    env = build("answer_math")
    responses = [
        "<answer>3\\sqrt{3}</answer>",  # unboxed, math-verify would read 3
        "<answer>\\boxed{3\\sqrt{3}}</answer>",
        "<answer>3</answer>",
        "3\\sqrt{3}",  # no tags: no answer
        "<answer> </answer>",
    ]
    assert env.score([""] * 5, responses, metadata(5, "3\\sqrt{3}")) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert env.pop_metrics()["env/verifier_errors"] == 0.0
    with pytest.raises(ValueError, match="tag must be"):
        build("answer_math", tag="<answer>")


# --- weighted / geometry3k ----------------------------------------------------------------------


class ConstantEnvironment:
    """A user environment for `custom` components; counts its calls as a counter metric."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.calls = 0

    def score(self, prompts, responses, metadata):
        self.calls += 1
        return [self.value] * len(responses)

    def pop_metrics(self):
        calls, self.calls = self.calls, 0
        return {"env/calls": float(calls)}


def test_weighted_sum_by_hand():
    env = build(
        "weighted",
        components=[
            {"name": "format", "weight": 0.25, "options": {"pattern": r"\d+"}},
            {"name": "format", "weight": 2.0, "options": {"pattern": "7", "match": "search"}, "label": "has_seven"},
            {
                "name": "custom",
                "weight": -0.5,
                "options": {"import_path": f"{__name__}:ConstantEnvironment", "value": 0.3},
            },
        ],
    )
    # "17": 0.25*1 + 2*1 - 0.5*0.3 = 2.1; "x7": 0 + 2 - 0.15 = 1.85; "12": 0.25 - 0.15 = 0.1; "x": -0.15
    assert env.score([""] * 4, ["17", "x7", "12", "x"], metadata(4)) == pytest.approx(
        [2.1, 1.85, 0.1, -0.15], abs=1e-12
    )
    metrics = env.pop_metrics()
    assert metrics["env/scored"] == 4.0
    assert metrics["env/format/scored"] == 4.0 and metrics["env/has_seven/scored"] == 4.0
    assert metrics["env/custom/calls"] == 1.0 and metrics["env/calls"] == 1.0
    assert metrics["env/verifier_errors"] == 0.0 and metrics["env/format/verifier_errors"] == 0.0
    assert env.pop_metrics()["env/scored"] == 0.0


def test_weighted_validates_at_construction():
    cases = [
        ([], "non-empty list"),
        ([{"name": "fromat", "weight": 1.0}], "component 0 .*did you mean 'format'"),
        ([{"name": "format", "weight": float("nan")}], "finite number"),
        ([{"name": "format", "weight": float("inf")}], "finite number"),
        ([{"name": "format", "weight": True}], "finite number"),
        ([{"name": "format", "weight": "1"}], "finite number"),
        ([{"name": "format"}], "missing keys \\['weight'\\]"),
        ([{"name": "format", "weight": 1, "kwargs": {}}], "unknown keys \\['kwargs'\\]"),
        (
            [{"name": "format", "weight": 1, "options": {"regex": "x"}}],
            "component 0 \\('format'\\): options do not fit",
        ),
        ([{"name": "format", "weight": 1, "options": {"pattern": "("}}], "not a valid regular expression"),
        ([{"name": "format", "weight": 1}, {"name": "format", "weight": 2}], "labels must be unique"),
        ([{"name": "custom", "weight": 1}], "import_path"),
        (["format"], "must be a mapping"),
    ]
    for components, message in cases:
        with pytest.raises(ValueError, match=message):
            WeightedEnvironment(components)


def test_weighted_check_options_builds_nothing(tmp_path):
    components = [{"name": "reward_model", "weight": 1.0, "options": {"model": str(tmp_path / "not-yet-trained")}}]
    WeightedEnvironment.check_options(components)  # cheap enough for recipe loading: no model is loaded
    with pytest.raises(CheckpointNotFoundError, match="no config.json") as raised:
        WeightedEnvironment(components)
    assert raised.value.__notes__ == ["while building weighted component 0 ('reward_model')"]
    with pytest.raises(ValueError, match="did you mean 'geometry3k'"):
        WeightedEnvironment.check_options([{"name": "geometry", "weight": 1.0}])


def test_weighted_rejects_a_component_returning_non_finite_rewards():
    env = WeightedEnvironment(
        [
            {
                "name": "custom",
                "weight": 1,
                "options": {"import_path": f"{__name__}:ConstantEnvironment", "value": float("nan")},
            }
        ]
    )
    with pytest.raises(ValueError, match="one finite reward per response"):
        env.score(["p"], ["r"], metadata(1))


def test_geometry3k_rewards():
    env = build("geometry3k")
    assert isinstance(env, Geometry3kEnvironment) and isinstance(env, Environment)
    cases = [
        ("<think>x</think><answer>\\frac{1}{2}</answer>", "0.5", 1.0),  # right answer, right format
        ("<think>half</think>\n<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
        ("<answer>\\frac{1}{2}</answer>", "0.5", 0.9),  # right answer, no think block
        (
            "<think>x</think><answer>1</answer> and <answer>0.5</answer>",
            "0.5",
            0.9,
        ),  # last answer counts; 2 answers: bad format
        ("<think>x</think><answer>0.25</answer>", "0.5", 0.1),  # right format, wrong answer
        ("<think>x</think><answer></answer>", "0.5", 0.1),  # right format, empty answer
        ("0.5", "0.5", 0.0),  # no tags: no answer, no format
        ("<think>0.5</think>", "0.5", 0.0),
    ]
    responses = [c[0] for c in cases]
    meta = [{"ground_truth": c[1], "origin": f"geo:{i}"} for i, c in enumerate(cases)]
    assert env.score([""] * len(cases), responses, meta) == [c[2] for c in cases]  # exact: 0.1 + 0.9 == 1.0
    metrics = env.pop_metrics()
    assert metrics["env/scored"] == len(cases)
    assert metrics["env/format/scored"] == metrics["env/answer_math/scored"] == len(cases)
    assert metrics["env/verifier_errors"] == 0.0


def test_geometry3k_scores_in_verifier_worker_processes():
    env = build("geometry3k", num_workers=1, call_timeout_s=30.0)
    responses = ["<think>x</think><answer>2</answer>", "<answer>2</answer>", "<think>x</think><answer>3</answer>"]
    try:
        assert env.score([""] * 3, responses, metadata(3, "2")) == [1.0, 0.9, 0.1]
    finally:
        env.components[1].environment.math.close()
    with pytest.raises(ValueError, match="call_timeout_s"):
        build("geometry3k", call_timeout_s=3.0)  # a bound on worker calls, without workers


def test_geometry3k_is_the_weighted_spec_it_documents():
    spec = build(
        "weighted",
        components=[{"name": "format", "weight": 0.1}, {"name": "answer_math", "weight": 0.9}],
    )
    responses = ["<think>x</think><answer>2</answer>", "<answer>2</answer>", "<think>x</think><answer>3</answer>"]
    meta = metadata(3, "2")
    assert (
        spec.score([""] * 3, responses, meta) == build("geometry3k").score([""] * 3, responses, meta) == [1.0, 0.9, 0.1]
    )


def test_registry_and_config_validation(reward_model_dir):
    for name in ("reward_model", "format", "answer_math", "weighted", "geometry3k", "math", "reasoning_gym"):
        assert name in BUILTIN_ENVIRONMENTS
    overrides = [
        (["env.name=geometry3k"], None),
        (["env.name=format", "env.options={pattern: 'x', match: search}"], None),
        (["env.name=reward_model", f"env.options={{model: {reward_model_dir}, device: cpu, batch_size: 8}}"], None),
        (["env.name=weighted", "env.options={components: [{name: format, weight: 1}]}"], None),
        (["env.name=reward_model", "env.options={device: cpu}"], "missing a required argument: 'model'"),
        (["env.name=geometry3k", "env.options={format_weight: 0.2}"], "format_weight"),
        (["env.name=geometry_3k"], "did you mean 'geometry3k'"),
    ]
    for override, error in overrides:
        if error is None:
            load_config(QUICKSTART_RECIPE, RecipeConfig, override)
        else:
            with pytest.raises(ConfigError, match=error):
                load_config(QUICKSTART_RECIPE, RecipeConfig, override)


def test_a_weighted_component_typo_fails_when_the_recipe_loads(tmp_path):
    from posttrain.cli.main import QUICKSTART_RECIPE
    from posttrain.config import RecipeConfig, load_config
    from posttrain.config.loader import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"defaults: {QUICKSTART_RECIPE}\n"
        "env: {name: weighted, options: {components: [{name: fromat, weight: 0.1}, {name: math, weight: 0.9}]}}\n"
    )
    with pytest.raises(ConfigError, match=r"component 0 \('fromat'\).*did you mean 'format'"):
        load_config(recipe, RecipeConfig)
