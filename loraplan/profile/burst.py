"""One training burst, exactly as loraplan/data/h100-protocol.md describes it (needs the
``[profile]`` extra). :func:`run_burst` is what the worker subprocess calls; it never raises for
a failure of the case: OOM and errors come back as data with the phase they happened in.
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

from ..spec import TrainSpec
from ..train_step import StepRunner, apply_checkpoint_layout, check_supported, checkpoint_kwargs

Emit = Callable[[dict], None]

#: phases in the order a burst reaches them
PHASES = ("start", "build", "load", "prepare", "lora", "optimizer", "first_forward", "first_backward",
          "first_optimizer_step", "steps", "done")
#: phases with their own memory peaks in a record
MEMORY_PHASES = ("load", "prepare", "lora", "first_forward", "first_backward", "first_optimizer_step")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
#: test hook: "<oom|error|memory|sleep>@<phase>" makes the burst fail (or hang) when it enters <phase>
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
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "loraplan", "nvidia-ml-py"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def environment(device: str) -> dict[str, Any]:
    """GPU name, driver, CUDA and library versions (or the CPU's description)."""
    import platform

    import torch

    env: dict[str, Any] = {"device": device, "python": platform.python_version(), "platform": platform.platform(),
                           "versions": _versions(), "cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
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
    if kind == "sleep":
        time.sleep(3600)
    raise RuntimeError(f"simulated error in phase {phase} ({FAULT_ENV})")


def _quant_config(quant: str, double_quant: bool):
    import torch
    import transformers

    if quant in ("nf4", "fp4"):
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                               bnb_4bit_use_double_quant=bool(double_quant),
                                               bnb_4bit_compute_dtype=torch.bfloat16)
    if quant == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return None


def _load_dtype(quant: str):
    """The torch dtype of ``storage.load_dtype`` (bf16 for bf16 and the quantized loads)."""
    import torch

    from ..storage import TORCH_DTYPE_NAMES, load_dtype

    return getattr(torch, TORCH_DTYPE_NAMES[load_dtype(quant)])


def _sdpa_backend(device: str, attention: str):
    """(attn_implementation, sdpa backend or None, label for the record)."""
    from torch.nn.attention import SDPBackend

    if attention == "eager":
        return "eager", None, "eager"
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
    "train": TrainSpec fields, "device": "cuda"|"cpu", "steps", "warmup", "cache_dir"?, "nvml"?}.
    """
    emit = emit or (lambda ev: None)
    device = spec.get("device", "cuda")
    steps, warmup = int(spec.get("steps", 6)), int(spec.get("warmup", 2))
    train, lora, mspec = spec["train"], spec["lora"], spec["model"]
    res: dict[str, Any] = {"status": "error", "phase": "start", "error": None,
                           "memory": {"phases": {}, "step_peaks": []}, "nvml": None,
                           "time": {}, "params": None, "env": None, "protocol": {}}
    mem = res["memory"]
    state = {"phase": "start"}

    def phase(name: str) -> None:
        state["phase"] = res["phase"] = name
        emit({"ev": "phase", "phase": name})
        _fault(name)

    def record_mem(name: str, m: dict) -> None:
        mem["phases"][name] = m
        emit({"ev": "mem", "phase": name, "mem": m})

    nvml = None
    tracker = None
    stack = contextlib.ExitStack()
    t_start = time.perf_counter()
    try:
        phase("start")
        import torch

        if device == "cuda" and spec.get("nvml", True):
            try:
                from .probes import NvmlSampler

                first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
                nvml = NvmlSampler(index=int(first) if first.isdigit() else 0,  # torch's device 0
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
        res["env"] = environment(device)

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

        quant = train["quant"]
        gc = bool(train["gradient_checkpointing"])
        tspec = TrainSpec(**train)
        check_supported(TrainSpec(**{**train, "device": device}), runner="burst")
        attn_impl, backend, attn_label = _sdpa_backend(device, train.get("attention", "auto"))
        if device == "cuda":
            from .probes import CudaProbe

            probe = CudaProbe(0, nvml)
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
        kw: dict[str, Any] = dict(dtype=_load_dtype(quant), device_map={"": 0 if device == "cuda" else "cpu"})
        qc = _quant_config(quant, train.get("double_quant"))
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
            stack.enter_context(tracker)
        record_mem("load", probe.end("load"))

        # ---- prepare ------------------------------------------------------------------
        phase("prepare")
        probe.begin("prepare")
        model.config.use_cache = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if qc is not None:
                model = peft.prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=checkpoint_kwargs(tspec))
            elif gc:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(tspec))
                model.enable_input_require_grads()
            apply_checkpoint_layout(model, tspec)
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
        model = peft.get_peft_model(model, cfg)
        trainable, total = model.get_nb_trainable_parameters()
        res["params"] = {"trainable": int(trainable), "total": int(total)}
        res["protocol"]["target_modules"] = target_modules
        record_mem("lora", probe.end("lora"))

        phase("optimizer")
        opt = _optimizer(train["optimizer"], [p for p in model.parameters() if p.requires_grad])
        model.train()
        batch, seq = int(train["batch"]), int(train["seq"])
        vocab = int(getattr(model.config, "vocab_size", None) or hf_config.vocab_size)
        dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
        if enc_dec:
            tseq = int(train.get("target_seq") or seq)
            labels = torch.randint(0, vocab, (batch, tseq), generator=gen).to(dev)
        else:
            tseq = None
            labels = ids
        if backend is not None:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel([backend]))

        # ---- steps (protocol 6-7; the recipe's trainer step: loraplan.train_step) ----
        step_s: list[float] = []
        first = {"forward": "first_forward", "backward": "first_backward", "optimizer": "first_optimizer_step"}
        current = {"step": 0}

        @contextlib.contextmanager
        def step_phase(name):
            # step 1: each part probed on its own (micro-steps: the largest of their peaks)
            if current["step"] != 1:
                yield
                return
            phase(first[name])
            probe.begin(first[name])
            yield
            m = probe.end(first[name])
            old = mem["phases"].get(first[name])
            if old is not None:
                m = {k: max(v, old.get(k, v)) if k.startswith("max_") and v is not None else v for k, v in m.items()}
            record_mem(first[name], m)

        runner = StepRunner(model, opt, [p for p in model.parameters() if p.requires_grad], ids, labels, tspec,
                            torch, phase=step_phase)
        for i in range(1, steps + 1):
            probe.synchronize()
            t0 = time.perf_counter()
            current["step"] = i
            if i == 1:
                runner.step()
                m = mem["phases"]["first_optimizer_step"]
                step_peak = {k: max(mem["phases"][p].get(k, 0) for p in MEMORY_PHASES[3:])
                             for k in m if k.startswith("max_") or k.startswith("nvml_")}
            else:
                if i == 2:
                    phase("steps")
                probe.begin(f"step_{i}")
                runner.step()
                step_peak = probe.end(f"step_{i}")
            probe.synchronize()
            step_s.append(time.perf_counter() - t0)
            mem["step_peaks"].append(step_peak)
            emit({"ev": "step", "step": i, "s": step_s[-1], "max_allocated_bytes": step_peak.get("max_allocated_bytes")})

        # ---- summary ------------------------------------------------------------------
        after = step_s[warmup:] if len(step_s) > warmup else step_s
        med = statistics.median(after)
        tokens = batch * seq * runner.ga  # per optimizer step: every micro-batch of it
        res["time"] = {"step_s": step_s, "warmup": warmup, "step_s_median": med,
                       "tokens_per_step": tokens, "decoder_tokens_per_step": batch * tseq * runner.ga if tseq else None,
                       "tokens_per_s": tokens / med if med > 0 else None,
                       "loss_last": runner.last_loss()}
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
        res["wall_s"] = time.perf_counter() - t_start
    _summarise_memory(res, probe_source=("torch.cuda.memory_stats" if device == "cuda" else
                                         "live-tensor tracker (storage bytes of live tensors)"),
                      tracker=tracker)
    return res


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
