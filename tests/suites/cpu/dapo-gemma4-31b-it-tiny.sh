#!/usr/bin/env bash
# recipes/tiny/dapo-gemma4-31b-it-tiny.yaml on CPU, then its gates (common.sh).
NUM_NODES=1
GPUS_PER_NODE=0
NUM_MINUTES=10
STEPS=
RECIPE=tiny/dapo-gemma4-31b-it-tiny.yaml
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
