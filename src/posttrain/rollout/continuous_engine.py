"""posttrain's rollout engine for RL: continuous batching over a preallocated slot cache.

- Slots: up to `max_batch_size` sequences decode together, one token per step each. A finished
  sequence leaves its slot at the next sync point and a waiting prompt takes it (prefilled in
  right-padded groups of at most `prefill_token_budget` tokens). Once nothing waits and the live
  sequences fit in half the slots or fewer, they move into the first slots and decoding
  continues with the smaller slot count (the tail of a batch no longer pays for empty slots).
- The cache (`SlotKVCache`) holds Gemma 4's per-layer head sizes and KV-head counts, bounded rings
  for sliding-window layers and nothing for KV-shared layers.
- Decode steps run without host syncs: token, logprob, length and stop bookkeeping stay on the
  device, and the host only looks every `sync_every` steps (or when it knows, from lengths alone,
  that every sequence has reached max_new_tokens). On CUDA each step's forward is a CUDA graph,
  captured once per (slot count, key-length bucket) and replayed; keys are read up to the
  longest live position rounded up to 128, not the whole ring.
- Logprobs are those of softmax(softcapped logits / temperature) over the full vocabulary, as in
  `SamplingParams`; tokens are drawn from the top-k/top-p truncated distribution.
- Precision: "bfloat16_autocast" stores Linear weights in bf16 and everything else (embeddings,
  norms) in fp32 and runs under bf16 autocast: the trainer's numerics (fp32 master weights under
  autocast) at about bf16's memory for the matmul weights. "bfloat16" and "float32" store
  everything in that dtype.
- Weights are the engine's own copy (text-only recipes copy no vision or audio tower; the
  audio tower is never copied) and `refresh_weights` copies the trainer's in place, so captured
  graphs stay valid.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from posttrain.models.registry import family_for
from posttrain.rollout.base import MultimodalPrompt, Rollout, SamplingParams, check_request
from posttrain.rollout.decoder_stack import DecoderStack, decoder_stack
from posttrain.rollout.sampling import first_stop_string_end, sample_with_noise
from posttrain.rollout.slot_attention import SLOT_ATTENTION, decode_mask, prefill_mask
from posttrain.rollout.slot_cache import SlotKVCache, ring_size

Precision = Literal["float32", "bfloat16", "bfloat16_autocast"]
KEY_LENGTH_BUCKET = 128


def slot_bucket(count: int, limit: int) -> int:
    """Slots for `count` sequences: the next power of two (fewer captured graphs), at most `limit`."""
    return min(limit, 1 << max(0, count - 1).bit_length())


def key_length_bucket(longest_position: int, max_len: int) -> int:
    return min(max_len, -(-(longest_position + 1) // KEY_LENGTH_BUCKET) * KEY_LENGTH_BUCKET)


def generation_copy(model: torch.nn.Module, drop_modules: tuple[str, ...], precision: Precision) -> torch.nn.Module:
    """A copy of `model` without `drop_modules` (dotted paths), cast for `precision`, with a
    lm_head of its own (tied embeddings stay fp32 under bfloat16_autocast, the head is bf16).

    Parameters the engine keeps in the trainer's own dtype (float32 everywhere; under
    bfloat16_autocast the embeddings, norms and scales) are the trainer's tensors themselves, not
    copies: the optimizer updates them in place, so the engine always sees the current weights
    and `refresh_weights` skips them. For Gemma 4 E2B that is 11 GB of fp32 embedding tables not
    held twice. A refresh from other tensors (FSDP2's shards, another model) gives the engine
    storage of its own for them first: it never writes into the trainer's."""
    detached = {}
    for path in drop_modules:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if getattr(parent, name, None) is not None:
            detached[path] = (parent, name, getattr(parent, name))
            setattr(parent, name, None)
    # deepcopy's memo maps each parameter to what the copy holds: the same object (shared) or a cast copy
    memo: dict[int, Any] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) in memo:
                continue
            cast = precision == "bfloat16" or (
                precision == "bfloat16_autocast" and (isinstance(module, torch.nn.Linear) or parameter.dim() == 3)
            )  # Linear and MoE expert weights
            # detach(): the trainer's storage under a parameter object of the engine's own
            shared_or_cast = parameter.detach().to(torch.bfloat16) if cast else parameter.detach()
            memo[id(parameter)] = torch.nn.Parameter(shared_or_cast, requires_grad=False)
    try:
        engine_model = copy.deepcopy(model, memo)
    finally:
        for parent, name, module in detached.values():
            setattr(parent, name, module)
    engine_model.eval()
    if precision == "bfloat16":
        return engine_model.to(torch.bfloat16)  # and the floating buffers, as before
    head = engine_model.get_output_embeddings()
    if precision != "float32" and head.weight.dtype != torch.bfloat16:  # tied to the shared fp32 embedding: untie
        head.weight = torch.nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)
    return engine_model


def refresh_targets(trainer_model: torch.nn.Module, engine_model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Trainer parameter name (as `named_parameters()` reports it, tied weights once) -> the engine
    tensors that copy it (a tied embedding feeds both the engine's embedding and its own head)."""
    canonical: dict[int, str] = {}
    for name, parameter in trainer_model.named_parameters():
        canonical.setdefault(id(parameter), name)
    engine_parameters = dict(engine_model.named_parameters(remove_duplicate=False))
    targets: dict[str, list[torch.Tensor]] = {}
    for name, parameter in trainer_model.named_parameters(remove_duplicate=False):
        if name in engine_parameters:
            targets.setdefault(canonical[id(parameter)], []).append(engine_parameters[name])
    return targets


def use_slot_attention(model: torch.nn.Module) -> None:
    """Route the text decoder's attention (only) through `slot_attention`; a vision tower keeps its own."""
    model.config.get_text_config()._attn_implementation = SLOT_ATTENTION


@dataclass
class GenerateStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    prefill_calls: int = 0
    graphs_captured: int = 0
    compactions: int = 0  # times the live sequences moved into fewer slots
    key_lengths: list[int] = field(default_factory=list)


class ContinuousBatchingEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        precision: Precision = "bfloat16_autocast",
        max_batch_size: int = 256,
        language_model_only: bool = True,
        copy_weights: bool = True,
        cuda_graphs: bool = True,
        compile: bool = True,
        sync_every: int = 16,
        prefill_token_budget: int = 32768,
        decode_text: Callable[[list[int]], str] | None = None,
    ):
        """`language_model_only`: keep no vision tower (text-only recipes). `copy_weights=False`
        generates from `model` itself (inference only: its attention is rerouted and its dtype
        left alone). `decode_text` turns token ids into text, for stop strings."""
        family = family_for(model.config)
        dropped_towers = ("vision_tower", "audio_tower") if language_model_only else ("audio_tower",)
        drop = tuple(p.rstrip(".") for tower in dropped_towers for p in family.towers.get(tower, ()))
        self.model = generation_copy(model, drop, precision) if copy_weights else model
        self._targets = refresh_targets(model, self.model) if copy_weights else {}
        # the trainer's own tensors (see generation_copy), until a refresh from other tensors
        self._released: list[tuple[torch.nn.Parameter, torch.Size]] = []  # see release_weights
        self._flat_ptrs: dict[torch.dtype, int] = {}
        trainer_storage = {p.data_ptr() for p in model.parameters()}
        self._shared = {id(p) for p in self.model.parameters() if p.data_ptr() in trainer_storage} if copy_weights else set()
        use_slot_attention(self.model)
        self.stack: DecoderStack = decoder_stack(self.model)
        self.autocast = precision == "bfloat16_autocast"
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.sync_every = sync_every
        self.prefill_token_budget = prefill_token_budget
        self.decode_text = decode_text
        self.device = next(self.model.parameters()).device
        self.never_sampled_ids = torch.tensor(
            family.placeholder_token_ids(self.model.config), dtype=torch.long, device=self.device
        )
        # transformers' MoE experts pick tokens per expert with data-dependent shapes (a host
        # sync), which a CUDA graph cannot hold: MoE models decode eagerly for now.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and not self.stack.has_dynamic_shapes()
        # A Gemma 4 decode step is thousands of small kernels (norms, rotary, casts); inductor
        # fuses them. One compilation with dynamic shapes serves every slot count and key length.
        self._decode_step, self._sample = self._decode_forward, sample_with_noise
        if compile and self.device.type == "cuda" and not self.stack.has_dynamic_shapes():
            self._decode_step = torch.compile(self._decode_forward, dynamic=True)
            self._sample = torch.compile(sample_with_noise, dynamic=True)
        self.cache: SlotKVCache | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._capture_stream: torch.cuda.Stream | None = None
        self.last_stats = GenerateStats()

    # ----- weights -----

    @torch.no_grad()
    def refresh_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's weights into the engine's tensors in place (casting to their dtype);
        names the engine does not hold (dropped towers) are skipped. FSDP2-sharded parameters are
        gathered (every rank calls this, in the same order), already cast, so the gather moves
        bf16 bytes for a bf16 engine."""
        self._reacquire()
        for name, tensor in named_tensors:
            targets = self._targets.get(name, ())
            if targets and hasattr(tensor, "full_tensor"):  # an FSDP2 shard: gather it in the engine's dtype
                tensor = tensor.to(targets[0].dtype).full_tensor()
            for target in targets:
                if target.data_ptr() == tensor.data_ptr():  # shared with the trainer: already current
                    continue
                if id(target) in self._shared:
                    # The trainer's tensor, refreshed from another one (FSDP2 shards, another model):
                    # the engine takes storage of its own rather than write into the trainer's.
                    target.data = tensor.detach().to(device=target.device, dtype=target.dtype, copy=True)
                    self._shared.discard(id(target))
                    self._graphs.clear()  # captured graphs read the old storage
                    self._graph_pool = None
                else:
                    target.copy_(tensor, non_blocking=True)

    def release_weights(self) -> None:
        """Free the engine's own weight copies (the bf16 matmul weights under bfloat16_autocast:
        3.5 GiB for E2B) while the trainer runs; the next refresh allocates them again, as one
        flat buffer per dtype. Captured graphs stay valid when that buffer comes back at the same
        address (the trainer's allocations repeat step to step) and are recaptured otherwise.
        Shared tensors (generation_copy) are the trainer's and stay."""
        if self._released:
            return
        refreshed = {id(t) for targets in self._targets.values() for t in targets}
        for parameter in self.model.parameters():
            if id(parameter) in refreshed and id(parameter) not in self._shared:
                self._released.append((parameter, parameter.shape))
                parameter.data = parameter.data.new_empty(0)

    def _reacquire(self) -> None:
        by_dtype: dict[torch.dtype, list[tuple[torch.nn.Parameter, torch.Size]]] = {}
        for parameter, shape in self._released:
            by_dtype.setdefault(parameter.dtype, []).append((parameter, shape))
        for dtype, members in by_dtype.items():
            sizes = [-(-shape.numel() // 64) * 64 for _, shape in members]  # 128-byte aligned views
            flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
            offset = 0
            for (parameter, shape), size in zip(members, sizes, strict=True):
                parameter.data = flat[offset : offset + shape.numel()].view(shape)
                offset += size
            if self._flat_ptrs.get(dtype) != flat.data_ptr():
                self._flat_ptrs[dtype] = flat.data_ptr()
                self._graphs.clear()  # captured graphs read the old addresses
                self._graph_pool = None
        self._released = []

    # ----- state -----

    def _allocate(self, slots: int, max_len: int, max_new_tokens: int) -> None:
        cache = self.cache
        if cache is None or cache.slots < slots or cache.max_len < max_len:
            self.cache = None
            self._graphs.clear()
            self._graph_pool = None  # a pool whose graphs are gone cannot host new captures
            dtype = torch.bfloat16 if self.autocast else next(self.stack.lm_head.parameters()).dtype
            self.cache = SlotKVCache(
                self.stack.cache_specs(), slots=slots, max_len=max_len, device=self.device, dtype=dtype
            )
            slots = self.cache.slots
            vocab = self.stack.lm_head.out_features
            self.ids = torch.zeros(slots, dtype=torch.long, device=self.device)
            self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
            self.logits = torch.zeros(slots, vocab, dtype=torch.float32, device=self.device)
        slots = self.cache.slots
        width = max_new_tokens + 1  # the last column absorbs writes from finished rows
        self.generated = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.stopped = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.out_tokens = torch.full((slots, width), self.pad_token_id, dtype=torch.long, device=self.device)
        self.out_logprobs = torch.zeros(slots, width, dtype=torch.float32, device=self.device)

    def _precision(self):
        if not self.autocast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    # ----- forward passes -----

    def _ring(self, layer_type: str) -> int:
        return ring_size(self.stack.window(layer_type), self.cache.max_len)

    def _prefill(self, slot_ids: list[int], prompts: list[list[int]], multimodal: list[MultimodalPrompt | None]):
        """Run the prompts into their slots' cache; return the last position's logits, fp32 [N, V]."""
        width = max(len(p) for p in prompts)
        ids_NT = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids_NT[row, : len(prompt)] = torch.tensor(prompt)
        ids_NT = ids_NT.to(self.device)
        lengths_N = torch.tensor([len(p) for p in prompts], device=self.device)
        slot_ids_N = torch.tensor(slot_ids, device=self.device)
        with self._precision():
            hidden_NTH, per_layer, blocks_NT = self.stack.embed_prompts(ids_NT, multimodal)
            masks = {
                layer_type: prefill_mask(
                    lengths_N,
                    width,
                    self.stack.window(layer_type),
                    blocks_NT if layer_type == "sliding_attention" else None,
                )
                for layer_type in set(self.stack.layer_types)
            }
            positions_NT = torch.arange(width, device=self.device).expand(len(prompts), -1)
            self.cache.begin_prefill(slot_ids_N, lengths_N)
            last_N1H = self.stack.forward(hidden_NTH, per_layer, positions_NT, masks, self.cache, keep_B=lengths_N - 1)
            logits_NV = self.stack.logits(last_N1H[:, 0])
        self.positions[slot_ids_N] = lengths_N
        return slot_ids_N, logits_NV

    def _decode_forward(self, rows: int, key_length: int) -> None:
        """One token for slots 0..rows-1: reads self.ids / self.positions, writes self.logits."""
        positions_S = self.positions[:rows]
        with self._precision():
            hidden_S1H, per_layer = self.stack.embed(self.ids[:rows].unsqueeze(-1))
            masks = {
                layer_type: decode_mask(positions_S, min(key_length, self._ring(layer_type)))
                for layer_type in set(self.stack.layer_types)
            }
            self.cache.begin_decode(rows, positions_S, key_length)
            hidden_S1H = self.stack.forward(hidden_S1H, per_layer, positions_S.unsqueeze(-1), masks, self.cache)
            self.logits[:rows] = self.stack.logits(hidden_S1H[:, 0])

    def _decode(self, rows: int, key_length: int) -> None:
        if not self.cuda_graphs:
            self._decode_step(rows, key_length)
            return
        graph = self._graphs.get((rows, key_length))
        if graph is None:
            graph = self._capture(rows, key_length)
        graph.replay()

    def _capture(self, rows: int, key_length: int) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then capture on it. Re-running a decode step is harmless: it
        writes the same K/V at the same positions and the same logits.

        One side stream for the engine's life: cuBLAS keeps a workspace (32 MiB on Hopper) per
        stream it has seen and never frees it, so a new stream per capture leaks that much for
        every recapture (after each release_weights, say)."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream()
        stream = self._capture_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_step(rows, key_length)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream):
            self._decode_step(rows, key_length)
        self._graphs[(rows, key_length)] = graph
        self.last_stats.graphs_captured += 1
        return graph

    # ----- sampling and bookkeeping (on the device, no host syncs) -----

    def _record(self, rows_N: torch.Tensor, logits_NV: torch.Tensor, params: SamplingParams, generator, stop_ids):
        generated_N = self.generated[rows_N]
        log_noise_NV = torch.empty_like(logits_NV).exponential_(generator=generator).log_()
        next_N, logprob_N = self._sample(
            logits_NV,
            log_noise_NV,
            params.temperature,
            params.top_p,
            params.top_k,
            self.never_sampled_ids,
            stop_ids,
            generated_N < params.min_new_tokens,
        )
        active_N = self.active[rows_N]
        column_N = torch.where(active_N, generated_N, params.max_new_tokens)
        self.out_tokens[rows_N, column_N] = next_N
        self.out_logprobs[rows_N, column_N] = logprob_N
        generated_N = generated_N + active_N.long()
        hit_stop_N = active_N & torch.isin(next_N, stop_ids)
        self.generated[rows_N] = generated_N
        self.stopped[rows_N] = self.stopped[rows_N] | hit_stop_N
        self.active[rows_N] = active_N & ~hit_stop_N & (generated_N < params.max_new_tokens)
        self.ids[rows_N] = next_N

    # ----- the loop -----

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        multimodal: list[MultimodalPrompt | None] | None = None,
        on_finished: Callable[[int, Rollout], None] | None = None,
    ) -> list[Rollout]:
        """One response per prompt, in order. `multimodal[i]` holds prompt i's images (None: text
        only); `on_finished(i, rollout)` runs as each response is collected (RolloutEngine)."""
        check_request(prompts, params, multimodal, self.decode_text)
        if self._released:
            raise RuntimeError("the engine's weights were released for training: refresh_weights first")
        if not prompts:
            return []
        multimodal = multimodal or [None] * len(prompts)
        with torch.no_grad():
            return self._generate(prompts, params, multimodal, on_finished or (lambda index, rollout: None))

    def _generate(self, prompts, params: SamplingParams, multimodal, on_finished) -> list[Rollout]:
        self.last_stats = stats = GenerateStats()
        rows = slot_bucket(len(prompts), self.max_batch_size)
        self._allocate(rows, max(len(p) for p in prompts) + params.max_new_tokens, params.max_new_tokens)
        generator = torch.Generator(device=self.device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        decode_rows = torch.arange(rows, device=self.device)

        waiting = deque(range(len(prompts)))
        slot_prompt: list[int | None] = [None] * rows
        slot_steps = [0] * rows  # decode steps since the slot's prompt was admitted
        results: list[Rollout | None] = [None] * len(prompts)

        def admit() -> None:
            free = [slot for slot in range(rows) if slot_prompt[slot] is None]
            while free and waiting:
                group, tokens = [], 0
                while free and waiting and (not group or tokens + len(prompts[waiting[0]]) <= self.prefill_token_budget):
                    tokens += len(prompts[waiting[0]])
                    group.append((free.pop(0), waiting.popleft()))
                start = time.perf_counter()
                slot_ids = [slot for slot, _ in group]
                slot_ids_N = torch.tensor(slot_ids, device=self.device)
                self.generated[slot_ids_N] = 0
                self.stopped[slot_ids_N] = False
                self.active[slot_ids_N] = True
                slot_ids_N, logits_NV = self._prefill(
                    slot_ids, [prompts[i] for _, i in group], [multimodal[i] for _, i in group]
                )
                self._record(slot_ids_N, logits_NV, params, generator, stop_ids)
                for slot, index in group:
                    slot_prompt[slot], slot_steps[slot] = index, 0
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # once per admitted group, for honest phase timings
                stats.prefill_seconds += time.perf_counter() - start
                stats.prefill_calls += 1

        def retire() -> None:
            """One host sync: collect finished slots (and apply stop strings to live ones)."""
            flags = torch.stack([self.active[:rows].long(), self.stopped[:rows].long(), self.generated[:rows]]).cpu()
            if params.stop_strings:
                self._apply_stop_strings(flags, slot_prompt, params.stop_strings)
            done = [slot for slot in range(rows) if slot_prompt[slot] is not None and not flags[0, slot]]
            if not done:
                return
            done_N = torch.tensor(done, device=self.device)
            tokens, logprobs = self.out_tokens[done_N].cpu(), self.out_logprobs[done_N].cpu()
            for row, slot in enumerate(done):
                length = int(flags[2, slot])
                results[slot_prompt[slot]] = Rollout(
                    prompt_token_ids=list(prompts[slot_prompt[slot]]),
                    token_ids=tokens[row, :length].tolist(),
                    logprobs=logprobs[row, :length].tolist(),
                    finish_reason="stop" if flags[1, slot] else "length",
                )
                on_finished(slot_prompt[slot], results[slot_prompt[slot]])
                slot_prompt[slot] = None

        admit()
        while any(index is not None for index in slot_prompt):
            live = [slot for slot in range(rows) if slot_prompt[slot] is not None]
            remaining = [params.max_new_tokens - 1 - slot_steps[slot] for slot in live]
            steps = min(remaining) if waiting else max(remaining)
            steps = max(1, min(self.sync_every, steps)) if max(remaining) > 0 else 0
            start = time.perf_counter()
            for _ in range(steps):
                longest = max(len(prompts[slot_prompt[slot]]) + slot_steps[slot] for slot in live)
                key_length = key_length_bucket(longest, self.cache.max_len)
                self._decode(rows, key_length)
                self._record(decode_rows, self.logits[:rows], params, generator, stop_ids)
                self.positions[:rows] += 1
                for slot in live:
                    slot_steps[slot] += 1
                stats.decode_steps += 1
                if key_length not in stats.key_lengths:
                    stats.key_lengths.append(key_length)
            retire()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            stats.decode_seconds += time.perf_counter() - start
            admit()
            live = [slot for slot in range(rows) if slot_prompt[slot] is not None]
            if not waiting and live and slot_bucket(len(live), rows) < rows:
                rows = self._compact(live, slot_prompt, slot_steps, slot_bucket(len(live), rows))
                decode_rows = torch.arange(rows, device=self.device)
                stats.compactions += 1
        return results

    def _compact(self, live: list[int], slot_prompt: list, slot_steps: list[int], rows: int) -> int:
        """Move the live sequences into slots 0..rows-1 (cache rows, tokens, bookkeeping), so that
        the tail of a batch, once nothing waits, decodes with a smaller slot count. Returns rows."""
        moving = [slot for slot in live if slot >= rows]
        free = [slot for slot in range(rows) if slot_prompt[slot] is None]
        if moving:
            source = torch.tensor(moving, device=self.device)
            target = torch.tensor(free[: len(moving)], device=self.device)
            per_slot = [*self.cache.keys.values(), *self.cache.values.values()]
            per_slot += [self.ids, self.positions, self.generated, self.active, self.stopped]
            per_slot += [self.out_tokens, self.out_logprobs]
            for tensor in per_slot:
                tensor.index_copy_(0, target, tensor.index_select(0, source))
            for old, new in zip(moving, free, strict=False):
                slot_prompt[new], slot_steps[new] = slot_prompt[old], slot_steps[old]
        del slot_prompt[rows:], slot_steps[rows:]
        return rows

    def _apply_stop_strings(self, flags: torch.Tensor, slot_prompt: list[int | None], stop_strings) -> None:
        """End live sequences whose text contains a stop string, at the token that completes it."""
        live = [slot for slot in range(len(slot_prompt)) if slot_prompt[slot] is not None and flags[2, slot] > 0]
        if not live:
            return
        tokens = self.out_tokens[torch.tensor(live, device=self.device)].cpu()
        for row, slot in enumerate(live):
            end = first_stop_string_end(tokens[row, : int(flags[2, slot])].tolist(), self.decode_text, stop_strings)
            if end is not None:
                self.generated[slot], self.stopped[slot], self.active[slot] = end, True, False
                flags[0, slot], flags[1, slot], flags[2, slot] = 0, 1, end
