"""Which attention kernel trains Gemma 4's layers fastest: forward + backward of one attention call
at the E2B shape (8 query heads, 1 KV head; sliding layers head_dim 256 with a 512-token window,
full layers head_dim 512), bf16, for each of PyTorch's SDPA backends and for flex attention
(compiled), and for posttrain's blocked-GEMM attention (`models/blocked_attention.py`), on one
4096-token sequence and on 8 such sequences packed into one row (document mask).

Useful FLOPs count only the attended (query, key) pairs: 4 x heads x head_dim x pairs forward,
2.5x that forward + backward. A backend that does not support a shape is recorded with its error.

    python benchmarks/attention_kernels.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from posttrain.models.blocked_attention import blocked_causal_attention

SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}


# one pipeline stage and small tiles: what a head_dim-512 tile set needs to fit in shared memory
SMALL_BLOCKS = {
    "BLOCK_M": 32,
    "BLOCK_N": 32,
    "num_stages": 1,
    "bwd_BLOCK_M1": 16,
    "bwd_BLOCK_N1": 32,
    "bwd_BLOCK_M2": 32,
    "bwd_BLOCK_N2": 16,
    "bwd_num_stages": 1,
}


def attended_pairs(documents: int, length: int, window: int | None) -> int:
    per_query = [min(q + 1, window) if window else q + 1 for q in range(length)]
    return documents * sum(per_query)


def document_mask_mod(document_T: torch.Tensor, window: int | None):
    def mask_mod(b, h, q, k):
        visible = (document_T[q] == document_T[k]) & (k <= q)
        return visible & (q - k < window) if window else visible

    return mask_mod


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    torch.cuda.synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run_case(backend: str, head_dim: int, window: int | None, documents: int, length: int, repeats: int) -> dict:
    heads, kv_heads, total = 8, 1, documents * length
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = lambda h: (1, h, total, head_dim)  # noqa: E731
    q = torch.randn(shape(heads), device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    k = torch.randn(shape(kv_heads), device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    v = torch.randn(shape(kv_heads), device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    document_T = torch.arange(total, device="cuda") // length
    positions = torch.arange(total, device="cuda")
    if backend.startswith("sdpa"):
        dense_mask = None
        if documents > 1 or window:
            visible = (document_T[:, None] == document_T[None, :]) & (positions[None, :] <= positions[:, None])
            if window:
                visible &= positions[:, None] - positions[None, :] < window
            dense_mask = visible
        kv_expand = lambda t: t.expand(1, heads, total, head_dim)  # noqa: E731 (efficient/cudnn lack GQA)

        def step():
            with sdpa_kernel(SDPA_BACKENDS[backend]):
                out = F.scaled_dot_product_attention(
                    q, kv_expand(k), kv_expand(v), attn_mask=dense_mask, is_causal=dense_mask is None, scale=1.0
                )
            out.sum().backward()
    elif backend == "blocked":
        # one call per document, as posttrain's document attention runs 512-wide heads
        def step():
            pieces = [
                blocked_causal_attention(q[0, :, s : s + length], k[0, :, s : s + length], v[0, :, s : s + length], scale=1.0, window=window)
                for s in range(0, total, length)
            ]
            torch.cat(pieces, dim=1).sum().backward()
    else:
        kernel_options = SMALL_BLOCKS if backend == "flex_small_blocks" else None
        block_mask = create_block_mask(document_mask_mod(document_T, window), 1, None, total, total, device="cuda")
        compiled = torch.compile(flex_attention)

        def step():
            out = compiled(q, k, v, block_mask=block_mask, scale=1.0, enable_gqa=True, kernel_options=kernel_options)
            out.sum().backward()

    result = {"backend": backend, "head_dim": head_dim, "window": window, "documents": documents, "length": length}
    try:
        seconds = timed(step, repeats)
    except Exception as error:  # noqa: BLE001 (record which backends cannot run the shape)
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        return result
    flops = 2.5 * 4 * heads * head_dim * attended_pairs(documents, length, window)
    result.update(seconds=seconds, tflops=flops / seconds / 1e12)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention_kernels-h200.json")
    args = parser.parse_args()
    results = []
    backends = [*SDPA_BACKENDS, "flex", "flex_small_blocks", "blocked"]
    for head_dim, window in ((256, 512), (512, None)):
        for documents in (1, 8):
            for backend in backends:
                result = run_case(backend, head_dim, window, documents, args.length, args.repeats)
                print(json.dumps(result), flush=True)
                results.append(result)
                torch.cuda.empty_cache()
    payload = {
        "results": results,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "command": "python benchmarks/attention_kernels.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
