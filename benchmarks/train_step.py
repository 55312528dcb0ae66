"""Training-step memory and speed on one GPU: the chunked logprob head vs the naive path.

E2B preset shape (random init), fp32 master weights, bf16 autocast, activation checkpointing on
(non-reentrant, per decoder layer). Each path runs forward + backward on the same tokens, warmed
up, median of --repeats; peak memory is what is allocated above the weights at the start of the
pass (weight gradients included):
- hidden_only: the backbone alone, a scalar loss on its hidden states (no head at all);
- naive: full logits -> fp32 log_softmax -> gather (transformers-style);
- logprob: posttrain's `token_logprobs` (chunked head: softcap, temperature, log-softmax, gather).
At 4 x 2048 tokens, then whether 8 x 4096 fits with the chunked head. Then a packed training
step (`policy.sequence_packing`: sequences of --packed-len tokens concatenated, AdamW step
included): tokens/s and model FLOPs utilization, and a memory breakdown, for each attention
implementation in --packed-attn (`policy.attention`). With --moe-layers N, the same packed step for the 26B-A4B MoE
preset cut to its first N layers (grouped expert GEMMs; all of it does not fit one GPU beside its
fp32 optimizer state), for throughput beside the dense preset's. Under torchrun the packed step
runs with FSDP2, each process training its own --packed-sequences (tok/s and MFU per GPU):

    python benchmarks/train_step.py --preset e2b --moe-layers 6
    torchrun --nproc-per-node 2 benchmarks/train_step.py --packed-only --moe-only --moe-layers 12 --packed-attn auto
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Gemma4ForCausalLM

from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig
from posttrain.models.activation_checkpointing import enable_activation_checkpointing
from posttrain.models.document_attention import resolve_training_attention, set_training_attention
from posttrain.models.family import final_logit_softcap, softcap_logits
from posttrain.models.gemma4_presets import gemma4_preset_config, temper_random_init_attention
from posttrain.models.loading import use_grouped_experts
from posttrain.models.logprobs import logprobs_from_logits, token_logprobs
from posttrain.models.tiny import tiny_gemma4_config
from posttrain.training.distributed import Distributed, init_distributed
from posttrain.training.trainer import PolicyTrainer, TrainBatch

GIB = 2**30
H200_BF16_DENSE_FLOPS = 989e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hidden_only_loss(model, ids_BT, mask_BT):
    hidden_BTH = model.base_model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).last_hidden_state
    return hidden_BTH.float().square().mean()


def naive_loss(model, ids_BT, mask_BT):
    hidden_BTH = model.base_model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False).last_hidden_state
    logits_BTV = softcap_logits(model.lm_head(hidden_BTH).float(), final_logit_softcap(model.config))
    return -logprobs_from_logits(logits_BTV[:, :-1], ids_BT[:, 1:], 1.0).mean()


def chunked_loss(model, ids_BT, mask_BT):
    return -token_logprobs(model, ids_BT, mask_BT).mean()


def measure(model, loss_fn, batch: int, length: int, repeats: int, device: torch.device) -> dict | None:
    """Median seconds and peak GiB above the starting allocation of forward + backward; None on OOM."""
    vocab = model.config.get_text_config().vocab_size
    ids_BT = torch.randint(3, vocab, (batch, length), device=device)
    mask_BT = torch.ones_like(ids_BT)
    seconds, peaks = [], []
    try:
        for attempt in range(repeats + 1):
            model.zero_grad(set_to_none=True)
            synchronize(device)
            base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(model, ids_BT, mask_BT)
            loss.backward()
            synchronize(device)
            if attempt:  # the first is warm-up
                seconds.append(time.perf_counter() - start)
                peaks.append((torch.cuda.max_memory_allocated() - base) / GIB if device.type == "cuda" else None)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return None
    model.zero_grad(set_to_none=True)
    return {"seconds": statistics.median(seconds), "peak_gib": peaks[-1]}


def flops_per_token(config, context: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (head included, embeddings' lookups not; of
    the experts only the top-k a token is routed to) plus attention scores and values (12 x layers
    x heads x head_dim x attended keys, causal or windowed)."""
    text = config.get_text_config()
    with torch.device("meta"):
        meta = Gemma4ForCausalLM(text)
    matmul = sum(
        m.weight.numel() for name, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and "per_layer_model" not in name
    )
    routed = text.top_k_experts / text.num_experts if getattr(text, "enable_moe_block", False) else 0.0
    matmul += routed * sum(p.numel() for name, p in meta.named_parameters() if ".experts." in name)
    attention = 0.0
    for index, layer_type in enumerate(text.layer_types):
        attn = meta.model.layers[index].self_attn
        keys = min(context, text.sliding_window) if layer_type == "sliding_attention" else context / 2
        attention += 12 * text.num_attention_heads * attn.head_dim * keys
    return 6 * matmul + attention


def packed_step(
    model,
    *,
    attention: str,
    compile: bool,
    sequences: int,
    length: int,
    repeats: int,
    device: torch.device,
    distributed: Distributed,
    profile: Path | None = None,
) -> dict:
    """Training steps on `sequences` x `length` tokens per process (FSDP2 under torchrun). With
    `profile`, one more step runs under torch.profiler: its kernel table is written there and its
    GPU time by kernel kind is returned."""
    policy = PolicyConfig(
        attention=attention,
        compile=compile,
        precision="bfloat16",
        train_global_batch_size=sequences,
        train_micro_batch_size=sequences,
        sequence_packing=True,
        max_grad_norm=1.0,
        optimizer=OptimizerConfig(lr=1e-6),
    )
    trainer = PolicyTrainer(model, policy, LossConfig(), total_optimizer_steps=repeats + 1, distributed=distributed)
    gen = torch.Generator().manual_seed(distributed.rank)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (sequences, length), generator=gen)
    batch = TrainBatch(
        input_ids_BT=ids,
        attention_mask_BT=torch.ones_like(ids),
        loss_mask_BT=torch.ones_like(ids),
        advantages_B=torch.linspace(-1, 1, sequences),
        gen_logprobs_BT=torch.zeros(ids.shape),
    )
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for attempt in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        trainer.train(batch, temperature=1.0)
        synchronize(device)
        if attempt:
            seconds.append(time.perf_counter() - start)
    tokens = sequences * length
    tok_per_s = tokens / statistics.median(seconds)
    model_name = "moe" if getattr(model.config.get_text_config(), "enable_moe_block", False) else "dense"
    table = profile / f"profile-{model_name}-{attention}{'-compiled' if compile else ''}-rank{distributed.rank}.txt" if profile else None
    kernel_seconds = profiled_step(trainer, batch, table) if table else None  # every rank: FSDP's collectives
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 (this rank's shard)
    optimizer_state_gib = (
        sum(
            local(t).numel() * t.element_size()
            for state in trainer.optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        / GIB
    )
    del trainer
    return {
        "attention": model.config.get_text_config()._attn_implementation,
        "packed_sequences": sequences,
        "packed_length": length,
        "train_step_seconds": statistics.median(seconds),
        "train_tok_per_s": tok_per_s,
        "mfu": tok_per_s * flops_per_token(model.config, length) / H200_BF16_DENSE_FLOPS if device.type == "cuda" else None,
        "optimizer_state_gib": optimizer_state_gib,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None,
        **({"profiled_kernel_seconds": kernel_seconds} if kernel_seconds else {}),
    }


KERNEL_KINDS = {  # substrings of kernel names, first match wins
    "attention": ("flash", "fmha", "attention", "flex", "triton_tem_fused"),
    "gemm": ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk"),
    "optimizer": ("adam", "multi_tensor", "foreach"),
    "nccl": ("nccl",),
}


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS.items() if any(key in lowered for key in keys)), "other")


def profiled_step(trainer: PolicyTrainer, batch: TrainBatch, table: Path) -> dict:
    """One training step under torch.profiler: the 60 costliest kernels to `table`, and the step's
    device seconds summed by kernel kind (gemm, attention, optimizer, nccl, other)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train(batch, temperature=1.0)
        synchronize(trainer.device)
    on_cpu = trainer.device.type == "cpu"  # the smoke run: CPU operators stand in for kernels
    kernels = [e for e in prof.key_averages() if on_cpu or e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    for event in kernels:
        kind = kernel_kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + (event.self_cpu_time_total if on_cpu else event.self_device_time_total) / 1e6
    table.parent.mkdir(parents=True, exist_ok=True)
    sort_by = "self_cpu_time_total" if on_cpu else "self_device_time_total"
    table.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=60, max_name_column_width=90))
    return {kind: round(value, 4) for kind, value in sorted(by_kind.items())}


def packed_steps(model, attentions: list[str], args, device: torch.device, distributed: Distributed) -> list[dict]:
    """The packed step under each attention implementation; an implementation that fails is recorded."""
    runs = []
    for attention in attentions:
        try:
            run = packed_step(
                model,
                attention=attention,
                compile=args.compile,
                sequences=args.packed_sequences,
                length=args.packed_len,
                repeats=args.repeats,
                device=device,
                distributed=distributed,
                profile=args.profile,
            )
        except Exception as error:  # noqa: BLE001 (e.g. a kernel that cannot take head_dim 512)
            run = {"attention": attention, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        print("packed", run, flush=True)
        runs.append(run)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if distributed.enabled:  # every rank's peak
            peaks = [None] * distributed.world_size
            dist.all_gather_object(peaks, run.get("peak_gib"))
            run["peak_gib_per_gpu"] = peaks
    return runs


def build_model(config, device: torch.device, attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with device:
        model = Gemma4ForCausalLM(config).float().train()
    temper_random_init_attention(model)
    use_grouped_experts(model)
    enable_activation_checkpointing(model)
    set_training_attention(model, resolve_training_attention(attention, model, device))  # as the trainer does
    return model


def weights_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / GIB


def dense_runs(args, device: torch.device, distributed: Distributed) -> dict:
    """The preset's 4 x 2048 comparisons (one process) and its packed step."""
    config = tiny_gemma4_config(300) if args.preset == "tiny" else gemma4_preset_config(args.preset, text_only=True)
    model = build_model(config, device, args.attention)
    weights = weights_gib(model)
    result_weights = {"weights_gib": weights}

    paths = {} if args.packed_only else {"hidden_only": hidden_only_loss, "naive": naive_loss, "logprob": chunked_loss}
    result: dict = {
        "preset": args.preset,
        "tokens": f"{args.batch} x {args.length}",
        "attention": model.config._attn_implementation,
        **result_weights,
    }
    for name, loss_fn in paths.items():
        measured = measure(model, loss_fn, args.batch, args.length, args.repeats, device)
        result[f"{name}_seconds"] = measured and measured["seconds"]
        result[f"{name}_peak_gib"] = measured and measured["peak_gib"]
        print(name, measured, flush=True)
    big = None if args.packed_only else measure(model, chunked_loss, 2 * args.batch, 2 * args.length, 1, device)
    result["fits_8x4096"] = big is not None
    result["logprob_8x4096_seconds"] = big and big["seconds"]
    result["logprob_8x4096_peak_gib"] = big and big["peak_gib"]
    result["compiled_layers"] = args.compile
    if result.get("hidden_only_peak_gib") is not None and result.get("logprob_peak_gib") is not None:
        result["logprob_extra_peak_gib"] = result["logprob_peak_gib"] - result["hidden_only_peak_gib"]
        result["logprob_extra_seconds"] = result["logprob_seconds"] - result["hidden_only_seconds"]
    if result.get("naive_peak_gib") is not None and result.get("hidden_only_peak_gib") is not None:
        result["naive_extra_peak_gib"] = result["naive_peak_gib"] - result["hidden_only_peak_gib"]
        result["naive_extra_seconds"] = result["naive_seconds"] - result["hidden_only_seconds"]

    runs = packed_steps(model, args.packed_attn.split(","), args, device, distributed)
    best = max((r for r in runs if "error" not in r), key=lambda r: r["train_tok_per_s"])
    result.update(best)
    result["packed_runs"] = runs
    if best["peak_gib"] is not None:
        # 4 x 2048 tokens: gradients are part of each pass's peak above the weights
        activations = result["hidden_only_peak_gib"] - weights if result.get("hidden_only_peak_gib") else None  # minus fp32 grads
        result["memory_breakdown_gib"] = {
            "weights_fp32": weights,
            "gradients_fp32": weights,
            "optimizer_state": best["optimizer_state_gib"],
            "peak_above_gradients_4x2048": activations,  # activations are freed as gradients accumulate
            "logprob_workspace_4x2048": result.get("logprob_extra_peak_gib"),
            "packed_step_peak": best["peak_gib"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="e2b", help="a Gemma 4 preset, or 'tiny' (CPU smoke run)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--packed-sequences", type=int, default=8)
    parser.add_argument("--packed-len", type=int, default=4096)
    parser.add_argument("--attention", default="auto", help="policy.attention for the 4 x 2048 comparisons")
    parser.add_argument("--packed-attn", default="auto", help="policy.attention values for the packed step, comma-separated")
    parser.add_argument("--moe-layers", type=int, default=0, help="also the packed step of 26B-A4B cut to N layers")
    parser.add_argument("--packed-only", action="store_true", help="skip the 4 x 2048 comparisons")
    parser.add_argument("--moe-only", action="store_true", help="only the truncated MoE's packed step (needs --moe-layers)")
    parser.add_argument("--compile", action="store_true", help="policy.compile for the packed step (each decoder layer compiled)")
    parser.add_argument("--profile", type=Path, default=None, help="profile one more packed step; kernel tables go here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    distributed = init_distributed()
    if distributed.enabled and (not args.packed_only or "," in args.packed_attn):
        parser.error("under torchrun only the packed step runs (FSDP2), for one attention: --packed-only --packed-attn X")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    result: dict = {"preset": args.preset}
    if not args.moe_only:
        result.update(dense_runs(args, device, distributed))
    if args.moe_layers:
        moe_config = (
            tiny_gemma4_config(300, variant="moe") if args.preset == "tiny" else gemma4_preset_config("26b-a4b", text_only=True)
        )
        moe_config.num_hidden_layers = args.moe_layers
        moe_config.layer_types = moe_config.layer_types[: args.moe_layers]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        moe_model = build_model(moe_config, device, args.attention)
        result["moe_26b_a4b"] = {"layers": args.moe_layers, "weights_gib": weights_gib(moe_model)}
        result["moe_26b_a4b"]["packed_runs"] = packed_steps(moe_model, args.packed_attn.split(","), args, device, distributed)
    if not distributed.is_main:
        return
    result["world_size"] = distributed.world_size
    result["torch"] = torch.__version__
    result["gpu"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    launcher = f"torchrun --nproc-per-node {distributed.world_size} " if distributed.enabled else "python "
    result["command"] = launcher + "benchmarks/train_step.py " + " ".join(sys.argv[1:])
    print(json.dumps(result, indent=1))
    gpu = result["gpu"].split()[-1].lower()
    suffix = (f"x{distributed.world_size}" if distributed.enabled else "") + ("-moe" if args.moe_only else "")
    out = args.out or Path(__file__).parent / "results" / f"train_step-{gpu}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
