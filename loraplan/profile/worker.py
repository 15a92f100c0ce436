"""``python -m loraplan.profile.worker``: runs one burst in a fresh process.

    python -m loraplan.profile.worker --spec SPEC.json --result RESULT.json
    python -m loraplan.profile.worker --probe          # prints the CUDA device as JSON

Progress goes to stdout as lines ``@@loraplan {json}`` (phases, per-phase memory, step
times); the result is written atomically to --result. The worker exits when its parent
dies, so a killed sweep leaves no orphan burst holding the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

MARK = "@@loraplan "


def emit(ev: dict) -> None:
    try:
        sys.stdout.write(MARK + json.dumps(ev, default=str) + "\n")
        sys.stdout.flush()
    except Exception:  # noqa: BLE001
        pass


def _watch_parent() -> None:
    """Exit when the sweep that started us dies: PR_SET_PDEATHSIG on Linux (immediate), and a
    thread that polls the parent pid everywhere (covers a parent that died before we got here)."""
    want = os.environ.get("LORAPLAN_PARENT_PID")
    ppid = int(want) if want and want.isdigit() else os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001
            pass
    if os.getppid() != ppid:
        os._exit(3)

    def loop():
        while True:
            time.sleep(0.5)
            if os.getppid() != ppid:
                os._exit(3)

    threading.Thread(target=loop, name="loraplan-parent-watch", daemon=True).start()


def _write_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def probe() -> dict:
    """What the parent needs before a CUDA sweep: is CUDA there, and which GPU is device 0."""
    out: dict = {"torch": None, "cuda_available": False}
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
        if out["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            out.update(name=props.name, total_bytes=int(props.total_memory), count=torch.cuda.device_count(),
                       compute_capability=f"{props.major}.{props.minor}",
                       uuid=str(getattr(props, "uuid", "") or "") or None)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loraplan.profile.worker")
    ap.add_argument("--spec")
    ap.add_argument("--result")
    ap.add_argument("--probe", action="store_true")
    a = ap.parse_args(argv)
    _watch_parent()
    if a.probe:
        print(json.dumps(probe()), flush=True)
        return 0
    with open(a.spec) as f:
        spec = json.load(f)
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .burst import run_burst

    res = run_burst(spec, emit)
    _write_atomic(a.result, res)
    emit({"ev": "end", "status": res.get("status")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
