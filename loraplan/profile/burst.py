"""One training burst, exactly as loraplan/data/h100-protocol.md describes it (needs the
``[profile]`` extra). :func:`run_burst` is what the worker subprocess calls; it never raises for
a failure of the case: OOM and errors come back as data with the phase they happened in.

The training-stack recipe (``loraplan.trainers.resolve_recipe``) shapes the load (dtype,
compute dtype, attn_implementation), the preparation (prepare_kbit, checkpointing variant) and
the steps, which the plain loop or the real transformers.Trainer / trl.SFTTrainer runs
(``loraplan.profile.stack``; batches: ``loraplan.profile.batches``). ``--trainer loop`` with
the default recipe is the protocol's step, unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

Emit = Callable[[dict], None]

#: phases in the order a burst reaches them
PHASES = ("start", "build", "load", "prepare", "lora", "wrap", "optimizer", "first_forward", "first_backward",
          "first_optimizer_step", "steps", "done")
#: phases with their own memory peaks in a record (a rank of a multi-GPU burst adds "wrap", where
#: ``loraplan.profile.distributed.wrap_model`` hands the model to DDP / FSDP, after "lora")
MEMORY_PHASES = ("load", "prepare", "lora", "first_forward", "first_backward", "first_optimizer_step")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
#: test hook: "<oom|error|memory|sleep|exit>@<phase>" makes the burst fail (or hang, or die) when it enters <phase>
FAULT_ENV = "LORAPLAN_PROFILE_FAULT"


def default_cache_dir() -> Path:
    base = os.environ.get("LORAPLAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loraplan")
    return Path(base) / "models"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_cache_path(name: str, config: dict, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/<name>-<hash of config>``: one random-weight bf16 checkpoint per config."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    return Path(cache_dir or default_cache_dir()) / f"{safe}-{config_hash(config)}"


def has_weights(folder: str | Path | None) -> bool:
    if not folder:
        return False
    p = Path(folder)
    if p.is_file():
        p = p.parent
    return p.is_dir() and (p / "config.json").exists() and any(any(p.glob(g)) for g in WEIGHT_FILES)


def _model_class(config_or_flag):
    import transformers

    enc_dec = config_or_flag if isinstance(config_or_flag, bool) else bool(getattr(config_or_flag, "is_encoder_decoder", False))
    return transformers.AutoModelForSeq2SeqLM if enc_dec else transformers.AutoModelForCausalLM


def _safetensors_complete(f: Path) -> bool:
    """A .safetensors file is whole: its header parses and the file is as long as the header says
    (8-byte length, JSON header, then the tensors' bytes up to the largest ``data_offsets`` end)."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100 * 2**20:
                return False
            header = json.loads(fh.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        return f.stat().st_size == 8 + n + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def checkpoint_complete(folder: str | Path) -> bool:
    """A cached checkpoint a burst can trust: config.json, weights (:func:`has_weights`), every
    shard the index names present, every .safetensors file whole. New entries appear whole (built
    under a temp name, then renamed); this also rejects a half-written entry from an older loraplan."""
    p = Path(folder)
    if not has_weights(p):
        return False
    try:
        json.loads((p / "config.json").read_text())
        for idx in p.glob("*.index.json"):
            shards = set((json.loads(idx.read_text()).get("weight_map") or {}).values())
            if any(not (p / s).is_file() for s in shards):
                return False
    except (OSError, ValueError, AttributeError):
        return False
    return all(_safetensors_complete(f) for f in p.glob("*.safetensors"))


#: ``.<entry>.tmp-<pid>-<random>``: a checkpoint being built (by the live process <pid>)
_BUILD_TMP = re.compile(r"^\.(?P<entry>.+)\.tmp-(?P<pid>\d+)-[A-Za-z0-9_]+$")
#: the pid-less temp names of older versions: ``.<name>-<config hash>.<8 random>``
_LEGACY_BUILD_TMP = re.compile(r"^\.[A-Za-z0-9._-]+-[0-9a-f]{12}\.[a-z0-9_]{8}$")


def remove_stale_builds(cache: str | Path) -> list[Path]:
    """Remove the temp folders of builds whose process is dead (a kill during the build) and
    pid-less ones of older versions a day old; returns what was removed."""
    from .locks import LEGACY_TEMP_AGE_S, pid_alive

    removed = []
    root = Path(cache)
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        try:
            if not d.name.startswith(".") or not d.is_dir() or d.is_symlink():
                continue
            m = _BUILD_TMP.match(d.name)
            if m:
                stale = not pid_alive(int(m.group("pid")))
            else:
                stale = bool(_LEGACY_BUILD_TMP.match(d.name)) and time.time() - d.stat().st_mtime > LEGACY_TEMP_AGE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def ensure_model(name: str, config: dict, cache_dir: str | Path | None = None, emit: Emit | None = None) -> Path:
    """The cached random-weight checkpoint for ``config``; built (bf16, CPU) and saved once.

    The build is written under ``.<entry>.tmp-<pid>-*`` and renamed into place only when whole, so
    a kill at any moment never leaves an entry a later run trusts; a later build removes the temp
    folders of dead builds, and an incomplete entry (:func:`checkpoint_complete`) is rebuilt.
    """
    path = model_cache_path(name, config, cache_dir)
    remove_stale_builds(path.parent)  # also when the entry is cached: a killed 7B build leaves ~13 GB
    if checkpoint_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if emit:
        emit({"ev": "phase", "phase": "build"})
    import torch
    import transformers

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model_class(hf_config).from_config(hf_config, dtype=torch.bfloat16)
    from .._meta import untie_like_checkpoint

    untie_like_checkpoint(model, config)  # flan-t5/mt0: a separate lm_head, as their checkpoints have
    if not model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.02)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        del model
        _fault("build")  # test hook: a kill between the save and the rename
        if path.exists() and not checkpoint_complete(path):  # an incomplete entry: move it aside, then remove it
            bad = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
            os.replace(path, bad / "old")
            shutil.rmtree(bad, ignore_errors=True)
        try:
            os.replace(tmp, path)  # atomic: a half-written folder is never used
        except OSError:
            if not checkpoint_complete(path):  # else: another run built it at the same time
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "loraplan", "nvidia-ml-py"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def environment(device: str, index: int = 0) -> dict[str, Any]:
    """GPU name, driver, CUDA and library versions (or the CPU's description); ``index``: the
    CUDA device this process uses (a rank's local rank)."""
    import platform

    import torch

    env: dict[str, Any] = {"device": device, "python": platform.python_version(), "platform": platform.platform(),
                           "versions": _versions(), "cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(index)
        env.update(gpu_name=props.name, gpu_total_bytes=int(props.total_memory),
                   compute_capability=f"{props.major}.{props.minor}",
                   gpu_uuid=str(getattr(props, "uuid", "") or "") or None,
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                   cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                   alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"))
        try:
            import pynvml

            pynvml.nvmlInit()
            drv = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = drv.decode() if isinstance(drv, bytes) else drv
            pynvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001
            env["driver"] = None
            env["driver_error"] = f"{type(e).__name__}: {e}"
    else:
        env.update(gpu_name=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def make_cpu_tracker():
    """The shared ``loraplan.trace.tracker.LiveTensorTracker`` for CPU storages, counting in
    512-byte blocks as CUDA's caching allocator counts max_memory_allocated, so a CPU record
    and a CUDA prediction use the same unit (tensors < 512 B count 512)."""
    from ..trace.tracker import LiveTensorTracker

    return LiveTensorTracker(round_to=512, device="cpu")


def _fault(phase: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or "@" not in spec:
        return
    kind, at = spec.split("@", 1)
    if at != phase:
        return
    import torch

    if kind == "oom":
        raise torch.OutOfMemoryError(f"simulated out of memory in phase {phase} ({FAULT_ENV})")
    if kind == "memory":
        raise MemoryError(f"simulated MemoryError in phase {phase} ({FAULT_ENV})")
    if kind == "exit":  # a hard crash: no result, no traceback
        os._exit(9)
    if kind == "sleep":
        time.sleep(3600)
    raise RuntimeError(f"simulated error in phase {phase} ({FAULT_ENV})")


def _quant_config(quant: str, double_quant: bool, compute_dtype: str = "bf16", quant_storage: str | None = None):
    """The BitsAndBytesConfig of ``quant``; ``quant_storage`` (``--quant-storage``, 4-bit only):
    ``bnb_4bit_quant_storage``, the dtype the packed 4-bit data is stored in (None: bitsandbytes'
    uint8), which FSDP-QLoRA sets to the float dtype it flattens with."""
    import transformers

    from ..train_step import torch_dtype

    if quant in ("nf4", "fp4"):
        kw = {"bnb_4bit_quant_storage": torch_dtype(quant_storage) if quant_storage and quant_storage != "uint8"
              else None}
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                               bnb_4bit_use_double_quant=bool(double_quant),
                                               bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
                                               **{k: v for k, v in kw.items() if v is not None})
    if quant == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return None


def _load_dtype(quant: str, recipe_load_dtype: str | None = None):
    """The torch dtype ``from_pretrained`` gets: the recipe's ``load_dtype`` for a quantized base
    (its non-quantized parameters), else ``storage.load_dtype`` (the base's own dtype)."""
    from ..storage import is_quantized, load_dtype
    from ..train_step import torch_dtype

    if recipe_load_dtype and is_quantized(quant):
        return torch_dtype(recipe_load_dtype)
    return torch_dtype(load_dtype(quant))


def _sdpa_backend(device: str, attention: str, attn_implementation: str = "sdpa"):
    """(attn_implementation, sdpa backend or None, label for the record)."""
    from torch.nn.attention import SDPBackend

    if attention == "eager" or attn_implementation == "eager":
        return "eager", None, "eager"
    if attn_implementation == "flash_attention_2":
        return "flash_attention_2", None, "flash_attention_2"
    if device == "cpu":
        return "sdpa", SDPBackend.MATH, "sdpa:math"
    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH}
    if attention in table:
        return "sdpa", table[attention], f"sdpa:{attention}"
    return "sdpa", None, "sdpa:auto"


def _optimizer(name: str, params):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0)
    import bitsandbytes.optim as bo

    cls = {"adamw_8bit": bo.AdamW8bit, "paged_adamw_8bit": bo.PagedAdamW8bit,
           "paged_adamw_32bit": bo.PagedAdamW32bit}[name]
    return cls(params, lr=1e-4)


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 4000 else text[:4000] + " ..."


def run_burst(spec: dict, emit: Emit | None = None) -> dict[str, Any]:
    """Run one case; returns the measured part of its record (status, phase, memory, time, ...).

    ``spec``: {"model": {"name", "config", "path"?}, "lora": {rank, alpha, dropout, targets},
    "train": TrainSpec fields, "device": "cuda"|"cpu", "steps", "warmup", "cache_dir"?, "nvml"?,
    "kernel_summary"? (None: on CUDA only; ``profile.kernels.wanted``), "distributed"?}. With the
    kernel summary on, the plain loop runs one more step under torch.profiler after the timed ones
    and the result holds ``kernels`` (``profile.kernels.profile_step``); the Trainer kinds record
    why not. ``distributed`` (a rank of a multi-GPU burst, ``loraplan.profile.distributed``):
    {"rank", "local_rank", "world_size", "strategy", ...}; the process group is already up, the
    rank uses CUDA device ``local_rank``, and the model is wrapped by the engine after LoRA.
    """
    emit = emit or (lambda ev: None)
    device = spec.get("device", "cuda")
    from .kernels import wanted as _kernels_wanted

    kernels_on = _kernels_wanted(spec.get("kernel_summary"), device)
    steps, warmup = int(spec.get("steps", 6)), int(spec.get("warmup", 2))
    train, lora, mspec = spec["train"], spec["lora"], spec["model"]
    res: dict[str, Any] = {"status": "error", "phase": "start", "error": None,
                           "memory": {"phases": {}, "step_peaks": []}, "nvml": None,
                           "time": {}, "params": None, "env": None, "protocol": {}}
    mem = res["memory"]
    state = {"phase": "start"}
    dist = spec.get("distributed")
    cuda_index = int(dist["local_rank"]) if dist else 0  # the rank's own GPU (every GPU stays visible)

    def phase(name: str) -> None:
        state["phase"] = res["phase"] = name
        emit({"ev": "phase", "phase": name})
        _fault(name)

    def record_mem(name: str, m: dict) -> None:
        mem["phases"][name] = m
        emit({"ev": "mem", "phase": name, "mem": m})

    nvml = None
    tracker = None
    outside: dict = {}  # NVML used - reserved (CudaProbe.outside_allocator): at idle, after the steps
    stack = contextlib.ExitStack()
    t_start = time.perf_counter()
    try:
        phase("start")
        import torch

        if device == "cuda" and spec.get("nvml", True):
            try:
                from .probes import NvmlSampler

                visible = [v.strip() for v in (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",") if v.strip()]
                first = visible[cuda_index] if cuda_index < len(visible) else str(cuda_index)
                nvml = NvmlSampler(index=int(first) if first.isdigit() else cuda_index,  # torch's device cuda_index
                                   uuid=first if first.startswith(("GPU-", "MIG-")) else None,
                                   ).start()  # baseline: before CUDA and the model
            except Exception as e:  # noqa: BLE001
                res["nvml"] = {"available": False, "reason": _error_text(e)}
        elif device == "cpu":
            res["nvml"] = {"available": False, "reason": "--device cpu: NVML measures GPUs only"}
        else:
            res["nvml"] = {"available": False, "reason": "NVML sampling turned off"}

        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available to torch in the worker; use --device cpu")
            torch.cuda.init()
            torch.cuda.set_device(cuda_index)
        res["env"] = environment(device, cuda_index)
        if dist:
            res["env"]["rank"], res["env"]["world_size"] = int(dist["rank"]), int(dist["world_size"])

        # ---- model files --------------------------------------------------------------
        if has_weights(mspec.get("path")):
            p = Path(mspec["path"])
            path = p.parent if p.is_file() else p
            res["protocol"]["model_source"] = "local weights"
        else:
            path = ensure_model(mspec["name"], mspec["config"], spec.get("cache_dir"), emit)
            res["protocol"]["model_source"] = "random bf16 weights from config (cached)"
        res["protocol"]["model_dir"] = str(path)

        import peft
        import transformers

        from ..spec import RECIPE_FIELDS
        from . import stack as st
        from ..train_step import torch_dtype

        r = st.burst_recipe(train)  # the trainer's defaults filled in (loraplan.trainers.resolve_recipe)
        kind = r.trainer
        res["protocol"]["trainer"] = kind
        res["protocol"]["recipe"] = {k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in ((k, getattr(r, k)) for k in RECIPE_FIELDS)}
        if r.loss == "liger" and not st.liger_available():
            raise RuntimeError("--loss liger needs liger-kernel, which is not installed; pip install liger-kernel "
                               "or use --loss chunked")
        quant = train["quant"]
        gc = bool(train["gradient_checkpointing"])
        attn_impl, backend, attn_label = _sdpa_backend(device, train.get("attention", "auto"), r.attn_implementation)
        if device == "cuda":
            from .probes import CudaProbe

            probe = CudaProbe(cuda_index, nvml)
            torch.cuda.mem_get_info(cuda_index)  # creates the context (torch.cuda.init does not)
            # at idle: the context and what torch loaded at init, nothing allocated yet
            outside["outside_allocator_idle_bytes"] = probe.outside_allocator()
        else:
            from .probes import CpuProbe

            tracker = make_cpu_tracker()
            res["protocol"]["tracker"] = type(tracker).__module__
            probe = CpuProbe(tracker)

        # ---- load ---------------------------------------------------------------------
        phase("load")
        probe.begin("load")
        hf_config = transformers.AutoConfig.from_pretrained(path)
        enc_dec = bool(getattr(hf_config, "is_encoder_decoder", False))
        cls = _model_class(enc_dec)
        kw: dict[str, Any] = dict(dtype=_load_dtype(quant, r.load_dtype), device_map={"": cuda_index if device == "cuda" else "cpu"})
        qc = _quant_config(quant, train.get("double_quant"), r.compute_dtype,
                           getattr(r, "quant_storage", None) or train.get("quant_storage"))
        if qc is not None:
            kw["quantization_config"] = qc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = cls.from_pretrained(path, attn_implementation=attn_impl, **kw)
            except ValueError as e:
                if attn_impl != "sdpa" or not ("sdpa" in str(e).lower() or "scaled_dot_product_attention" in str(e)):
                    raise
                model = cls.from_pretrained(path, attn_implementation="eager", **kw)
                attn_label = f"eager (model has no sdpa: {str(e).splitlines()[0][:200]})"
        actual_impl = getattr(model.config, "_attn_implementation", attn_impl)
        if actual_impl and not str(attn_label).startswith(str(actual_impl)):
            attn_label = f"{actual_impl} (asked {attn_label})"
        res["protocol"].update(loader=cls.__name__, attention=attn_label,
                               load_dtype=str(kw["dtype"]).replace("torch.", ""),
                               quantization=(qc.to_dict() if qc is not None else None))
        if tracker is not None:
            weights = list(model.parameters()) + list(model.buffers())
            if hasattr(tracker, "register_module"):
                tracker.register(*weights)
            else:
                tracker.register(weights, label="weights")
            del weights  # a held list would keep the full weights alive after FSDP shards them (a rank's wrap)
            stack.enter_context(tracker)
            if dist:  # FSDP frees and re-allocates unsharded tensors by resizing their storage
                from .distributed import follow_storage_resizes

                stack.enter_context(follow_storage_resizes(tracker))
        record_mem("load", probe.end("load"))

        # ---- prepare ------------------------------------------------------------------
        phase("prepare")
        probe.begin("prepare")
        model.config.use_cache = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if qc is not None and r.prepare_kbit:
                ckw = st.checkpoint_kwargs(r)
                for k in ("every_n_layers", "offload"):  # not torch.utils.checkpoint kwargs: the Trainer or the loop
                    ckw.pop(k, None)                      # (below) enables them
                model = peft.prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=ckw)
                if gc and kind == "loop" and (r.checkpoint_every_n_layers != 1 or r.checkpoint_offload):
                    st.enable_checkpointing(model, r)
            elif gc and kind == "loop":  # a Trainer enables it itself (TrainingArguments.gradient_checkpointing)
                st.enable_checkpointing(model, r)
        record_mem("prepare", probe.end("prepare"))

        # ---- LoRA ---------------------------------------------------------------------
        phase("lora")
        probe.begin("lora")
        from .._meta import linear_modules
        from ..targets import peft_target_modules

        target_modules = peft_target_modules(lora["targets"], *linear_modules(model))
        cfg = peft.LoraConfig(r=int(lora["rank"]), lora_alpha=lora["alpha"], lora_dropout=float(lora["dropout"]),
                              target_modules=target_modules, bias="none",
                              task_type="SEQ_2_SEQ_LM" if enc_dec else "CAUSAL_LM")
        res["protocol"]["target_modules"] = target_modules

        def lora_done(m) -> None:
            trainable, total = m.get_nb_trainable_parameters()
            res["params"] = {"trainable": int(trainable), "total": int(total)}
            res["protocol"]["param_dtypes"] = st.param_dtypes(m)
            record_mem("lora", probe.end("lora"))

        if kind == "loop" and r.loss == "chunked" and not enc_dec:
            # trl's fused chunked LM head, applied before PEFT as SFTTrainer.__init__ applies it
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        if kind != "trl":  # SFTTrainer wraps the model itself (peft_config), in its __init__
            model = peft.get_peft_model(model, cfg)
            if r.adapter_dtype != "fp32":  # get_peft_model upcasts adapters to fp32 (autocast_adapter_dtype)
                st.cast_adapters(model, r.adapter_dtype)
            lora_done(model)

        batch, seq = int(train["batch"]), int(train["seq"])
        ga = int(r.gradient_accumulation)
        vocab = int(getattr(model.config, "vocab_size", None) or hf_config.vocab_size)
        if enc_dec and r.padding != "max-length":
            raise RuntimeError(f"--padding {r.padding}: the burst builds encoder-decoder batches at max length only; "
                               f"use --padding max-length")
        if enc_dec and kind == "trl":
            raise RuntimeError(f"--trainer trl: trl's SFTTrainer trains causal LMs, not encoder-decoder "
                               f"{hf_config.model_type}; use --trainer hf (Seq2SeqTrainer) or --trainer loop")
        if enc_dec and r.loss != "standard":
            raise RuntimeError(f"--loss {r.loss}: the burst's {r.loss} loss is for decoder-only models; "
                               f"use --loss standard")
        if backend is not None:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel([backend]))
        marks = st.StepMarks(phase, probe, record_mem, mem, emit)

        if dist:  # a rank of a multi-GPU burst: the engine takes the model (DDP / FSDP), then the optimizer
            from .distributed import wrap_model

            if kind != "loop":
                raise RuntimeError(f"--trainer {kind} with --strategy {dist['strategy']}: a burst wraps the plain "
                                   f"loop's model only; use --trainer loop")
            phase("wrap")
            probe.begin("wrap")
            model, res["protocol"]["engine"] = wrap_model(model, dist, r, device, cuda_index)
            record_mem("wrap", probe.end("wrap"))

        # ---- steps (protocol 6-7) -----------------------------------------------------
        if kind == "loop":
            phase("optimizer")
            opt = _optimizer(train["optimizer"], [p for p in model.parameters() if p.requires_grad])
            model.train()
            dev = torch.device("cuda", cuda_index) if device == "cuda" else torch.device("cpu")
            if enc_dec:
                gen = torch.Generator(device="cpu").manual_seed(0)
                ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
                tseq = int(train.get("target_seq") or seq)
                labels = torch.randint(0, vocab, (batch, tseq), generator=gen).to(dev)
                batch_t = {"input_ids": ids, "labels": labels}
            else:
                from .batches import collate, token_rows

                tseq = None
                cpu_batch = collate(token_rows(r.padding, r.lengths, batch, seq, vocab), r.padding)
                batch_t = {k: v.to(dev) for k, v in cpu_batch.items() if k != "labels"}
                # labels=ids is one tensor (the protocol's model(input_ids=ids, labels=ids)), not a second copy
                batch_t["labels"] = (batch_t["input_ids"] if cpu_batch["labels"] is cpu_batch["input_ids"]
                                     else cpu_batch["labels"].to(dev))
            st.loop_steps(model, opt, r, batch_t, steps, marks, device, vocab)
            positions = int(batch_t["input_ids"].numel())
            if kernels_on:  # one more step, after the timed ones, under torch.profiler (profile/kernels.py)
                res["kernels"] = _kernel_summary(model, opt, r, batch_t, device, vocab, probe)
        else:
            from .batches import collate, token_rows

            tseq = int(train.get("target_seq") or seq) if enc_dec else None
            rows = st.dataset_rows(kind, r.padding, r.lengths, batch, seq, vocab, steps, ga, enc_dec, tseq)
            positions = batch * seq if (enc_dec or (kind == "trl" and r.padding == "packing")) else \
                int(collate(token_rows(r.padding, r.lengths, batch, seq, vocab), r.padding)["input_ids"].numel())
            if kind == "hf":
                phase("optimizer")  # Trainer.train builds the optimizer (create_optimizer) before step 1

            def built(trainer) -> None:
                if kind == "trl":
                    m = trainer.model
                    want = torch_dtype(r.adapter_dtype)
                    have = {str(p.dtype) for p in m.parameters() if p.requires_grad}
                    if st.cast_adapters(m, r.adapter_dtype):
                        res["protocol"]["adapters_recast"] = f"{sorted(have)} -> {want} after SFTTrainer.__init__"
                    lora_done(m)
                    phase("optimizer")

            with tempfile.TemporaryDirectory(prefix="loraplan-trainer-") as out_dir, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res["protocol"].update(st.trainer_steps(
                    kind, model, r, rows=rows, collate_fn=st.row_collator(r.padding, enc_dec), steps=steps,
                    batch=batch, seq=seq, optimizer=train["optimizer"], gc=gc, device=device, enc_dec=enc_dec,
                    marks=marks, out_dir=out_dir, peft_config=cfg if kind == "trl" else None, on_built=built))
        if kernels_on and kind != "loop":
            res["kernels"] = {"skipped": f"the kernel summary runs the plain loop's step; the {kind} trainer's "
                                         f"step is not re-run under the profiler"}
        step_s = marks.step_s
        loss = marks.loss
        res["protocol"]["input_shape"] = marks.input_shape
        if len(step_s) != steps:
            raise RuntimeError(f"the {kind} trainer ran {len(step_s)} optimizer steps, not {steps}")

        # ---- summary ------------------------------------------------------------------
        if device == "cuda":
            # after the last step: reserved is at its high-water mark (no empty_cache) and every
            # kernel module the step uses is loaded
            outside["outside_allocator_peak_bytes"] = probe.outside_allocator()
        after = step_s[warmup:] if len(step_s) > warmup else step_s
        med = statistics.median(after)
        tokens = positions * ga
        res["time"] = {"step_s": step_s, "warmup": warmup, "step_s_median": med,
                       "tokens_per_step": tokens, "decoder_tokens_per_step": batch * tseq * ga if tseq else None,
                       "micro_steps": marks.micro_steps, "optimizer_steps": marks.optimizer_steps,
                       "tokens_per_s": tokens / med if med > 0 else None,
                       "loss_last": float(loss.detach().float().item()) if loss is not None else None}
        res["status"], res["error"] = "ok", None
        phase("done")
    except Exception as e:  # noqa: BLE001 - every failure of the case is data
        import sys

        torch_mod = sys.modules.get("torch")
        oom_types = (MemoryError,) + ((torch_mod.OutOfMemoryError,) if hasattr(torch_mod, "OutOfMemoryError") else ())
        res["status"] = "oom" if isinstance(e, oom_types) else "error"
        res["phase"] = state["phase"]
        res["error"] = _error_text(e)
        res["traceback"] = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-6000:]
    finally:
        stack.close()
        if nvml is not None:
            res["nvml"] = nvml.stop()
            res["nvml"].update({k: v for k, v in outside.items() if v is not None})
        res["wall_s"] = time.perf_counter() - t_start
    _summarise_memory(res, probe_source=("torch.cuda.memory_stats" if device == "cuda" else
                                         "live-tensor tracker (storage bytes of live tensors)"),
                      tracker=tracker)
    return res


def _kernel_summary(model, opt, r, batch_t: dict, device: str, vocab: int, probe) -> dict:
    """One more optimizer step of the loop (``stack.loop_steps``, its phase and memory marks
    discarded) under ``profile.kernels.profile_step``; matmul kernels whose names carry no dtype
    take the recipe's frozen-matmul dtype (``storage.Dtypes.frozen_matmul``)."""
    from ..spec import TrainSpec
    from ..storage import Dtypes
    from . import stack as st
    from .kernels import profile_step

    scratch: dict = {"phases": {}, "step_peaks": []}  # the marks' bookkeeping, not the record's
    quiet = st.StepMarks(lambda name: None, probe, lambda name, m: scratch["phases"].__setitem__(name, m), scratch,
                         lambda ev: None)
    try:
        default = Dtypes.of(r).frozen_matmul if isinstance(r, TrainSpec) else None
    except Exception:  # noqa: BLE001 - only a label for unnamed kernels
        default = None
    return profile_step(lambda: st.loop_steps(model, opt, r, batch_t, 1, quiet, device, vocab), device, default)


def _summarise_memory(res: dict, probe_source: str, tracker=None) -> None:
    mem = res["memory"]
    mem["source"] = probe_source
    steps = mem.get("step_peaks") or []
    for key in ("max_allocated_bytes", "max_reserved_bytes", "max_active_bytes", "max_requested_bytes"):
        vals = [s.get(key) for s in steps if s.get(key) is not None]
        # over all steps, as the protocol's peak_allocated_bytes (reset before step 1)
        mem[key.replace("max_", "peak_")] = max(vals) if vals else None
    allv = [p.get("max_allocated_bytes") for p in mem["phases"].values() if p.get("max_allocated_bytes") is not None]
    allv += [s.get("max_allocated_bytes") for s in steps if s.get("max_allocated_bytes") is not None]
    mem["process_peak_allocated_bytes"] = max(allv) if allv else None
    if tracker is not None:
        mem["tracker_peak_bytes"] = int(tracker.peak)
        if hasattr(tracker, "snapshot"):
            try:  # what was live at the peak, largest groups first (shared tracker only)
                mem["live_at_peak"] = [g.to_dict() for g in tracker.snapshot(at="peak", top=12)]
            except Exception as e:  # noqa: BLE001
                mem["live_at_peak_error"] = f"{type(e).__name__}: {e}"
