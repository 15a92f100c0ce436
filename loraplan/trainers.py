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
                "max_grad_norm", "reentrant", "attn_implementation", "loss", "loop_outputs"):
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
    if train.strategy in FSDP_STRATEGIES:  # the engine defaults apply only where FSDP runs (single: inputs as before)
        for key in ("fsdp_version", "use_orig_params", "ram_efficient_loading"):
            if getattr(train, key) is None:
                changes[key] = default_of(t, key, q, train.stack)
        if train.fsdp_backward_prefetch is None and changes.get("fsdp_version", train.fsdp_version) == 1:
            changes["fsdp_backward_prefetch"] = default_of(t, "fsdp_backward_prefetch", q, train.stack)
    if train.strategy in ZERO_STRATEGIES and train.deepspeed_buckets is None:
        changes["deepspeed_buckets"] = default_of(t, "deepspeed_buckets", q, train.stack)
    out = replace(train, **changes)
    check_options(out)
    check_parallel(out)
    if out.mixed_precision == "fp16" and out.adapter_dtype == "fp16":
        raise InputError("--mixed-precision fp16 with --adapter-dtype fp16: GradScaler cannot unscale fp16 "
                         "gradients ('Attempting to unscale FP16 gradients'); use --adapter-dtype fp32")
    return out


#: the strategies that run FSDP (FullyShardedDataParallel / fully_shard)
FSDP_STRATEGIES = ("fsdp", "fsdp-offload")
#: the DeepSpeed ZeRO strategies
ZERO_STRATEGIES = ("zero1", "zero2", "zero3", "zero3-offload")
#: the strategies that shard the frozen base across ranks (FSDP FULL_SHARD/SHARD_GRAD_OP, ZeRO-3)
BASE_SHARDING = ("fsdp", "fsdp-offload", "zero3", "zero3-offload")
#: GPUs in one machine of the catalog's servers (DGX/HGX: 8); more need --nodes
GPUS_PER_NODE_MAX = 8


def check_parallel(train: TrainSpec) -> None:
    """InputError (one line: the value and the fix) for a multi-GPU layout the engines refuse.

    ``--batch`` is the per-rank micro-batch (transformers' per_device_train_batch_size; DeepSpeed's
    train_micro_batch_size_per_gpu, with train_batch_size = micro x accumulation x world size,
    runtime/config.py::_batch_assertion), so no engine needs the world size to divide it: DDP, FSDP
    and ZeRO give every rank its own batch, and device_map runs one process. Refused:
    - ``--strategy single`` with ``--num-gpus`` > 1 (which engine?), or a multi-GPU strategy with 1 GPU;
    - more than GPUS_PER_NODE_MAX GPUs per node, or a GPU count the nodes do not share evenly;
    - int8 (LLM.int8) with a strategy that shards the base: Int8Params carry their row scales (SCB)
      outside the tensor, which FSDP's flat parameters (torch _flat_param.py) and ZeRO-3's partitions
      do not carry;
    - 4-bit with a sharded base and ``bnb_4bit_quant_storage`` uint8: FSDP flattens/shards only
      floating-point parameters of one dtype (_flat_param.py::FlatParamHandle._validate_tensors_to_flatten:
      "Must flatten tensors with uniform dtype"); the storage must be the float dtype the model loads in;
    - FSDP1 with prepare_model_for_kbit_training on a 4-bit base (fp32 norms beside the float storage:
      two dtypes in one flat parameter);
    - ``--quant-storage`` with a base that is not 4-bit;
    - FSDP options (--fsdp-sharding other than full, --fsdp-version, --use-orig-params,
      --fsdp-backward-prefetch) with a strategy that is not FSDP, ``--deepspeed-buckets`` with one that
      is not ZeRO; hybrid sharding on one node;
    - ``--fsdp-backward-prefetch`` with FSDP2: fully_shard has no such option, it always prefetches the
      next unit in backward (_fully_shard/_fsdp_state.py::FSDPState._pre_backward ->
      _fsdp_param_group.py::FSDPParamGroup.pre_backward -> _backward_prefetch; accelerate drops the
      setting with a warning, utils/dataclasses.py::FullyShardedDataParallelPlugin.__post_init__).
    """
    s, n, nodes = train.strategy, train.num_gpus, train.nodes
    if s == "single" and n > 1:
        raise InputError(f"--num-gpus {n} with --strategy single: choose --strategy ddp, fsdp, fsdp-offload, zero1, "
                         f"zero2, zero3, zero3-offload or device-map")
    if s != "single" and n == 1:
        raise InputError(f"--strategy {s} with --num-gpus 1: give --num-gpus 2 or more, or --strategy single")
    if n % nodes:
        raise InputError(f"--num-gpus {n} is not a multiple of --nodes {nodes}: every node runs the same number of "
                         f"ranks; use --num-gpus {nodes * max(1, round(n / nodes))}")
    if n // nodes > GPUS_PER_NODE_MAX:
        need = -(-n // GPUS_PER_NODE_MAX)
        raise InputError(f"--num-gpus {n} on {nodes} node{'s' if nodes > 1 else ''} is more than {GPUS_PER_NODE_MAX} "
                         f"GPUs per node: add --nodes {need}")
    if s == "device-map" and nodes > 1:
        raise InputError(f"--strategy device-map runs one process on one machine: drop --nodes {nodes}")
    fsdp = s in FSDP_STRATEGIES
    if not fsdp:
        for key, v, default in (("fsdp_sharding", train.fsdp_sharding, "full"),
                                ("fsdp_version", train.fsdp_version, None),
                                ("use_orig_params", train.use_orig_params, None),
                                ("fsdp_backward_prefetch", train.fsdp_backward_prefetch, None)):
            if v != default:
                raise InputError(f"--{key.replace('_', '-')} {v} is an FSDP setting, but --strategy is {s}: drop it or "
                                 f"use --strategy fsdp")
    if s not in ZERO_STRATEGIES and train.deepspeed_buckets is not None:
        raise InputError(f"--deepspeed-buckets {train.deepspeed_buckets} is a DeepSpeed setting, but --strategy is "
                         f"{s}: drop it or use --strategy zero1, zero2, zero3 or zero3-offload")
    if fsdp and train.fsdp_version == 2 and train.fsdp_backward_prefetch is not None:
        raise InputError(f"--fsdp-backward-prefetch {train.fsdp_backward_prefetch} is an FSDP1 setting: FSDP2 "
                         f"(fully_shard) always prefetches the next unit in backward; drop it or use --fsdp-version 1")
    if fsdp and train.fsdp_sharding == "hybrid" and nodes == 1:
        raise InputError("--fsdp-sharding hybrid shards within a node and replicates across nodes: with --nodes 1 "
                         "it is full sharding; use --fsdp-sharding full or give --nodes")
    if train.quant_storage is not None and train.quant not in ("nf4", "fp4"):
        raise InputError(f"--quant-storage {train.quant_storage} applies to 4-bit bases only (--quant nf4 or fp4); "
                         f"drop it")
    if s in BASE_SHARDING and train.quant == "int8":
        raise InputError(f"--quant int8 with --strategy {s}: LLM.int8 weights keep their scales outside the tensor, "
                         f"which sharding cannot split; use --quant nf4 --quant-storage bf16, or --strategy ddp")
    if s in BASE_SHARDING and train.quant in ("nf4", "fp4"):
        qs = train.quant_storage or "uint8"
        if qs == "uint8":
            raise InputError(f"--strategy {s} with --quant {train.quant} needs a float bnb_4bit_quant_storage "
                             f"(FSDP/ZeRO-3 shard float parameters only): use --quant-storage "
                             f"{train.load_dtype or 'bf16'}")
        if s in FSDP_STRATEGIES and train.fsdp_version == 1 and train.prepare_kbit:
            raise InputError(f"--strategy {s} (FSDP1 flat parameters) with prepare_model_for_kbit_training: it upcasts "
                             f"norms and embeddings to fp32 beside the {qs} 4-bit storage, and a flat parameter holds "
                             f"one dtype; use --no-prepare-kbit, or --fsdp-version 2")
        if train.load_dtype is not None and qs != train.load_dtype:
            raise InputError(f"--quant-storage {qs} differs from --load-dtype {train.load_dtype}: a sharded unit "
                             f"holds one dtype; use --quant-storage {train.load_dtype}")


def parallel_setting(engine: str, variant: str) -> dict:
    """trainers.json 'parallel': ``engine`` ("deepspeed") settings of ``variant`` (--deepspeed-buckets
    auto / deepspeed); sources in 'parallel.sources'."""
    return trainers_data()["parallel"][engine][variant]


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
    parts.append(f"attn_implementation {d['attn_implementation']}")  # what from_pretrained is given
    pad = d["padding"] + (f" (lengths {_lengths_text(d['lengths'])})" if d.get("lengths") else "")
    parts.append(f"padding {pad}")
    parts.append(f"loss {d['loss']}")
    if d.get("loop_outputs", "dropped") != "dropped":
        parts.append(f"model outputs kept until the {'next forward' if d['loop_outputs'] == 'next-forward' else 'micro-step ends'}")
    if d.get("strategy", "single") != "single":  # several GPUs (issue 13): the layout the per-GPU numbers assume
        lay = f"{d['strategy']} on {d['num_gpus']} GPUs" + (f" ({d['nodes']} nodes)" if d.get("nodes", 1) > 1 else "")
        if d["strategy"].startswith("fsdp"):
            lay += f" (FSDP{d['fsdp_version']} {d['fsdp_sharding']}" + (
                ", RAM-efficient loading)" if d.get("ram_efficient_loading") else ")")
        if d.get("quant_storage"):
            lay += f", quant storage {d['quant_storage']}"
        parts.append(lay)
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
    if r.loop_outputs != "dropped":
        cands.append(("the model output dropped before backward (loss = model(...).loss, or del outputs)",
                      "--loop-outputs dropped", replace(train, loop_outputs="dropped")))
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


def check_recipe(train: TrainSpec) -> TrainSpec:
    """The refusals of :func:`gpu_refusal` that hold on every GPU: ``resolve_recipe``'s (the
    trainers' and engines' own, ``check_parallel`` among them) and flash_attention_2 on fp32
    inputs (``estimate.sequences.check_attention_dtype``). Returns the resolved recipe; raises
    the one-line InputError that ``estimate`` raises for the same input."""
    from .estimate.sequences import check_attention_dtype
    from .storage import Dtypes, dtype_bytes

    r = resolve_recipe(train)
    check_attention_dtype(r, dtype_bytes(Dtypes.of(r).stream))
    return r


def gpu_refusal(train: TrainSpec, gpu, model=None) -> str | None:
    """Why ``gpu`` cannot run ``train``'s recipe at all, as estimate() would refuse it (bf16
    without bf16 tensor cores: ``check_gpu_dtypes``; flash_attention_2 below sm80 or on an fp32
    model: ``estimate.sequences.check_attention``; with ``model``, an explicit ``--attention``
    kernel torch's sdpa cannot run: ``estimate.activations.check_attention_kernel``), or None.
    Used by plan (which lists such GPUs) and sweep (which reports them per row)."""
    from .estimate.activations import check_attention_kernel
    from .estimate.sequences import check_attention
    from .storage import Dtypes, dtype_bytes

    try:
        check_gpu_dtypes(train, gpu)
        r = resolve_recipe(train)
        check_attention(r, gpu.compute_capability, dtype_bytes(Dtypes.of(r).stream))
        if model is not None:
            check_attention_kernel(model, r, gpu.compute_capability)
    except InputError as e:
        return str(e)
    return None
