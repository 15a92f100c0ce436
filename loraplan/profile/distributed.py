"""Multi-GPU bursts (``loraplan profile --strategy ddp|fsdp|fsdp-offload --num-gpus N``): the
torchrun launch (parent side, pure Python) and the per-rank worker (torch).

The parent runs ``python -m torch.distributed.run --standalone --nproc-per-node N
-m loraplan.profile.distributed --spec SPEC --result-dir DIR`` in its own process group
(:func:`launch_command`). Each rank (:func:`main`) joins the process group (nccl on CUDA, gloo
on the CPU: torch/distributed/distributed_c10d.py::init_process_group, the env:// rendezvous
torchrun sets up), lets rank 0 build the cached random-weight checkpoint while the others wait,
and runs the same burst as a one-GPU case (``loraplan.profile.burst.run_burst``) on CUDA device
``LOCAL_RANK`` with the model handed to the engine after LoRA (:func:`wrap_model`). Every rank
writes ``DIR/result-<rank>.json`` (atomically); a rank whose burst fails (OOM, error) writes its
result and exits 1, so torchrun's agent stops the others instead of leaving them in a collective.
Progress lines carry ``"rank"``.

Engines (``wrap_model``), as the libraries build them:

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank])`` (no
  device_ids on the CPU) with torch's defaults, which are also accelerate's
  ``DistributedDataParallelKwargs``: bucket_cap_mb 25 (first bucket 1 MiB,
  ``dist._DEFAULT_FIRST_BUCKET_BYTES``), find_unused_parameters False, gradient_as_bucket_view
  False. The plain loop all-reduces at every micro-step (it does not call ``no_sync``).
- ``fsdp``/``fsdp-offload`` with ``fsdp_version`` 2 (``fully_shard``, torch/distributed/fsdp/
  _fully_shard/_fully_shard.py): the units accelerate builds in
  accelerate/utils/fsdp_utils.py::fsdp2_prepare_model: each decoder layer (the model's
  ``_no_split_modules`` classes, bottom-up), the input embedding, the tail [final norm, output
  embedding] with ``reshard_after_forward=False``, then the root with torch's default.
  ``reshard_after_forward`` of the layers: True for ``--fsdp-sharding full`` and ``hybrid``,
  False for ``shard-grad-op``; ``hybrid``: a 2-D mesh (nodes, GPUs per node) of (replicate,
  shard); ``fsdp-offload``: ``CPUOffloadPolicy()``. No ``MixedPrecisionPolicy`` (the loop runs
  its forward under ``torch.autocast``), and the trainable (adapter) dtype is left as the recipe
  made it (FSDP2 needs it uniform within a unit: _fsdp_param_group.py::_init_mp_dtypes).
- ``fsdp`` with ``fsdp_version`` 1 (``FullyShardedDataParallel``, flat parameters): PEFT's
  ``utils/other.py::fsdp_auto_wrap_policy`` (decoder layers and every leaf with a trainable
  weight) and accelerate's ``FullyShardedDataParallelPlugin`` defaults: use_orig_params False
  unless given, limit_all_gathers True, no forward prefetch, sync_module_states False;
  ``ShardingStrategy`` FULL_SHARD / SHARD_GRAD_OP / HYBRID_SHARD; ``CPUOffload(offload_params=True)``
  for fsdp-offload. ``fsdp_version``, ``use_orig_params`` and ``backward_prefetch``
  (``--fsdp-backward-prefetch``) come from the resolved recipe
  (``loraplan.trainers.resolve_recipe``: the trainer's defaults, data/trainers.json).

Refused before any burst (:func:`check_cases`, one line with the fix): DeepSpeed ZeRO (not
installed, and it needs CUDA), ``device-map`` (one process over several GPUs, not a torchrun
job), ``--nodes`` > 1 (torchrun here starts the ranks of one machine), Trainer/SFTTrainer
bursts (they build their own engine through accelerate), a 4-bit base under FSDP without a
float ``--quant-storage``, int8 under FSDP, more ranks than CUDA devices, and
``--strategy single`` with several GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from typing import Any

#: strategies a burst can run under torchrun
ENGINES = ("ddp", "fsdp", "fsdp-offload")
#: the DeepSpeed strategies (not runnable here)
ZERO = ("zero1", "zero2", "zero3", "zero3-offload")
RESULT_NAME = "result-{rank}.json"
#: test hook: only this rank gets ``burst.FAULT_ENV`` (unset: every rank)
FAULT_RANK_ENV = "LORAPLAN_PROFILE_FAULT_RANK"


# ---- parent side (no torch) -----------------------------------------------------------------

def is_distributed(train) -> bool:
    """A case that runs as a torchrun job: any strategy but ``single``, or several GPUs."""
    return getattr(train, "strategy", "single") != "single" or int(getattr(train, "num_gpus", 1)) > 1


def backend(device: str) -> str:
    """The process-group backend: nccl on CUDA, gloo on the CPU."""
    return "nccl" if device == "cuda" else "gloo"


def check_cases(cases: list, device: str, cuda_count: int | None = None) -> None:
    """InputError (one line: the value and the fix) for a multi-GPU case a burst cannot run. What
    no engine can run (single on several GPUs, int8 sharded, 4-bit with uint8 storage, ...) is
    refused earlier, when the case resolves (``trainers.check_parallel``)."""
    import importlib.util

    from ..errors import InputError

    for c in cases:
        t = c.train
        if not is_distributed(t):
            continue
        n = int(t.num_gpus)
        if t.strategy in ZERO:
            why = ("deepspeed is not installed" if importlib.util.find_spec("deepspeed") is None
                   else "the profile runs DDP and FSDP bursts only")
            raise InputError(f"--strategy {t.strategy}: {why} (DeepSpeed ZeRO also needs CUDA); profile --strategy "
                             f"ddp or fsdp, or estimate {t.strategy} with 'loraplan estimate --strategy {t.strategy}'")
        if t.strategy == "device-map":
            raise InputError("--strategy device-map splits the model over GPUs in one process, which is not a "
                             "torchrun job; estimate it with 'loraplan estimate --strategy device-map', or profile "
                             "--strategy ddp or fsdp")
        if int(t.nodes) > 1:
            raise InputError(f"--nodes {t.nodes}: 'loraplan profile' starts the ranks of this machine only; use "
                             f"--nodes 1 (and --num-gpus at most this machine's GPUs)")
        if t.trainer != "loop":
            raise InputError(f"--trainer {t.trainer} with --strategy {t.strategy}: the Trainer builds its own engine "
                             f"through accelerate, which a burst does not configure; use --trainer loop")
        if device == "cuda" and cuda_count is not None and n > cuda_count:
            raise InputError(f"--num-gpus {n}: this machine has {cuda_count} CUDA device(s); use --num-gpus "
                             f"{cuda_count} or fewer")
        if device == "cpu" and t.strategy == "fsdp-offload":
            raise InputError("--strategy fsdp-offload on --device cpu: the parameters already live in host memory; "
                             "use --strategy fsdp, or --device cuda")


def launch_command(nprocs: int, spec_path: str, result_dir: str, python: str | None = None) -> list[str]:
    """torchrun's command line (``python -m torch.distributed.run``: torch/distributed/run.py):
    one machine (``--standalone``: a local rendezvous on a free port), ``nprocs`` ranks, no
    restarts (a failed rank ends the job)."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nprocs)}",
            "--max-restarts=0", "-m", "loraplan.profile.distributed", "--spec", spec_path, "--result-dir", result_dir]


def read_rank_results(result_dir: str, nprocs: int) -> dict[int, dict]:
    """{rank: burst result} for the ranks that wrote one."""
    out = {}
    for rank in range(nprocs):
        p = os.path.join(result_dir, RESULT_NAME.format(rank=rank))
        if os.path.exists(p):
            try:
                with open(p) as f:
                    out[rank] = json.load(f)
            except (OSError, json.JSONDecodeError):
                pass
    return out


def missing_rank_result(rank: int, phase: str | None, mem_phases: dict, why: str) -> dict:
    """The result of a rank that wrote none (killed, crashed, stopped by torchrun, timed out)."""
    return {"status": "error", "phase": phase or "start", "error": why, "memory": {"phases": mem_phases or {}}}


STATUS_ORDER = ("oom", "error", "timeout", "ok")

#: one failure of torchrun's failure table (torch/distributed/elastic/multiprocessing/errors/
#: __init__.py::_FAILURE_FORMAT_TEMPLATE): "rank      : 1 (local_rank: 1)" then "exitcode  : -9 (pid: ...)"
_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
_ROOT = "Root Cause (first observed failure):"


def torchrun_failures(stderr: str) -> tuple[int | None, dict[int, int]]:
    """(the rank torchrun saw fail first, {rank: exit code} of every failed rank) from the last
    failure table in torchrun's stderr (ChildFailedError.format_msg); (None, {}) when none."""
    at = stderr.rfind(_ROOT)
    if at < 0:
        return None, {}
    start = stderr.rfind("Failures:", 0, at)
    codes = {int(r): int(c) for r, c in _FAILURE.findall(stderr[start if start >= 0 else at:])}
    m = _FAILURE.search(stderr[at:])
    return (int(m.group(1)) if m else None), codes


def summarise(results: dict[int, dict], world_size: int) -> dict:
    """What the summary record measured over the ranks: status, error and phase of the rank that
    failed first (torchrun's root cause, marked ``root_cause``; else the worst status of oom,
    error, timeout; ok when every rank is ok), the worst rank's peaks, the mean of the
    ranks' median step times, tokens per step and per second over all ranks (each rank trains
    its own micro-batches)."""
    ranks = sorted(results)
    statuses = {r: results[r].get("status", "error") for r in ranks}
    bad = [r for r in ranks if statuses[r] != "ok"]
    # the rank that failed first (torchrun's root cause) explains the others; else the worst status
    first = min(bad, key=lambda r: (not results[r].get("root_cause"),
                                    STATUS_ORDER.index(statuses[r]) if statuses[r] in STATUS_ORDER else 0, r)) \
        if bad else None
    status = statuses[first] if first is not None else "ok"
    peaks = {r: (results[r].get("memory") or {}).get("peak_allocated_bytes") for r in ranks}
    known = {r: p for r, p in peaks.items() if p is not None}
    worst = max(known, key=lambda r: (known[r], -r)) if known else None
    mem: dict[str, Any] = {"peak_allocated_bytes": known[worst] if worst is not None else None,
                           "worst_rank": worst, "per_rank_peak_allocated_bytes": {str(r): peaks[r] for r in ranks}}
    for k in ("peak_reserved_bytes", "peak_active_bytes", "process_peak_allocated_bytes", "tracker_peak_bytes"):
        vals = [(results[r].get("memory") or {}).get(k) for r in ranks]
        vals = [v for v in vals if v is not None]
        if vals:
            mem[k] = max(vals)
    mem["source"] = (results[ranks[0]].get("memory") or {}).get("source") if ranks else None
    tm: dict[str, Any] = {}
    meds = [(results[r].get("time") or {}).get("step_s_median") for r in ranks]
    toks = [(results[r].get("time") or {}).get("tokens_per_step") for r in ranks]
    if ranks and all(m is not None for m in meds):
        mean = sum(meds) / len(meds)
        tm = {"step_s_median": mean, "step_s_median_per_rank": {str(r): m for r, m in zip(ranks, meds)},
              "step_s_median_max": max(meds), "aggregate": "mean over ranks of each rank's median step time"}
        if all(t is not None for t in toks):
            total = sum(toks)
            tm.update(tokens_per_step=total, tokens_per_s=total / mean if mean > 0 else None)
    out = {"status": status, "phase": results[first].get("phase") if first is not None else "done",
           "error": (f"rank {first}: {results[first].get('error')}" if first is not None else None),
           "memory": mem, "time": tm, "world_size": world_size,
           "ranks_reported": len(ranks)}
    return out


# ---- rank side (torch) ------------------------------------------------------------------------

def _decoder_layer_classes(model) -> tuple:
    """The classes of the model's ``_no_split_modules`` (its decoder/encoder layers), found among
    its modules (accelerate's get_module_class_from_name)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names |= set(getattr(inner, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def _final_norm(model):
    """accelerate fsdp_utils.py::_find_final_norm: the last child of the base transformer whose
    class name has "Norm"."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(inner, "base_model_prefix", "")
    base = getattr(inner, prefix, None) if prefix else inner
    found = None
    if base is not None:
        for _, m in base.named_children():
            if "Norm" in type(m).__name__:
                found = m
    return found


def _mesh(dist: dict, device: str):
    from torch.distributed.device_mesh import init_device_mesh

    world, nodes = int(dist["world_size"]), max(1, int(dist.get("nodes") or 1))
    dev = "cuda" if device == "cuda" else "cpu"
    if dist.get("fsdp_sharding") == "hybrid":
        return init_device_mesh(dev, (nodes, world // nodes), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(dev, (world,))


def wrap_model(model, dist: dict, r, device: str, cuda_index: int = 0):
    """(the model the steps run, what the record's protocol says about the engine); see the
    module docstring for each engine."""
    import torch

    strategy = dist["strategy"]
    info: dict[str, Any] = {"strategy": strategy, "world_size": int(dist["world_size"]), "backend": dist["backend"]}
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[cuda_index] if device == "cuda" else None)
        info.update(engine="DistributedDataParallel", bucket_cap_mb=25, find_unused_parameters=False,
                    gradient_as_bucket_view=False)
        return wrapped, info
    if strategy not in ("fsdp", "fsdp-offload"):
        raise RuntimeError(f"--strategy {strategy}: a burst wraps ddp, fsdp and fsdp-offload only")
    # the resolved recipe's values (loraplan.trainers.resolve_recipe fills the trainer's defaults
    # under an FSDP strategy)
    version, orig_params = int(r.fsdp_version), bool(r.use_orig_params)
    sharding = dist.get("fsdp_sharding") or "full"
    offload = strategy == "fsdp-offload"
    layers = _decoder_layer_classes(model)
    if version == 2:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

        kw = {"mesh": _mesh(dist, device), "reshard_after_forward": sharding != "shard-grad-op",
              "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
        units = 0
        for m in reversed(list(model.modules())):  # bottom-up, as get_module_children_bottom_up
            if layers and isinstance(m, layers) and not isinstance(m, FSDPModule):
                fully_shard(m, **kw)
                units += 1
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = emb is not None and out is not None and getattr(emb, "weight", None) is getattr(out, "weight", 0)
        if emb is not None and not tied and not isinstance(emb, FSDPModule):
            fully_shard(emb, **kw)
            units += 1
        tail = [m for m in ((_final_norm(model), emb, out) if tied else (_final_norm(model), out))
                if m is not None and not isinstance(m, FSDPModule)]
        if tail:
            fully_shard(tail, **{**kw, "reshard_after_forward": False})
            units += 1
        root = {k: v for k, v in kw.items() if k != "reshard_after_forward"}
        fully_shard(model, **root)
        info.update(engine="fully_shard", fsdp_version=2, units=units + 1, reshard_after_forward=kw["reshard_after_forward"],
                    offload_policy=type(kw["offload_policy"]).__name__, mesh=list(kw["mesh"].shape))
        return model, info
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, FullyShardedDataParallel, ShardingStrategy

    strat = {"full": ShardingStrategy.FULL_SHARD, "shard-grad-op": ShardingStrategy.SHARD_GRAD_OP,
             "hybrid": ShardingStrategy.HYBRID_SHARD}[sharding]
    kw = dict(auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=strat,
              cpu_offload=CPUOffload(offload_params=offload), use_orig_params=orig_params,
              limit_all_gathers=True, forward_prefetch=False, sync_module_states=False,
              backward_prefetch={"none": None, "backward-pre": BackwardPrefetch.BACKWARD_PRE,
                                 "backward-post": BackwardPrefetch.BACKWARD_POST}[r.fsdp_backward_prefetch],
              device_id=torch.device("cuda", cuda_index) if device == "cuda" else torch.device("cpu"))
    if sharding == "hybrid":
        kw["device_mesh"] = _mesh(dist, device)
    wrapped = FullyShardedDataParallel(model, **kw)
    info.update(engine="FullyShardedDataParallel", fsdp_version=1, sharding_strategy=strat.name,
                use_orig_params=kw["use_orig_params"], cpu_offload=offload, backward_prefetch=r.fsdp_backward_prefetch,
                units=sum(1 for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)))
    return wrapped, info


@contextlib.contextmanager
def follow_storage_resizes(tracker):
    """While open, a resize of a tracked storage (``UntypedStorage.resize_``) is followed by
    ``tracker`` (its ``_resync_storage``: the new size replaces the old). FSDP frees an unsharded
    parameter or gradient by resizing its storage to 0 bytes and re-allocates it the same way
    (FSDP2 _fully_shard/_fsdp_param.py::free_storage / alloc_storage; FSDP1
    torch/distributed/utils.py::_free_storage / _alloc_storage through TypedStorage._resize_), a
    call that reaches no TorchDispatchMode: without this, a CPU rank's live-tensor count would
    keep every unsharded parameter alive. (On CUDA the caching allocator sees the frees.)"""
    import torch

    cls = torch.UntypedStorage
    orig = cls.resize_

    def resize_(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        try:
            if tracker.is_tracked_storage(self) if hasattr(tracker, "is_tracked_storage") else \
                    self._cdata in tracker._live:
                tracker._resync_storage(self)
        except Exception:  # noqa: BLE001 - accounting must never break the step
            pass
        return out

    cls.resize_ = resize_
    try:
        yield tracker
    finally:
        cls.resize_ = orig


def _emit_for(rank: int):
    from .worker import emit

    def e(ev: dict) -> None:
        emit({**ev, "rank": rank})

    return e


def _watch(runner_pid: int | None) -> None:
    """Exit when torchrun's agent (our parent) or the loraplan run that started it dies."""
    ppid = os.getppid()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def loop():
        while True:
            time.sleep(0.5)
            if os.getppid() != ppid or (runner_pid and not alive(runner_pid)):
                os._exit(3)

    threading.Thread(target=loop, name="loraplan-rank-watch", daemon=True).start()


def main(argv=None) -> int:
    """One rank: join the process group, run the burst, write result-<rank>.json; exit 1 when
    the burst failed (torchrun then stops the other ranks)."""
    import argparse
    import warnings
    from datetime import timedelta

    ap = argparse.ArgumentParser(prog="python -m loraplan.profile.distributed")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--result-dir", required=True)
    a = ap.parse_args(argv)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    runner = os.environ.get("LORAPLAN_PARENT_PID")
    _watch(int(runner) if runner and runner.isdigit() else None)
    want = os.environ.get(FAULT_RANK_ENV)
    if want is not None and want.strip() != str(rank):
        from .burst import FAULT_ENV

        os.environ.pop(FAULT_ENV, None)
    with open(a.spec) as f:
        spec = json.load(f)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    emit = _emit_for(rank)
    import torch
    import torch.distributed as tdist

    from .burst import ensure_model, has_weights, run_burst
    from .worker import _write_atomic

    device = spec.get("device", "cuda")
    be = backend(device)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    # the build of a cached checkpoint (minutes for a 7B) happens between two barriers
    tdist.init_process_group(be, timeout=timedelta(seconds=max(1800.0, float(spec.get("timeout") or 0))),
                             **({"device_id": torch.device("cuda", local_rank)} if device == "cuda" else {}))
    train = spec["train"]
    spec["distributed"] = {"rank": rank, "local_rank": local_rank, "world_size": world, "backend": be,
                           "strategy": train.get("strategy"), "nodes": train.get("nodes"),
                           "fsdp_sharding": train.get("fsdp_sharding")}
    mspec = spec["model"]
    if rank == 0 and not has_weights(mspec.get("path")):
        try:
            ensure_model(mspec["name"], mspec["config"], spec.get("cache_dir"), emit)
        except Exception:  # noqa: BLE001 - run_burst meets the same failure and records it
            pass
    tdist.barrier()
    res = run_burst(spec, emit)
    res["rank"], res["local_rank"], res["world_size"] = rank, local_rank, world
    _write_atomic(os.path.join(a.result_dir, RESULT_NAME.format(rank=rank)), res)
    emit({"ev": "end", "status": res.get("status")})
    if res.get("status") != "ok":
        sys.stdout.flush()
        os._exit(1)  # no destroy_process_group: the other ranks may sit in a collective
    try:
        tdist.barrier()
        tdist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
