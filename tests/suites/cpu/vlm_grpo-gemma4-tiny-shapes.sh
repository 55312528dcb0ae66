#!/usr/bin/env bash
# recipes/vlm/vlm_grpo-gemma4-tiny-shapes.yaml on CPU, then its gates (common.sh).
NUM_NODES=1
GPUS_PER_NODE=0
NUM_MINUTES=20
STEPS=
RECIPE=vlm/vlm_grpo-gemma4-tiny-shapes.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
