"""``estimate()``: the analytical estimator's one entry point (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import replace

from ..catalog import load_calibration
from ..spec import Calibration, GpuSpec, LoraSpec, ModelSpec, TrainSpec, run_inputs
from ..targets import resolve_targets, select_expert_targets, select_targets
from .comm import check_layout, with_communication
from .memory import estimate_memory, make_setup
from .params import count_params
from .result import Estimate
from .time import estimate_step_time


def estimate(model: ModelSpec, lora: LoraSpec, train: TrainSpec, gpu: GpuSpec | None = None,
             calibration: Calibration | None = None, with_time: bool = True, alloc_conf: str = "") -> Estimate:
    """Peak memory ledger, parameter counts, fit verdict and (when a GPU is given) step time.

    ``lora.targets`` None (the default) is PEFT's default for the model family; the Estimate's
    ``inputs`` name the modules it resolved to. Raises TargetError for targets matching nothing.
    ``alloc_conf``: the run's PYTORCH_CUDA_ALLOC_CONF for peak reserved, "" (unset) or
    "expandable_segments:True" (``allocator_slack.CONFIGS``; InputError otherwise).
    """
    if gpu is not None:
        from ..trainers import check_gpu_dtypes

        check_gpu_dtypes(train, gpu)  # bf16 on a GPU without it: InputError
    check_layout(train, gpu)  # a multi-GPU layout the engines cannot run: InputError
    if lora.targets is None:
        lora = replace(lora, targets=resolve_targets(model, None))
    cal = calibration or load_calibration(gpu.id if gpu else None)
    # Linears (target_modules) + fused MoE expert parameters (target_parameters)
    adapted = select_targets(model, lora.targets) + select_expert_targets(model, lora.targets, lora.dropout)
    setup = make_setup(model, lora, train, adapted, gpu.compute_capability if gpu else "9.0")
    memory = estimate_memory(setup, gpu, cal, alloc_conf)
    time, comm = None, {}
    if with_time and gpu is not None:
        # the kernel the ledger resolved (setup.attention): the time prices the same one
        time = estimate_step_time(model, lora, train, gpu, cal, setup.attention)
        # several GPUs: + the exposed communication of the engine (estimate/comm.py)
        time, comm = with_communication(model, lora, train, gpu, time, adapted)
        time = _with_host_range(time, model, lora, train, gpu, cal, adapted, setup.attention)
        time = _with_emulated_bf16(time, model, lora, train, gpu, cal, adapted)
    inputs = run_inputs(model, lora, train)
    inputs["attention_kernel"] = setup.attention
    if alloc_conf:
        inputs["alloc_conf"] = alloc_conf
    if gpu is not None:
        inputs["gpu"] = gpu.id
    result = Estimate(
        inputs=inputs,
        params=count_params(model, lora, adapted),
        memory=memory,
        gpu=gpu.id if gpu else None,
        gpu_memory_bytes=gpu.memory_bytes if gpu else None,
        time=time,
        calibration={"gpu": cal.gpu, "coefficients": dict(cal.coefficients)},
        detail={"communication": comm} if comm else {},
    )
    return _with_paging_cost(result, gpu)


#: the host-speed note appears when the step at the slowest and fastest hosts seen differ by more
#: than this fraction of the predicted step
HOST_RANGE_NOTE_FRACTION = 0.10


def _with_host_range(time, model, lora, train, gpu, cal, adapted, attention=None):
    """``time`` with ``step_s_host_range`` and a note when the user's host is unknown
    (``catalog.host_speed_known``) and the step would change by more than
    ``HOST_RANGE_NOTE_FRACTION`` between the slowest and fastest host speeds seen
    (``host_costs.host_speed_range``: the H100 reference host and published HF-stack hosts)."""
    from ..catalog import host_speed_known
    from .host_costs import host_speed_range

    if time is None or host_speed_known(cal):
        return time
    lo, hi = host_speed_range()
    at = []
    for speed in (lo, hi):
        c = replace(cal, coefficients={**cal.coefficients, "time_host_speed": speed})
        t, _ = with_communication(model, lora, train, gpu, estimate_step_time(model, lora, train, gpu, c, attention),
                                  adapted)
        at.append(float(t.step_s))
    slow, fast = at
    if slow - fast <= HOST_RANGE_NOTE_FRACTION * time.step_s:
        return time
    c = time.components
    note = (f"host: the CPU's work (Python, kernel launches) takes {c.get('host_s', 0.0):.3f} s per step beside "
            f"the GPU's {c.get('gpu_s', 0.0):.3f} s, priced at the H100 reference host's speed; hosts running "
            f"transformers + peft measured {lo:.1f}-{hi:.1f}x that speed in published runs (data/host-speeds.json), "
            f"which gives {fast:.3f}-{slow:.3f} s per step here. Give --host-speed, or calibrate from a profile "
            f"of your machine")
    return replace(time, notes=time.notes + (note,), step_s_host_range=(fast, slow))


def fp16_alternative(train: TrainSpec, gpu: GpuSpec) -> tuple[str, TrainSpec] | None:
    """(option, recipe) that replaces emulated bf16 compute with fp16 on a GPU without bf16 tensor
    cores (compute capability below ``trainers.BF16_MIN_COMPUTE_CAPABILITY``: T4, V100), or None when
    the run computes no bf16 matmul there. ``check_gpu_dtypes`` refuses the bf16 the user asks for
    (``--compute-dtype bf16``, ``--mixed-precision bf16``); what it leaves alone is the implicit bf16:
    a 4-bit base's default ``bnb_4bit_compute_dtype`` and a ``--quant bf16`` base, which torch runs
    emulated (torch/cuda/__init__.py::is_bf16_supported: ``major >= 8`` for native bf16), priced at
    the GPU's fp32 rate (``time._peak_mm_tflops``: the catalog's bf16 rate is the fp32 one there)."""
    from ..storage import FOUR_BIT, Dtypes
    from ..trainers import BF16_MIN_COMPUTE_CAPABILITY

    cc = gpu.compute_capability
    try:
        if not cc or float(cc) >= BF16_MIN_COMPUTE_CAPABILITY:
            return None
    except ValueError:
        return None
    dt = Dtypes.of(train)
    if dt.frozen_matmul != "bf16":
        return None
    if dt.quant in FOUR_BIT:
        return "--compute-dtype fp16", replace(train, compute_dtype="fp16")
    if dt.quant == "bf16":
        return "--quant fp16", replace(train, quant="fp16", load_dtype=None)
    return None


def _with_emulated_bf16(time, model, lora, train, gpu, cal, adapted):
    """``time`` with ``step_s_fp16``, ``fp16_option`` and a note when the run computes in bf16 on a
    GPU without bf16 tensor cores (``fp16_alternative``): the step with fp16 instead."""
    alt = fp16_alternative(train, gpu)
    if time is None or alt is None:
        return time
    option, t16 = alt
    fast, _ = with_communication(model, lora, t16, gpu, estimate_step_time(model, lora, t16, gpu, cal), adapted)
    note = (f"bf16 compute on {gpu.id} (compute capability {gpu.compute_capability} < 8.0, no bf16 tensor cores) is "
            f"emulated: priced at its fp32 rate, {time.step_s:.3f} s per step; {option} runs on its fp16 tensor cores: "
            f"{float(fast.step_s):.3f} s per step")
    return replace(time, notes=time.notes + (note,), step_s_fp16=float(fast.step_s), fp16_option=option)


def _with_paging_cost(e: Estimate, gpu: GpuSpec | None) -> Estimate:
    """For "fits with paging": what moves over the GPU's host link every step, and how long it
    takes (``reserved.paging_cost``), as ``detail["paging"]``, a note, and a step-time component
    ``paging_s`` added to the step. Other verdicts: as is.

    The paging adds to the step, it does not overlap it: bitsandbytes' paged optimizers
    (optim/optimizer.py::Optimizer8bit.step) prefetch each parameter's managed state
    (``prefetch_state``: cudaMemPrefetchAsync) then run its update kernel on the same stream and
    ``sync_gpu`` after every parameter, so the update waits for the migration and the host waits
    for the update; the pages evicted to make room are faulted out while the next forward's
    kernels allocate (a faulting kernel stalls until its pages arrive)."""
    if e.verdict != "fits with paging" or gpu is None or not gpu.host_link:
        return e
    from .reserved import paging_cost

    cost = paging_cost(e.memory.device_total_bytes - gpu.memory_bytes, gpu.host_link)
    note = (f"paging: {cost.evicted_bytes / 2**30:.2f} GiB of paged optimizer state moves over {cost.link} "
            f"every step, about {cost.seconds_per_step:.2f} s per step (at least {cost.lower_bound_s:.2f} s; "
            f"uncertain: {cost.uncertain}); the step time includes it (paging_s)")
    detail = dict(e.detail, paging={"evicted_bytes": cost.evicted_bytes, "link": cost.link,
                                     "seconds_per_step": cost.seconds_per_step, "lower_bound_s": cost.lower_bound_s,
                                     "uncertain": cost.uncertain, "sources": list(cost.sources)})
    time = None if e.time is None else with_paging_time(e.time, cost.seconds_per_step)
    return replace(e, memory=replace(e.memory, notes=e.memory.notes + (note,)), detail=detail, time=time)


def with_paging_time(time, paging_s):
    """``time`` with ``paging_s`` seconds of paging added to the step (component ``paging_s``;
    tokens/s and the host-speed range follow). Numbers or numpy arrays (the sweep: 0 where a case
    does not page)."""
    from .arrays import is_scalar

    step = time.step_s + paging_s
    if is_scalar(step):
        tps = time.tokens_per_s * time.step_s / step if step else 0.0
    else:
        import numpy as np

        with np.errstate(divide="ignore", invalid="ignore"):
            tps = np.where(step > 0, time.tokens_per_s * time.step_s / step, 0.0)
    rng = time.step_s_host_range
    return replace(time, step_s=step, tokens_per_s=tps, components={**time.components, "paging_s": paging_s},
                   step_s_host_range=None if rng is None else (rng[0] + paging_s, rng[1] + paging_s))
