#!/usr/bin/env bash
# recipes/llm/sft-gemma4-e2b-it.yaml on 1 node x 8 GPUs, 100 steps, then its gates (common.sh).
NUM_NODES=1
GPUS_PER_NODE=8
NUM_MINUTES=30
STEPS=100
STEPS_KEY=sft.max_num_steps
RECIPE=llm/sft-gemma4-e2b-it.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
