#!/usr/bin/env bash
# recipes/gpu1/dpo-gemma4-e2b-it-1gpu.yaml on 1 node x 1 GPU, then its gates (common.sh).
NUM_NODES=1
GPUS_PER_NODE=1
NUM_MINUTES=30
STEPS=
RECIPE=gpu1/dpo-gemma4-e2b-it-1gpu.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
