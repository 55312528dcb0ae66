#!/usr/bin/env bash
# recipes/vlm/vlm_grpo-gemma4-e4b-geo3k.yaml on 1 node x 8 GPUs, 20 steps, then its gates (common.sh).
NUM_NODES=1
GPUS_PER_NODE=8
NUM_MINUTES=60
STEPS=20
RECIPE=vlm/vlm_grpo-gemma4-e4b-geo3k.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
