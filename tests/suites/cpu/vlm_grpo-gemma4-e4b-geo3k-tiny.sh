#!/usr/bin/env bash
# recipes/tiny/vlm_grpo-gemma4-e4b-geo3k-tiny.yaml on CPU, then its gates (common.sh).
NUM_NODES=1
GPUS_PER_NODE=0
NUM_MINUTES=10
STEPS=
RECIPE=tiny/vlm_grpo-gemma4-e4b-geo3k-tiny.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
