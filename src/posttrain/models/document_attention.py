"""Training attention on CUDA without a dense [T x T] mask: document-masked, windowed, causal.

transformers' SDPA path hands packed rows and sliding-window layers a dense boolean mask, which
rules out the fused kernels' causal mode: every (query, key) pair is computed, 8x the useful work
for eight 4k-token documents packed into one row, and far more on Gemma 4's 512-token-window
layers (`benchmarks/attention_kernels.py`: 0.6-2.3 TFLOP/s useful on those shapes). Here:

- Documents come from the positions: a position 0 starts a document (packed rows restart their
  positions per sequence). Padding tokens, whichever side they are, are left out: their outputs are
  zeros.
- `document` (DOCUMENT_SDPA): documents of similar length are gathered into padded batches (one
  kernel call per batch and layer: a Python loop per document cost ~1 s of launches per E2B
  DAPO step of 64 short responses), in causal mode. Heads up to
  WIDE_HEAD_DIM wide run SDPA (flash attention or cuDNN on CUDA); where a sliding window cuts in,
  on blocks of window-many queries against the keys each can see. Wider heads (Gemma 4's 512-wide
  global layers: beyond flash attention's and cuDNN's head-size limit, flex attention's tiles do
  not fit in shared memory, and SDPA's memory-efficient kernel spent 0.86 s of a 4.2 s E2B step in
  its backward) run blocked GEMMs (`blocked_attention.py`). Gradients checked against
  transformers' SDPA on CPU and CUDA (tests/gpu/test_training_cuda.py). The default on CUDA.

An earlier flex-attention variant was removed: on the device its gradients disagreed with SDPA's
on the tiny `dense` variant while its values agreed (a silent error is worse than a slow kernel).

Only self-attention over whole sequences (training and scoring: queries and keys the same
tokens); the rollout engines keep their own attention. Gemma 4's bidirectional image blocks are
not expressed here, so multimodal models stay on SDPA (`resolve_training_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from posttrain.models.blocked_attention import blocked_causal_attention

DOCUMENT_SDPA = "posttrain_document_sdpa"
DOCUMENT_IMPLEMENTATIONS = {"document": DOCUMENT_SDPA}
WIDE_HEAD_DIM = 256  # wider heads run blocked GEMMs: the fused kernels' limit
# Documents batch in groups (one kernel call per group and layer, not per document): at most this
# many padded tokens, and padding of at most this times the real tokens
MAX_GROUP_TOKENS = 16384
MAX_PADDING = 1.25


def document_ids(position_ids_BT: torch.Tensor, padding_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """doc_BT[b, t] >= 1 numbers the documents of row b (a position 0 starts one); padding tokens
    get 0, a document no real token belongs to, so no real query ever sees a padding key."""
    doc_BT = (position_ids_BT == 0).long().cumsum(dim=-1) + 1
    return doc_BT if padding_mask_BT is None else doc_BT * padding_mask_BT.long()


def document_segments(doc_BT: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, stop) token ranges of its documents."""
    segments = []
    for row in doc_BT.tolist():
        bounds = [t for t in range(1, len(row)) if row[t] != row[t - 1]]
        starts, stops = [0, *bounds], [*bounds, len(row)]
        segments.append(list(zip(starts, stops, strict=True)))
    return segments


class _Documents:
    """One forward's documents, shared by its layers (and by their recomputation in backward):
    keyed on the position_ids tensor the model passes to every layer."""

    def __init__(self):
        self.position_ids = None
        self.entries: dict = {}

    def get(self, position_ids_BT: torch.Tensor, padding_mask_BT: torch.Tensor | None, key, build):
        if self.position_ids is not position_ids_BT:
            self.position_ids, self.entries = position_ids_BT, {}
            self.entries["doc"] = document_ids(position_ids_BT, padding_mask_BT)
        if key not in self.entries:
            self.entries[key] = build(self.entries["doc"])
        return self.entries[key]


_documents = _Documents()


def _window_mask(q_start: int, q_stop: int, k_start: int, k_stop: int, window: int, device) -> torch.Tensor:
    """[queries, keys] of one document: query q sees key k when 0 <= q - k < window."""
    distance = torch.arange(q_start, q_stop, device=device)[:, None] - torch.arange(k_start, k_stop, device=device)[None, :]
    return (distance >= 0) & (distance < window)


def _windowed_sdpa(q, k, v, window: int, scaling) -> torch.Tensor:
    """One document's windowed causal attention as SDPA calls on blocks of `window` queries, each
    against the (at most 2 x window) keys it can see: about 2 x window x length scores instead of
    length^2, with masks of one block."""
    length = q.shape[2]
    pieces = []
    for q_start in range(0, length, window):
        q_stop = min(q_start + window, length)
        k_start = max(0, q_start - window + 1)
        mask = _window_mask(q_start, q_stop, k_start, q_stop, window, q.device)
        pieces.append(
            F.scaled_dot_product_attention(
                q[:, :, q_start:q_stop], k[:, :, k_start:q_stop], v[:, :, k_start:q_stop], attn_mask=mask, scale=scaling
            )
        )
    return torch.cat(pieces, dim=2)


@dataclass
class DocumentGroup:
    """Documents of similar length run as one batch: `index_DL` holds each document's token
    positions in the flattened [B*T] tokens, right-padded (with its first position) to the group's
    longest; `valid_DL` marks the real ones. In causal attention a real query never sees the
    padding keys after it, so padded documents need no mask of their own."""

    index_DL: torch.Tensor
    valid_DL: torch.Tensor


def document_groups(
    doc_BT: torch.Tensor, *, max_group_tokens: int = MAX_GROUP_TOKENS, max_padding: float = MAX_PADDING
) -> list[DocumentGroup]:
    """The real documents (padding, document 0, is left out: its outputs are zeros) of a
    micro-batch, longest first, in groups of at most `max_group_tokens` padded tokens and at most
    `max_padding` x their real tokens (a longer document is a group of its own)."""
    length = doc_BT.shape[1]
    docs = []  # (length, first flat position)
    for b, (row_ids, row_segments) in enumerate(zip(doc_BT.tolist(), document_segments(doc_BT), strict=True)):
        docs += [(stop - start, b * length + start) for start, stop in row_segments if row_ids[start] != 0]
    docs.sort(key=lambda doc: -doc[0])
    groups, start = [], 0
    while start < len(docs):
        longest, stop, real = docs[start][0], start + 1, docs[start][0]
        while stop < len(docs) and (stop - start + 1) * longest <= min(max_group_tokens, max_padding * (real + docs[stop][0])):
            real += docs[stop][0]
            stop += 1
        lengths_D = torch.tensor([n for n, _ in docs[start:stop]])
        offsets_L = torch.arange(longest)
        valid_DL = offsets_L[None, :] < lengths_D[:, None]
        first_D = torch.tensor([first for _, first in docs[start:stop]])
        index_DL = first_D[:, None] + torch.where(valid_DL, offsets_L[None, :], 0)
        device = doc_BT.device
        groups.append(DocumentGroup(index_DL.to(device, non_blocking=True), valid_DL.to(device, non_blocking=True)))
        start = stop
    return groups


def _grouped_documents(query, key, value, groups: list[DocumentGroup], attend) -> torch.Tensor:
    """[B, T, H, D] (zeros at padding tokens) from `attend(q, k, v)` on each group's [docs, heads,
    longest, D] batch; query [B, H, T, D], key and value [B, KV, T, D]."""
    batch, heads, length, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    positions, pieces = [], []
    for group in groups:
        q, k, v = (t[group.index_DL].transpose(1, 2) for t in flat)  # [docs, heads, longest, D]
        out_DHLd = attend(q, k, v)
        positions.append(group.index_DL[group.valid_DL])
        pieces.append(out_DHLd.transpose(1, 2)[group.valid_DL])
    output = query.new_zeros(batch * length, heads, dim, dtype=pieces[0].dtype if pieces else query.dtype)
    if pieces:
        output = output.index_put((torch.cat(positions),), torch.cat(pieces))
    return output.view(batch, length, heads, dim)


def _document_sdpa(q, k, v, window: int | None, scaling) -> torch.Tensor:
    """A batch of documents [docs, heads, longest, D]: SDPA in causal mode, or blocks of
    window-many queries when a window cuts in. The memory-efficient kernel takes no grouped KV
    heads: they are repeated."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    if window and q.shape[2] > window:
        return _windowed_sdpa(q, k, v, window, scaling)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)


def _document_blocked(q, k, v, window: int | None, scaling) -> torch.Tensor:
    """A batch of documents as blocked GEMMs: documents x heads are the kernel's heads (document
    d's query head h reads its KV head h // groups, which the flattening keeps)."""
    docs, heads, longest, dim = q.shape
    scale = scaling if scaling is not None else dim**-0.5
    out = blocked_causal_attention(
        q.reshape(docs * heads, longest, dim), k.reshape(-1, longest, dim), v.reshape(-1, longest, dim), scale=scale, window=window
    )
    return out.view(docs, heads, longest, dim)


@torch.compiler.disable  # eager under policy.compile: the documents come from data (`tolist`); traced, every new packing would recompile the layer
def document_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    position_ids: torch.Tensor | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key/value [B, KV, T, D] -> ([B, T, H, D], None), transformers' layout."""
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise NotImplementedError("document attention is for whole sequences (training, scoring), not cached decoding")
    if dropout or softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("document attention supports no attention dropout, softcap or sinks")
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device).expand(batch, length)
    padding_mask_BT = None if attention_mask is None else attention_mask[:, 0, 0, :]
    window = sliding_window or getattr(module, "sliding_window", None)
    groups = _documents.get(position_ids, padding_mask_BT, "groups", document_groups)
    if head_dim > WIDE_HEAD_DIM:
        # SDPA runs in the autocast dtype; so do the GEMMs (rotary embeddings leave q and k in the
        # fp32 of the residual stream, v in bf16: fp32 GEMMs here took ~0.5 s of an E2B step)
        device_type = query.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        output = _grouped_documents(query, key, value, groups, lambda q, k, v: _document_blocked(q, k, v, window, scaling))
    else:
        output = _grouped_documents(query, key, value, groups, lambda q, k, v: _document_sdpa(q, k, v, window, scaling))
    return output, None


def document_attention_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """What transformers' mask builder hands the layers: the padding mask as [B, 1, 1, T] (the
    4-D layout transformers slices), or None. Documents, windows and causality come from the
    positions inside `document_attention_forward`."""
    return None if attention_mask is None else attention_mask[:, None, None, :]


AttentionInterface.register(DOCUMENT_SDPA, document_attention_forward)
AttentionMaskInterface.register(DOCUMENT_SDPA, document_attention_mask)


def is_multimodal(model: torch.nn.Module) -> bool:
    return model.config.get_text_config() is not model.config


def resolve_training_attention(choice: str, model: torch.nn.Module, device: torch.device) -> str:
    """`policy.attention` -> a transformers attention implementation. `auto`: per-document SDPA for
    text models on CUDA, otherwise the implementation the model was loaded with (CPU runs stay as
    they were; multimodal models need Gemma 4's image masks)."""
    if choice == "auto":
        if device.type == "cuda" and not is_multimodal(model):
            return DOCUMENT_SDPA
        return model.config.get_text_config()._attn_implementation
    if choice in DOCUMENT_IMPLEMENTATIONS:
        if is_multimodal(model):
            raise ValueError(f"policy.attention={choice} does not express image attention; use auto or sdpa for multimodal models")
        return DOCUMENT_IMPLEMENTATIONS[choice]
    return choice


def is_document_attention(implementation: str) -> bool:
    return implementation in DOCUMENT_IMPLEMENTATIONS.values()


def set_training_attention(model: torch.nn.Module, implementation: str) -> None:
    if is_document_attention(implementation):  # text models only: one config
        model.config._attn_implementation = implementation
    elif model.config.get_text_config()._attn_implementation != implementation:
        model.set_attn_implementation(implementation)
