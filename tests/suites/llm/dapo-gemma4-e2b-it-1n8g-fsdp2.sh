#!/usr/bin/env bash
# recipes/llm/dapo-gemma4-e2b-it-1n8g-fsdp2.yaml on 1 node x 8 GPUs, 20 steps, then its gates (common.sh).
NUM_NODES=1
GPUS_PER_NODE=8
NUM_MINUTES=60
STEPS=20
RECIPE=llm/dapo-gemma4-e2b-it-1n8g-fsdp2.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
