"""Shared fixtures: a tiny Gemma 4 checkpoint (tokenizer trained locally) built once per session."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.arithmetic import arithmetic_samples
from posttrain.models.tiny import save_tiny_gemma4, train_tokenizer

torch.set_num_threads(1)  # tiny models: more threads only add contention on 2-core machines


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run tests/gpu through the device tool)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A random-init 2-layer Gemma 4 text model (sliding + full layer, softcap 30) on disk."""
    samples = arithmetic_samples(500, seed=0)
    tokenizer = train_tokenizer([f"{s.prompt} {s.ground_truth}" for s in samples] + ["user model"], vocab_size=300)
    path = tmp_path_factory.mktemp("tiny_gemma4")
    save_tiny_gemma4(path, tokenizer, seed=0)
    return str(path)
