"""Public dataset loaders (data/datasets.py), prompt templates (data/templates.py) and the run's data
wiring (loops/setup.py): each dataset is written as a tiny local file in its published format."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
import pytest
from PIL import Image

from posttrain.config import ConfigError, RecipeConfig
from posttrain.config.loader import validate_config
from posttrain.config.schema import DataConfig, DatasetName, DatasetSource
from posttrain.data.datasets import DAPO_PREFIX, DAPO_SUFFIX, DATASETS, load_dataset_samples
from posttrain.data.prompts import load_samples, tokenize_prompts
from posttrain.data.sources import BadRows, DataError
from posttrain.data.templates import TemplateError, builtin_templates, load_template, render, resolve_template
from posttrain.data.types import Sample
from posttrain.loops.setup import load_data, tokenize_data
from posttrain.metrics.console import Console
from posttrain.models.loading import load_tokenizer

pytestmark = pytest.mark.unit


def write_parquet(path: Path, rows: list[dict], features: datasets.Features | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def source(**fields) -> DatasetSource:
    """The recipe source, validated as a recipe would be."""
    return DatasetSource.model_validate({"type": "dataset", **fields})


def test_schema_names_match_the_registry():
    assert set(DatasetName.__args__) == set(DATASETS)


# --------------------------------------------------------------------- DAPO-Math-17k and AIME-2024

DAPO_PROBLEM = (
    "Let $a, b, c$ be distinct numbers such that the equations $x^2 + ax + 1 = 0$ and $x^2 + bx + c = 0$ have a "
    "common real root, and the equations $x^2 + x + a = 0$ and $x^2 + cx + b = 0$ also have a common real root. "
    "Compute the sum $a + b + c$."
)


def verl_dapo_row(problem: str, answer: str, index: str) -> dict:
    """A row as BytedTsinghua-SIA/DAPO-Math-17k and AIME-2024 store it (verl's RL format)."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def test_dapo_math_17k_from_a_download_of_the_hub_repository(tmp_path):
    rows = [verl_dapo_row(DAPO_PROBLEM, "-3", "6ff0b17f-7e5c-4ae9-b5e9-63ebecd2b9f7"), verl_dapo_row("What is $6 \\times 7$?", "42", "b1")]
    write_parquet(tmp_path / "DAPO-Math-17k" / "data" / "dapo-math-17k.parquet", rows)
    samples = load_samples(source(name="dapo_math_17k", path=str(tmp_path / "DAPO-Math-17k")), split="train")
    first, second = samples
    assert first.prompt == DAPO_PROBLEM  # the bare problem: the instruction comes from the template
    assert first.ground_truth == "-3" and second.ground_truth == "42"
    assert first.origin == "dapo-math-17k.parquet:0" and second.origin == "dapo-math-17k.parquet:1"
    assert first.metadata == {
        "data_source": "math_dapo",
        "ability": "MATH",
        "reward_model": {"ground_truth": "-3", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "6ff0b17f-7e5c-4ae9-b5e9-63ebecd2b9f7"},
    }
    assert first.images == ()
    # the built-in dapo_answer template puts back exactly the user message the dataset ships
    assert render(load_template("dapo_answer"), first.prompt) == rows[0]["prompt"][0]["content"]


def test_aime_2024_in_verl_format_from_a_file_with_limit(tmp_path):
    rows = [verl_dapo_row(f"AIME problem {i}.", str(100 + i), str(i)) for i in range(4)]
    path = write_parquet(tmp_path / "aime-2024.parquet", rows)
    samples = load_samples(source(name="aime_2024", path=str(path), limit=2), split="validation")
    assert [(s.prompt, s.ground_truth, s.origin) for s in samples] == [
        ("AIME problem 0.", "100", "aime-2024.parquet:0"),
        ("AIME problem 1.", "101", "aime-2024.parquet:1"),
    ]
    with pytest.raises(DataError, match=r"is a file, so split 'train' does not apply"):
        load_dataset_samples("aime_2024", path=str(path), split="train")


def test_dapo_row_without_the_instruction_is_a_bad_row(tmp_path):
    good, bad = verl_dapo_row("Fine.", "1", "a"), verl_dapo_row("Unwrapped.", "2", "b")
    bad["prompt"] = [{"content": "Unwrapped.", "role": "user"}]
    path = write_parquet(tmp_path / "dapo.parquet", [good, bad])
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: the user message does not carry DAPO's instruction")):
        load_dataset_samples("dapo_math_17k", path=str(path))


# ------------------------------------------------------------------------------------------ GSM8K

GSM8K_TRAIN = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
        "in April and May.\n#### 72",
    },
]
GSM8K_TEST = [
    {"question": "A farm has 1000 hens and buys 250 more. How many hens?", "answer": "1000+250=<<1000+250=1250>>1250\n#### 1,250"},
    {"question": "Broken row.", "answer": "The final answer line is missing."},
    {"question": "What is 9-10?", "answer": "9-10=-1\n#### -1"},
]


def gsm8k_download(root: Path) -> Path:
    """openai/gsm8k as on the hub: main/ and socratic/ subsets, one parquet file per split."""
    write_parquet(root / "main" / "train-00000-of-00001.parquet", GSM8K_TRAIN)
    write_parquet(root / "main" / "test-00000-of-00001.parquet", GSM8K_TEST)
    write_parquet(root / "socratic" / "test-00000-of-00001.parquet", [{"question": "socratic", "answer": "#### 0"}])
    return root


def test_gsm8k_final_answer_after_the_marker(tmp_path):
    root = gsm8k_download(tmp_path / "gsm8k")
    [sample] = load_samples(source(name="gsm8k", path=str(root)), split="train")  # default split: train
    assert sample.prompt == GSM8K_TRAIN[0]["question"]
    assert sample.ground_truth == "72"
    assert sample.metadata == {"solution": GSM8K_TRAIN[0]["answer"]}
    assert sample.origin == "train-00000-of-00001.parquet:0"


def test_gsm8k_malformed_row_errors_naming_file_and_row_or_is_skipped(tmp_path):
    root = gsm8k_download(tmp_path / "gsm8k")
    test_file = root / "main" / "test-00000-of-00001.parquet"
    with pytest.raises(DataError, match=re.escape(f"{test_file} row 1: 'answer' has no '####' line")):
        load_samples(source(name="gsm8k", path=str(root), split="test"), split="validation")
    bad_rows = BadRows("skip")
    samples = load_samples(source(name="gsm8k", path=str(root), split="test"), split="validation", bad_rows=bad_rows)
    assert [(s.ground_truth, s.origin) for s in samples] == [
        ("1250", "test-00000-of-00001.parquet:0"),  # thousands separator removed
        ("-1", "test-00000-of-00001.parquet:2"),  # origins keep the file's row numbers
    ]
    assert len(bad_rows.skipped) == 1 and bad_rows.skipped[0].startswith(f"{test_file} row 1: ")


def test_every_row_malformed_is_an_error_even_when_skipping(tmp_path):
    path = write_parquet(tmp_path / "test.parquet", [{"question": "q", "answer": "no marker"}] * 2)
    with pytest.raises(DataError, match=r"all 2 rows are malformed \(data.on_bad_row: skip\); the first: .*row 0"):
        load_dataset_samples("gsm8k", path=str(path), bad_rows=BadRows("skip"))


def test_directory_without_the_split_lists_what_it_holds(tmp_path):
    root = gsm8k_download(tmp_path / "gsm8k")
    (root / "main" / "train-00000-of-00001.parquet").unlink()
    with pytest.raises(DataError, match=r"no 'main/train-\*.parquet' under .* data files found: \['main/test-00000"):
        load_dataset_samples("gsm8k", path=str(root))


def test_file_in_another_format_names_the_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(DataError, match=r"not in the gsm8k format \(https://huggingface.co/datasets/openai/gsm8k\): no column\(s\) \['question'\]"):
        load_dataset_samples("gsm8k", path=str(path))


def test_unknown_split_fails_when_the_recipe_loads():
    with pytest.raises(ValueError, match=r"dataset gsm8k has no split 'tset'; its splits: \['test', 'train'\]"):
        source(name="gsm8k", split="tset")


# --------------------------------------------------------------------------------------- MATH-500

MATH_500_ROW = {
    "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in the form "
    "$(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$",
    "solution": "We have that $r = \\sqrt{0^2 + 3^2} = 3.$ ... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
    "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
    "subject": "Precalculus",
    "level": 2,
    "unique_id": "test/precalculus/807.json",
}


def test_math_500_from_the_hub_layout_jsonl(tmp_path):
    write_jsonl(tmp_path / "MATH-500" / "test.jsonl", [MATH_500_ROW])
    [sample] = load_samples(source(name="math_500", path=str(tmp_path / "MATH-500")), split="validation")
    assert sample.prompt == MATH_500_ROW["problem"]
    assert sample.ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert sample.metadata == {
        "solution": MATH_500_ROW["solution"],
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    }
    assert sample.origin == "test.jsonl:0"


# ----------------------------------------------------------------------------- OpenMathInstruct-2


def omi2_row(i: int) -> dict:
    return {
        "problem": f"What is {i} + {i}?",
        "generated_solution": f"{i} + {i} = \\boxed{{{2 * i}}}",
        "expected_answer": str(2 * i),
        "problem_source": "augmented_math",
    }


def test_openmathinstruct2_default_split_is_train_1m_read_shard_by_shard(tmp_path):
    root = tmp_path / "OpenMathInstruct-2"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [omi2_row(100)])
    write_parquet(root / "data" / "train_1M-00000-of-00002.parquet", [omi2_row(1), omi2_row(2)])
    write_parquet(root / "data" / "train_1M-00001-of-00002.parquet", [omi2_row(3), omi2_row(4)])
    samples = load_samples(source(name="openmathinstruct2", path=str(root), limit=3), split="train")
    assert [(s.ground_truth, s.origin) for s in samples] == [
        ("2", "train_1M-00000-of-00002.parquet:0"),
        ("4", "train_1M-00000-of-00002.parquet:1"),
        ("6", "train_1M-00001-of-00002.parquet:0"),  # limit counts across shards
    ]
    assert samples[0].prompt == "What is 1 + 1?"
    assert samples[0].metadata == {"generated_solution": "1 + 1 = \\boxed{2}", "problem_source": "augmented_math"}
    [full] = load_samples(source(name="openmathinstruct2", path=str(root), split="train"), split="train")
    assert full.ground_truth == "200"  # "train" does not pick up the train_1M shards


def test_empty_expected_answer_is_a_bad_row(tmp_path):
    row = omi2_row(1) | {"expected_answer": " "}
    path = write_parquet(tmp_path / "shard.parquet", [omi2_row(0), row])
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: 'expected_answer' is empty")):
        load_dataset_samples("openmathinstruct2", path=str(path))


# ------------------------------------------------------------------------------------- geometry3k

GEOMETRY3K_FEATURES = datasets.Features(
    {
        "images": datasets.List(datasets.Image()),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "id": datasets.Value("int64"),
        "choices": datasets.List(datasets.Value("string")),
        "ground_truth": datasets.Value("string"),
    }
)


def png_bytes(color: tuple[int, int, int], size=(5, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def geometry3k_row(problem: str, image: bytes, i: int) -> dict:
    """hiyouga/geometry3k: images as datasets Image structs {bytes, path}, one "<image>" per image."""
    return {
        "images": [{"bytes": image, "path": None}],
        "problem": problem,
        "answer": "3",
        "id": i,
        "choices": ["3", "4", "5", "6"],
        "ground_truth": "A",
    }


def test_geometry3k_samples_carry_their_decoded_images(tmp_path):
    root = tmp_path / "geometry3k"
    rows = [geometry3k_row("<image>Find x.", png_bytes((255, 0, 0)), 0), geometry3k_row("<image>Find y.", png_bytes((0, 0, 255), (3, 2)), 1)]
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", rows, GEOMETRY3K_FEATURES)
    write_parquet(root / "data" / "train-00000-of-00001.parquet", rows[:1], GEOMETRY3K_FEATURES)
    first, second = load_samples(source(name="geometry3k", path=str(root), split="validation"), split="validation")
    assert (first.prompt, first.ground_truth) == ("Find x.", "3")  # the placeholder is taken out of the text
    assert first.metadata == {"id": 0, "choices": ["3", "4", "5", "6"], "dataset_ground_truth": "A"}
    assert first.origin == "validation-00000-of-00001.parquet:0"
    [image] = first.images
    assert isinstance(image, Image.Image) and image.size == (5, 4) and image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert second.images[0].size == (3, 2) and second.images[0].convert("RGB").getpixel((2, 1)) == (0, 0, 255)


def test_geometry3k_undecodable_image_and_placeholder_mismatch_are_bad_rows(tmp_path):
    rows = [
        geometry3k_row("<image>Fine.", png_bytes((0, 255, 0)), 0),
        geometry3k_row("<image>Broken image.", b"not a png", 1),
        geometry3k_row("No placeholder.", png_bytes((0, 255, 0)), 2),
    ]
    path = write_parquet(tmp_path / "train.parquet", rows, GEOMETRY3K_FEATURES)
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: image 0 could not be decoded")):
        load_dataset_samples("geometry3k", path=str(path))
    bad_rows = BadRows("skip")
    [sample] = load_dataset_samples("geometry3k", path=str(path), bad_rows=bad_rows)
    assert sample.prompt == "Fine."
    assert bad_rows.skipped[1] == f"{path} row 2: 'problem' has 0 '<image>' placeholders for 1 images"


def test_geometry3k_image_whose_file_is_missing_names_the_row(tmp_path):
    missing = tmp_path / "figures" / "missing.png"
    row = geometry3k_row("<image>Find x.", b"", 0)
    row["images"] = [{"bytes": None, "path": str(missing)}]
    missing.parent.mkdir()
    missing.write_bytes(png_bytes((0, 255, 0)))  # there while the parquet file is written, then gone
    path = write_parquet(tmp_path / "train.parquet", [row], GEOMETRY3K_FEATURES)
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(f"{path} row 0: image 0 could not be decoded")) as error:
        load_dataset_samples("geometry3k", path=str(path))
    assert "missing.png" in str(error.value)


# ------------------------------------------------------------------------------------ hub loading


def test_a_hub_id_goes_to_load_dataset_with_the_subset_and_split(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(hub_id, config, *, split):
        calls.append((hub_id, config, split))
        return datasets.Dataset.from_list(GSM8K_TRAIN)

    monkeypatch.chdir(tmp_path)  # no local "openai/gsm8k" directory
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    [sample] = load_samples(source(name="gsm8k", split="test"), split="validation")  # path unset: the dataset's hub id
    assert calls == [("openai/gsm8k", "main", "test")]
    assert sample.ground_truth == "72" and sample.origin == "openai/gsm8k:test:0"


def test_a_missing_local_path_that_looks_like_a_hub_id_names_both(monkeypatch, tmp_path):
    def unreachable_hub(hub_id, config, *, split):
        raise ConnectionError("offline")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", unreachable_hub)
    with pytest.raises(DataError, match=r"'data/gsm8k' is not a local file or directory .* the hub could not load"):
        load_dataset_samples("gsm8k", path="data/gsm8k")
    with pytest.raises(DataError, match=r"'data/gsm8k/train.parquet' is neither a local file or directory"):
        load_dataset_samples("gsm8k", path="data/gsm8k/train.parquet")


# -------------------------------------------------------------------------------------- templates


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def test_builtin_templates_are_shipped_files_with_the_placeholder():
    templates = builtin_templates()
    assert set(templates) == {"math_cot_boxed", "dapo_answer", "geo3k_think_answer"}
    assert templates["dapo_answer"] == DAPO_PREFIX + "{prompt}" + DAPO_SUFFIX  # DAPO's exact instruction
    assert templates["math_cot_boxed"] == "{prompt}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize("name", ["math_cot_boxed", "dapo_answer"])
def test_template_files_render_through_the_chat_template(tokenizer, name):
    template = resolve_template("{prompt}", name)
    sample = Sample(prompt="What is 6*7?", ground_truth="42", metadata={}, origin="unit:0")
    [prompt] = tokenize_prompts([sample], tokenizer, template=template, max_prompt_tokens=10_000).prompts
    assert prompt.text == template.replace("{prompt}", "What is 6*7?")
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.text}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert prompt.token_ids == list(expected)
    assert tokenizer.decode(prompt.token_ids).startswith("<bos><|turn>user\n" + prompt.text)


def test_template_file_by_path_drops_one_final_newline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mine.txt").write_text("Q: {prompt}\nA:\n")
    assert resolve_template("{prompt}", "mine.txt") == "Q: {prompt}\nA:"
    Path("templates").mkdir()
    Path("templates/no_placeholder").write_text("Just text.\n")
    with pytest.raises(TemplateError, match=r"templates/no_placeholder has no \{prompt\} placeholder"):
        load_template("templates/no_placeholder")
    with pytest.raises(TemplateError, match=r"prompt template file not found: 'missing.txt'"):
        load_template("missing.txt")


def test_template_options_are_checked_when_the_recipe_loads():
    train = {"type": "arithmetic", "size": 4}
    assert DataConfig.model_validate({"train": train, "prompt_template_file": "dapo_answer"}).prompt_template_file == "dapo_answer"
    with pytest.raises(ValueError, match=r"unknown built-in prompt template 'math_cot'; did you mean 'math_cot_boxed'\?"):
        DataConfig.model_validate({"train": train, "prompt_template_file": "math_cot"})
    with pytest.raises(ValueError, match=r"set data.prompt_template or data.prompt_template_file, not both"):
        DataConfig.model_validate({"train": train, "prompt_template": "Q: {prompt}", "prompt_template_file": "dapo_answer"})


# ------------------------------------------------------------------------------- the run's data


def recipe(tiny_checkpoint: str, tmp_path: Path, data: dict, max_total: int = 64) -> RecipeConfig:
    return validate_config(
        {
            "policy": {
                "model_name": tiny_checkpoint,
                "max_total_sequence_length": max_total,
                "train_global_batch_size": 4,
                "generation": {"max_new_tokens": 8},
            },
            "data": data,
            "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 2},
            "logger": {"log_dir": str(tmp_path / "run")},
        },
        RecipeConfig,
    )


def test_run_data_skips_bad_rows_drops_long_prompts_and_counts_both(tiny_checkpoint, tokenizer, tmp_path, capsys):
    rows = [
        {"prompt": "Compute 1+2.", "answer": "3"},
        {"prompt": None, "answer": "4"},
        {"prompt": "Compute " + "+".join(["12"] * 40) + ".", "answer": "480"},
        {"prompt": "Compute 2+2.", "answer": "4"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = {"train": {"type": "file", "path": str(path)}, "validation": {"type": "file", "path": str(path), "limit": 1}}
    cfg = recipe(tiny_checkpoint, tmp_path, {**data, "on_bad_row": "skip", "prompt_template_file": "math_cot_boxed"}, max_total=160)
    loaded = load_data(cfg)
    assert loaded.template == builtin_templates()["math_cot_boxed"]
    assert [s.origin for s in loaded.train] == ["train.jsonl:0", "train.jsonl:2", "train.jsonl:3"]
    assert loaded.skipped_rows == [f"{path} row 1: 'prompt' must be a non-empty string, got None"]

    train, val, metrics = tokenize_data(cfg, loaded, tokenizer, Console())
    assert [p.sample.origin for p in train] == ["train.jsonl:0", "train.jsonl:3"]
    assert [p.sample.origin for p in val] == ["train.jsonl:0"]
    assert metrics == {
        "data/train_prompts": 2.0,
        "data/validation_prompts": 1.0,
        "data/dropped_long_prompts": 1.0,
        "data/skipped_bad_rows": 1.0,
    }
    out = capsys.readouterr().out
    assert f"data: skipped 1 malformed rows (data.on_bad_row: skip), first: {path} row 1" in out
    assert "data: dropped 1 training and 0 validation prompts longer than 152 tokens" in out and "train.jsonl:2" in out


def test_run_data_errors_on_a_bad_row_by_default(tiny_checkpoint, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}])
    cfg = recipe(tiny_checkpoint, tmp_path, {"train": {"type": "file", "path": str(path)}})
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: 'answer' must be a string or a number, got None")):
        load_data(cfg)


def test_recipe_with_a_dataset_source_validates(tiny_checkpoint, tmp_path):
    cfg = recipe(
        tiny_checkpoint,
        tmp_path,
        {
            "train": {"type": "dataset", "name": "dapo_math_17k", "path": "data/dapo-math-17k"},
            "validation": {"type": "dataset", "name": "aime_2024"},
            "prompt_template_file": "dapo_answer",
        },
    )
    assert cfg.data.train.name == "dapo_math_17k" and cfg.data.validation.path is None
    with pytest.raises(ConfigError, match=r"data.train.nam: unknown key; did you mean 'name'\?"):
        recipe(tiny_checkpoint, tmp_path, {"train": {"type": "dataset", "nam": "gsm8k"}})
