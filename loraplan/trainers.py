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


def fused_lm_head() -> dict:
    """trl's fused chunked LM head as trainers.json records it: ``token_chunk`` and
    ``vocab_chunk`` (the tile), ``outputs`` per trainer ("trl": SFTTrainer's, "loop": the
    default of add_fused_lm_head) and their ``sources``."""
    return trainers_data()["fused_lm_head"]


def fused_lm_head_outputs(trainer: str) -> tuple[str, ...]:
    """The per-token fields add_fused_lm_head computes under ``trainer`` (trl: SFTTrainer's
    ('log_probs', 'entropy', 'is_top1'); a loop: the default ('log_probs',))."""
    return tuple(fused_lm_head()["outputs"]["trl" if trainer == "trl" else "loop"])


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


#: how each trainer is named in messages, and the option that picks it
_TRAINER_NAMES = {"loop": "a plain loop (--trainer loop)", "hf": "transformers.Trainer (--trainer hf)",
                  "trl": "trl.SFTTrainer (--trainer trl)"}


def options_of(trainer: str, key: str) -> tuple | None:
    """The values ``key`` can take with ``trainer`` (trainers.json 'options'); None: every value."""
    v = trainers_data()["trainers"][trainer].get("options", {}).get(key)
    return None if v is None else tuple(v)


def check_options(train: TrainSpec) -> None:
    """InputError (one line: the value, why the trainer lacks it, the fix) when a resolved recipe
    setting is one its trainer does not have (trainers.json 'options', sources in 'option_sources'),
    or the trainer does not train encoder-decoder models ('encoder_decoder': false; an
    encoder-decoder case is one with ``target_seq``, which ``case.resolve_case`` sets only for them)."""
    t = train.trainer
    entry = trainers_data()["trainers"][t]
    if train.target_seq is not None and not entry.get("encoder_decoder", True):  # resolve_case: enc-dec only
        why = entry["encoder_decoder_source"].split(":")[0]
        raise InputError(f"--trainer {t}: {_TRAINER_NAMES[t].split(' (')[0]} does not train encoder-decoder models "
                         f"({why}); use --trainer hf (Seq2SeqTrainer) or --trainer loop")
    for key, allowed in entry.get("options", {}).items():
        v = getattr(train, key)
        if v is None or v in allowed:
            continue
        others = [o for o in trainers_data()["trainers"] if o != t and (options_of(o, key) is None or v in options_of(o, key))]
        opt = "--" + key.replace("_", "-")
        why = source_of_option(t, key).split(";")[0]
        raise InputError(f"{opt} {v} is not available with {_TRAINER_NAMES[t]}: {why}; use {opt} "
                         f"{' or '.join(allowed)}" + (f", or --trainer {' or '.join(others)}" if others else ""))


def source_of_option(trainer: str, key: str) -> str:
    """Why ``trainer`` has only the values trainers.json lists for ``key`` (the library source)."""
    return trainers_data()["trainers"][trainer].get("option_sources", {}).get(key, "loraplan/data/trainers.json")


def resolve_recipe(train: TrainSpec) -> TrainSpec:
    """``train`` with every None training-stack field replaced by its trainer's default.

    A bf16/fp16/fp32 base loads in that dtype, so ``load_dtype`` is ``quant`` there (a different
    explicit ``load_dtype`` raises InputError). ``compute_dtype`` is only read for 4-bit bases.
    Raises InputError (one line: the value and the fix) for settings the libraries refuse: a
    setting its trainer does not have (``check_options``: e.g. ``--loss chunked`` with
    transformers.Trainer), fp16 mixed precision with fp16 trainable adapters (GradScaler cannot unscale fp16 grads;
    torch/amp/grad_scaler.py::GradScaler._unscale_grads_).
    """
    q = is_quantized(train.quant)
    t = train.trainer
    changes: dict[str, Any] = {}
    for key in ("mixed_precision", "load_dtype", "prepare_kbit", "compute_dtype", "adapter_dtype",
                "max_grad_norm", "reentrant", "attn_implementation", "loss"):
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
    check_options(out)
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


def _lengths_text(lengths) -> str:
    if len(lengths) <= 4:
        return ",".join(str(n) for n in lengths)
    return f"{len(lengths)} rows, longest {max(lengths)}"


def recipe_summary(inputs: dict) -> str:
    """The resolved recipe as one line, from an estimate's ``inputs`` (``spec.run_inputs``):
    trainer, mixed precision, dtypes, accumulation, clipping, checkpointing variant, attention,
    padding and loss, so a reader sees what the numbers assumed. The dtype of 4-bit compute
    and prepare_kbit are named only for quantized bases (the only ones they apply to)."""
    d = inputs
    mp = d["mixed_precision"]
    parts = [f"trainer {d['trainer']}", "autocast " + ("off" if mp == "no" else mp) + (" + GradScaler" if mp == "fp16" else ""),
             f"load {d['load_dtype']}"]
    if d["quant"] in ("nf4", "fp4"):
        parts.append(f"compute {d['compute_dtype']}")
    if is_quantized(d["quant"]):
        parts.append("prepare_kbit " + ("on" if d["prepare_kbit"] else "off"))
    parts.append(f"adapters {d['adapter_dtype']}")
    parts.append(f"accumulation x{d['gradient_accumulation']}")
    parts.append("clipping " + (f"at {d['max_grad_norm']:g}" if d["max_grad_norm"] else "off"))
    if d.get("gradient_checkpointing"):
        ck = "reentrant" if d["reentrant"] else "non-reentrant"
        n = d["checkpoint_every_n_layers"]
        ck += f" every {n} layers" if n > 1 else ""
        ck += ", offloaded" if d["checkpoint_offload"] else ""
        parts.append(f"checkpointing {ck}")
    parts.append(f"attention {d['attn_implementation']}")
    pad = d["padding"] + (f" (lengths {_lengths_text(d['lengths'])})" if d.get("lengths") else "")
    parts.append(f"padding {pad}")
    parts.append(f"loss {d['loss']}")
    return ", ".join(parts)


def recipe_levers(train: TrainSpec) -> list[tuple[str, str, TrainSpec]]:
    """(change, option, train') for each recipe change that may lower memory and that the trainer
    has (a chunked or fused loss, bf16 autocast, no prepare_model_for_kbit_training, offloaded
    checkpoints, FlashAttention-2). Only candidates: callers re-estimate each and keep those the
    estimator says save memory (``loraplan.explain``, ``loraplan.plan``); nothing here is a number."""
    r = resolve_recipe(train)
    cands: list[tuple[str, str, TrainSpec]] = []
    if r.loss == "standard":
        cands += [("trl's fused chunked LM head (no B·T·V logits)", "--loss chunked", replace(train, loss="chunked")),
                  ("Liger fused linear cross-entropy", "--loss liger", replace(train, loss="liger"))]
    if r.mixed_precision == "no":
        cands.append(("bf16 autocast", "--mixed-precision bf16", replace(train, mixed_precision="bf16")))
    if is_quantized(train.quant) and r.prepare_kbit:
        cands.append(("without prepare_model_for_kbit_training (no fp32 upcast)", "--no-prepare-kbit",
                      replace(train, prepare_kbit=False)))
    if train.gradient_checkpointing and not r.checkpoint_offload:
        cands.append(("checkpointed inputs in host memory", "--checkpoint-offload",
                      replace(train, checkpoint_offload=True)))
    if r.attn_implementation != "flash_attention_2":
        cands.append(("FlashAttention-2", "--attn-implementation flash_attention_2",
                      replace(train, attn_implementation="flash_attention_2", attention="auto")))
    out = []
    for change, option, t in cands:
        try:
            resolve_recipe(t)
        except InputError:  # the trainer lacks it (trainers.json 'options') or the libraries refuse it
            continue
        out.append((change, option, t))
    return out


def gpu_refusal(train: TrainSpec, gpu) -> str | None:
    """Why ``gpu`` cannot run ``train``'s recipe at all, as estimate() would refuse it (bf16
    without bf16 tensor cores: ``check_gpu_dtypes``; flash_attention_2 below sm80 or on an fp32
    model: ``estimate.sequences.check_attention``), or None. Used by plan (which lists such GPUs)
    and sweep (which reports them per row)."""
    from .estimate.sequences import check_attention
    from .storage import Dtypes, dtype_bytes

    try:
        check_gpu_dtypes(train, gpu)
        r = resolve_recipe(train)
        check_attention(r, gpu.compute_capability, dtype_bytes(Dtypes.of(r).stream))
    except InputError as e:
        return str(e)
    return None
