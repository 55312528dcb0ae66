#!/usr/bin/env bash
# recipes/tiny/dpo-gemma4-e2b-it-tiny.yaml on CPU, then its gates (common.sh).
NUM_NODES=1
GPUS_PER_NODE=0
NUM_MINUTES=10
STEPS=
RECIPE=tiny/dpo-gemma4-e2b-it-tiny.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
