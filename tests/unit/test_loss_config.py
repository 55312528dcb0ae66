import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from posttrain.config.loss import LossConfig

pytestmark = pytest.mark.unit

TIS_ON = {
    "use_importance_sampling_correction": True,
    "truncated_importance_sampling_type": "tis",
    "truncated_importance_sampling_ratio": 2.0,
}


def test_defaults_are_dapo_clip_higher():
    cfg = LossConfig()
    assert (cfg.ratio_clip_min, cfg.ratio_clip_max) == (0.2, 0.28)
    assert cfg.ratio_clip_c is None and cfg.token_level_loss
    assert cfg.reference_policy_kl_penalty == 0.0 and cfg.reference_policy_kl_type == "k3"


def test_integers_accepted_for_float_fields():
    cfg = LossConfig(
        ratio_clip_min=0,
        ratio_clip_max=1,
        ratio_clip_c=10,
        reference_policy_kl_penalty=0,
        **{**TIS_ON, "truncated_importance_sampling_ratio": 2},
    )
    assert cfg.ratio_clip_c == 10.0 and isinstance(cfg.ratio_clip_c, float)
    assert cfg.truncated_importance_sampling_ratio == 2.0


def test_ratio_without_type_is_an_error():
    with pytest.raises(ValidationError, match="truncated_importance_sampling_type"):
        LossConfig(use_importance_sampling_correction=True, truncated_importance_sampling_ratio=2.0)


def test_type_without_ratio_is_an_error():
    with pytest.raises(ValidationError, match="truncated_importance_sampling_ratio is null"):
        LossConfig(
            use_importance_sampling_correction=True, truncated_importance_sampling_type="tis"
        )


def test_type_without_correction_is_an_error():
    with pytest.raises(ValidationError, match="use_importance_sampling_correction"):
        LossConfig(**{**TIS_ON, "use_importance_sampling_correction": False})


def test_ratio_min_must_be_below_ratio():
    with pytest.raises(ValidationError, match="truncated_importance_sampling_ratio_min"):
        LossConfig(**TIS_ON, truncated_importance_sampling_ratio_min=2.0)


def test_gspo_needs_sequence_level_loss():
    with pytest.raises(ValidationError, match="token_level_loss"):
        LossConfig(sequence_level_importance_ratios=True)
    LossConfig(sequence_level_importance_ratios=True, token_level_loss=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ratio_clip_c", 1.0),
        ("ratio_clip_min", -0.1),
        ("reference_policy_kl_penalty", -1.0),
        ("truncated_importance_sampling_ratio", 0.0),
        ("reference_policy_kl_type", "k4"),
        ("truncated_importance_sampling_type", "clip"),
    ],
)
def test_field_constraints_name_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        LossConfig(**{field: value})


def test_unknown_key_is_rejected():
    with pytest.raises(ValidationError, match="ratio_clip_high"):
        LossConfig(ratio_clip_high=0.28)


def test_module_imports_without_torch():
    src = Path(__file__).resolve().parents[2] / "src"
    code = "import sys, posttrain.config.loss; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
