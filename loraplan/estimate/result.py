"""What an estimate returns: plain data (dataclasses + to_dict), never formatted text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .params import ParamCounts


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of a training burst, in bytes.

    ``components`` is the itemised ledger of ``peak_allocated_bytes`` (torch.cuda.max_memory_allocated):
    its values sum exactly to it. ``peak_moment`` names the moment of the step at which the peak
    happens (e.g. "loss backward", "optimizer step"). Reserved adds allocator caching; device
    total adds the CUDA context and memory outside torch's allocator (paged optimizer buffers).
    On several GPUs (``--strategy``) every top-level number is the worst rank's; ``per_gpu`` has
    each rank's ledger and ``host_bytes`` the CPU RAM of one machine (estimate.parallel).
    """

    components: dict[str, int]
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int
    peak_moment: str
    moments: dict[str, int] = field(default_factory=dict)  # candidate moment -> allocated bytes
    outside_allocator_bytes: dict[str, int] = field(default_factory=dict)  # e.g. paged buffers, CUDA context
    notes: tuple[str, ...] = ()
    #: rank -> the itemised ledger at that rank's peak (sums to its peak allocated); one GPU: {0: components}
    per_gpu: dict[int, dict[str, int]] = field(default_factory=dict)
    #: CPU RAM of one machine the run needs (estimate.parallel.host_ledger), and its components
    host_bytes: int = 0
    host_components: dict[str, int] = field(default_factory=dict)
    #: how far peak reserved may be off beyond peak allocated's own error (bytes; None: the
    #: calibration's ratio spread applies, ``uncertainty_band``)
    reserved_uncertainty_bytes: int | None = None
    #: how far the CUDA context may be off (bytes; None: ``cuda_context_uncertainty_bytes``)
    context_uncertainty_bytes: int | None = None


@dataclass(frozen=True)
class TimeEstimate:
    step_s: float
    tokens_per_s: float
    components: dict[str, float] = field(default_factory=dict)  # seconds by part
    bound: str = ""  # what limits the step: host | compute | memory
    notes: tuple[str, ...] = ()
    #: the step at the slowest and fastest host speeds seen (estimate/host_costs.host_speed_range),
    #: seconds, when the user's host is unknown and the step depends on it; else None
    step_s_host_range: tuple[float, float] | None = None
    #: on a GPU without bf16 tensor cores (compute capability < 8.0) running bf16 compute: the
    #: step with fp16 in its place (``fp16_option``), seconds; else None
    step_s_fp16: float | None = None
    #: the option that gives ``step_s_fp16`` (e.g. "--compute-dtype fp16"); "" when none
    fp16_option: str = ""


@dataclass(frozen=True)
class Estimate:
    inputs: dict[str, Any]
    params: ParamCounts
    memory: MemoryEstimate
    gpu: str | None
    gpu_memory_bytes: int | None
    time: TimeEstimate | None = None
    method: str = "analytic"
    calibration: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)  # method-specific extras (trace phases, ...)

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_bytes is None:
            return None
        return self.memory.device_total_bytes <= self.gpu_memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.gpu_memory_bytes is None else self.gpu_memory_bytes - self.memory.device_total_bytes

    @property
    def uncertainty_bytes(self) -> int | None:
        """The band around the device total (``uncertainty_band``), from the calibration's
        ``*_uncertainty`` coefficients; None when the Estimate carries no calibration."""
        return uncertainty_band(self.memory, self.calibration.get("coefficients") or {})

    @property
    def verdict(self) -> str | None:
        """One of VERDICTS (None without a GPU): the headroom compared with the uncertainty band.

        - "fits": the device total plus the band fits the card;
        - "fits, within the uncertainty": the device total fits, but less than the band is left;
        - "fits with paging": only with the paged optimizer state evicted to host memory (it is
          managed memory, which the driver pages out under pressure: bitsandbytes
          functional.py::get_paged); what stays resident fits;
        - "does not fit".
        """
        return _verdict(self.memory, self.gpu_memory_bytes, self.uncertainty_bytes)[0]

    @property
    def margin_bytes(self) -> int | None:
        """Headroom left beyond the uncertainty band (negative: inside the band, or over the card);
        for "fits with paging", counted without the evictable paged optimizer state."""
        return _verdict(self.memory, self.gpu_memory_bytes, self.uncertainty_bytes)[1]

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        d: dict[str, Any] = {
            "method": self.method,
            "inputs": self.inputs,
            "params": {"trainable": self.params.trainable, "total": self.params.total,
                       "trainable_percent": round(self.params.trainable_percent, 6),
                       "adapted_modules": self.params.adapted_modules},
            "memory": {
                "peak_allocated_bytes": m.peak_allocated_bytes,
                "peak_reserved_bytes": m.peak_reserved_bytes,
                "device_total_bytes": m.device_total_bytes,
                "peak_moment": m.peak_moment,
                "components": dict(m.components),
                "moments": dict(m.moments),
                "outside_allocator_bytes": dict(m.outside_allocator_bytes),
                "notes": list(m.notes),
                "per_gpu": {str(k): dict(v) for k, v in m.per_gpu.items()},
                "host_bytes": m.host_bytes,
                "host_components": dict(m.host_components),
            },
            "gpu": self.gpu,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "verdict": self.verdict,
            "margin_bytes": self.margin_bytes,
            "uncertainty_bytes": self.uncertainty_bytes,
            "calibration": self.calibration,
        }
        if self.detail:
            d["detail"] = self.detail
        if self.time is not None:
            d["time"] = {"step_s": self.time.step_s, "tokens_per_s": self.time.tokens_per_s,
                         "components": dict(self.time.components), "bound": self.time.bound,
                         "notes": list(self.time.notes),
                         "step_s_host_range": (list(self.time.step_s_host_range)
                                               if self.time.step_s_host_range else None)}
        return d


# ---- the fit verdict -----------------------------------------------------------------------------

#: the fit verdicts, best first
VERDICTS = ("fits", "fits, within the uncertainty", "fits with paging", "does not fit")

#: the calibration coefficients the band reads (catalog/calibrations/default.json: values and sources)
UNCERTAINTY_COEFFICIENTS = ("peak_allocated_uncertainty_ratio", "reserved_over_allocated_uncertainty",
                            "cuda_context_uncertainty_bytes")


def uncertainty_band(memory: MemoryEstimate, coefficients) -> int | None:
    """Bytes by which the device total may be off, from what is checked and what is a prior.

    device total = R + C + P (memory.device_totals: peak reserved R from peak allocated A,
    CUDA context C, paged buffers P). Each uncertain factor moves it by:
    u_A·R (peak allocated, checked to ``peak_allocated_uncertainty_ratio`` u_A on the reference)
    + the reserved model's own spread: ``memory.reserved_uncertainty_bytes`` (the allocator closed
    form's spread against replays, ``allocator_slack.slack_uncertainty``) or, when a calibrated
    ratio R = A·(1 + ρ) is used, u_ρ·A (``reserved_over_allocated_uncertainty``) + the context's
    spread: ``memory.context_uncertainty_bytes`` (data/cuda-context.json) or u_C
    (``cuda_context_uncertainty_bytes``, a prior's spread), added linearly (the worst case; the
    errors' correlation is unknown). None when a coefficient is missing (an Estimate built
    without ``load_calibration``).
    """
    try:
        u_a, u_rho, u_c = (float(coefficients[k]) for k in UNCERTAINTY_COEFFICIENTS)
    except KeyError:
        return None
    a = memory.peak_allocated_bytes
    u_res, u_ctx = memory.reserved_uncertainty_bytes, memory.context_uncertainty_bytes
    return int(u_a * memory.peak_reserved_bytes + (u_rho * a if u_res is None else u_res)
               + (u_c if u_ctx is None else u_ctx))


def _verdict(memory: MemoryEstimate, capacity: int | None, band: int | None) -> tuple[str | None, int | None]:
    """(verdict, margin bytes); see ``Estimate.verdict``."""
    if capacity is None:
        return None, None
    band = band or 0
    headroom = capacity - memory.device_total_bytes
    if headroom >= 0:
        return ("fits" if headroom >= band else "fits, within the uncertainty"), headroom - band
    paged = memory.outside_allocator_bytes.get("paged_optimizer_state", 0)
    if paged and headroom + paged >= 0:
        return "fits with paging", headroom + paged - band
    return "does not fit", headroom - band


# ---- the ledger's vocabulary -------------------------------------------------------------------

@dataclass(frozen=True)
class LedgerLine:
    """One line of the memory ledger: its key (as in ``MemoryEstimate.components``), the label
    shown in tables and legends, the colour of its segment in stacked bars, and the views that
    emit it (``analytic``: ``estimate.memory.moments``; ``trace``: ``trace.run.trace_step``;
    ``trace-parallel``: lines only the trace of a multi-GPU engine adds, ``trace.distributed``)."""

    key: str
    label: str
    color: str
    views: tuple[str, ...] = ("analytic",)


_BOTH = ("analytic", "trace")
#: lines of the multi-GPU engines that both the analytic ledger and the engines' trace name
_PARALLEL = ("analytic", "trace-parallel")

#: every ledger line, in the order tables and stacked bars show them. The trace's categories are
#: coarser: ``weights`` is the analytic frozen_linear_weights + unquantized_weights (+ expert_weights), ``other``
#: holds its inputs, cuBLAS workspaces and the in-kernel transient at the peak, and its
#: ``optimizer_state`` includes the optimizer step's temporaries.
LEDGER: tuple[LedgerLine, ...] = (
    LedgerLine("weights", "frozen weights and buffers (quantized base, embeddings, norms)", "#3d5a80", ("trace",)),
    LedgerLine("frozen_linear_weights", "frozen Linear weights", "#4c72b0"),  # the CLI names the storage per setup
    LedgerLine("unquantized_weights", "embeddings, norms, lm_head, biases", "#8172b2"),
    LedgerLine("expert_weights", "MoE expert weights (fused; never bnb-quantized)", "#2a9d8f"),
    LedgerLine("lora_weights", "LoRA weights", "#64b5cd", _BOTH),  # + the adapter dtype per setup
    LedgerLine("lora_gradients", "LoRA gradients", "#55a868", _BOTH),
    LedgerLine("optimizer_state", "optimizer state", "#c44e52", _BOTH),
    LedgerLine("optimizer_temporaries", "optimizer step temporaries", "#e08a8c"),
    LedgerLine("activations", "activations saved for backward", "#dd8452", _BOTH),
    LedgerLine("autocast_copies", "autocast: low-precision copies of weights and adapters", "#f4a261"),
    LedgerLine("int8_previous_step", "int8: inputs kept by the graph loss still holds", "#f2b880"),
    LedgerLine("previous_step_input_grad", "previous step's input embedding + grad", "#ccb974"),
    LedgerLine("input_embedding_grad", "input embedding output + its grad", "#a6d854"),
    LedgerLine("logits_loss", "logits and loss", "#937860", _BOTH),
    LedgerLine("model_output", "the loop's kept model output", "#c9a66b"),
    LedgerLine("backward_transients", "backward transients (grads, dequantized weight)", "#da8bc3"),
    LedgerLine("kernel_transients", "int8 matmul transients (int32 result, outlier columns)", "#b5556e"),
    # several GPUs (estimate.parallel): what the engines add per rank
    LedgerLine("master_weights", "ZeRO fp32 master partition of the adapters", "#a33b3f"),
    LedgerLine("quant_state", "4-bit quant state (absmax, codes), on every rank", "#4c9ab0"),
    LedgerLine("persistent_params", "ZeRO-3 persistent (unpartitioned) small params", "#5e8c9a"),
    LedgerLine("gathered_params", "all-gathered units in flight (incl. prefetch)", "#6a7fb5", _PARALLEL),
    LedgerLine("all_gather_buffers", "FSDP2 all-gather output buffer", "#9aa8d0"),
    LedgerLine("reduce_scatter_buffers", "gradient reduce-scatter / bucket buffers", "#7fbf8e", _PARALLEL),
    LedgerLine("ddp_buckets", "DDP gradient buckets", "#3f8f5a", _PARALLEL),
    LedgerLine("cuda_workspaces", "cuBLAS workspaces", "#8c8c8c"),
    LedgerLine("allocator_overhead", "allocator overhead (calibrated)", "#cccccc"),
    LedgerLine("other", "inputs, cuBLAS workspaces, in-kernel transients", "#b0b0b0", ("trace",)),
)
LEDGER_BY_KEY: dict[str, LedgerLine] = {line.key: line for line in LEDGER}


def ledger_keys(view: str | None = None) -> tuple[str, ...]:
    """The ledger keys in order; only those ``view`` ("analytic" | "trace") emits when given."""
    return tuple(line.key for line in LEDGER if view is None or view in line.views)


def ledger_labels(keys, train, model=None, moment: str | None = None) -> dict[str, str]:
    """{key: display label} for a ledger of ``train`` (a TrainSpec) at ``moment``: the recipe's
    dtypes (``storage.Dtypes.of``) and the engine's own for the trainable lines
    (``parallel.engine_line_dtypes``, from the same function as their bytes)."""
    from ..storage import Dtypes
    from ..trainers import resolve_recipe
    from .parallel import engine_line_dtypes

    r = resolve_recipe(train)
    dt = Dtypes.of(r)
    engine = engine_line_dtypes(r, dt.adapter, moment)
    return {k: ledger_label(k, dt, model, engine) for k in keys}


def ledger_label(key: str, quant=None, model=None, engine: dict[str, str] | None = None) -> str:
    """The display label of a ledger key (the key with spaces when it is not in the vocabulary).

    With the setup's ``quant`` (and ``model``, for families whose Linears bitsandbytes does not
    convert), the weight lines say what is true for it (loraplan.storage): "frozen Linear weights
    (nf4)", "(bf16)" for an unquantized base, "(fp32, not quantized)" for a Falcon "4-bit" base;
    "embeddings, norms, lm_head, biases (fp32)" after prepare_model_for_kbit_training; the LoRA
    lines name the adapter dtype, or ``engine``'s for the key (``parallel.engine_line_dtypes``:
    ZeRO's 16-bit copies). ``quant`` may be the recipe's ``storage.Dtypes``."""
    line = LEDGER_BY_KEY.get(key)
    label = line.label if line else key.replace("_", " ")
    if engine and key in engine:
        return f"{label} ({engine[key]})"
    if key in ("lora_weights", "lora_gradients"):
        from ..storage import as_dtypes

        return f"{label} ({as_dtypes(quant).adapter if quant is not None else 'fp32'})"
    if quant is None or key not in ("frozen_linear_weights", "unquantized_weights"):
        return label
    from ..storage import as_dtypes, effective_linear_quant, is_quantized

    dt = as_dtypes(quant)  # a quantization name, or the recipe's storage.Dtypes
    quant = dt.quant
    if key == "frozen_linear_weights":
        stored = effective_linear_quant(model, dt) if model is not None else quant
        if is_quantized(quant) and not is_quantized(stored):
            return f"frozen Linear weights ({stored}, not quantized)"
        return f"frozen Linear weights ({stored}{' base' if is_quantized(stored) else ''})"
    dtype = dt.unquantized
    return f"embeddings, norms, lm_head, biases ({dtype})"


def ledger_color(key: str) -> str | None:
    """The stacked-bar colour of a ledger key (None: matplotlib's next colour)."""
    line = LEDGER_BY_KEY.get(key)
    return line.color if line else None


def ledger_order(keys) -> list[str]:
    """``keys`` (distinct) in the vocabulary's order; keys outside it last, sorted."""
    keys = set(keys)
    return [k for k in ledger_keys() if k in keys] + sorted(keys - set(LEDGER_BY_KEY))
