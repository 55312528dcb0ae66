#!/usr/bin/env bash
# recipes/llm/dpo-gemma4-e2b-it.yaml on 1 node x 8 GPUs, 100 steps, then its gates (common.sh).
# In the release suite: the nightly one has no GPU-hours left for it (tests/suites/budget.py).
NUM_NODES=1
GPUS_PER_NODE=8
NUM_MINUTES=30
STEPS=100
STEPS_KEY=dpo.max_num_steps
RECIPE=llm/dpo-gemma4-e2b-it.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
