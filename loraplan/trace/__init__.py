"""Trace mode: the real transformers + peft (+ bitsandbytes) LoRA training step on the meta device.

Public API (importing this package never imports torch):

- ``run_trace_subprocess(model_config, lora, train, gpu_cc="9.0", timeout_s=300, steps=2) -> dict``:
  runs ``python -m loraplan.trace.worker`` in a fresh process (JSON over stdin/stdout) and
  returns ``run.trace_step``'s dict; raises a one-line ``loraplan.errors.TraceError`` on
  failure or timeout, ``MissingExtraError`` when torch/transformers/peft are missing.
- ``run.trace_step(...)``: the same in-process (imports torch).
- ``tracker.LiveTensorTracker``: the generic storage-level live-tensor tracker.
- ``emulation``: the CUDA-emulation pieces (sdpa backend choice, fused dropout, int8 fakes,
  in-kernel transients, cuBLAS workspace).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from typing import Any

from ..errors import (InputError, LoraplanError, MissingExtraError, TargetError, TraceDataDependentError, TraceError,
                      TraceTimeoutError, require_extra)
from ..spec import LoraSpec, TrainSpec

__all__ = ["run_trace_subprocess", "trace_estimate"]


_ERRORS = {c.__name__: c for c in (TraceError, TraceDataDependentError, TraceTimeoutError, InputError,
                                   TargetError, MissingExtraError, LoraplanError)}


def run_trace_subprocess(model_config: dict, lora: LoraSpec, train: TrainSpec, gpu_cc: str | None = "9.0",
                         timeout_s: float = 300, steps: int = 2, gpu_memory_bytes: int | None = None,
                         count_work: bool = False, rank: int = 0) -> dict[str, Any]:
    """Trace one setup in a worker process; see ``loraplan.trace.run.trace_step`` for the result.

    ``gpu_memory_bytes``: what the caching allocator can obtain on the card; when given, the
    allocator replay says whether and where the step would raise OOM (``result["oom"]``).
    ``count_work``: also count the last step's work (``result["work"]``, ``trace.counts``).
    ``rank``: under a multi-GPU ``train.strategy``, the rank to trace (``trace.distributed``)."""
    for mod in ("torch", "transformers", "peft"):
        require_extra(mod)
    if lora.targets is None:  # PEFT's default for the family, the modules the analytic view adapts
        from dataclasses import replace

        from ..hf import spec_from_config
        from ..targets import default_targets

        lora = replace(lora, targets=default_targets(spec_from_config(dict(model_config))))
    payload = json.dumps({"model_config": dict(model_config), "lora": asdict(lora), "train": asdict(train),
                          "gpu_cc": gpu_cc, "steps": steps, "gpu_memory_bytes": gpu_memory_bytes,
                          "count_work": count_work, "rank": rank})
    try:
        proc = subprocess.run([sys.executable, "-m", "loraplan.trace.worker"], input=payload, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TraceTimeoutError(f"the meta-device trace ran longer than {timeout_s:g} s and was stopped; "
                                f"raise the timeout or use --method analytic") from None
    out = proc.stdout.strip().splitlines()
    try:
        reply = json.loads(out[-1]) if out else None
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        tail = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit code {proc.returncode}"
        raise TraceError(f"the meta-device trace worker failed: {tail[:300]}")
    if "error" in reply:
        err = reply["error"]
        cls = _ERRORS.get(err.get("type"), TraceError)
        raise cls(err.get("message", "the meta-device trace failed"))
    return reply["result"]


#: |analytic − trace| / trace above which both outputs say the two views disagree
DISAGREEMENT_PERCENT = 3.0


def _disagreement_notes(am, trace_peak: int, analytic_kernel, trace_kernels) -> tuple[str, ...]:
    """A note when the analytic ledger and the trace differ by more than DISAGREEMENT_PERCENT
    (shown in the table and kept in the JSON's memory.notes), naming both peaks and kernels."""
    if not trace_peak:
        return ()
    pct = 100.0 * (am.peak_allocated_bytes - trace_peak) / trace_peak
    if abs(pct) <= DISAGREEMENT_PERCENT:
        return ()
    kernels = ",".join(sorted(trace_kernels or {})) or "none"
    return (f"trace and analytic disagree: analytic {am.peak_allocated_bytes / 2**30:.2f} GiB "
            f"({am.peak_moment}, attention {analytic_kernel or '?'}) is {pct:+.1f}% from the trace "
            f"{trace_peak / 2**30:.2f} GiB (sdpa {kernels}); the trace runs the installed libraries' code, "
            f"compare the top_live breakdown in detail",)


def trace_estimate(analytic, model, lora: LoraSpec, train: TrainSpec, gpu=None, timeout_s: float = 300,
                   alloc_conf: str = ""):
    """An Estimate whose memory comes from a meta-device trace of the real step.

    Same schema as the analytic estimate (``loraplan estimate --method trace``): the trace's
    peak allocated and its breakdown at the peak replace the ledger; peak reserved is the
    replay of the traced allocation stream through the caching-allocator model (default
    config; ``loraplan.trace.run.replay_allocations``), device total adds what lives outside
    the allocator; ``detail`` keeps the trace's own output (phase peaks, what was live at the
    peak, sdpa kernels used, versions, caveats), the analytic peak beside it, and under
    ``allocator`` the replays (default and expandable segments, fragmentation, OOM verdict
    against the GPU's memory less the memory outside the allocator), and under ``work`` the
    last step's counted work per class (``trace.counts``: FLOPs, bytes, kernel launches,
    bitsandbytes / peft Python calls). ``alloc_conf``
    "expandable_segments:True" reads the expandable-segments replay instead.
    """
    from dataclasses import replace

    from ..estimate.result import MemoryEstimate

    cc = gpu.compute_capability if gpu is not None else "9.0"
    am = analytic.memory
    outside = dict(am.outside_allocator_bytes)
    capacity = None
    if gpu is not None and getattr(gpu, "memory_bytes", None):
        # paged optimizer state is managed memory the driver evicts under pressure: not subtracted
        capacity = int(gpu.memory_bytes) - sum(v for k, v in outside.items() if k != "paged_optimizer_state")
    from .distributed import assemble_ranks, is_parallel, traced_ranks

    parallel = None
    if is_parallel(train):  # one worker per rank that can peak (trace/distributed.py); the worst one leads
        from concurrent.futures import ThreadPoolExecutor

        ranks = traced_ranks(train)
        with ThreadPoolExecutor(len(ranks)) as pool:  # one worker process per rank, side by side
            futures = {r: pool.submit(run_trace_subprocess, dict(model.config), lora, train, cc, timeout_s=timeout_s,
                                      gpu_memory_bytes=capacity, rank=r,
                                      count_work=True) for r in ranks}
            runs = {r: f.result() for r, f in futures.items()}
        tr, parallel = assemble_ranks(runs, train)
    else:
        tr = run_trace_subprocess(dict(model.config), lora, train, cc, timeout_s=timeout_s, gpu_memory_bytes=capacity,
                                  count_work=True)
    peak = int(tr["peak_allocated_bytes"])
    from ..estimate.allocator_slack import _config_name

    expandable = _config_name(alloc_conf or "default") == "expandable_segments"
    key = "peak_reserved_expandable_bytes" if expandable else "peak_reserved_bytes"
    if tr.get(key) is not None:
        reserved = int(tr[key])
    else:  # a worker without the allocator replay: the analytic ratio
        ratio = am.peak_reserved_bytes / am.peak_allocated_bytes if am.peak_allocated_bytes else 1.0
        reserved = int(peak * ratio)
    if tr.get("paged_optimizer_bytes"):
        outside["paged_optimizer_state"] = int(tr["paged_optimizer_bytes"])
    memory = MemoryEstimate(
        components={k: int(v) for k, v in tr["components"].items() if v},
        peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved,
        device_total_bytes=reserved + sum(outside.values()),
        peak_moment=str(tr.get("peak_phase", "")),
        moments={k: int(v) for k, v in tr.get("phase_peaks", {}).items()},
        outside_allocator_bytes=outside,
        notes=(tuple(tr.get("uncertain", ())) if train.quant == "int8" else am.notes)
        + _disagreement_notes(am, peak, analytic.inputs.get("attention_kernel"), tr.get("sdpa_backends"))
        + (tuple(parallel["notes"]) if parallel else ()),
        **({"per_gpu": parallel["per_gpu"], "host_bytes": parallel["host_bytes"],
            "host_components": parallel["host_components"]} if parallel else {}),
    )
    detail = {
        "analytic_peak_allocated_bytes": am.peak_allocated_bytes,
        "trace_vs_analytic_percent": 100.0 * (am.peak_allocated_bytes - peak) / peak if peak else None,
        "phase_peaks": tr.get("phase_peaks"),
        "terms": tr.get("terms"),
        "top_live": tr.get("top_live"),
        "sdpa_backends": tr.get("sdpa_backends"),
        "params_peft": tr.get("params"),
        "versions": tr.get("versions"),
        "stack": tr.get("stack"),
        "uncertain": tr.get("uncertain"),
        "elapsed_s": tr.get("elapsed_s"),
        "allocator": tr.get("allocator"),
        "analytic_peak_reserved_bytes": am.peak_reserved_bytes,
        "work": tr.get("work"),
        **({"parallel": parallel} if parallel else {}),
    }
    return replace(analytic, memory=memory, method="trace", detail=detail)
