"""Planning a run before it starts: per-GPU memory and the fewest GPUs a recipe fits on."""

from posttrain.planning.memory import (
    GPU_USABLE_GIB,
    SAFETY_MARGIN,
    MemoryPlan,
    PlanningError,
    plan_command,
    plan_memory,
    smallest_gpu_count,
    warn_if_unfit,
)

__all__ = [
    "GPU_USABLE_GIB",
    "SAFETY_MARGIN",
    "MemoryPlan",
    "PlanningError",
    "plan_command",
    "plan_memory",
    "smallest_gpu_count",
    "warn_if_unfit",
]
