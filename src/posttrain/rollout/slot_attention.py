"""Attention for the continuous-batching engine, plugged into transformers' attention modules.

transformers' attention modules project, normalize and rotate Q/K/V, call the cache's `update`,
then the attention function registered under `config._attn_implementation`. Registering this
one keeps every family's projection quirks (Gemma 4's k_eq_v, q/k/v norms, KV sharing) in
transformers' code, and leaves to posttrain only what a slot cache changes: which keys a query
may see (boolean masks built here, from positions) and how to read a ring of keys fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

SLOT_ATTENTION = "posttrain_slots"


def decode_mask(positions_S: torch.Tensor, ring: int) -> torch.Tensor:
    """mask_S11R: which ring indices hold a key the new token at positions_S may see. Index j
    holds the latest position p <= pos with p % ring == j, which lies within the window whenever
    it exists (j <= pos, or always once the ring has wrapped)."""
    index_R = torch.arange(ring, device=positions_S.device)
    return (index_R <= positions_S.unsqueeze(-1))[:, None, None, :]


def prefill_mask(
    lengths_N: torch.Tensor,
    width: int,
    window: int | None,
    bidirectional_blocks_NT: torch.Tensor | None = None,
) -> torch.Tensor:
    """mask_N1TT for right-padded prompts: keys inside the prompt that are causal or in the query's
    bidirectional block (Gemma 4's image soft tokens on sliding layers; block ids > 0, 0 for
    other tokens), and within the sliding window (query - key < window), as transformers composes them."""
    device = lengths_N.device
    query_T1 = torch.arange(width, device=device).unsqueeze(-1)
    key_1T = torch.arange(width, device=device).unsqueeze(0)
    visible_NTT = (key_1T <= query_T1).unsqueeze(0).expand(len(lengths_N), -1, -1)
    if bidirectional_blocks_NT is not None:
        same_block_NTT = bidirectional_blocks_NT.unsqueeze(-1) == bidirectional_blocks_NT.unsqueeze(-2)
        visible_NTT = visible_NTT | (same_block_NTT & (bidirectional_blocks_NT > 0).unsqueeze(-1))
    if window is not None:
        visible_NTT = visible_NTT & (query_T1 - key_1T < window)
    in_prompt_N1T = (key_1T < lengths_N.view(-1, 1)).unsqueeze(1)
    return (visible_NTT & in_prompt_N1T).unsqueeze(1)


def bidirectional_blocks(is_block_token_NT: torch.Tensor) -> torch.Tensor:
    """Number each run of consecutive block tokens (1, 2, ...); 0 elsewhere."""
    previous_NT = F.pad(is_block_token_NT[:, :-1], (1, 0), value=False)
    starts_NT = is_block_token_NT & ~previous_NT
    return torch.cumsum(starts_NT.long(), dim=-1) * is_block_token_NT.long()


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D]; key/value [B, KV, K, D]; returns [B, T, H, D] as transformers expects.

    Decode (T = 1): each group of H / KV query heads shares one KV head, so the group is laid out
    as KV heads with H / KV "query positions" each and the ring is read once, not copied per
    head. Prefill: KV heads are repeated and SDPA runs with the prompt mask."""
    batch, heads, width, head_dim = query.shape
    kv_heads = key.shape[1]
    dtype = value.dtype if not torch.is_autocast_enabled(query.device.type) else None
    if dtype is not None:
        query, key = query.to(dtype), key.to(dtype)
    if width == 1:
        grouped_query = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped_query, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(batch, heads, 1, head_dim).transpose(1, 2), None
    repeats = heads // kv_heads
    key = key.repeat_interleave(repeats, dim=1) if repeats > 1 else key
    value = value.repeat_interleave(repeats, dim=1) if repeats > 1 else value
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
