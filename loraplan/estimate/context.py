"""Device memory outside torch's caching allocator: the CUDA context, its kernel modules, NCCL.

NVML's "used" for a training process = torch.cuda.memory_reserved + this (+ paged optimizer
buffers, cudaMallocManaged, counted by the ledger). The figures are data with sources
(``loraplan/data/cuda-context.json``, each quoting ``benchmarks/data/published-memory.json``),
chosen by the module-loading mode of the stack's torch (``versions.rule("cuda_module_loading_lazy")``:
torch >= 1.13 sets CUDA_MODULE_LOADING=LAZY, pytorch PR #86509) and the GPU's compute
capability where a measurement for it exists. ``loraplan calibrate`` replaces them with NVML
used - reserved measured by ``loraplan profile`` (calibration coefficient ``cuda_context_bytes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .. import versions

__all__ = ["ContextEstimate", "cuda_context", "nccl_bytes", "load_context_data"]

_DATA = Path(__file__).resolve().parents[1] / "data" / "cuda-context.json"


@lru_cache(maxsize=2)
def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_context_data(path: str | Path | None = None) -> dict:
    """``cuda-context.json``: {"lazy" | "eager": {context_bytes, modules_bytes, uncertainty_bytes}, "nccl": ...}."""
    return _load(str(path or _DATA))


@dataclass(frozen=True)
class ContextEstimate:
    """Bytes outside the allocator for one process on one GPU: ``bytes`` = context + modules,
    ``uncertainty_bytes`` its spread; ``mode`` lazy | eager; ``sources`` the data's source lines."""

    bytes: int
    context_bytes: int
    modules_bytes: int
    uncertainty_bytes: int
    mode: str
    sources: tuple[str, ...] = ()


def cuda_context(compute_capability: str | None = None, stack=None, data: dict | None = None) -> ContextEstimate:
    """The CUDA context and the kernel modules a training step loads, for the stack's torch
    (lazy or eager module loading) and the GPU generation (``compute_capability`` "9.0"; the
    mode's default figure where none was measured for it)."""
    if data is None:
        return _cuda_context_cached(compute_capability, stack)
    return _cuda_context(compute_capability, stack, data)


@lru_cache(maxsize=64)
def _cuda_context_cached(compute_capability, stack) -> ContextEstimate:
    return _cuda_context(compute_capability, stack, load_context_data())


def _cuda_context(compute_capability, stack, data: dict) -> ContextEstimate:
    d = data["lazy" if versions.rule("cuda_module_loading_lazy", stack) else "eager"]
    ctx = d["context_bytes"]
    c = int(ctx["by_compute_capability"].get(str(compute_capability), ctx["default"]))
    m = int(d["modules_bytes"]["value"])
    mode = "lazy" if d is data["lazy"] else "eager"
    return ContextEstimate(c + m, c, m, int(d["uncertainty_bytes"]["value"]), mode,
                           (ctx["source"], d["modules_bytes"]["source"], d["uncertainty_bytes"]["source"]))


def nccl_bytes(ranks: int, communicators: int = 1, data: dict | None = None) -> int:
    """NCCL buffers per GPU for ``communicators`` process groups of ``ranks`` ranks (0 for one
    rank): the A100 measurement of cuda-context.json "nccl" (2-rank vs larger groups)."""
    if ranks <= 1:
        return 0
    per = (data or load_context_data())["nccl"]["per_communicator_bytes"]
    return int(communicators) * int(per["2"] if ranks == 2 else per["more"])
