"""The continuous-batching engine's KV cache: preallocated, one row per slot.

Each layer that computes its own K/V owns a ring of `ring` positions per slot: position p lives
at index p % ring. Full-attention layers get ring = the longest sequence the engine serves, so
nothing wraps; sliding-window layers get ring = min(window, longest sequence), which is all a
window ever reads (key visible when query - key < window), so their memory stays bounded.
KV-shared layers (Gemma 4 E-series) own nothing: transformers hands them the K/V the last
non-shared layer of their type returned from `update`, i.e. this cache's buffers.

transformers' attention modules call `update(key, value, layer_idx, ...)`; the engine says
beforehand which slots the call is for (`begin_prefill` / `begin_decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerCacheSpec:
    layer_type: str  # "full_attention" or "sliding_attention"
    num_kv_heads: int
    head_dim: int
    window: int | None  # sliding window, None for full attention
    owns_cache: bool  # False for KV-shared layers


def ring_size(window: int | None, max_len: int) -> int:
    return max_len if window is None else min(window, max_len)


def ring_positions(lengths_N: torch.Tensor, ring: int) -> torch.Tensor:
    """positions_NR[n, j]: the prompt position stored at ring index j after a prefill of lengths_N[n]
    tokens, i.e. the last position p < length with p % ring == j (clamped to 0 where none exists;
    those indices are masked until decoding overwrites them)."""
    last_N1 = (lengths_N - 1).unsqueeze(-1)
    index_R = torch.arange(ring, device=lengths_N.device)
    return (last_N1 - torch.remainder(last_N1 - index_R, ring)).clamp(min=0)


class SlotKVCache:
    def __init__(
        self,
        specs: list[LayerCacheSpec],
        *,
        slots: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.slots, self.max_len = slots, max_len
        # decode rows are views of this: nothing allocated inside a graph capture outlives it (a
        # tensor kept from a capture would pin that graph's memory pool after the graph is gone)
        self._all_rows = torch.arange(slots, device=device)
        self.rings = [ring_size(spec.window, max_len) for spec in specs]
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer, (spec, ring) in enumerate(zip(specs, self.rings, strict=True)):
            if spec.owns_cache:
                shape = (slots, spec.num_kv_heads, ring, spec.head_dim)
                self.keys[layer] = torch.zeros(shape, device=device, dtype=dtype)
                self.values[layer] = torch.zeros(shape, device=device, dtype=dtype)
        self._prefill: tuple[torch.Tensor, torch.Tensor] | None = None  # (slot ids N, lengths N)
        self._decode_rows: torch.Tensor | None = None  # slot ids S (0..S-1)
        self._decode_positions: torch.Tensor | None = None  # position of each row's new token, S
        self._key_length = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def begin_prefill(self, slot_ids_N: torch.Tensor, lengths_N: torch.Tensor) -> None:
        """The next forward is a right-padded prefill of these slots' prompts."""
        self._prefill, self._decode_rows = (slot_ids_N, lengths_N), None

    def begin_decode(self, rows: int, positions_S: torch.Tensor, key_length: int) -> None:
        """The next forward decodes one token for slots 0..rows-1, at positions_S, all below
        key_length: attention reads ring indices below min(key_length, ring) only."""
        self._prefill = None
        self._decode_rows = self._all_rows[:rows]
        self._decode_positions = positions_S
        self._key_length = key_length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new K/V ([B, kv_heads, T, head_dim]); return what attention reads: the fresh
        K/V in a prefill (prompt tokens attend to each other), the slots' rings in a decode."""
        keys, values, ring = self.keys[layer_idx], self.values[layer_idx], self.rings[layer_idx]
        if self._prefill is not None:
            slot_ids_N, lengths_N = self._prefill
            positions_NR = ring_positions(lengths_N, ring).clamp(max=key.shape[2] - 1)
            index = positions_NR[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
            keys.index_copy_(0, slot_ids_N, key.gather(2, index).to(keys.dtype))
            values.index_copy_(0, slot_ids_N, value.gather(2, index).to(values.dtype))
            return key, value
        rows_S = self._decode_rows
        index_S = torch.remainder(self._decode_positions, ring)
        keys[rows_S, :, index_S] = key[:, :, 0].to(keys.dtype)
        values[rows_S, :, index_S] = value[:, :, 0].to(values.dtype)
        readable = min(self._key_length, ring)
        return keys[: len(rows_S), :, :readable], values[: len(rows_S), :, :readable]
