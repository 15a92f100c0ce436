"""Trace one LoRA/QLoRA training burst on the meta device and count its tensor memory.

``trace_step`` builds the model from its config on ``torch.device("meta")``, applies exactly the
code paths of the reference protocol (shared/reference/protocol.md: quantization as
bitsandbytes would, ``prepare_model_for_kbit_training``, gradient checkpointing, ``get_peft_model``,
the real optimizer) and runs ``steps`` training steps of
``loss = model(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)``
under a ``LiveTensorTracker`` with 512 B block rounding, inside ``emulation.cuda_emulation``.
Nothing is allocated; a 7B step takes seconds.

The training recipe (``trainers.resolve_recipe``; ``storage.Dtypes``) decides the load dtype,
``bnb_4bit_compute_dtype``, whether ``prepare_model_for_kbit_training`` runs, the adapters' dtype
(cast after ``get_peft_model`` as trl does) and mixed precision: the forward (and the loss inside
it) runs under ``trace.autocast.EmulatedAutocast`` -- CUDA autocast's cast policies applied above
autograd, since autocast does not run on meta -- re-entered by checkpoint recomputes, with a real
``GradScaler`` for fp16 (``trace.autocast.emulated_grad_scaler``).

The result predicts ``torch.cuda.max_memory_allocated()``: the tracker's peak (which includes
kernel-internal transients, see ``emulation.kernel_transients``) plus constant terms that never
pass through dispatch (cuBLAS workspaces); and ``torch.cuda.max_memory_reserved()`` by replaying
the step's ordered allocation stream (storages, transients, resizes, the workspaces at each
thread's first matmul) through ``loraplan.allocator`` (``replay_allocations``).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Any

from ..errors import InputError, LoraplanError, TraceDataDependentError, TraceError, require_extra
from ..estimate.result import ledger_keys
from ..spec import LoraSpec, TrainSpec
from ..storage import Dtypes, is_quantized
from ..hf import MOE_RULES
from ..targets import expert_parameter_targets, peft_target_modules, peft_target_parameters
from ..train_step import apply_checkpoint_layout, check_supported, checkpoint_kwargs, torch_dtype
from .loss_paths import FUSED_HEAD_UNCERTAIN, apply_loss_form, apply_loss_path, fused_head_cuda
from .steps import meta_offload_hooks, run_steps

#: the trace's ledger lines (coarser than the analytic ledger's; see estimate.result.LEDGER)
CATEGORIES = ledger_keys("trace")


def _quantize_meta(model, train: TrainSpec, torch_mod, dt: Dtypes | None = None):
    """Replace Linears by bitsandbytes modules and quantize their weights on meta, as
    ``from_pretrained(dtype=load, quantization_config=BitsAndBytesConfig(...,
    bnb_4bit_compute_dtype=compute))`` does on a GPU (``dt``: the recipe's dtypes)."""
    torch = torch_mod
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    dt = dt or Dtypes.protocol(train.quant)
    load = torch_dtype(dt.load)
    if train.quant in ("nf4", "fp4"):
        storage = getattr(train, "quant_storage", None)  # FSDP-QLoRA: a float storage (issue 13)
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=train.quant,
                                bnb_4bit_use_double_quant=bool(train.double_quant),
                                bnb_4bit_compute_dtype=torch_dtype(dt.compute),
                                **({"bnb_4bit_quant_storage": torch_dtype(storage)}
                                   if storage not in (None, "uint8") else {}))
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    hq = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    hq.preprocess_model(model, device_map={"": 0}, dtype=load)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, bnb.nn.Linear4bit):
            w = torch.empty(mod.out_features, mod.in_features, dtype=load, device="meta")
            old = mod.weight
            new = bnb.nn.Params4bit(w, requires_grad=False, **old.__dict__)
            new._quantize(torch.device("meta"))
            mod.weight = new
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            w = torch.empty(mod.out_features, mod.in_features, dtype=load, device="meta")
            new = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            new._quantize(torch.device("meta"))
            mod.weight = new
        else:
            continue
        if mod.bias is not None:  # loaded from the checkpoint in the load dtype
            mod.bias = torch.nn.Parameter(torch.empty(mod.out_features, dtype=load, device="meta"),
                                          requires_grad=False)
    hq.postprocess_model(model)
    model.hf_quantizer = hq
    return model


def _make_optimizer(name: str, params, tracker, torch):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)  # CUDA's default path
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0, foreach=True)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}.get(name)
    if cls is None:
        raise InputError(f"optimizer '{name}' is not supported by the trace")
    opt = cls(params, lr=1e-4)
    if opt.is_paged:
        # F.get_paged uses cudaMallocManaged: outside torch's allocator, so not in
        # max_memory_allocated. Make the same buffers untracked on meta.
        def get_state_buffer(p, dtype=torch.float32):
            if p.numel() < 1e5:
                return torch.zeros_like(p, dtype=dtype, device=p.device)
            with tracker.pause():
                buf = torch.zeros_like(p, dtype=dtype, device=p.device)
            tracker.ignore(buf)
            opt._paged_bytes = getattr(opt, "_paged_bytes", 0) + buf.numel() * buf.element_size()
            return buf

        opt.get_state_buffer = get_state_buffer
        opt.prefetch_state = lambda p: None
    return opt


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _stack(train: TrainSpec) -> dict[str, str]:
    """The versions the trace's rules assumed (``--stack`` over the installed ones). The code
    that runs is always the installed one: a given stack changes only the emulated kernel
    choice, the constant terms and the loss head's form (``loss_paths.apply_loss_form``)."""
    from ..versions import resolve

    return resolve(train.stack)


def trace_step(model_config: dict, lora: LoraSpec, train: TrainSpec, gpu_compute_capability: str | None = "9.0",
               steps: int = 2, gpu_memory_bytes: int | None = None, return_events: bool = False,
               count_work: bool = False, rank: int = 0) -> dict[str, Any]:
    """Run ``steps`` training steps on meta and predict ``torch.cuda.max_memory_allocated``.

    ``model_config``: config.json values (needs ``model_type``). Returns a plain dict:
    peak_allocated_bytes, phase_peaks, peak_phase, components (the ledger categories at the
    peak, summing to peak_allocated_bytes), terms (named in-kernel / constant memory with
    provenance), top_live (largest groups live at the peak), params, sdpa backends used,
    versions, uncertain (what the emulation cannot know), elapsed_s; and from a replay of the
    step's allocation stream through ``loraplan.allocator`` (see ``replay_allocations``):
    peak_reserved_bytes (default allocator config), peak_reserved_expandable_bytes
    (``expandable_segments:True``), fragmentation_at_peak, oom (None, or where a card whose
    caching allocator can obtain ``gpu_memory_bytes`` would raise), and ``allocator`` (both
    replays in detail). ``gpu_memory_bytes``: what the allocator can get on the card (its memory
    minus the CUDA context and other memory outside the allocator); None = no OOM check.
    ``return_events``: also return the stream itself under ``_events`` (in-process use only).
    ``count_work``: also count the last step's work per op (``trace.counts``: FLOPs, bytes,
    launches, bitsandbytes / peft Python calls, by work class) into ``work``; off, the trace
    runs no counting code.
    ``rank``: with a multi-GPU ``train.strategy``, the rank of ``train.num_gpus`` to trace: the real
    engine runs on a fake process group (``trace.distributed``); the result then has a
    ``parallel`` dict (strategy, world size, rank, wrapped units, host bytes) and the components
    are ``distributed.PARALLEL_CATEGORIES``.
    """
    for mod in ("torch", "transformers", "peft"):
        require_extra(mod)
    if is_quantized(train.quant) or train.optimizer not in ("adamw", "sgd"):
        require_extra("bitsandbytes")
    from ..trainers import resolve_recipe as _resolve

    if _resolve(train).loss == "chunked":  # trl's add_fused_lm_head (trace/loss_paths.py)
        require_extra("trl")
    if train.quant not in ("bf16", "fp16", "fp32", "nf4", "fp4", "int8"):
        raise InputError(f"quant '{train.quant}' is not supported by the trace")
    if steps < 1:
        raise InputError(f"steps {steps} must be at least 1")
    from ..hf import check_config

    check_config(model_config, "model config")  # the values the shape rules refuse, before transformers builds
    check_supported(train)  # the trainer step structures the trace can run (train_step.py)

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from . import emulation as em
    from .tracker import LiveTensorTracker

    t0 = time.perf_counter()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    cfg = dict(model_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise InputError("model config has no 'model_type'; give the config.json of a transformers model")
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    cfg.pop("quantization_config", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise InputError(f"transformers {transformers.__version__} cannot build model_type "
                         f"'{model_type}': {str(e).splitlines()[0]}") from None
    config.use_cache = False
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if seq2seq:  # labels -> decoder inputs need these; published T5 configs set both to 0
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = config.pad_token_id
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    train, layout, attn_impl = _sequence_recipe(train, gpu_compute_capability)  # the resolved recipe
    if model_type == "falcon" and attn_impl == em.FA2_EMULATION_NAME:
        raise TraceError("falcon's FalconFlashAttention2 calls flash-attn's functions itself (modeling_falcon.py), "
                         "which the meta trace does not emulate; use --method analytic")
    dt = Dtypes.of(train)
    load_dtype = torch_dtype(dt.load)
    quantized = is_quantized(train.quant)

    # ---- module context: which module is running (forward hooks), for breakdowns and errors
    mod_names: dict[int, str] = {}
    stack: list[str] = []

    def pre_hook(module, args):
        stack.append(mod_names.get(id(module), type(module).__name__))

    def post_hook(module, args, output):
        if stack:
            stack.pop()

    def context():
        return stack[-1] if stack else ""

    # ---- int8 outliers: explicit fraction, else the analytic estimator's random-init default
    #      for MLP-out inputs (loraplan.estimate.transients.default_int8_outlier_fraction), 0 elsewhere
    frac = train.int8_outlier_fraction
    default_frac, outlier_leaves = _default_outliers(model_config, train)

    def outlier_policy(cols: int) -> int:
        if frac is not None:
            return round(frac * cols)
        parts = [p for p in context().split(".") if p not in ("base_layer",)]
        leaf = parts[-1] if parts else ""
        return round(default_frac * cols) if leaf in outlier_leaves else 0

    ws_bytes = em.cublas_workspace_bytes(gpu_compute_capability)
    ws_threads: set[str] = set()

    def op_hook(tr, func, args, kwargs, out):
        for name, nbytes in em.kernel_transients(func, args, kwargs):
            tr.transient(nbytes, name)
        if ws_bytes and len(ws_threads) < 2 and _op_base(func) in em.CUBLAS_OPS:
            thread = em.cublas_thread()
            if thread not in ws_threads:  # first cuBLAS call of this thread: its workspace, kept
                ws_threads.add(thread)
                tr.persistent(ws_bytes, f"cublas_workspace_{thread}")

    tracker = LiveTensorTracker(round_to=512, device="meta", context_fn=context, op_hook=op_hook)
    from .distributed import engine_for

    engine = engine_for(train, rank, tracker, torch)  # None for one GPU
    sdpa_used: dict[str, int] = {}

    def log_sdpa(b):
        sdpa_used[b] = sdpa_used.get(b, 0) + 1

    if train.quant == "int8":
        em.register_int8_fakes()
        em.set_int8_outlier_policy(outlier_policy)

    h_pre = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    h_post = torch.nn.modules.module.register_module_forward_hook(post_hook)
    try:
        with engine.context() if engine is not None else contextlib.nullcontext(), \
                em.cuda_emulation(gpu_compute_capability, train.attention, log_sdpa, train.stack), \
                em.sequence_emulation(layout.padded, layout.packed, train.batch), tracker:
            try:
                result = _run(torch, transformers, auto, config, load_dtype, attn_impl, quantized, seq2seq,
                              lora, train, steps, cfg, tracker, mod_names, stack, layout,
                              LoraConfig, get_peft_model, prepare_model_for_kbit_training, dt, count_work, engine=engine)
            except LoraplanError:
                raise
            except Exception as e:  # noqa: BLE001 - turned into one line naming op and module
                if os.environ.get("LORAPLAN_TRACE_DEBUG"):
                    raise
                raise _explain(e, tracker, stack, model_type) from None
    finally:
        h_pre.remove()
        h_post.remove()
        em.set_int8_outlier_policy(lambda cols: 0)
        _drop_meta_caches()

    consts = em.constant_terms(gpu_compute_capability, stack=train.stack)
    const_bytes = sum(t["bytes"] for t in consts.values())
    comp = result["components"]
    terms = dict(consts)
    if tracker.peak_transient is not None:
        name, nbytes = tracker.peak_transient
        terms[name] = {"bytes": nbytes, "source": "in-kernel transient at the peak moment (emulation.kernel_transients)"}
    comp["other"] += const_bytes
    peak = tracker.peak + const_bytes
    assert sum(comp.values()) == peak, (sum(comp.values()), peak)
    phase_peaks = {k: v + const_bytes for k, v in tracker.phase_peaks.items() if k != "setup"}
    step_phases = {k: v for k, v in phase_peaks.items() if k in ("forward", "backward", "optimizer")}
    peak_phase = max(step_phases, key=step_phases.get) if step_phases else ""
    events = tracker.allocation_events(start_seq=getattr(tracker, "setup_end_seq", None), with_phase=True)
    if engine is not None:  # FSDP1 built from the host: the constructor's blocks first (Engine.construction_prefix)
        events = engine.construction_prefix() + events
    n_weight_events = sum(1 for e in events if e[-1] == "setup")
    replays = replay_allocations(events, gpu_memory_bytes, n_weight_events, tracker.allocation_streams())
    replays.update(n_resizes=tracker.n_resizes, cublas_workspace_threads=sorted(ws_threads),
                   tracker_peak_allocated_bytes=peak)
    if return_events:
        result["_events"] = events
    result.update(
        peak_reserved_bytes=replays["default"]["peak_reserved_bytes"],
        peak_reserved_expandable_bytes=replays["expandable_segments"]["peak_reserved_bytes"],
        fragmentation_at_peak=replays["default"]["fragmentation_at_peak"],
        oom=replays["default"]["oom"],
        allocator=replays,
    )
    result.update(
        peak_allocated_bytes=peak,
        phase_peaks=phase_peaks,
        peak_phase=peak_phase,
        terms=terms,
        transient_peaks=dict(tracker.transient_peaks),
        sdpa_backends=sdpa_used,
        gpu_compute_capability=gpu_compute_capability,
        steps=steps,
        versions=_versions(),
        stack=_stack(train),
        uncertain=list(em.UNCERTAIN) + (list(FUSED_HEAD_UNCERTAIN) if train.loss == "chunked" else []),
        offload_host_peak_bytes=int(getattr(tracker, "offload_host_peak_bytes", 0)),
        int8_outlier_fraction=(frac if frac is not None else {leaf: default_frac for leaf in sorted(outlier_leaves)})
        if train.quant == "int8" else None,
        elapsed_s=round(time.perf_counter() - t0, 3),
    )
    return result


def _sequence_recipe(train: TrainSpec, gpu_cc: str | None):
    """The resolved recipe (``trainers.resolve_recipe``), its worst batch
    (``estimate.sequences.batch_layout``) and the ``attn_implementation`` the model is loaded with:
    eager, sdpa, or the FA2 emulation's name (``emulation.FA2_EMULATION_NAME``). Raises InputError
    for FA2 where flash-attn refuses (``sequences.check_attention``)."""
    from ..estimate.sequences import batch_layout, check_attention
    from ..storage import stream_dtype_bytes
    from ..trainers import resolve_recipe
    from . import emulation as em

    train = resolve_recipe(train)
    check_attention(train, gpu_cc, stream_dtype_bytes(train.quant))
    layout = batch_layout(train)
    impl = {"eager": "eager", "flash_attention_2": em.FA2_EMULATION_NAME}.get(train.attn_implementation, "sdpa")
    return train, layout, impl


def _model_inputs(torch, layout, vocab: int) -> dict:
    """Token ids [rows, row_len] of the worst batch (``sequences.batch_layout``), with a 2-D
    ``attention_mask`` for a padded batch and ``position_ids`` for packed rows (the values do
    not matter on meta: ``emulation.sequence_emulation`` supplies what transformers reads)."""
    shape = (layout.rows, layout.row_len)
    out = {"input_ids": torch.randint(0, vocab, shape, device="meta")}
    if layout.padded:
        out["attention_mask"] = torch.ones(shape, dtype=torch.int64, device="meta")
    if layout.packed:
        out["position_ids"] = torch.zeros(shape, dtype=torch.int64, device="meta")
    return out


def _run(torch, transformers, auto, config, load_dtype, attn_impl, quantized, seq2seq, lora, train, steps,
         raw_config,
         tracker, mod_names, stack, layout, LoraConfig, get_peft_model, prepare_model_for_kbit_training, dt=None,
         count_work=False, engine=None):
    gc = train.gradient_checkpointing
    dt = dt or Dtypes.protocol(train.quant)
    from .autocast import EmulatedAutocast, emulated_grad_scaler

    # mixed precision: torch.autocast emulated above autograd (trace/autocast.py), CUDA's op lists
    amp = (EmulatedAutocast(torch_dtype(dt.autocast), "cpu" if train.device == "cpu" else "cuda")
           if dt.autocast else None)
    gc_kwargs = checkpoint_kwargs(train)
    reentrant_amp = amp is not None and gc and gc_kwargs["use_reentrant"]
    if amp is not None and gc and not reentrant_amp:
        gc_kwargs["context_fn"] = amp.checkpoint_context_fn()
    with tracker.phase("setup"):
        with torch.device("meta"):
            try:
                model = auto.from_config(config, dtype=load_dtype, attn_implementation=attn_impl)
                if attn_impl == "loraplan_fa2" and not getattr(model, "_supports_flash_attn", False):
                    raise InputError(f"{config.model_type} does not support flash_attention_2 in transformers "
                                     f"{transformers.__version__}; use --attn-implementation sdpa")
            except ValueError as e:  # a family without sdpa (gemma2): the protocol's load falls back
                if attn_impl != "sdpa" or not ("sdpa" in str(e).lower() or "scaled_dot_product_attention" in str(e)):
                    raise
                model = auto.from_config(config, dtype=load_dtype, attn_implementation="eager")
            from .._meta import linear_modules, untie_like_checkpoint

            untie_like_checkpoint(model, raw_config)
        if quantized:
            _quantize_meta(model, train, torch, dt)
        model.config.use_cache = False
        if dt.prepare_kbit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                    gradient_checkpointing_kwargs=gc_kwargs)
            if gc and not quantized:  # prepare enables checkpointing for k-bit models only
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
                model.enable_input_require_grads()
        elif gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
        apply_checkpoint_layout(model, train, gc_kwargs, offload_hooks=meta_offload_hooks(tracker, torch))
        if reentrant_amp:
            _reenter_autocast_in_recompute(model, amp, train, torch)
        apply_loss_path(model, train, torch)
        from ..hf import spec_from_config

        # fused MoE expert parameters go to target_parameters (lora.ParamWrapper), as loraplan counts them
        module_targets, target_parameters = tuple(lora.targets), None
        if config.model_type in MOE_RULES:  # raw_config has its model_type popped
            spec = spec_from_config({**raw_config, "model_type": config.model_type})
            target_parameters = peft_target_parameters(spec, lora.targets)
            expert_targets = expert_parameter_targets(spec, lora.targets)
            module_targets = tuple(t for t in lora.targets if t not in expert_targets)
        lcfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=peft_target_modules(module_targets, *linear_modules(model)) or None,
                          target_parameters=target_parameters, bias="none",
                          task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as e:
            from ..errors import TargetError

            raise TargetError(f"LoRA targets {list(lora.targets)}: {str(e).splitlines()[0]}") from None
        apply_loss_form(model, train, torch)  # an older --stack's loss head (trace/loss_paths.py)
        if dt.adapter != "fp32":
            # get_peft_model(autocast_adapter_dtype=True) made the adapters fp32; cast them as trl's
            # SFTTrainer does for a quantized model (sft_trainer.py: param.data = param.data.to(bf16))
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch_dtype(dt.adapter))
        model.train()
        mod_names.update({id(m): n for n, m in model.named_modules()})
        n_train, n_total = model.get_nb_trainable_parameters()  # before an engine flattens or shards them
        # DDP / FSDP on a fake process group (trace/distributed.py); the step runs the wrapper
        step_model = engine.wrap(model, mod_names) if engine is not None else model
        trainable = [p for p in step_model.parameters() if p.requires_grad]
        if not trainable:
            raise TraceError("no trainable parameters after get_peft_model; check --targets")
        opt = _make_optimizer(train.optimizer, trainable, tracker, torch)
        if engine is not None:
            engine.attach_optimizer(opt)
        scaler = emulated_grad_scaler(torch) if dt.autocast == "fp16" else None
        vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
        if seq2seq and train.padding != "max-length":
            raise InputError(f"--padding {train.padding} is modelled for decoder-only models; "
                             f"{config.model_type} is encoder-decoder: use --padding max-length")
        inputs = _model_inputs(torch, layout, vocab)
        ids = inputs["input_ids"]
        labels = ids
        if seq2seq and train.target_seq and train.target_seq != train.seq:
            labels = torch.randint(0, vocab, (train.batch, train.target_seq), device="meta")
        # label what exists before the burst
        for p in step_model.parameters():
            tracker.label(p, "lora_weights" if p.requires_grad else "weights")
        for buf in step_model.buffers():
            tracker.label(buf, "weights")
        for t in (*inputs.values(), labels):
            tracker.label(t, "inputs")
        for rec_i in list(tracker._live.values()):  # quant states, int8 CB/SCB, rope tables ...
            rec = tracker._records[rec_i]
            if rec[5] is None:
                rec[5] = "weights"
    def label_grad(p):
        tracker.label(p.grad, "lora_gradients")

    for p in trainable:
        p.register_post_accumulate_grad_hook(label_grad)
    tracker.setup_end_seq = tracker._seq  # the allocator replay starts here: the built model, no setup churn
    tracker.reset_peak()

    # the trainer's step structure (trace/steps.py): the protocol's loop, where `loss` keeps the
    # previous step's graph (and what autograd Functions keep as ctx attributes) alive until the
    # next forward returns, or transformers Trainer's training_step, whose graph dies on return;
    # mixed precision: the forward under (emulated) autocast, fp16 with the GradScaler; the worst
    # batch's mask / position ids go in with the ids (sequences.batch_layout); trl's fused chunked
    # LM head (--loss chunked) on its CUDA path (trace/loss_paths.py)
    extra = {k: v for k, v in inputs.items() if k != "input_ids"}
    with fused_head_cuda(train, torch), _work_counting(model, tracker, steps, count_work) as work:
        run_steps(step_model, opt, trainable, ids, labels, train, tracker, stack, steps, torch, autocast=amp,
                  scaler=scaler, model_inputs=extra)

    comp = engine.categorize(tracker, vocab, _categorize) if engine is not None else _categorize(tracker, vocab)
    top = [g.to_dict() for g in tracker.snapshot("peak", top=int(os.environ.get("LORAPLAN_TRACE_TOP", "15")))]
    return {
        "components": comp,
        "top_live": top,
        "params": {"trainable": int(n_train), "total": int(n_total)},
        "paged_optimizer_bytes": int(getattr(opt, "_paged_bytes", 0)),
        "model_type": config.model_type,
        **({"work": work.summary()} if work is not None else {}),
        **({"parallel": engine.summary()} if engine is not None else {}),
    }


@contextlib.contextmanager
def _work_counting(model, tracker, steps: int, on: bool):
    """``trace.counts`` over the last of ``steps`` steps, fed by the tracker's op hook (the
    tracker is the dispatch mode already running), with module owners and the bitsandbytes /
    flash-attn Python-level calls; yields the ``WorkCounter`` (None when ``on`` is False)."""
    if not on:
        yield None
        return
    from .counts import ModuleOwners, WorkCounter, python_calls

    last = f"step{steps}"

    def active():
        stack = tracker._phase_stack
        return bool(stack) and stack[0] == last

    def phase():
        path = tracker._phase_stack
        return path[-1] if path and path[-1] in ("forward", "backward", "optimizer") else ""

    owners = ModuleOwners(model, active)
    counter = WorkCounter(owners, phase, active)
    hook = tracker.op_hook

    def op_hook(tr, func, args, kwargs, out):
        if hook is not None:
            hook(tr, func, args, kwargs, out)
        try:
            counter.record(func, args, kwargs, out)
        except Exception as e:  # noqa: BLE001 - counting never fails the memory trace; reported
            counter.errors[f"{_op_base(func)}: {type(e).__name__}"] = counter.errors.get(
                f"{_op_base(func)}: {type(e).__name__}", 0) + 1

    tracker.op_hook = op_hook
    try:
        with owners, python_calls(counter.python_calls, active, counter.add_fa2_call):
            yield counter
    finally:
        tracker.op_hook = hook


#: the allocator configurations every trace is replayed under (PYTORCH_CUDA_ALLOC_CONF strings)
REPLAY_CONFIGS = {"default": "", "expandable_segments": "expandable_segments:True"}


def _reenter_autocast_in_recompute(model, amp, train, torch) -> None:
    """Reentrant checkpointing under emulated autocast: torch/utils/checkpoint.py::
    CheckpointFunction.backward re-enters the *real* autocast for the recompute (a no-op on meta)
    and takes no ``context_fn``, so each checkpointed layer's function is wrapped to re-enter the
    emulation, in the state of its forward, when it runs outside it (the recompute); in the
    forward it runs as it is. Installed with transformers' ``_set_gradient_checkpointing``
    (modeling_utils.py), every_n_layers kept."""
    import functools

    from torch.utils.checkpoint import checkpoint

    from .autocast import active

    def checkpoint_func(function, *args, **kwargs):
        on = active() is amp

        def run(*a, **k):
            if on and active() is None:
                with amp._reentered(True):
                    return function(*a, **k)
            return function(*a, **k)

        return checkpoint(run, *args, **kwargs)

    from ..trainers import resolve_recipe

    n = resolve_recipe(train).checkpoint_every_n_layers
    model._set_gradient_checkpointing(enable=True, every_n_layers=n,
                                      gradient_checkpointing_func=functools.partial(checkpoint_func, use_reentrant=True))


def replay_allocations(events: list, capacity_bytes: int | None = None, n_weight_events: int = 0,
                       streams: dict | None = None) -> dict:
    """Replay a trace's allocation stream through ``loraplan.allocator`` under each of
    ``REPLAY_CONFIGS``; plain dict per config: peak_allocated_bytes, peak_reserved_bytes,
    allocated_at_peak_reserved_bytes, fragmentation_at_peak, max_segments, num_alloc_retries and
    oom (None, or {"event": index, "phase": tracker phase path then, "message"}); plus
    ``weights``: a replay of the first ``n_weight_events`` events alone (the built model), whose
    reserved - allocated is the weights' share of the slack. ``streams``: allocation key ->
    stream id of the allocations a multi-GPU engine makes on its side streams
    (``LiveTensorTracker.allocation_streams``); each config's dict then also has
    ``peak_allocated_by_stream`` / ``peak_reserved_by_stream`` (stream id -> bytes; 0 = default).

    The stream starts with the model's tensors allocated in the order the model was built
    (``from_config`` creates each module's parameters in ``__init__`` order, then
    quantization replaces the frozen Linear weights one module at a time, then peft adds
    lora_A/lora_B per adapted module). A real ``from_pretrained`` allocates in checkpoint order
    instead: transformers loads the state dict shard by shard (safetensors key order,
    alphabetical within a shard: ``model.layers.0.mlp.down_proj`` before ``...self_attn.q_proj``),
    a bf16 weight is loaded then quantized (the bf16 copy freed at once), and peft's adapters
    come after everything. What differs is only the *order* of persistent allocations that
    are never freed: with no frees in between, the caching allocator's state after the load
    depends on the order only through how sub-10-MiB tensors share 20 MiB (large pool) and
    2 MiB (small pool) segments. Measured (tests/test_trace.py and five shuffles each, b2 s256,
    checkpointing): a 4-layer hidden-512 Llama bf16/nf4 moved by 0 B; Qwen2.5-0.5B nf4 by 0 B,
    bf16 by 0 or +20 MiB (one kLargeBuffer segment) on 2.54 GB reserved, < 1%: the order
    matters little, because the step's peak is set by activation churn on top of segments
    that are never freed. The transient bf16 copies of a quantized
    load are not replayed: they are freed before the next weight arrives, and their blocks
    stay cached (reserved) for reuse — up to one Linear's bf16 size plus segment rounding that
    the trace does not show.
    """
    from ..allocator import replay

    out: dict[str, Any] = {"capacity_bytes": capacity_bytes, "n_events": len(events),
                           "configs": dict(REPLAY_CONFIGS)}
    for name, conf in REPLAY_CONFIGS.items():
        r = replay(events, capacity_bytes=capacity_bytes, config=conf, streams=streams)
        oom = None
        if r.oom_at is not None:
            oom = {"event": r.oom_at, "phase": str(events[r.oom_at][-1]), "message": r.oom_error}
        out[name] = {
            "peak_allocated_bytes": r.peak_allocated, "peak_reserved_bytes": r.peak_reserved,
            "allocated_at_peak_reserved_bytes": r.allocated_at_peak_reserved,
            "fragmentation_at_peak": r.fragmentation_at_peak, "max_segments": r.max_segments,
            "num_alloc_retries": r.num_alloc_retries, "oom": oom,
            "peak_allocated_by_stream": r.peak_allocated_by_stream,
            "peak_reserved_by_stream": r.peak_reserved_by_stream,
        }
    w = replay(events[:n_weight_events], streams=streams)
    out["weights"] = {"allocated_bytes": w.final_allocated, "reserved_bytes": w.final_reserved,
                      "n_events": n_weight_events}
    return out


def _op_base(func) -> str:
    try:
        return func.overloadpacket.__name__
    except AttributeError:
        return ""


def _categorize(tracker, vocab: int) -> dict[str, int]:
    """What is live at the peak, in ledger categories (sums to the tracker's peak)."""
    comp = dict.fromkeys(CATEGORIES, 0)
    for r in tracker.records_live_at("peak"):
        label, phase, ctx = r["label"], r["phase"], r["context"] or ""
        if label in ("weights", "lora_weights", "lora_gradients", "optimizer_state"):
            cat = label
        elif label == "inputs":
            cat = "other"
        elif phase == "optimizer":
            cat = "optimizer_state"  # AdamW foreach step temporaries
        elif phase in ("forward", "backward"):
            leaf = ctx.rsplit(".", 1)[-1]
            shape = r["shape"]
            if leaf == "lm_head" or (shape and shape[-1] == vocab) or (phase == "forward" and _is_top_level(ctx)):
                cat = "logits_loss"
            else:
                cat = "activations"
        else:
            cat = "other"
        comp[cat] += r["bytes"]
    if tracker.peak_transient is not None:
        comp["other"] += tracker.peak_transient[1]
    return comp


def _is_top_level(ctx: str) -> bool:
    """The loss is computed in the top-level *ForCausalLM forward (after lm_head)."""
    return ctx in ("", "base_model", "base_model.model")


def _explain(e: Exception, tracker, stack: list[str], model_type: str) -> LoraplanError:
    msg = " ".join(str(e).split())
    op = getattr(tracker, "failed_op", None) or "?"
    where = stack[-1] if stack else "(outside any module)"
    data_dep = any(k in msg for k in ("meta tensors", "data-dependent", "item()", "nonzero", "Cannot copy out",
                                      "_local_scalar_dense", "data dependent"))
    if data_dep:
        return TraceDataDependentError(
            f"the meta-device trace of {model_type} needs tensor values at op '{op}' in module '{where}' "
            f"({msg[:160]}); this setup cannot be traced, use --method analytic")
    return TraceError(f"the meta-device trace of {model_type} failed at op '{op}' in module '{where}': "
                      f"{type(e).__name__}: {msg[:200]}")


def _default_outliers(model_config: dict, train: TrainSpec) -> tuple[float, set[str]]:
    """The random-init outlier share and the Linear leaf names it applies to (MLP-out inputs)."""
    from ..estimate.transients import random_init_outlier_fraction
    from ..estimate.weights import INT8_OUTLIER_ROLES
    from ..hf import spec_from_config

    spec = spec_from_config(model_config, "trace")
    if spec.is_encoder_decoder or train.padding == "max-length":
        T = train.batch * ((train.target_seq or train.seq) if spec.is_encoder_decoder else train.seq)
    else:  # the worst batch's tokens, as the ledger's Shape (estimate.sequences.batch_layout)
        from ..estimate.sequences import batch_layout

        layout = batch_layout(train)
        T = layout.rows * layout.row_len
    leaves = {l.leaf for l in spec.linears if l.role in INT8_OUTLIER_ROLES}
    return random_init_outlier_fraction(spec, T), leaves


def _drop_meta_caches() -> None:
    """bitsandbytes caches its quantization maps per process (functional.name2qmap), made on the
    first device that asks: after a trace they are meta tensors, which a later real load in the
    same process cannot copy. Forget the meta ones."""
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        return
    for k, v in list(bf.name2qmap.items()):
        if getattr(v, "is_meta", False):
            del bf.name2qmap[k]
