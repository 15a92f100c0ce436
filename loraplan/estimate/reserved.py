"""Peak reserved memory (``torch.cuda.max_memory_reserved``) from what the analytic estimator knows,
and the fit verdict of paged optimizer state. Pure Python, no torch.

Method: build a *synthetic allocation stream* of one LoRA training step from physics the ledger
already has, and replay it through ``loraplan.allocator`` (the caching-allocator model, every rule
from ``c10/cuda/CUDACachingAllocator.cpp``). Nothing is fitted. The stream is:

1. the weights, one allocation per tensor as it exists on the GPU, in build order
   (``weight_tensor_bytes``): a 4-bit Linear is its packed data, absmax, nested absmax, nested
   code, offset and code table (bitsandbytes ``functional.py::quantize_4bit``; see
   ``quantized_linear_bytes`` in weights.py); int8 is CB + SCB; LoRA A/B in fp32; then the cuBLAS
   workspaces (kept for the whole run).
2. ``steps`` training steps (2, as the trace: optimizer state exists from the first ``step()``),
   each the script of ``StepScript``: per layer in forward, the tensors it saves for backward
   (chunked in units of one residual-stream tensor ``T·h·a``; with checkpointing only the layer
   input survives the layer) and the kernel transients of its quantized Linears (4-bit
   dequantized weight, bitsandbytes ``_dequant_linear_fallback``); the loss head as
   transformers' ``ForCausalLMLoss`` runs it (logits, their fp32 copy, log_softmax output; in
   backward the nll gradient, the log_softmax input gradient, the cast back); per layer in
   backward the recompute, the layer's backward transients and its LoRA gradients; the
   optimizer step (state at the first step, foreach temporaries, gradients freed by
   ``zero_grad(set_to_none=True)``).

``peak_reserved_bytes(weight_tensor_bytes, script, config)`` is the plain function to wire in;
``step_script(...)`` builds the script from (ModelSpec, LoraSpec, TrainSpec, ...) with
memory.py's formulas. Agreement with the trace replays (``loraplan.trace.run.replay_allocations``)
is printed by ``benchmarks/reserved_from_replay.py`` and held by ``tests/test_reserved.py``.

Paged optimizers: ``paging_cost``, the per-step time of "fits with paging" (``Estimate.verdict``; link bandwidths are data in
``loraplan/data/host-links.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..allocator import AllocatorConfig, ReplayResult, replay

__all__ = ["StepScript", "peak_reserved_bytes", "replay_step", "weight_tensor_bytes", "weight_tensors", "WEIGHT_KINDS", "step_script",
           "reserved_for_setup", "PagingCost", "paging_cost", "load_host_links"]


@dataclass(frozen=True)
class StepScript:
    """One training step's dynamic allocations, as tensor sizes in bytes (plain values).

    - ``persistent_bytes``: allocated once before the first step, kept (cuBLAS workspaces).
    - ``layers``: per layer in forward order, ``(saved, kept, transients)``: tensors the layer
      allocates and keeps for its backward (``saved``), those of them that survive the layer's
      forward (``kept``: all with no checkpointing, the layer input with checkpointing), and
      transients allocated and freed one after another inside it (dequantized weights).
    - ``backward_transients``: per layer, tensors alive together at its backward's high point.
    - ``head_forward`` / ``head_backward``: the loss head's script as ``("alloc", name, bytes)`` /
      ``("free", name)``, names local to the head; ``head_forward`` may leave tensors alive for
      ``head_backward`` to free.
    - ``lora_grad_bytes``: per layer (same order as ``layers``), the LoRA gradients made in its
      backward, alive until ``zero_grad``; ``head_lora_grad_bytes`` for lm_head/other leaves.
    - ``optimizer_state_bytes`` (made in the first ``step()``), ``optimizer_temp_bytes`` (alive
      together during each ``step()``).
    - ``step_retained``: per layer, tensors a step keeps until the next step's forward ends
      (int8 ctx tensors held by the graph that ``loss`` keeps).
    - ``output_kept`` / ``output_until``: names of ``head_forward`` tensors the loop's bound model
      output keeps (``--loop-outputs``; ``head_forward`` does not free them), freed at the end of
      the step ("micro-step") or when the next step's head forward is done ("next-forward").
    """

    layers: tuple = ()
    backward_transients: tuple = ()
    head_forward: tuple = ()
    head_backward: tuple = ()
    lora_grad_bytes: tuple = ()
    head_lora_grad_bytes: tuple = ()
    optimizer_state_bytes: tuple = ()
    optimizer_temp_bytes: tuple = ()
    persistent_bytes: tuple = ()
    step_retained: tuple = ()
    input_bytes: tuple = ()
    output_kept: tuple = ()
    output_until: str = "micro-step"


def _events(weights: Sequence[int], s: StepScript, steps: int):
    ev: list[tuple] = []
    add = ev.append
    for i, nb in enumerate(weights):
        add(("alloc", ("w", i), nb))
    for i, nb in enumerate(s.input_bytes):
        add(("alloc", ("in", i), nb))
    for i, nb in enumerate(s.persistent_bytes):
        add(("alloc", ("ws", i), nb))
    retained_prev: list = []
    n_layers = len(s.layers)
    for k in range(steps):
        # ---- forward
        retained: list = []
        for li, (saved, kept, trans) in enumerate(s.layers):
            for j, nb in enumerate(saved):
                add(("alloc", (k, "s", li, j), nb))
            for j, nb in enumerate(trans):
                add(("alloc", (k, "t", li, j), nb))
                add(("free", (k, "t", li, j)))
            if li < len(s.step_retained):
                for j, nb in enumerate(s.step_retained[li]):
                    add(("alloc", (k, "r", li, j), nb))
                    retained.append((k, "r", li, j))
            for j in range(kept, len(saved)):  # checkpointing: only the first `kept` survive
                add(("free", (k, "s", li, j)))
        for e in s.head_forward:
            add((e[0], (k, "h", e[1])) + tuple(e[2:]))
        for key in retained_prev:  # the previous graph dies when `loss` is rebound
            add(("free", key))
        retained_prev = retained
        if k and s.output_until == "next-forward":  # the previous output dies when `outputs` is rebound
            for name in s.output_kept:
                add(("free", (k - 1, "h", name)))
        # ---- backward
        for e in s.head_backward:
            add((e[0], (k, "h", e[1])) + tuple(e[2:]))
        for j, nb in enumerate(s.head_lora_grad_bytes):
            add(("alloc", (k, "hg", j), nb))
        for li in range(n_layers - 1, -1, -1):
            saved, kept, trans = s.layers[li]
            for j in range(kept, len(saved)):  # recompute
                add(("alloc", (k, "s", li, j), saved[j]))
            for j, nb in enumerate(trans):  # the recompute's and the backward's own kernel transients
                for rep in range(2 if kept < len(saved) else 1):
                    add(("alloc", (k, "tb", li, j, rep), nb))
                    add(("free", (k, "tb", li, j, rep)))
            bt = s.backward_transients[li] if li < len(s.backward_transients) else ()
            for j, nb in enumerate(bt):
                add(("alloc", (k, "b", li, j), nb))
            if li < len(s.lora_grad_bytes):
                for j, nb in enumerate(s.lora_grad_bytes[li]):
                    add(("alloc", (k, "g", li, j), nb))
            for j in range(len(bt)):
                add(("free", (k, "b", li, j)))
            for j in range(len(saved)):
                add(("free", (k, "s", li, j)))
        # ---- optimizer
        if k == 0:
            for j, nb in enumerate(s.optimizer_state_bytes):
                add(("alloc", ("opt", j), nb))
        for j, nb in enumerate(s.optimizer_temp_bytes):
            add(("alloc", (k, "ot", j), nb))
        for j in range(len(s.optimizer_temp_bytes)):
            add(("free", (k, "ot", j)))
        for li in range(n_layers):
            if li < len(s.lora_grad_bytes):
                for j in range(len(s.lora_grad_bytes[li])):
                    add(("free", (k, "g", li, j)))
        for j in range(len(s.head_lora_grad_bytes)):
            add(("free", (k, "hg", j)))
        if s.output_until == "micro-step":  # outputs = None at the end of the micro-step
            for name in s.output_kept:
                add(("free", (k, "h", name)))
    return ev


def replay_step(weight_tensor_bytes: Sequence[int], script: StepScript,
                config: AllocatorConfig | str = "", capacity_bytes: int | None = None,
                steps: int = 2) -> ReplayResult:
    """The allocator model's view of the synthetic stream (peak allocated/reserved, OOM, ...)."""
    return replay(_events(weight_tensor_bytes, script, steps), capacity_bytes=capacity_bytes,
                  config=config or AllocatorConfig())


def peak_reserved_bytes(weight_tensor_bytes: Sequence[int], script: StepScript,
                        config: AllocatorConfig | str = "", steps: int = 2) -> int:
    """Peak ``torch.cuda.max_memory_reserved`` of a LoRA step: the synthetic stream replayed
    through the caching-allocator model. ``config``: a ``PYTORCH_CUDA_ALLOC_CONF`` string or
    ``AllocatorConfig`` ("" = torch's defaults)."""
    return replay_step(weight_tensor_bytes, script, config, None, steps).peak_reserved


# ------------------------------------------------------------------------------- from the ledger
def weight_tensor_bytes(model, adapted, quant: str, double_quant: bool, rank: int) -> list[int]:
    """Every weight tensor's bytes as allocated, in build order (embeddings and norms with their
    layer are approximated as: non-Linear params first, then Linears, then LoRA A/B per adapted
    Linear; the order moves peak reserved by at most a segment, see run.replay_allocations).
    The bytes of ``weight_tensors``; see there for each tensor's size."""
    return [nb for _, nb, _ in weight_tensors(model, adapted, quant, double_quant, rank)]


#: ``weight_tensors`` kinds: a frozen param that is not a quantized Linear (embeddings, norms,
#: biases, an untied lm_head, an unquantized Linear), quantized Linear data, its quantization
#: state (absmax, code tables, SCB), a LoRA factor
WEIGHT_KINDS = ("param", "quantized", "quant_state", "lora")


def weight_tensors(model, adapted, quant: str, double_quant: bool, rank: int) -> list[tuple[str, int, int]]:
    """``(kind, bytes, elements)`` of every weight tensor in ``weight_tensor_bytes``' order (kinds:
    ``WEIGHT_KINDS``; elements 0 for quantization state and LoRA, which no loader counts).

    Frozen Linears by storage (storage.py ``linear_storage``): nf4/fp4 -> packed uint8 n/2, code
    table 16 fp32, and with double quant uint8 absmax per 64-block + fp32 nested absmax per 256
    blocks + 256-entry fp32 nested code + fp32 offset, else fp32 absmax per 64-block
    (bitsandbytes functional.py::quantize_4bit / quantize_blockwise); int8 -> CB n int8 + SCB
    out fp32 (nn/modules.py::Int8Params); else n x 2 (bf16/fp16) or 4 (fp32). Biases, embeddings,
    norms, an untied lm_head in the stream dtype (weights.py ``unquantized_weights``: fp32 after
    prepare_model_for_kbit_training). LoRA: fp32 [r, in] and [out, r] (peft upcasts adapters).
    """
    from ..storage import FOUR_BIT, linear_storage, stream_dtype_bytes

    b = stream_dtype_bytes(quant)
    out = [("param", p.numel * b, p.numel) for p in model.others]
    for l in model.linears:
        n = l.in_features * l.out_features
        if l.role == "lm_head":
            if not model.tie_word_embeddings:
                out.append(("param", n * b, n))
            continue
        q = linear_storage(model, quant, l)
        if q in FOUR_BIT:
            blocks = -(-n // 64)
            out.append(("quantized", n // 2 + n % 2, n))
            out += [("quant_state", nb, 0) for nb in
                    [16 * 4] + ([blocks, -(-blocks // 256) * 4, 256 * 4, 4] if double_quant else [blocks * 4])]
        elif q == "int8":
            out += [("quantized", n, n), ("quant_state", l.out_features * 4, 0)]
        else:
            out.append(("param", n * (4 if q == "fp32" else 2), n))
        if l.bias:
            out.append(("param", l.out_features * b, l.out_features))
    for l in adapted:
        out += [("lora", rank * l.in_features * 4, 0), ("lora", l.out_features * rank * 4, 0)]
    return [t for t in out if t[1] > 0]


def _chunks(total: int, unit: int) -> tuple[int, ...]:
    """``total`` bytes as tensors of ``unit`` bytes (+ one remainder): a layer's saved tensors are
    mostly residual-stream-sized (T·h·a); the allocator rules act per tensor size."""
    total, unit = int(total), max(int(unit), 1)
    if total <= 0:
        return ()
    n, rem = divmod(total, unit)
    return (unit,) * n + ((rem,) if rem else ())


def step_script(model, lora, train, adapted, compute_capability: str | None = "9.0",
                cublas_workspace_bytes: Sequence[int] = ()) -> StepScript:
    """The StepScript of a case from the ledger's per-layer formulas (activations.py, transients.py) (see StepScript)."""
    from ..storage import FOUR_BIT, linear_storage
    from .activations import layer_saved
    from .memory import make_setup
    from .steps import lm_loss_form, lm_loss_forms
    from .transients import int8_retained_per_step, layer_backward_transients, logits_bytes

    st_setup = make_setup(model, lora, train, adapted, compute_capability)
    st, x, kind = st_setup.structure, st_setup.shape, st_setup.attention
    a = st.stream_bytes
    gc = train.gradient_checkpointing
    h = model.hidden_size
    layers, bwd, grads, keep = [], [], [], []
    stacks = [("encoder", model.num_encoder_layers, x.T_enc)] if model.num_encoder_layers else []
    stacks.append(("decoder", model.num_layers, x.T))
    by_layer: dict[tuple[str, int], list] = {}
    for l in adapted:
        if l.layer is not None:
            by_layer.setdefault((l.stack, l.layer), []).append(l)
    head_grads = [4 * lora.rank * (l.in_features + 0) for l in adapted if l.layer is None] + \
                 [4 * lora.rank * l.out_features for l in adapted if l.layer is None]
    # 4-bit: every call of a frozen Linear dequantizes its weight to bf16 (out·in·2 B) inside
    # bitsandbytes' gemm_4bit (backends/cuda/ops.py _dequant_linear_fallback), also in backward
    dq: dict[tuple[str, int], list[int]] = {}
    for l in model.linears:
        if l.layer is not None and linear_storage(model, train.quant, l) in FOUR_BIT:
            dq.setdefault((l.stack, l.layer), []).append(2 * l.in_features * l.out_features)
    retained = 0
    if st.linear_quant == "int8":
        L = max(model.num_layers + model.num_encoder_layers, 1)
        retained = int(int8_retained_per_step(st, x, train.int8_outlier_fraction, gc)) // L
    for stack, n, T in stacks:
        S = int(layer_saved(st, kind, x, stack))
        unit = a * T * h
        saved = _chunks(S, unit)
        if gc:
            saved = (unit,) + _chunks(S - unit, unit) if S > unit else saved
        kept = 1 if gc else len(saved)
        bt = _chunks(max(int(layer_backward_transients(st, x, kind, gc)), 0), unit)
        for i in range(n):
            mods = by_layer.get((stack, i), [])
            layers.append((saved, kept, tuple(dq.get((stack, i), ()))))
            bwd.append(bt)
            keep.append(_chunks(retained, unit))
            grads.append(tuple(g for l in mods for g in (4 * lora.rank * l.in_features,
                                                        4 * lora.rank * l.out_features)))
    # the loss head (transformers loss/loss_utils.py ForCausalLMLoss; T5: CrossEntropyLoss)
    TV = x.T * model.vocab_size
    c = logits_bytes(st)
    # the loop's bound model output keeps its logits (steps.kept_model_output): not freed in the head
    from ..trainers import resolve_recipe

    rr = resolve_recipe(train)
    outputs = rr.loop_outputs if rr.trainer == "loop" and rr.loss == "standard" else "dropped"
    if not model.arch.loss_upcasts_logits:  # T5: CrossEntropyLoss on the raw logits
        hf = (("alloc", "logits", c * TV), ("alloc", "lsm", c * TV), ("free", "logits"))
        kept = ("logits",)  # the output's logits
        hb = (("alloc", "g_nll", c * TV), ("alloc", "g_lsm", c * TV), ("free", "g_nll"), ("free", "lsm"),
              ("alloc", "g_h", a * x.T * h), ("free", "g_lsm"), ("free", "g_h"))
    else:
        # older transformers (version rule causal_lm_loss_logits; transients.loss_forward_transient):
        # "loss_shift" adds the fp32 shift copy; "model_upcast" also frees the c logits on upcast
        form = lm_loss_form(model.model_type, lm_loss_forms(train.stack))
        hf = [("alloc", "logits", c * TV)]
        if c == 2:
            hf.append(("alloc", "logits32", 4 * TV))
            if form == "model_upcast":
                hf.append(("free", "logits"))
        if form != "loss_pad":
            hf.append(("alloc", "shift32", 4 * TV))
        hf.append(("alloc", "lsm", 4 * TV))
        if form != "loss_pad":
            hf.append(("free", "shift32"))
        if c == 2:
            hf.append(("free", "logits32"))
        if c != 2 or form != "model_upcast":
            hf.append(("free", "logits"))  # the model output is dropped: `loss = model(...).loss`
        # the output's logits: the fp32 upcast where the model upcasts them, else lm_head's
        kept = ("logits32",) if c == 2 and form == "model_upcast" else ("logits",)
        hb = [("alloc", "g_nll", 4 * TV), ("alloc", "g_lsm", 4 * TV), ("free", "g_nll"), ("free", "lsm")]
        if c == 2:
            hb += [("alloc", "g_logits", 2 * TV), ("free", "g_lsm"), ("alloc", "g_h", a * x.T * h),
                   ("free", "g_logits")]
        else:
            hb += [("alloc", "g_h", a * x.T * h), ("free", "g_lsm")]
        hb.append(("free", "g_h"))
        hf, hb = tuple(hf), tuple(hb)
    if outputs == "dropped":
        kept = ()
    else:
        hf = tuple(e for e in hf if not (e[0] == "free" and e[1] in kept))
    # optimizer (weights.py optimizer_state / optimizer_step_temporaries, per tensor)
    sizes = [lora.rank * l.in_features for l in adapted] + [lora.rank * l.out_features for l in adapted]
    opt = train.optimizer
    state, temps = [], []
    for n_el in sizes:
        if opt == "sgd":
            continue
        if opt.startswith("paged") and n_el >= PAGED_MIN_NUMEL:
            continue
        if opt in ("adamw", "paged_adamw_32bit") or n_el < 4096:
            state += [4 * n_el, 4 * n_el]
        else:
            state += [n_el, -(-n_el // 256) * 4, n_el, -(-n_el // 256) * 4]
        if opt == "adamw":
            temps.append(4 * n_el)
    ids = (train.batch * train.seq * 8,) + ((train.batch * x.tseq * 8,) if model.is_encoder_decoder else ())
    return StepScript(layers=tuple(layers), backward_transients=tuple(bwd), head_forward=hf, head_backward=hb,
                      lora_grad_bytes=tuple(grads), head_lora_grad_bytes=tuple(head_grads),
                      optimizer_state_bytes=tuple(state), optimizer_temp_bytes=tuple(temps),
                      persistent_bytes=tuple(cublas_workspace_bytes), input_bytes=ids,
                      step_retained=tuple(keep) if retained else (), output_kept=kept,
                      output_until=outputs)


def reserved_for_setup(model, lora, train, compute_capability: str | None = "9.0",
                       cublas_workspace_bytes: Sequence[int] = (), config: AllocatorConfig | str = "") -> ReplayResult:
    """Convenience: targets -> weight tensors + step script -> replay (what the integrator wires)."""
    from ..targets import select_targets

    adapted = select_targets(model, lora.targets)
    w = weight_tensor_bytes(model, adapted, train.quant, train.double_quant, lora.rank)
    s = step_script(model, lora, train, adapted, compute_capability, cublas_workspace_bytes)
    return replay_step(w, s, config)


# ------------------------------------------------------------------------------- paged optimizers
#: bitsandbytes optim/optimizer.py::Optimizer8bit.get_state_buffer: paged buffers (F.get_paged,
#: cudaMallocManaged) only for tensors with at least this many elements
PAGED_MIN_NUMEL = 100_000

_HOST_LINKS = Path(__file__).resolve().parents[1] / "data" / "host-links.json"


def load_host_links(path: str | Path | None = None) -> dict:
    """``host-links.json``: {"links": {link id: {"bytes_per_s", "source", ...}}, "paging_efficiency": ...}."""
    return json.loads(Path(path or _HOST_LINKS).read_text())


@dataclass(frozen=True)
class PagingCost:
    """Time to move paged optimizer state through the host link, per step. ``seconds_per_step``:
    the bitsandbytes maintainers' cost model; ``lower_bound_s``: the same bytes at the link's
    peak; ``uncertain`` says why it is only an estimate."""

    evicted_bytes: int
    seconds_per_step: float
    lower_bound_s: float
    link: str
    uncertain: str = ""
    sources: tuple = field(default_factory=tuple)


def paging_cost(evicted_bytes: int, link: str, host_links: dict | None = None) -> PagingCost:
    """Per-step time of paging ``evicted_bytes`` of managed (cudaMallocManaged) optimizer state.

    When only the paged state does not fit (``Estimate.verdict`` "fits with paging"), the driver
    evicts that many bytes to host memory and faults them back when ``optimizer.step()`` reads
    them: every step moves them. Time (bitsandbytes docs 'Paged optimizers': "if you evict 1 GB of
    memory per forward-backward-optimizer loop, then you can expect about 50% of the PCIe bandwidth
    as time in the best case"): evicted / (paging_efficiency × link bandwidth); lower bound
    evicted / bandwidth. Bandwidths and the efficiency are data (``loraplan/data/host-links.json``)
    with sources. Uncertain: the efficiency is a maintainer's estimate for prefetched PCIe 3.0
    transfers, not a measurement; fault-driven migration without prefetch is slower, and whether
    eviction overlaps compute depends on the driver. Raises KeyError for an unknown ``link``.
    """
    data = host_links if host_links is not None else load_host_links()
    links = data["links"]
    if link not in links:
        raise KeyError(f"host link {link!r} is not in host-links.json; use one of {', '.join(sorted(links))}")
    bw = float(links[link]["bytes_per_s"])
    moved = max(int(evicted_bytes), 0)
    return PagingCost(moved, paging_seconds(moved, link, data), moved / bw, link,
                      uncertain=data["paging_efficiency"]["uncertain"],
                      sources=(links[link]["source"], data["paging_efficiency"]["source"]))


def paging_seconds(evicted_bytes, link: str, host_links: dict | None = None):
    """``paging_cost``'s seconds per step: evicted / (paging_efficiency × link bandwidth), for a
    number or a numpy array of evicted bytes (negative counts as 0). KeyError for an unknown link."""
    from .arrays import maximum

    data = host_links if host_links is not None else load_host_links()
    bw = float(data["links"][link]["bytes_per_s"])
    eff = float(data["paging_efficiency"]["value"])
    return maximum(evicted_bytes, 0) / (eff * bw)
