# Shared by every launcher (tests/suites/*/*.sh): train RECIPE for STEPS steps into RUN_DIR, then
# evaluate the recipe's metric gates with `posttrain check`. A launcher sets NUM_NODES,
# GPUS_PER_NODE, NUM_MINUTES (its wall-clock budget, also what budget.py counts), STEPS (empty: the
# recipe's own), STEPS_KEY (the key STEPS sets; unset: grpo.max_num_steps, sft and dpo recipes set
# sft.max_num_steps, dpo.max_num_steps) and RECIPE (relative to recipes/), then sources this file.
# Arguments go to `posttrain train` as overrides: the real-shape recipes need the user's checkpoint
# and data,
#   tests/suites/llm/dapo-gemma4-e2b-it-1n8g-fsdp2.sh policy.model_name=/ckpt/gemma-4-e2b-it \
#       data.train.path=/data/DAPO-Math-17k data.validation.path=/data/AIME_2024
# Several nodes: run the launcher on each node with NODE_RANK and RDZV_ENDPOINT (host:port of
# node 0) set, as for torchrun.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUN_DIR=${RUN_DIR:-$REPO/runs/suites/$(basename "$RECIPE" .yaml)}
overrides=("logger.log_dir=$RUN_DIR")
if [[ -n "${STEPS:-}" ]]; then
  overrides+=("${STEPS_KEY:-grpo.max_num_steps}=$STEPS")
fi
if (( NUM_NODES * GPUS_PER_NODE > 1 )); then
  launch=(torchrun --nnodes "$NUM_NODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "${NODE_RANK:-0}")
  if (( NUM_NODES > 1 )); then
    launch+=(--rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}")
  fi
  launch+=(-m posttrain.cli.main)
else
  launch=(posttrain)
fi
timeout "$((NUM_MINUTES * 60))" "${launch[@]}" train "$REPO/recipes/$RECIPE" "${overrides[@]}" "$@"
if [[ "${NODE_RANK:-0}" == 0 ]]; then
  posttrain check "$RUN_DIR"
fi
