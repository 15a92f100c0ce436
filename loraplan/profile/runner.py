"""The sweep side of ``loraplan profile`` (pure Python: torch runs only in the workers).

For each case: its inputs (``run_inputs`` + device + gpu id) and stable key; skip it when the
records file holds that key (unless ``force``); else run ``python -m loraplan.profile.worker``
in its own process group with a time limit, follow its progress lines, and append one record.

Nothing measured is lost: the records file is checked writable and locked (and, on CUDA, the
GPU) before any burst; a record that cannot be appended goes to a recovery file that the next
run adds back; SIGTERM/SIGHUP end the run through the normal exit path (worker killed, temp
folder removed, a finished measurement written first); temp folders of killed runs are removed
at the next start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..errors import DeviceError, HostMemoryError, MissingExtraError, RecordsError
from ..spec import LoraSpec, ModelSpec, TrainSpec, run_inputs
from ..storage import dtype_bytes, is_quantized, load_dtype
from .distributed import is_distributed
from .locks import device_key, device_lock, records_lock, remove_stale_temp_dirs, temp_prefix
from .records import (SCHEMA, append_record, case_key, check_writable, default_out_path, gpu_id_for_name,
                      keep_record, merge_recovered, read_records)

OnEvent = Callable[[dict], None]
MARK = "@@loraplan "
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


@dataclass(frozen=True)
class Case:
    model: ModelSpec
    lora: LoraSpec
    train: TrainSpec
    gpu: str | None = None  # GPU id whose estimate goes beside the measurement

    @property
    def label(self) -> str:
        t, l = self.train, self.lora
        q = t.quant + ("-dq" if t.double_quant and t.quant in ("nf4", "fp4") else "")
        tg = "+".join(l.targets)
        s = f"s{t.seq}" + (f"/{t.target_seq}" if t.target_seq and t.target_seq != t.seq else "")
        return (f"{self.model.name} {q} r{l.rank} {tg} {t.optimizer} b{t.batch} {s} "
                f"{'gc' if t.gradient_checkpointing else 'nogc'}" + (f" {t.attention}" if t.attention != "auto" else "")
                + "".join(f" {v}" if k == "trainer" else f" {k}={v}" for k, v in _recipe_given(t))
                + _parallel_label(t))


def _parallel_label(t: TrainSpec) -> str:
    """" fsdp x2" (and the FSDP options given) for a multi-GPU case; "" for one GPU."""
    if not is_distributed(t):
        return ""
    out = f" {t.strategy} x{t.num_gpus}"
    if t.strategy.startswith("fsdp"):
        out += "".join(f" {k}={v}" for k, v in (("fsdp_sharding", t.fsdp_sharding), ("fsdp_version", t.fsdp_version),
                                                 ("use_orig_params", t.use_orig_params),
                                                 ("fsdp_backward_prefetch", t.fsdp_backward_prefetch),
                                                 ("quant_storage", t.quant_storage))
                       if v is not None and not (k == "fsdp_sharding" and v == "full"))
    return out


def _recipe_given(t: TrainSpec) -> list[tuple[str, Any]]:
    """The training-stack fields (spec.RECIPE_FIELDS) set away from TrainSpec's defaults, for a label."""
    from dataclasses import fields

    from ..spec import RECIPE_FIELDS

    default = {f.name: f.default for f in fields(TrainSpec)}
    given = [(k, getattr(t, k)) for k in RECIPE_FIELDS if getattr(t, k) is not None and getattr(t, k) != default[k]]
    return [(k, ",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in given]


@dataclass
class DeviceInfo:
    device: str  # cuda | cpu
    gpu_id: str  # catalog id, a slug of the CUDA name, or "cpu"
    name: str | None = None
    probe: dict = field(default_factory=dict)


@dataclass
class CaseResult:
    case: Case
    key: str
    record: dict | None
    skipped: bool = False


# ---- checks -----------------------------------------------------------------------------

def check_extras(cases: list[Case], device: str) -> None:
    """MissingExtraError naming pip install 'loraplan[profile]' when a needed package is absent."""
    import importlib.util

    need = ["torch", "transformers", "peft"]
    if any(is_quantized(c.train.quant) or c.train.optimizer in BNB_OPTIMIZERS for c in cases):
        need.append("bitsandbytes")
    if device == "cuda":
        need.append("pynvml")
    if any(c.train.trainer == "trl" for c in cases):
        need += ["trl", "datasets"]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        pretty = ["nvidia-ml-py" if m == "pynvml" else m for m in missing]
        raise MissingExtraError(
            f"'loraplan profile' needs {', '.join(pretty)}, which {'is' if len(pretty) == 1 else 'are'} not installed; "
            f"install them with: pip install 'loraplan[profile]'")
    if any(c.train.loss == "liger" for c in cases) and importlib.util.find_spec("liger_kernel") is None:
        raise MissingExtraError("--loss liger needs liger-kernel, which is not installed; install it with: "
                                "pip install liger-kernel (or use --loss chunked)")


def check_recipes(cases: list[Case], device: str = "cuda") -> None:
    """InputError (one line: the value and the fix) for a recipe the burst cannot run, before any
    burst (a refused case recorded as an error would be skipped by the next run): trl's
    SFTTrainer with an encoder-decoder model, the loop's chunked loss under a Trainer,
    padding/loss variants the burst builds for decoder-only models only, and on ``--device cpu``
    checkpoint offload (transformers modeling_utils.py::_activation_checkpointing_enable wraps
    ``save_on_cpu(pin_memory=True)``, and torch has no pinned allocator without an accelerator)
    and flash_attention_2 (CUDA only)."""
    from ..errors import InputError

    for c in cases:
        t, enc_dec = c.train, c.model.is_encoder_decoder
        if device == "cpu" and t.checkpoint_offload:
            raise InputError("--checkpoint-offload on --device cpu: transformers offloads through pinned host memory, "
                             "which needs a GPU (and CPU activations live in host memory anyway); drop "
                             "--checkpoint-offload or use --device cuda")
        if device == "cpu" and t.attn_implementation == "flash_attention_2":
            raise InputError("--attn-implementation flash_attention_2 runs on CUDA only; use --attn-implementation sdpa "
                             "or eager on --device cpu, or --device cuda")
        if enc_dec and t.trainer == "trl":
            raise InputError(f"--trainer trl: trl's SFTTrainer trains causal LMs, not encoder-decoder "
                             f"{c.model.model_type}; use --trainer hf (Seq2SeqTrainer) or --trainer loop")
        if t.trainer != "loop" and t.loss == "chunked":
            raise InputError(f"--loss chunked is the plain loop's chunked cross-entropy; --trainer {t.trainer} has none; "
                             f"use --trainer loop or --loss standard")
        if enc_dec and (t.padding != "max-length" or t.loss != "standard"):
            bad = f"--padding {t.padding}" if t.padding != "max-length" else f"--loss {t.loss}"
            raise InputError(f"{bad}: a burst builds encoder-decoder ({c.model.model_type}) batches at max length with "
                             f"the standard loss; use --padding max-length --loss standard")


def detect_device(device: str, python: str | None = None, timeout: float = 120.0) -> DeviceInfo:
    """``cpu`` -> DeviceInfo("cpu", "cpu"); ``cuda`` asks a worker process (the parent never
    creates a CUDA context) for device 0's name and maps it to a catalog GPU id."""
    if device == "cpu":
        return DeviceInfo("cpu", "cpu", None, {})
    if device != "cuda":
        raise DeviceError(f"--device '{device}' is not one of cuda, cpu")
    try:
        p = subprocess.run([python or sys.executable, "-m", "loraplan.profile.worker", "--probe"],
                           capture_output=True, text=True, timeout=timeout)
        info = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        raise DeviceError(f"could not ask torch about CUDA ({type(e).__name__}); use --device cpu for a CPU burst") from None
    if not info.get("cuda_available"):
        why = f" ({info['error']})" if info.get("error") else ""
        build = f"torch {info.get('torch')}, CUDA build {info.get('cuda') or 'none'}"
        raise DeviceError(f"--device cuda: no CUDA GPU is available to torch ({build}){why}; "
                          f"use --device cpu for a CPU burst")
    name = info.get("name") or "cuda"
    return DeviceInfo("cuda", gpu_id_for_name(name), name, info)


def host_memory_available_bytes() -> int | None:
    """RAM the kernel says can be had without swapping: MemAvailable of /proc/meminfo (Linux),
    else free pages x page size (``os.sysconf``); None when neither is there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def host_weight_bytes(case: Case) -> int:
    """Host RAM the model's weights alone take in a --device cpu burst: every parameter in the
    larger of bf16 (the cached random-weight checkpoint is built in bf16, burst.ensure_model) and
    the load dtype (``storage.load_dtype``), once per rank of a multi-GPU case (each rank loads
    the whole model before the engine shards it). Activations, gradients and optimizer come on top."""
    ranks = int(case.train.num_gpus) if is_distributed(case.train) else 1
    return ranks * case.model.total_params * max(dtype_bytes("bf16"), dtype_bytes(load_dtype(case.train.quant)))


def check_host_memory(cases: list[Case], dev: DeviceInfo, available: int | None = None) -> None:
    """HostMemoryError (one line) when a --device cpu case's weights alone exceed the available
    host RAM: such a burst would swap or be killed after minutes of building."""
    if dev.device != "cpu" or not cases:
        return
    avail = host_memory_available_bytes() if available is None else available
    if avail is None:
        return
    case = max(cases, key=host_weight_bytes)
    need = host_weight_bytes(case)
    if need > avail:
        gib = 2**30
        raise HostMemoryError(
            f"--device cpu: the weights of '{case.model.name}' ({case.model.total_params / 1e9:.2f}B parameters) "
            f"alone need {need / gib:.1f} GiB of host RAM and {avail / gib:.1f} GiB is available; for a CPU smoke "
            f"run use --model tiny-llama (a tiny test shape), or profile this model with --device cuda")


def build_cases(case_dicts: list[dict], gpu: str | None = None) -> list[Case]:
    """Grid dicts (CLI option names) -> validated cases (resolve_case), models read once each."""
    from ..case import DEFAULTS, resolve_case
    from ..catalog import load_model

    models: dict[str, ModelSpec] = {}
    out = []
    for d in case_dicts:
        name = d.get("model") or DEFAULTS["model"]
        if name not in models:
            models[name] = load_model(name)
        m, l, t = resolve_case(d, models[name])
        out.append(Case(m, l, t, gpu))
    return out


# ---- one case ---------------------------------------------------------------------------

def case_inputs(case: Case, dev: DeviceInfo) -> dict:
    d = run_inputs(case.model, case.lora, case.train)
    d.update(device=dev.device, gpu_id=dev.gpu_id)
    return d


def estimate_for(case: Case, dev: DeviceInfo) -> tuple[dict | None, str | None, str | None]:
    """(estimate.to_dict(), GPU id used, why absent): the analytic estimate beside the measurement."""
    from ..catalog import load_calibration, load_gpu
    from ..estimate.api import estimate

    gid = estimate_gpu_id(case, dev)
    try:
        gpu = load_gpu(gid)
        cal = load_calibration(gid)
        from dataclasses import replace

        est = estimate(case.model, case.lora, replace(case.train, device=dev.device), gpu, cal)
        return est.to_dict(), gid, None
    except Exception as e:  # noqa: BLE001 - a failing estimate must not lose the measurement
        return None, gid, f"{type(e).__name__}: {e}"


def estimate_gpu_id(case: Case, dev: DeviceInfo) -> str:
    """The GPU whose estimate goes beside the measurement: the detected GPU when the catalog has it
    (CUDA runs), else the case's --gpu, else h100-sxm-80gb."""
    from ..catalog import gpu_entries

    return dev.gpu_id if dev.device == "cuda" and dev.gpu_id in gpu_entries() else (case.gpu or "h100-sxm-80gb")


#: what a record keeps of ``run_trace_subprocess``'s result
TRACE_KEYS = ("peak_allocated_bytes", "components", "phase_peaks", "peak_phase", "versions", "elapsed_s")


def trace_for(case: Case, dev: DeviceInfo, timeout: float = 300.0) -> dict:
    """The meta-device trace of the case's CUDA step, for the record's ``trace`` entry.

    The TrainSpec goes in as given (device "cuda" semantics: the trace predicts the CUDA figure,
    even for a --device cpu burst) with the compute capability of the estimate's GPU. Never
    raises: a failure is ``{"error": "..."}`` (a trace failure must not lose the measurement).
    """
    gid = estimate_gpu_id(case, dev)
    out: dict[str, Any] = {"gpu": gid}
    try:
        from ..catalog import load_gpu
        from ..trace import run_trace_subprocess

        cc = load_gpu(gid).compute_capability or "9.0"
        out["gpu_compute_capability"] = cc
        tr = run_trace_subprocess(dict(case.model.config), case.lora, case.train, cc, timeout_s=timeout)
        out.update({k: tr.get(k) for k in TRACE_KEYS})
        out["peak_allocated_bytes"] = int(tr["peak_allocated_bytes"])
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        out = {"error": f"{type(e).__name__}: {e}", "gpu": gid}
    if dev.device == "cpu":
        out["comparable_with_measurement"] = False
        out["note"] = (f"CUDA figure for {gid}: not comparable with this --device cpu measurement (the record's "
                       f"'estimate' is the CPU-target estimate)")
    return out


def worker_spec(case: Case, dev: DeviceInfo, steps: int, warmup: int, cache_dir: str | None,
                kernel_summary: bool | None = None) -> dict:
    from .burst import has_weights

    src = case.model.source
    return {
        "model": {"name": case.model.name, "config": dict(case.model.config),
                  "path": src if src and has_weights(src) else None},
        "lora": {"rank": case.lora.rank, "alpha": case.lora.alpha, "dropout": case.lora.dropout,
                 "targets": list(case.lora.targets)},
        "train": asdict(case.train), "device": dev.device, "steps": steps, "warmup": warmup,
        "cache_dir": cache_dir, "nvml": dev.device == "cuda",
        "kernel_summary": kernel_summary,  # None: on CUDA only (profile.kernels.wanted)
    }


@dataclass
class Followed:
    """What :func:`_follow` saw of a worker (or of torchrun and its ranks)."""

    rc: int
    timed_out: bool
    wall_s: float
    stderr_tail: str
    #: last phase and per-phase memory, by rank (None: a one-GPU worker)
    phases: dict = field(default_factory=dict)
    mem: dict = field(default_factory=dict)

    def phase(self, rank=None) -> str:
        """The last phase ``rank`` (None: the one-GPU worker) reported."""
        return self.phases.get(rank) or "start"


def _follow(argv: list[str], timeout: float, on_event: OnEvent, env: dict | None, err_path: str) -> Followed:
    """Run ``argv`` in its own process group, forward its ``@@loraplan`` progress lines (those of
    rank 0 only, when they carry a rank), and kill the group after ``timeout`` seconds; the clock
    stops while the cached model is built (the lead rank's ``build`` phase) and restarts after."""
    wenv = dict(os.environ if env is None else env)
    wenv.update(PYTHONUNBUFFERED="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1",
                TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
                LORAPLAN_PARENT_PID=str(os.getpid()))
    phases: dict = {}
    mems: dict = {}
    with open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=wenv)
        q: queue.Queue = queue.Queue()

        def reader():
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith(MARK):
                    try:
                        q.put(json.loads(line[len(MARK):]))
                    except json.JSONDecodeError:
                        pass
            q.put(None)

        threading.Thread(target=reader, daemon=True).start()
        deadline, timed_out, eof = t0 + timeout, False, False
        try:
            while True:
                try:
                    ev = q.get(timeout=0.1)
                except queue.Empty:
                    ev = False
                if ev is None:
                    eof = True
                elif ev:
                    rank = ev.get("rank")
                    lead = rank in (None, 0)
                    if ev.get("ev") == "phase":
                        if lead and ev["phase"] == "build":
                            deadline = math.inf
                        elif lead and phases.get(rank) == "build":
                            deadline = time.monotonic() + timeout
                        phases[rank] = ev["phase"]
                    elif ev.get("ev") == "mem":
                        mems.setdefault(rank, {})[ev["phase"]] = ev.get("mem")
                    if lead:
                        on_event(ev)
                if eof and proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    _kill_group(proc)
                    break
        finally:
            if proc.poll() is None and not timed_out:
                _kill_group(proc)
        rc = proc.wait()
    tail = Path(err_path).read_text(errors="replace")[-20000:]  # torchrun's failure table is near the end
    return Followed(rc, timed_out, time.monotonic() - t0, tail, phases, mems)


def _died(f: Followed, rank=None) -> str:
    how = f"killed by signal {-f.rc}" if f.rc < 0 else f"exit status {f.rc}"
    if f.rc == -signal.SIGKILL:
        how += " (possibly the system's out-of-memory killer)"
    last = f.stderr_tail.strip().splitlines()[-1] if f.stderr_tail.strip() else ""
    if rank is not None:  # torchrun's last stderr line is its own traceback, not the rank's
        last = ""
    return f"worker died without a result ({how}) in phase '{f.phase(rank)}'" + (f": {last}" if last else "")


def run_worker(spec: dict, timeout: float, on_event: OnEvent | None = None, python: str | None = None,
               env: dict | None = None) -> dict:
    """Run one burst in a subprocess; returns the burst result (status ok|oom|timeout|error).

    ``timeout`` bounds the case's wall time except while it builds the cached model (once per
    model): the clock restarts when building ends.
    """
    on_event = on_event or (lambda ev: None)
    with tempfile.TemporaryDirectory(prefix=temp_prefix()) as tmp:  # a kill -9 leaves it: the next run removes it
        spec_path, result_path, err_path = (os.path.join(tmp, n) for n in ("spec.json", "result.json", "stderr.txt"))
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        fo = _follow([python or sys.executable, "-m", "loraplan.profile.worker", "--spec", spec_path,
                      "--result", result_path], timeout, on_event, env, err_path)
        if fo.timed_out:
            return {"status": "timeout", "phase": fo.phase(),
                    "error": f"no result within --timeout {timeout:g}s (reached phase '{fo.phase()}'); the worker was killed",
                    "memory": {"phases": fo.mem.get(None, {})}, "wall_s": fo.wall_s}
        if os.path.exists(result_path):
            with open(result_path) as f:
                return json.load(f)
        return {"status": "error", "phase": fo.phase(), "error": _died(fo), "stderr_tail": fo.stderr_tail[-3000:],
                "memory": {"phases": fo.mem.get(None, {})}, "wall_s": fo.wall_s}


def run_distributed(spec: dict, nprocs: int, timeout: float, on_event: OnEvent | None = None,
                    python: str | None = None, env: dict | None = None) -> tuple[dict[int, dict], dict]:
    """Run one burst as a torchrun job of ``nprocs`` ranks (``loraplan.profile.distributed``);
    returns ({rank: burst result}, launcher facts). Every rank gets a result: a rank that wrote
    none (it crashed, torchrun stopped it after another rank failed, or the time ran out) gets
    status error or timeout, with the phase it reached."""
    from .distributed import launch_command, missing_rank_result, read_rank_results, torchrun_failures

    on_event = on_event or (lambda ev: None)
    with tempfile.TemporaryDirectory(prefix=temp_prefix()) as tmp:
        spec_path, err_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "stderr.txt")
        with open(spec_path, "w") as f:
            json.dump(dict(spec, timeout=timeout), f)
        argv = launch_command(nprocs, spec_path, tmp, python)
        fo = _follow(argv, timeout, on_event, env, err_path)
        got = read_rank_results(tmp, nprocs)
    root, codes = torchrun_failures(fo.stderr_tail)
    failed = sorted(r for r, res in got.items() if res.get("status") != "ok")
    oom = [r for r in failed if got[r].get("status") == "oom"]
    if oom:  # a rank out of memory explains its peers' lost connections (torchrun may see a peer exit first)
        root = oom[0]
    elif root is None and failed:
        root = failed[0]
    first = (f"rank {root} failed first" + (f" ({got[root].get('status')} in {got[root].get('phase')})"
                                            if root in got else "")) if root is not None else None
    out: dict[int, dict] = {}
    for rank in range(nprocs):
        if rank in got:
            res = got[rank]
            if res.get("status") != "ok" and root is not None and rank != root:
                res["error"] = f"after {first}: {res.get('error')}"  # e.g. gloo's "connection closed" when a peer died
                res["after_rank"] = root
            out[rank] = res
            continue
        ph, mem = fo.phase(rank), fo.mem.get(rank, {})
        if fo.timed_out:
            res = missing_rank_result(rank, ph, mem, f"no result within --timeout {timeout:g}s (reached phase "
                                                     f"'{ph}'); the job was killed")
            res["status"] = "timeout"
        elif rank in codes:  # torchrun saw this rank exit without writing a result: a crash
            code = codes[rank]
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            res = missing_rank_result(rank, ph, mem, f"rank {rank} died without a result ({how}) in phase '{ph}'"
                                      + ("" if rank == root or first is None else f", after {first}"))
            res["stderr_tail"] = fo.stderr_tail[-3000:]
        elif first is not None:
            res = missing_rank_result(rank, ph, mem, f"stopped by torchrun in phase '{ph}' after {first}")
            res["after_rank"] = root
        else:
            res = missing_rank_result(rank, ph, mem, _died(fo, rank))
            res["stderr_tail"] = fo.stderr_tail[-3000:]
        res["wall_s"] = fo.wall_s
        out[rank] = res
    if root is not None and root in out:
        out[root]["root_cause"] = True
    launcher = {"command": "python -m torch.distributed.run --standalone --nproc-per-node "
                           f"{nprocs} --max-restarts=0 -m loraplan.profile.distributed",
                "exit_status": fo.rc, "timed_out": fo.timed_out, "wall_s": fo.wall_s}
    return out, launcher


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the worker we started and its children (its own session / process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def make_record(case: Case, dev: DeviceInfo, result: dict, *, steps: int, warmup: int, timeout: float,
                trace: dict | None = None, estimated: tuple | None = None) -> dict:
    """One JSON record: inputs, what the worker measured, the analytic estimate beside it
    (``estimated``: :func:`estimate_for`'s answer when already computed) and, with ``trace``
    (from :func:`trace_for`), the meta-device trace's prediction."""
    inputs = case_inputs(case, dev)
    est, est_gpu, est_why = estimated if estimated is not None else estimate_for(case, dev)
    protocol = dict(result.get("protocol") or {})
    protocol.update(steps=steps, warmup=warmup, timeout_s=timeout, reference="loraplan/data/h100-protocol.md")
    rec = {
        "schema": SCHEMA,
        "key": case_key(inputs),
        "label": case.label,
        "inputs": inputs,
        "status": result.get("status", "error"),
        "phase": result.get("phase"),
        "error": result.get("error"),
        "memory": result.get("memory") or {},
        "nvml": result.get("nvml") or ({"available": False, "reason": "--device cpu: NVML measures GPUs only"}
                                       if dev.device == "cpu" else {"available": False, "reason": "no result from the worker"}),
        "time": result.get("time") or {},
        "params": result.get("params"),
        "env": result.get("env") or {"device": dev.device, "gpu_name": dev.name},
        "protocol": protocol,
        "estimate": est,
        "estimate_gpu": est_gpu,
        "estimate_error": est_why,
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": result.get("wall_s"),
    }
    if result.get("kernels") is not None:
        rec["kernels"] = result["kernels"]
    if dev.device == "cpu":
        rec["comparable"] = ("--device cpu: the measurement counts live tensor bytes on the CPU; 'estimate' is the "
                             "CPU-target estimate" + ("; 'trace' is a CUDA figure and not comparable with it"
                                                      if trace is not None else ""))
    if trace is not None:
        rec["trace"] = trace
    for k in ("traceback", "stderr_tail"):
        if result.get(k):
            rec[k] = result[k]
    return rec


def rank_estimate(est: dict | None, rank: int) -> tuple[dict | None, str | None]:
    """(the estimate of one rank, why absent): the rank's ledger ``memory.per_gpu[rank]`` (its
    components sum to that rank's peak) and the estimate's time; None when the estimate has no
    per-GPU ledger."""
    if est is None:
        return None, "no estimate"
    per = (est.get("memory") or {}).get("per_gpu") or {}
    comp = per.get(str(rank), per.get(rank)) if isinstance(per, dict) else None
    if not isinstance(comp, dict):
        return None, "the estimate has no per-GPU ledger (memory.per_gpu) for this rank"
    return {"memory": {"peak_allocated_bytes": int(sum(v for v in comp.values() if isinstance(v, (int, float)))),
                       "components": comp, "rank": rank},
            "time": est.get("time")}, None


def make_distributed_records(case: Case, dev: DeviceInfo, results: dict[int, dict], launcher: dict, *, steps: int,
                             warmup: int, timeout: float, trace: dict | None = None) -> list[dict]:
    """The records of a multi-GPU case: one per rank, then the summary (records.py's layout
    note); ``results`` from :func:`run_distributed`. The summary carries the whole estimate
    (its top-level peak is the worst rank's) and the trace; each rank record its rank's ledger."""
    import uuid

    from .distributed import summarise
    from .records import RANK, SUMMARY, rank_key

    n = int(case.train.num_gpus)
    estimated = estimate_for(case, dev)
    run = uuid.uuid4().hex[:12]
    recs = []
    for rank in sorted(results):
        rec = make_record(case, dev, results[rank], steps=steps, warmup=warmup, timeout=timeout, estimated=estimated)
        rec["estimate"], rank_why = rank_estimate(estimated[0], rank)
        rec["estimate_error"] = estimated[2] or rank_why
        case_k = rec["key"]
        rec.update(key=rank_key(rec["inputs"], rank), label=f"{case.label} rank {rank}", record=RANK, rank=rank,
                   world_size=n, case_key=case_k, run=run)
        recs.append(rec)
    sm = summarise(results, n)
    lead = results.get(0) or next(iter(results.values()), {})
    worst = sm["memory"].get("worst_rank")
    nv = (results.get(worst) or {}).get("nvml") if worst is not None else None
    summary_result = {**sm, "params": lead.get("params"), "env": lead.get("env"),
                      "protocol": dict(lead.get("protocol") or {}, launcher=launcher),
                      "nvml": nv, "wall_s": launcher.get("wall_s")}
    summ = make_record(case, dev, summary_result, steps=steps, warmup=warmup, timeout=timeout, trace=trace,
                       estimated=estimated)
    summ.update(record=SUMMARY, world_size=n, run=run,
                ranks=[{"rank": r["rank"], "key": r["key"], "status": r["status"], "phase": r["phase"],
                        "peak_allocated_bytes": (r.get("memory") or {}).get("peak_allocated_bytes")} for r in recs])
    return recs + [summ]


# ---- the sweep --------------------------------------------------------------------------

class _Signals:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread, so the run ends through
    its ``finally`` blocks (worker group killed, temp folder removed, locks released) rather than
    where it stands; inside :meth:`held` (a finished measurement being written) they wait."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self) -> None:
        self.holding = 0
        self.pending: int | None = None

    def _handler(self, signum, frame) -> None:
        if self.holding:
            self.pending = signum
        else:
            raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def held(self):
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if not self.holding and self.pending is not None:
            raise SystemExit(128 + self.pending)


def _write_or_keep(path: Path, rec: dict, label: str) -> None:
    """Append ``rec``; when that fails, keep it in a recovery file and raise RecordsError saying where."""
    try:
        append_record(path, rec)
        return
    except OSError as e:
        why = e.strerror or str(e)
    try:
        kept = keep_record(path, rec)
    except OSError as e2:
        import json as _json

        raise RecordsError(f"could not append to {path} ({why}) nor write a recovery file ({e2.strerror or e2}); "
                           f"the measurement of '{label}' is this record: "
                           f"{_json.dumps(rec, separators=(',', ':'), default=str)}") from None
    raise RecordsError(f"could not append to {path} ({why}); the measurement of '{label}' is kept in {kept} and "
                       f"the next run on {path} adds it back; free space or fix permissions, then run again") from None


def profile(cases: list[Case], dev: DeviceInfo, *, out: str | Path | None = None, force: bool = False,
            steps: int = 6, warmup: int = 2, timeout: float = 600.0, cache_dir: str | None = None,
            on_event: OnEvent | None = None, on_warning: Callable[[str], None] | None = None,
            python: str | None = None, trace: bool = False, trace_timeout: float = 300.0,
            kernel_summary: bool | None = None) -> list[CaseResult]:
    """Run every case not yet recorded in ``out`` (default profiles/<gpu-id>.jsonl); append records.

    ``trace``: after each burst also run the meta-device trace of the case (its CUDA step on the
    estimate's GPU) and keep it in the record under ``trace``. ``kernel_summary``: one more step
    under torch.profiler, summarised per kernel class in the record's ``kernels``
    (``profile.kernels``); None: on CUDA only.

    Before any burst: RecordsError when ``out`` cannot be written, ProfileBusyError when another
    run holds ``out`` (or, on CUDA, the GPU), HostMemoryError when a --device cpu case's weights
    exceed the host RAM. A record that cannot be appended after its burst is kept in a recovery
    file (RecordsError names it) and added back by the next run.
    """
    on_event = on_event or (lambda ev: None)
    warn = on_warning or (lambda m: None)
    path = Path(out) if out else default_out_path(dev.gpu_id)
    check_writable(path)
    sig = _Signals()
    with contextlib.ExitStack() as stack:
        stack.enter_context(sig.installed())
        stack.enter_context(records_lock(path, warn))
        if dev.device == "cuda":
            stack.enter_context(device_lock(device_key(dev.probe.get("uuid")), dev.name, warn))
        remove_stale_temp_dirs()
        try:
            for rp, n, removed in merge_recovered(path):
                warn(f"added {n} record(s) to {path} from {rp}, kept there after an earlier write failure"
                     + ("" if removed else f"; {rp} has unreadable lines and is left in place"))
        except OSError as e:
            raise RecordsError(f"could not add the records kept after an earlier write failure to {path} "
                               f"({e.strerror or e}); they stay where they are; free space or fix permissions, "
                               f"then run again") from None
        return _sweep(cases, dev, path, sig, force=force, steps=steps, warmup=warmup, timeout=timeout,
                      cache_dir=cache_dir, on_event=on_event, warn=warn, python=python, trace=trace,
                      trace_timeout=trace_timeout, kernel_summary=kernel_summary)


def _sweep(cases: list[Case], dev: DeviceInfo, path: Path, sig: _Signals, *, force: bool, steps: int, warmup: int,
           timeout: float, cache_dir: str | None, on_event: OnEvent, warn: Callable[[str], None],
           python: str | None, trace: bool, trace_timeout: float,
           kernel_summary: bool | None = None) -> list[CaseResult]:
    """profile()'s loop, run with the records file locked."""
    existing = read_records(path)
    for msg in existing.messages():
        warn(msg)
    done = existing.keys
    by_key = {r.get("key"): r for r in existing.records}
    keys = [case_key(case_inputs(case, dev)) for case in cases]
    check_host_memory([c for c, k in zip(cases, keys) if force or k not in done], dev)
    results: list[CaseResult] = []
    n = len(cases)
    on_event({"ev": "start", "n": n, "path": str(path)})
    for i, (case, key) in enumerate(zip(cases, keys), start=1):
        if key in done and not force:
            results.append(CaseResult(case, key, by_key.get(key), skipped=True))
            on_event({"ev": "skip", "i": i, "n": n, "label": case.label, "key": key})
            continue
        on_event({"ev": "case_start", "i": i, "n": n, "label": case.label, "key": key})
        spec = worker_spec(case, dev, steps, warmup, cache_dir, kernel_summary)
        multi = is_distributed(case.train)
        if multi:
            by_rank, launcher = run_distributed(spec, int(case.train.num_gpus), timeout, on_event, python=python)
        else:
            result = run_worker(spec, timeout, on_event, python=python)
        tr, stop = None, None
        if trace:
            on_event({"ev": "phase", "phase": "trace"})
            try:
                tr = trace_for(case, dev, trace_timeout)
            except (SystemExit, KeyboardInterrupt) as e:  # stopped while tracing: keep the measurement, then stop
                stop = e
                tr = {"error": f"the run was stopped ({type(e).__name__}) before the trace finished",
                      "gpu": estimate_gpu_id(case, dev)}
        with sig.held():
            if multi:
                recs = make_distributed_records(case, dev, by_rank, launcher, steps=steps, warmup=warmup,
                                                timeout=timeout, trace=tr)
                rec = recs[-1]
                _write_or_keep(path, recs, case.label)
            else:
                rec = make_record(case, dev, result, steps=steps, warmup=warmup, timeout=timeout, trace=tr)
                _write_or_keep(path, rec, case.label)
        if stop is not None:
            raise stop
        done.add(key)
        results.append(CaseResult(case, key, rec))
        on_event({"ev": "case_end", "i": i, "n": n, "label": case.label, "record": rec})
    return results


def measured_peak(rec: dict) -> int | None:
    mem = rec.get("memory") or {}
    return mem.get("peak_allocated_bytes")


def estimated_peak(rec: dict) -> int | None:
    est = rec.get("estimate") or {}
    return (est.get("memory") or {}).get("peak_allocated_bytes")


def traced_peak(rec: dict) -> int | None:
    tr = rec.get("trace") or {}
    return tr.get("peak_allocated_bytes") if "error" not in tr else None
