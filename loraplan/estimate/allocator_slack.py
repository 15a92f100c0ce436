"""Peak reserved in closed form: ``torch.cuda.max_memory_reserved`` = peak allocated + slack.

The caching allocator (``loraplan.allocator``, c10/cuda/CUDACachingAllocator.cpp) reserves more
than is allocated for two reasons, which this module prices separately (pure Python, numpy only
for sweep arrays, no torch; cheap enough for ``loraplan sweep``):

1. **weights slack** ``W`` (exact, from the rules, nothing fitted): the model's tensors are
   allocated once, in build order, and never freed, so their segments follow from
   ``get_allocation_size`` alone: blocks <= 1 MiB share 2 MiB small-pool segments, 1-10 MiB blocks
   share 20 MiB segments (``kLargeBuffer``), larger ones get a segment rounded to 2 MiB
   (``kRoundLarge``); with ``expandable_segments:True`` the pools grow by 2 MiB / 20 MiB pages.
   ``W`` = reserved - allocated after replaying ``reserved.weight_tensor_bytes`` (+ the cuBLAS
   workspaces) through the allocator model: one short replay per (model, targets, quantization,
   rank), cached.
2. **step slack** ``phi * B + phi_layer * B_layer`` (fitted, data with provenance): what the
   step's churn strands in cached segments. Its size follows the step's *largest single block*
   ``B`` (``largest_step_block``): a freed block is reused for smaller requests by best-fit
   splitting (``get_free_block``, ``should_split``: remainders > 1 MiB go back to the pool), so
   the next request of the largest size finds no whole free block and cudaMallocs a new segment;
   the stranded bytes scale with that largest size. The per-layer block ``B_layer``
   (``step_blocks``: an MLP intermediate, a dequantized weight, materialised scores) strands
   memory of its own: it is allocated and freed in every layer's forward, recompute and
   backward, between tensors that stay alive, so when the loss head sets ``B`` the layers'
   holes still add (on the H100 reference setups, where ``B_layer`` is close to ``B``, ``phi * B``
   alone read under the replays on 8 of 10). How many such blocks a step strands depends on the
   order of the step's requests, which the rules do not reduce to a formula: ``phi`` and
   ``phi_layer`` per allocator config are fitted on replays of traced steps
   (``benchmarks/reserved_from_replay.py --fit``) and read from
   ``loraplan/data/reserved-slack.json`` with their provenance and spread.

    reserved = A + W + phi * B + phi_layer * B_layer       (A: the ledger's peak allocated)

How well it matches the trace replays over the analytic-vs-trace grid is printed by
``benchmarks/reserved_from_replay.py`` and stated in the data file; ``slack_uncertainty`` is the
fit's largest under-prediction (``spread_of_allocated`` x peak allocated), which the fit verdict's
band adds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..allocator import K_LARGE_BUFFER, K_MIN_LARGE_ALLOC, K_ROUND_LARGE, K_SMALL_BUFFER, K_SMALL_SIZE
from .arrays import is_scalar
from .arrays import maximum as _max

__all__ = ["CONFIGS", "check_config", "WeightsState", "load_slack_data", "slack_factors", "largest_step_block", "weights_state", "weights_slack",
           "step_bytes", "step_segments_bytes", "peak_reserved", "slack_uncertainty"]

_DATA = Path(__file__).resolve().parents[1] / "data" / "reserved-slack.json"

#: allocator configs the closed form is fitted for: name -> PYTORCH_CUDA_ALLOC_CONF
CONFIGS = {"default": "", "expandable_segments": "expandable_segments:True"}


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_slack_data(path: str | Path | None = None) -> dict:
    """``reserved-slack.json``: {"configs": {name: {"phi", "phi_layer", "spread_of_allocated", "fit": {...}}}, "about": ...}."""
    return _load(str(path or _DATA))


def slack_factors(config: str = "default", engine: str | None = None, data: dict | None = None) -> dict:
    """{"phi", "phi_layer", "spread_of_allocated"} of an allocator config; ``engine`` (e.g.
    "fsdp1": a multi-GPU engine's default stream, ``stream_reserved``) takes the config's
    ``engines`` entry when the data has one (fitted on that engine's stream-aware replays,
    benchmarks/fsdp_reserved_from_replay.py --fit), else the one-GPU factors."""
    c = (data or load_slack_data())["configs"][_config_name(config)]
    e = (c.get("engines") or {}).get(engine) if engine else None
    src = e or c
    return {"phi": src["phi"], "phi_layer": src.get("phi_layer", 0.0),
            "spread_of_allocated": src["spread_of_allocated"]}


def _config_name(config: str) -> str:
    for name, text in CONFIGS.items():
        if config in (name, text):
            return name
    from ..errors import InputError

    raise InputError(f"--alloc-conf {config!r} has no closed form; give '' (PYTORCH_CUDA_ALLOC_CONF unset) or "
                     f"'expandable_segments:True'")


def check_config(config: str) -> None:
    """InputError (one line) for an allocator config without a closed form; "" is torch's default."""
    _config_name(config or "default")


def step_blocks(st, x, kind: str):
    """(head, layer): bytes of the largest single tensor the loss head and one layer allocate and
    free in a step (ints, or arrays of x's shape).

    head: the loss head's fp32 [T, V] (ForCausalLMLoss upcasts: log_softmax's output and its
    gradients are 4·T·V; T5's CrossEntropyLoss on raw logits: c·T·V; transients.logits_bytes).
    layer: the largest of an MLP intermediate [T, I] in the stream dtype, the materialised
    attention scores of the math / eager kernels, fp32 [b, n_h, s, kv]
    (activations._attention_core_saved), and a 4-bit / int8 weight dequantized per call
    (transients.dequantized_weight_transient)."""
    from .transients import dequantized_weight_transient, logits_bytes

    m = st.model
    TV = x.T * m.vocab_size
    head = (4 if m.arch.loss_upcasts_logits or st.dt.autocast else logits_bytes(st)) * TV
    inter = m.intermediate_size or 4 * m.hidden_size
    layer = st.stream_bytes * x.T * inter
    if kind in ("math", "eager"):
        layer = _max(layer, 4 * x.b * m.num_heads * x.seq * x.seq)
    return head, _max(layer, dequantized_weight_transient(st))


def largest_step_block(st, x, kind: str):
    """``B``: the largest single tensor a step allocates and frees (``step_blocks``)."""
    return _max(*step_blocks(st, x, kind))


@dataclass(frozen=True)
class WeightsState:
    """The allocator after the model is built: bytes allocated and reserved, and the sizes of
    the cached free blocks (segment tails) the step can use, per pool."""

    allocated: int
    reserved: int
    small_free: tuple = ()
    large_free: tuple = ()


@lru_cache(maxsize=1024)
def _replayed(sizes: tuple, config: str) -> WeightsState:
    from ..allocator import AllocatorConfig, CachingAllocator

    a = CachingAllocator(None, AllocatorConfig.parse(config))
    for n in sizes:
        a.malloc(n)
    small, large = a.free_block_sizes()
    return WeightsState(a.allocated, a.reserved, small, large)


def weights_state(st, r: int, workspaces: tuple = (), config: str = "default") -> WeightsState:
    """The model's tensors (``reserved.weight_tensor_bytes``: quantized data and its constants,
    unquantized parameters, LoRA A/B at rank ``r``) and the cuBLAS workspaces, replayed in build
    order through the allocator model (one replay per distinct input, cached)."""
    key = (int(r), tuple(workspaces), CONFIGS[_config_name(config)])
    held = _BY_STRUCTURE.get(id(st))
    if held is None or held[0] is not st:  # Structure is unhashable (dict fields): keyed by identity
        if len(_BY_STRUCTURE) > 256:
            _BY_STRUCTURE.clear()
        held = _BY_STRUCTURE[id(st)] = (st, {})
    if key not in held[1]:
        from .reserved import weight_tensor_bytes

        sizes = tuple(weight_tensor_bytes(st.model, st.adapted, st.quant, st.double_quant, key[0])) + key[1]
        held[1][key] = _replayed(sizes, key[2])
    return held[1][key]


#: id(Structure) -> (the Structure, {(rank, workspaces, config): WeightsState}); the Structure is
#: kept so its id cannot be reused while the entry exists
_BY_STRUCTURE: dict[int, tuple] = {}


def weights_slack(st, r, workspaces: tuple = (), config: str = "default"):
    """``W``: reserved - allocated of the built model (``weights_state``); ``r`` an int or an
    array of ranks."""
    if is_scalar(r):
        w = weights_state(st, r, workspaces, config)
        return w.reserved - w.allocated
    import numpy as np

    ranks = np.asarray(r)
    out = np.zeros(ranks.shape, dtype=np.int64)
    for v in np.unique(ranks):
        w = weights_state(st, int(v), workspaces, config)
        out[ranks == v] = w.reserved - w.allocated
    return out


def _ceil_div(a, b):
    return -(-a // b)


def step_segments_bytes(w: WeightsState, D, B, phi: float, config: str = "default", extra=0, fill=0):
    """New device memory the step needs beyond the built model's segments (ints or int64 arrays).

    The step needs its D bytes plus ``phi`` blocks of its largest size B that its churn strands
    and ``extra`` further stranded bytes (``phi_layer`` x the layer block; fitted, see the module
    docstring); B (rounded to 512 B, ``round_size``) decides the pool and the segment
    granularity, by the allocator rules:

    - the cached free blocks of that pool hold what fits in them in pieces of B (best fit with
      splitting, ``get_free_block``: a free block of f bytes holds floor(f / B)·B); with ``fill``
      (> 0: the step's per-layer block, ``step_blocks``) a large free block smaller than B holds
      the step's smaller tensors instead, floor(f / fill)·fill (best fit hands a cached block to
      any request it fits: FSDP1's cached construction / lazy-init blocks take a layer's tensors
      when the head's are larger);
    - the rest is new memory in whole segments of ``get_allocation_size``: 2 MiB for B <= 1 MiB
      (small pool), 20 MiB (``kLargeBuffer``) for B < 10 MiB, else rounded up to 2 MiB
      (``kRoundLarge``); with ``expandable_segments:True`` in pages of 2 MiB (small) / 20 MiB
      (large), the free blocks counted whole (pages map where free + unmapped space fits).
    """
    expandable = bool(CONFIGS[_config_name(config)])
    if is_scalar(D) and is_scalar(B):  # pure Python (explain and estimate never import numpy)
        Bs = max(_ceil_div(max(int(B), 1), 512) * 512, 512)
        need = max(int(D), 0) + math.ceil(phi * Bs) + int(extra)
        small = Bs <= K_SMALL_SIZE
        pool = w.small_free if small else w.large_free
        if expandable:
            free, gran = sum(pool), (K_SMALL_BUFFER if small else K_LARGE_BUFFER)
        else:
            Fs = max(_ceil_div(int(fill), 512) * 512, 512) if fill and not small else Bs
            free = sum(f // Bs * Bs if f >= Bs else f // Fs * Fs for f in pool)
            gran = K_SMALL_BUFFER if small else (K_LARGE_BUFFER if Bs < K_MIN_LARGE_ALLOC else K_ROUND_LARGE)
        return _ceil_div(max(need - free, 0), gran) * gran
    import numpy as np

    D = np.maximum(np.asarray(D, dtype=np.int64), 0)
    B = np.maximum(np.asarray(B, dtype=np.int64), 1)
    Bs = np.maximum(_ceil_div(B, 512) * 512, 512)
    need = D + np.ceil(phi * Bs).astype(np.int64) + np.asarray(extra, dtype=np.int64)
    small = Bs <= K_SMALL_SIZE
    sf = np.asarray(w.small_free, dtype=np.int64)
    lf = np.asarray(w.large_free, dtype=np.int64)
    if expandable:
        free = np.where(small, sf.sum(), lf.sum())
        gran = np.where(small, K_SMALL_BUFFER, K_LARGE_BUFFER)
    else:
        flat = Bs.reshape(1, -1)
        fs = ((sf[:, None] // flat) * flat).sum(0).reshape(Bs.shape) if sf.size else 0
        if lf.size:
            F = np.broadcast_to(np.asarray(fill, dtype=np.int64), Bs.shape)
            Fs = np.where(F > 0, np.maximum(_ceil_div(F, 512) * 512, 512), Bs).reshape(1, -1)
            fl = np.where(lf[:, None] >= flat, (lf[:, None] // flat) * flat,
                          (lf[:, None] // Fs) * Fs).sum(0).reshape(Bs.shape)
        else:
            fl = 0
        free = np.where(small, fs, fl)
        gran = np.where(small, K_SMALL_BUFFER, np.where(Bs < K_MIN_LARGE_ALLOC, K_LARGE_BUFFER, K_ROUND_LARGE))
    return (_ceil_div(np.maximum(need - free, 0), gran) * gran).astype(np.int64)


def step_bytes(st, x, peak_allocated, workspaces: tuple = ()):
    """``D``: the bytes of the peak that the step makes (peak allocated minus the model's tensors
    and the workspaces, which live for the whole run): activations, gradients, optimizer state
    and temporaries, the loss head."""
    from .weights import lora_weights

    return peak_allocated - (st.frozen_linear_weights + st.unquantized_weights + (st.expert_weights or 0)
                             + lora_weights(st, x.r) + sum(workspaces))


def peak_reserved(st, x, kind: str, peak_allocated, workspaces: tuple = (), config: str = "default",
                  data: dict | None = None):
    """Peak ``max_memory_reserved`` (bytes, ints or int64 arrays): the built model's segments
    (``weights_state``) + the step's new segments (``step_segments_bytes`` of D = peak allocated -
    the model's bytes, B = ``largest_step_block`` and the layer block's stranded bytes
    ``phi_layer`` x ``step_blocks``' layer block), never below peak allocated + the model's own
    slack."""
    c = (data or load_slack_data())["configs"][_config_name(config)]
    phi, phi_layer = c["phi"], c.get("phi_layer", 0.0)
    head, layer = step_blocks(st, x, kind)
    B = _max(head, layer)
    if is_scalar(x.r) and is_scalar(peak_allocated) and is_scalar(B):
        w = weights_state(st, x.r, workspaces, config)
        extra = math.ceil(phi_layer * int(layer))
        res = w.reserved + step_segments_bytes(w, peak_allocated - w.allocated, B, phi, config, extra)
        return int(max(res, peak_allocated + w.reserved - w.allocated))
    import numpy as np

    ranks = np.asarray(x.r)
    shape = np.broadcast(ranks, np.asarray(peak_allocated), np.asarray(B), np.asarray(layer)).shape
    A, Bb, Ll, rr = (np.broadcast_to(np.asarray(v), shape) for v in (peak_allocated, B, layer, ranks))
    out = np.zeros(shape, dtype=np.int64)
    for v in np.unique(rr):
        sel = rr == v
        w = weights_state(st, int(v), workspaces, config)
        extra = np.ceil(phi_layer * Ll[sel].astype(np.float64)).astype(np.int64)
        res = w.reserved + step_segments_bytes(w, A[sel] - w.allocated, Bb[sel], phi, config, extra)
        out[sel] = np.maximum(res, A[sel] + w.reserved - w.allocated)
    return out


def slack_uncertainty(peak_allocated, config: str = "default", data: dict | None = None,
                      engine: str | None = None):
    """How far the closed form may read under the replays: ``spread_of_allocated`` × peak allocated
    (bytes; the largest under-prediction of the fit, (replay - closed) / peak allocated,
    reserved-slack.json; ``engine``: as ``slack_factors``). One-sided: the verdict's band guards the
    fits side only, where an under-prediction is the risk, so over-predictions do not widen it."""
    u = slack_factors(config, engine, data)["spread_of_allocated"] * peak_allocated
    return int(u) if is_scalar(u) else u.astype("int64")
