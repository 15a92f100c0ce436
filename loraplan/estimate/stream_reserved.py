"""Peak reserved of one rank under FSDP: the caching allocator's pools are per CUDA stream.

The CUDA caching allocator hands a cached block only to a request of the stream that created
its segment (c10/cuda/CUDACachingAllocator.cpp: ``BlockComparatorSize`` orders by stream first,
``get_free_block`` refuses another stream's block; modelled in ``loraplan.allocator``), and a
replay never frees a segment before an OOM retry or ``empty_cache``, so peak reserved is the sum
over streams of each stream's own peak reserved -- reached at different moments of the step.
FSDP allocates on side streams (read from torch 2.13):

- FSDP1: the padded unsharded flat parameters (``gathered_params``) inside
  ``_runtime_utils.py::_unshard``'s ``with stream(unshard_stream)``
  (``_flat_param.py::FlatParamHandle._alloc_padded_unsharded_flat_param``), in the
  mixed-precision param dtype when the unit has one (``_get_padded_unsharded_flat_param``:
  ``_full_param_padded``, allocated low precision); with parameter mixed precision (a flat
  parameter stored in another dtype than MixedPrecision's ``param_dtype``: an fp32-loaded base
  or fp32 adapters under accelerate's bf16 policy, ``_init_param_reduce_dtypes``) each unshard
  first casts the rank's shard to ``_mp_shard`` inside ``with stream(pre_unshard_stream)``
  (``pre_unshard`` -> ``_use_low_precision_shard``) and frees it after the all-gather
  (``post_unshard`` -> ``_free_low_precision_sharded_param``): one shard-sized block at a time on
  ``pre_unshard_stream``, the pool of ``mp_shard_blocks``; the reduce-scatter
  output, kept as the sharded gradient (``lora_gradients``), inside ``_post_backward_hook``'s
  ``with stream(post_backward_stream)`` (``_reduce_grad``: ``new_sharded_grad``).
- FSDP2: the flat all-gather output inside ``_fsdp_collectives.py::foreach_all_gather``'s
  ``with stream(all_gather_copy_in_stream)``; in forward the previous unit's output is freed
  only at the next unit's ``wait_for_unshard`` (``_fsdp_param_group.py``: ``all_gather_state``),
  after the next all-gather was allocated, so two consecutive units' outputs coexist: the root's
  and the first layer's. The unsharded parameters are copied out on the default stream
  (``foreach_all_gather_copy_out``). Under a MixedPrecisionPolicy whose ``param_dtype`` is not the
  stored dtype (an fp32-loaded base under accelerate's bf16 policy) each shard is first cast in
  the copy-in stream (``FSDPParam.all_gather_inputs``), beside the output until the copy-in.
  The reduce-scatter output / new sharded gradients
  (``lora_gradients``) are allocated in ``reduce_scatter_stream`` (``foreach_reduce``).
- DDP allocates its buckets on the default stream (one stream: the one-GPU closed form).

So, per rank (``reserved_by_stream``):

    reserved = R_default + sum over side streams of R_side
    R_default = S + W_lazy + the step's new segments for A_def - S, phi blocks of the step's largest
                block B and phi_layer layer blocks (allocator_slack.step_segments_bytes; a rank's
                shards are a few large flat tensors, each its own segment, so no model tails)
    W_lazy    = FSDP1: the segments FSDP1's lazy init leaves cached on the default stream
                (``lazy_init_state``), whose free blocks the step reuses only for blocks that fit;
                a model that reaches the constructor off the GPU first replays the constructor's
                blocks (``construction_events``), and the step then needs A_def minus the shards
                the construction left allocated
    S         = FSDP1 without a replayed construction: what the constructor allocated before the
                lazy init and keeps (the rank's shards, adapters, 4-bit quant state: ``HELD_LINES``),
                in segments of its own, rounded to kRoundLarge; 0 for FSDP2 (no lazy-init blocks, S
                is part of A_def) and when ``construction_events`` replay the shards
    A_def     = max over moments of the moment's ledger minus its side-stream lines
    R_side    = max over moments of the stream's lines, rounded up to kRoundLarge (2 MiB)
                (FSDP2 all-gather: max(root, unit) + unit rounded the same way, and with a cast
                the largest unit's cast shard + its output, each rounded; FSDP1 unshard:
                at least root + 2 units, each rounded, the backward boundary's two units;
                FSDP1 pre-unshard: the segments the ``_mp_shard`` blocks leave, each freed before
                the next, replayed through ``loraplan.allocator``)

FSDP1's lazy init (first forward: ``_runtime_utils.py::_lazy_init`` ->
``_share_state_and_init_handle_attrs`` -> ``_flat_param.py::FlatParamHandle.
init_flat_param_attributes``, on the current, default stream, root handle first then the others in
``_all_fsdp_states`` order) allocates each handle's padded unsharded flat parameter
(``_full_param_padded``, numel x world size in the unsharded dtype) and at once frees it
(``_free_storage``); with parameter mixed precision also the low-precision shard (``_mp_shard``)
and the full-precision unsharded copy (``_full_prec_full_param_padded``). The caching allocator
keeps those segments: the root unit's (embeddings + head, the largest) stays cached on the
default stream as a free block, split by the step's smaller tensors but too small for its
largest, so on Llama-2-7B QLoRA b4 ctx2048 it strands ~0.5 GiB that the one-GPU closed form
(whose frozen weights are never freed) has no term for.

FSDP1's construction (``_init_utils.py::_init_param_handle_from_module``, each unit as auto-wrap
builds it: a layer's units before their parent, the root last) when the model is on the host
or the meta device and ``device_id`` is given -- accelerate's RAM-efficient loading (rank 0 on
the host, the others on meta, ``sync_module_states``) and Answer.AI's fsdp_qlora ``low_memory``
(train.py: rank 0 quantizes each layer on the GPU, moves it to the host, ``empty_cache``, then
``FSDP(..., device_id=..., sync_module_states=True, param_init_fn=to_empty on cuda)``), per unit
on the default stream: ``_move_module_to_device`` / ``param_init_fn`` put every parameter of the
unit on the GPU (one block per tensor, as stored); ``_sync_module_params_and_buffers`` broadcasts
them in buckets of ``PARAM_BROADCAST_BUCKET_SIZE`` (250 MiB; c10d ``broadcast_coalesced``: a
bucket of one tensor is a view, of several a ``cat`` copy, freed after the broadcast);
``FlatParamHandle.flatten_tensors`` cats the unit into its flat parameter; ``shard()`` clones
this rank's chunk (kept) and frees the flat parameter; the moved originals die when the
constructor returns. The root's blocks (the embedding and the head moved, their flat cat) come
last and stay cached: Llama-2-7B QLoRA on 2 ranks leaves 1.2 GiB free on the default stream
(reserved 3.5 GiB after the wrap, Answer.AI's benchmarks_03_2024.md reads "about 3.72GiB (see
reserved_after_model_wrap)"), which a small step never fills while its small-pool blocks
(the sharded LoRA state, <= 1 MiB each) cannot use it at all. A model already on the GPU
before the wrap (a bitsandbytes base loaded with a device map) is not modelled: its originals
were allocated together by the load.

What the rules leave to the step's order (``phi`` / ``phi_layer``) is fitted per engine on
stream-aware replays of full-size FSDP ranks (``engines.fsdp1`` / ``fsdp2`` in
loraplan/data/reserved-slack.json, ``benchmarks/fsdp_reserved_from_replay.py --fit``): a rank
strands about one more head block B than one GPU does (fsdp1 phi 1.3 against 0.55). Part of it
grows with the layer count (each checkpointed layer's kept tensors carved from a freed layer
block, a new layer-block segment per layer in the full-size replays), which a constant per B
does not follow: on 4 layers the fitted factors read 9-15% high (the safe side).

Checked against stream-aware replays of the fake-process-group trace
(``benchmarks/trace_parallel_table.py``). What replays cannot show: a real run frees the
unsharded flat parameter with ``record_stream`` (FSDP1 ``_free_unsharded_flat_param``) and its
CPU thread runs ahead of the GPU, so up to ``limit_all_gathers``' two freed blocks wait on
events while the next all-gather allocates (the rate limiter, ``_free_event_queue``): the
side-stream figure here is the program-order (lower) bound.
"""

from __future__ import annotations

import math
from functools import lru_cache

from ..allocator import K_ROUND_LARGE
from .arrays import is_scalar
from .arrays import maximum as _max
from .parallel import LAZY_INIT, PARAM_LINES

#: lines FSDP1 holds from its constructor, before the lazy init: the rank's shards (frozen and LoRA
#: flat parameters) and the replicated 4-bit quant state (segments of their own, allocated first)
HELD_LINES = PARAM_LINES + ("quant_state", "lora_weights")

__all__ = ["SIDE_LINES", "HELD_LINES", "PARAM_BROADCAST_BUCKET_SIZE", "construction_events", "unit_construction_events",
           "lazy_init_blocks", "lazy_init_state", "mp_shard_blocks", "reserved_by_stream", "peak_reserved"]

#: ledger lines allocated on a side stream, per FSDP version: line -> stream (module docstring)
SIDE_LINES = {
    1: {"gathered_params": "unshard_stream", "lora_gradients": "post_backward_stream"},
    2: {"all_gather_buffers": "all_gather_copy_in_stream", "lora_gradients": "reduce_scatter_stream"},
}


def round_up(v, g: int):
    """``v`` rounded up to a multiple of ``g`` bytes, negatives to 0 (an int, or an int64 array)."""
    if is_scalar(v):
        return int(math.ceil(max(v, 0) / g)) * g
    import numpy as np

    return (np.ceil(np.maximum(v, 0) / g) * g).astype(np.int64)


def lazy_init_blocks(fsdp_version: int, root: int, unit: int, shard_group: int = 1,
                     param_factor: float = 1) -> tuple[int, ...]:
    """Bytes FSDP1's lazy init allocates and frees at once on the default stream, in order (module
    docstring): per handle (the root unit of ``root`` bytes, then a layer unit of ``unit`` bytes,
    both as gathered in the compute dtype) ``_mp_shard`` (1/``shard_group`` of it) with parameter
    mixed precision, ``_full_param_padded``, and with parameter mixed precision
    ``_full_prec_full_param_padded`` (``param_factor`` x: the stored dtype over the computed,
    ``parallel.param_factor``). Identical layer units leave the same blocks, so one stands for
    all. FSDP2 allocates nothing at lazy init (its buffers come per all-gather): ()."""
    if int(fsdp_version) != 1:
        return ()
    mp = param_factor != 1
    out: list[int] = []
    for u in (int(root), int(unit)):
        if u <= 0:
            continue
        if mp:
            out.append(_ceil(u / max(int(shard_group), 1)))
        out.append(u)
        if mp:
            out.append(_ceil(u * param_factor))
    return tuple(out)


def mp_shard_blocks(fsdp_version: int, root: int, unit: int, shard_group: int = 1, param_factor: float = 1,
                    lora_block: int = 0, offload: bool = False) -> tuple[int, ...]:
    """Bytes FSDP1 allocates and frees at once on ``pre_unshard_stream`` per unshard, in order (module
    docstring): the ``_mp_shard`` of the root unit and of a layer unit (``root`` / ``unit`` bytes
    as gathered, 1/``shard_group`` of it) when the frozen base is stored in another dtype than it
    is gathered in (``param_factor`` != 1), then ``lora_block``: the largest LoRA unit's
    ``_mp_shard`` (0: the adapters are stored in the param dtype). Identical units leave the same
    blocks, so one stands for all. ``offload`` (CPU offload of the parameters, the frozen units
    without parameter mixed precision): ``FlatParamHandle.pre_unshard`` copies each unit's host
    shard to the device (``flat_param_to(self.device, non_blocking=True)``) on the same stream, a
    shard-sized block freed once the all-gather has read it (``_use_unsharded_flat_param`` rebinds
    ``flat_param.data``). FSDP2 and FSDP1 without either: ()."""
    if int(fsdp_version) != 1:
        return ()
    out = [_ceil(u / max(int(shard_group), 1)) for u in (int(root), int(unit))
           if (param_factor != 1 or offload) and u > 0]
    if int(lora_block) > 0:
        out.append(int(lora_block))
    return tuple(out)


def _ceil(v) -> int:
    return int(math.ceil(v))


@lru_cache(maxsize=256)
def lazy_init_state(blocks: tuple, config: str = "default", construction: tuple = ()):
    """``allocator_slack.WeightsState`` of the default stream after the lazy init's allocations,
    each freed before the next (``lazy_init_blocks``), replayed through ``loraplan.allocator``
    after the ``construction`` events (``construction_events``; () for a model built on the
    GPU): allocated the shards the construction keeps, the segments reserved and their free
    blocks."""
    from ..allocator import AllocatorConfig, CachingAllocator
    from .allocator_slack import CONFIGS, WeightsState, _config_name

    a = CachingAllocator(None, AllocatorConfig.parse(CONFIGS[_config_name(config)]))
    live: dict = {}
    for op, key, *nb in construction:
        if op == "alloc":
            live[key] = a.malloc(int(nb[0]))
        else:
            a.free(live.pop(key))
    for n in blocks:
        a.free(a.malloc(int(n)))
    small, large = a.free_block_sizes()
    return WeightsState(a.allocated, a.reserved, small, large)


#: torch/distributed/fsdp/_init_utils.py::PARAM_BROADCAST_BUCKET_SIZE (sync_module_states buckets)
PARAM_BROADCAST_BUCKET_SIZE = 250 * 1024 * 1024


def construction_events(root: tuple, layer: tuple, n_layers: int, world: int, sync: bool = True,
                        offload: bool = False) -> tuple:
    """FSDP1's constructor on the default stream (``unit_construction_events``) for ``n_layers``
    identical layer units of tensors ``layer`` (bytes as stored), then the root unit of tensors
    ``root``. LoRA factors (their own small-pool units) are left out: the step's ledger counts them."""
    return unit_construction_events([tuple(layer)] * int(n_layers) + [tuple(root)], world, sync, offload)


def unit_construction_events(units, world: int, sync: bool = True, offload: bool = False) -> tuple:
    """FSDP1's constructor on the default stream, for a model that reaches it on the host or meta
    (module docstring), as ``(op, key, bytes)`` replay events; ``units``: per FSDP unit in
    construction order, the bytes of each tensor it flattens, as stored. Per unit: every tensor
    moved (``_move_states_to_device``) or materialized; with ``sync`` (``sync_module_states``)
    each broadcast bucket of several tensors copied by ``cat`` and freed
    (``PARAM_BROADCAST_BUCKET_SIZE``, a bucket closes when it reaches the size; one-tensor buckets
    are views); the flat parameter (the sum, padded to ``world``) allocated; this rank's shard
    (1/``world`` of it, ``FlatParamHandle._get_shard``) allocated and kept, the flat parameter
    freed (``shard``: ``_resize_(0)``), the originals freed; with ``offload`` (CPUOffload) the
    shard then goes to the host (``_init_param_handle_from_params``: ``flat_param_to(cpu)``), its
    GPU block freed."""
    ev: list[tuple] = []
    world = max(int(world), 1)
    for u, tensors in enumerate(units):
        tensors = tuple(int(t) for t in tensors if int(t) > 0)
        if not tensors:
            continue
        for j, nb in enumerate(tensors):
            ev.append(("alloc", (u, "orig", j), nb))
        if sync:
            buckets, cur, size = [], [], 0
            for nb in tensors:
                cur.append(nb)
                size += nb
                if size >= PARAM_BROADCAST_BUCKET_SIZE:
                    buckets.append(cur)
                    cur, size = [], 0
            buckets += [cur] if cur else []
            for j, b in enumerate(buckets):
                if len(b) > 1:
                    ev += [("alloc", (u, "bucket", j), sum(b)), ("free", (u, "bucket", j))]
        full = _ceil(sum(tensors) / (2 * world)) * 2 * world
        ev += [("alloc", (u, "flat"), full), ("alloc", (u, "shard"), full // world), ("free", (u, "flat"))]
        ev += [("free", (u, "shard"))] if offload else []
        ev += [("free", (u, "orig", j)) for j in range(len(tensors))]
    return tuple(ev)


def _pre_unshard_stream(fn, root, unit, lora, config):
    """Reserved bytes of FSDP1's ``pre_unshard_stream``: ``lazy_init_state`` of the blocks
    ``fn(root, unit, lora)`` (``mp_shard_blocks``), per distinct triple of a sweep's arrays."""
    if is_scalar(root) and is_scalar(unit) and is_scalar(lora):
        return lazy_init_state(fn(root, unit, lora), config).reserved
    import numpy as np

    R, U, P = np.broadcast_arrays(np.asarray(root), np.asarray(unit), np.asarray(lora))
    out = np.zeros(R.shape, dtype=np.int64)
    for r, u, p in np.unique(np.stack([R.ravel(), U.ravel(), P.ravel()], 1), axis=0):
        out[(R == r) & (U == u) & (P == p)] = lazy_init_state(fn(r, u, p), config).reserved
    return out


def _default_stream(a_def, B, phi, config, extra, lazy, construction: tuple = (), fill=0, held=0):
    """R_default (module docstring); ``lazy``: (root, unit) -> ``lazy_init_blocks``, or None;
    ``construction``: ``construction_events`` or (); ``fill``: the step's layer block
    (``allocator_slack.step_segments_bytes``); ``held``: bytes allocated before the lazy init and
    kept (the shards and adapters ``FullyShardedDataParallel.__init__`` made), in segments of their
    own that the lazy-init blocks' free space cannot hold: only ``a_def - held`` reuses them. With
    ``construction`` the replay allocates the shards itself (``held`` is then not added)."""
    from .allocator_slack import WeightsState, step_segments_bytes

    if lazy is None:
        return _max(a_def, step_segments_bytes(WeightsState(0, 0), a_def, B, phi, config, extra))
    fn, root, unit = lazy
    held_r = round_up(held, K_ROUND_LARGE)
    if is_scalar(root) and is_scalar(unit):
        w = lazy_init_state(fn(root, unit), config, construction)
        return _max(a_def, held_r + w.reserved + step_segments_bytes(w, a_def - held - w.allocated, B, phi, config,
                                                                     extra, fill))
    import numpy as np

    shape = np.broadcast(*(np.asarray(v) for v in (a_def, B, extra, root, unit, fill, held))).shape
    A, Bb, E, R, U, Fl, H, HR = (np.broadcast_to(np.asarray(v), shape)
                                 for v in (a_def, B, extra, root, unit, fill, held, held_r))
    out = np.zeros(shape, dtype=np.int64)
    pairs = np.stack([R.ravel(), U.ravel()], 1)
    for r, u in np.unique(pairs, axis=0):
        sel = (R == r) & (U == u)
        w = lazy_init_state(fn(r, u), config, construction)
        out[sel] = np.maximum(A[sel], HR[sel] + w.reserved
                              + step_segments_bytes(w, A[sel] - H[sel] - w.allocated, Bb[sel], phi, config,
                                                    E[sel], Fl[sel]))
    return out


def reserved_by_stream(moments: dict[str, dict], fsdp_version: int, B, phi: float, config: str = "default",
                       root=0, unit=0, extra=0, shard_group: int = 1,
                       param_factor: float = 1, construction: tuple = (), fill=0,
                       lora_block: int = 0, offload: bool = False) -> dict[str, object]:
    """{stream name: its peak reserved bytes} of one FSDP rank (module docstring).

    ``moments``: the rank's ledger per moment (``parallel.rank_moments``: line -> bytes, ints or
    arrays); ``B``: the step's largest block (``allocator_slack.largest_step_block``); ``phi``
    the closed form's step-slack factor for ``config``; ``root`` / ``unit``: bytes of the
    gathered root unit and of one layer unit (``parallel.layer_unit``), for FSDP2's two
    coexisting all-gather outputs; ``extra``: further stranded bytes on the default stream
    (``phi_layer`` x the layer block, as ``allocator_slack.peak_reserved``); ``shard_group``,
    ``param_factor``: for FSDP1's lazy-init blocks (``lazy_init_blocks``) and, with
    ``lora_block``, its pre-unshard blocks (``mp_shard_blocks``: ``pre_unshard_stream``, present
    only when FSDP1 casts shards); ``construction``: FSDP1's constructor's events for a model built
    off the GPU (``construction_events``), () otherwise; ``fill``: the step's layer block, which
    fills FSDP1's cached blocks smaller than B; ``offload``: FSDP1 CPU offload (its shards copied to
    the device before each all-gather: ``mp_shard_blocks``)."""

    side = SIDE_LINES[int(fsdp_version)]
    a_def, held, peaks = 0, 0, dict.fromkeys(side.values(), 0)
    for name, c in moments.items():
        if name == LAZY_INIT:  # FSDP1's lazy-init blocks: default-stream segments, W_lazy (lazy_init_state)
            continue
        held = _max(held, sum(c.get(k, 0) for k in HELD_LINES))
        total = sum(c.values())
        on_side = 0
        for line, stream in side.items():
            v = c.get(line, 0)
            on_side = on_side + v
            peaks[stream] = _max(peaks[stream], v)
        a_def = _max(a_def, total - on_side)
    if int(fsdp_version) == 1:
        # the stream's own peak is the backward boundary's: the previous unit all-gathered (its
        # pre-backward hook) before this unit's reshard-only hook frees it, beside the root; the
        # ledger's moment nets the layer's backward transients against the second unit because
        # the total peaks inside the layer (parallel.py, BACKWARD_MOMENTS), the stream does not
        peaks["unshard_stream"] = _max(peaks["unshard_stream"],
                                       round_up(root, K_ROUND_LARGE) + 2 * round_up(unit, K_ROUND_LARGE))
    if int(fsdp_version) == 2:
        peaks["all_gather_copy_in_stream"] = _max(peaks["all_gather_copy_in_stream"],
                                                  round_up(_max(root, unit), K_ROUND_LARGE) + unit)
        if param_factor != 1:
            # a shard stored in another dtype than MixedPrecisionPolicy's param_dtype is cast first, in
            # the same stream, and freed after the copy-in (_fsdp_collectives.py::foreach_all_gather:
            # _get_param_all_gather_inputs -> _fsdp_param.py::FSDPParam.all_gather_inputs, ``.to(param_dtype)``):
            # the largest unit's cast shard beside its output
            big = _max(root, unit)
            peaks["all_gather_copy_in_stream"] = _max(
                peaks["all_gather_copy_in_stream"],
                round_up(big / max(int(shard_group), 1), K_ROUND_LARGE) + round_up(big, K_ROUND_LARGE))
    lazy = None
    if int(fsdp_version) == 1:
        lazy = (lambda r, u: lazy_init_blocks(1, r, u, shard_group, param_factor), root, unit)
    fsdp1 = int(fsdp_version) == 1
    out = {"default": _default_stream(a_def, B, phi, config, extra, lazy, construction if fsdp1 else (), fill,
                                      0 if (construction and fsdp1) else held)}
    for stream, v in peaks.items():
        out[stream] = round_up(v, K_ROUND_LARGE)
    if int(fsdp_version) == 1 and (param_factor != 1 or offload
                                   or (lora_block > 0 if is_scalar(lora_block) else bool((lora_block > 0).any()))):
        out["pre_unshard_stream"] = _pre_unshard_stream(
            lambda r, u, p: mp_shard_blocks(1, r, u, shard_group, param_factor, p, offload), root, unit, lora_block,
            config)
    return out


def peak_reserved(moments: dict[str, dict], fsdp_version: int, B, phi: float, config: str = "default",
                  root=0, unit=0, extra=0, shard_group: int = 1, param_factor: float = 1, construction: tuple = (),
                  fill=0, lora_block: int = 0, offload: bool = False):
    """Peak reserved bytes of one FSDP rank: the sum of ``reserved_by_stream``."""
    total = 0
    for v in reserved_by_stream(moments, fsdp_version, B, phi, config, root, unit, extra,
                                shard_group, param_factor, construction, fill, lora_block, offload).values():
        total = total + v
    return total
