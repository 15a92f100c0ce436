"""Training stacks: what each trainer does with the settings a user leaves unset.

``TrainSpec`` fields of the training stack (``spec.RECIPE_FIELDS``) may be None, meaning "what
this trainer does by default". ``resolve_recipe`` fills them from ``loraplan/data/trainers.json``
(each default with the library source it was read from; version-dependent ones through
``loraplan.versions`` rules) and refuses combinations the libraries refuse. Every estimator
view (analytic, trace, profile) calls it first, so the three read the same recipe.
Pure Python (no torch).
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from typing import Any

from .errors import InputError
from .spec import TrainSpec
from .storage import is_quantized


@lru_cache(maxsize=1)
def trainers_data() -> dict:
    """The parsed loraplan/data/trainers.json."""
    return json.loads(resources.files("loraplan").joinpath("data/trainers.json").read_text())


def default_of(trainer: str, key: str, quantized: bool, stack=None) -> Any:
    """The value ``trainer`` uses for ``key`` when it is unset (trainers.json; a version rule
    where the default moved between releases)."""
    from .versions import rule

    v = trainers_data()["trainers"][trainer]["defaults"][key]
    if isinstance(v, dict) and "rule" in v:
        return rule(v["rule"], stack)
    if isinstance(v, dict) and "quantized" in v:
        return v["quantized"] if quantized else v["otherwise"]
    return v


def source_of(trainer: str, key: str) -> str:
    """Where ``trainer``'s default for ``key`` was read (a library file::function or the protocol)."""
    return trainers_data()["trainers"][trainer]["sources"][key]


def resolve_recipe(train: TrainSpec) -> TrainSpec:
    """``train`` with every None training-stack field replaced by its trainer's default.

    A bf16/fp16/fp32 base loads in that dtype, so ``load_dtype`` is ``quant`` there (a different
    explicit ``load_dtype`` raises InputError). ``compute_dtype`` is only read for 4-bit bases.
    Raises InputError (one line: the value and the fix) for settings the libraries refuse:
    fp16 mixed precision with fp16 trainable adapters (GradScaler cannot unscale fp16 grads;
    torch/amp/grad_scaler.py::GradScaler._unscale_grads_).
    """
    q = is_quantized(train.quant)
    t = train.trainer
    changes: dict[str, Any] = {}
    for key in ("mixed_precision", "load_dtype", "prepare_kbit", "compute_dtype", "adapter_dtype",
                "max_grad_norm", "reentrant", "attn_implementation"):
        if getattr(train, key) is None:
            changes[key] = default_of(t, key, q, train.stack)
    if not q:
        given = train.load_dtype
        if given is not None and given != train.quant:
            raise InputError(f"--load-dtype {given} contradicts --quant {train.quant} (an unquantized base loads in "
                             f"its own dtype); drop --load-dtype or use --quant {given}")
        changes["load_dtype"] = train.quant
    if train.attention == "eager":  # the older spelling: sdpa backend 'eager' is attn_implementation eager
        if train.attn_implementation not in (None, "eager"):
            raise InputError(f"--attention eager contradicts --attn-implementation {train.attn_implementation}; "
                             f"give one of them")
        changes["attn_implementation"] = "eager"
    elif train.attention != "auto" and train.attn_implementation not in (None, "sdpa"):
        raise InputError(f"--attention {train.attention} picks an sdpa kernel, but --attn-implementation is "
                         f"{train.attn_implementation}; drop --attention or use --attn-implementation sdpa")
    out = replace(train, **changes)
    if out.mixed_precision == "fp16" and out.adapter_dtype == "fp16":
        raise InputError("--mixed-precision fp16 with --adapter-dtype fp16: GradScaler cannot unscale fp16 "
                         "gradients ('Attempting to unscale FP16 gradients'); use --adapter-dtype fp32")
    return out


#: the first compute capability with bf16 tensor cores (Ampere, sm80); torch's
#: torch/cuda/__init__.py::is_bf16_supported(including_emulation=False) tests ``major >= 8``
BF16_MIN_COMPUTE_CAPABILITY = 8.0


def check_gpu_dtypes(train: TrainSpec, gpu) -> None:
    """InputError (one line: the value, the GPU, the fix) for a bf16 setting on a GPU without bf16
    (compute capability < 8.0: T4, V100): torch then only emulates bf16
    (torch/cuda/__init__.py::is_bf16_supported: ``major >= 8``, else a test allocation), flash
    attention refuses it, and bitsandbytes' bf16 kernels need sm80. Checked: the resolved
    ``mixed_precision`` (trl's default is bf16) and the recipe dtypes the user gave explicitly
    (``--load-dtype``, ``--compute-dtype``, ``--adapter-dtype``); the loop's implicit bf16 load
    of a quantized base and ``--quant bf16`` (a base dtype loraplan has always estimated on any
    GPU: it runs, emulated) are left alone.
    A GPU without a compute capability (not NVIDIA) is not checked."""
    cc = getattr(gpu, "compute_capability", None) if gpu is not None else None
    if not cc:
        return
    try:
        if float(cc) >= BF16_MIN_COMPUTE_CAPABILITY:
            return
    except ValueError:
        return
    r = resolve_recipe(train)
    given = [("--mixed-precision", r.mixed_precision), ("--load-dtype", train.load_dtype),
             ("--compute-dtype", train.compute_dtype), ("--adapter-dtype", train.adapter_dtype)]
    for flag, value in given:
        if value == "bf16":
            raise InputError(f"{flag} bf16 on {gpu.id} (compute capability {cc} < 8.0, no bf16 tensor cores): "
                             f"use {flag} fp16" + (" (adds a GradScaler)" if flag == "--mixed-precision" else ""))
