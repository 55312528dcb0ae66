"""Embedding gradients accumulated in place over micro-batches.

An `nn.Embedding`'s backward builds a dense gradient the size of its whole table, which autograd
then adds to `.grad`: with gradient accumulation, every micro-batch after the first holds a second
table-sized tensor at the peak. For Gemma 4 E2B's per-layer embeddings (262,144 x 8,960 in fp32)
that is 8.75 GiB, more than the activations of the whole step.

With `sparse=True` the backward yields only the rows it looked up, and autograd adds a sparse
gradient into an existing dense `.grad` in place. The trainer therefore gives these tables a dense
zero `.grad` before a step's first micro-batch: the optimizer (fused AdamW takes dense gradients
only) then sees the same dense sum as before, at no extra memory.

One process only: FSDP2 reduce-scatters dense gradients of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def embedding_tables(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    """The trainable embedding tables (a table tied to the output head too: its lookup's gradient
    then adds into the head's, still without a second dense table)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight.requires_grad]


def zero_dense_grads(tables: list[torch.nn.Embedding]) -> None:
    """Before a step's first backward: a dense zero `.grad` for the sparse gradients to add into."""
    for table in tables:
        if table.weight.grad is None or table.weight.grad.is_sparse:
            table.weight.grad = torch.zeros_like(table.weight)
        else:
            table.weight.grad.zero_()


@contextmanager
def sparse_backward(tables: list[torch.nn.Embedding]) -> Iterator[None]:
    """Forward passes inside record sparse embedding backwards; the model is left as it was."""
    before = [table.sparse for table in tables]
    for table in tables:
        table.sparse = True
    try:
        yield
    finally:
        for table, sparse in zip(tables, before, strict=True):
            table.sparse = sparse
