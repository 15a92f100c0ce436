"""``python -m loraplan.trace.worker``: one trace, JSON in on stdin, JSON out on stdout.

In:  {"model_config": {...}, "lora": LoraSpec fields, "train": TrainSpec fields, "gpu_cc": "9.0", "steps": 2, "gpu_memory_bytes": null,
      "count_work": false, "rank": 0 (the rank of train.num_gpus to trace under a multi-GPU strategy)}
Out: {"result": trace_step's dict} or {"error": {"type": class name, "message": one line}} (exit 1).
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # libraries that print must not corrupt the JSON reply
    try:
        req = json.loads(sys.stdin.read())
        from ..spec import LoraSpec, TrainSpec
        from .run import trace_step

        lora = dict(req["lora"])
        lora["targets"] = tuple(lora["targets"]) if lora.get("targets") else None  # None: the family's default
        result = trace_step(req["model_config"], LoraSpec(**lora), TrainSpec(**req["train"]),
                            req.get("gpu_cc", "9.0"), int(req.get("steps", 2)),
                            gpu_memory_bytes=req.get("gpu_memory_bytes"), count_work=bool(req.get("count_work")),
                            rank=int(req.get("rank", 0)))
        reply, rc = {"result": result}, 0
    except Exception as e:  # noqa: BLE001 - every failure becomes one JSON line
        from ..errors import LoraplanError

        name = type(e).__name__ if isinstance(e, LoraplanError) else "TraceError"
        msg = str(e) if isinstance(e, LoraplanError) else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        reply, rc = {"error": {"type": name, "message": msg}}, 1
    real_stdout.write(json.dumps(reply) + "\n")
    real_stdout.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
