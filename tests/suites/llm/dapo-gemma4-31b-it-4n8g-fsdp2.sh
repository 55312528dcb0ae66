#!/usr/bin/env bash
# recipes/llm/dapo-gemma4-31b-it-4n8g-fsdp2.yaml on 4 nodes x 8 GPUs, 20 steps, then its gates (common.sh).
NUM_NODES=4
GPUS_PER_NODE=8
NUM_MINUTES=90
STEPS=20
RECIPE=llm/dapo-gemma4-31b-it-4n8g-fsdp2.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
