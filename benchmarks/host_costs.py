"""Measure the host (CPU) cost of a LoRA training step's dispatched ops and Python-level calls.

    nice python benchmarks/host_costs.py [--steps 8] [--json OUT] [--only ID] [--device cpu|cuda]

The H100 reference cases are host-bound (they reach at most ~18% of the GPU's peak), so their
step time is the CPU time of the Python and dispatcher work of one step. This benchmark runs
the very same step (the reference protocol of loraplan/data/h100-protocol.md: transformers model,
peft LoRA, bitsandbytes nf4, torch optimizer; forward, backward, step, zero_grad) **on the CPU
with tiny tensors** (hidden 64, 16 tokens), where the kernels themselves take about a
microsecond, so the step's wall time is its host overhead. The reference models keep their
layer counts and module structure (so the counts of ops and calls are those of the real
models); only the widths shrink.

Each variant's counts come from ``estimate.time.step_work`` on the same tiny config; the per-op,
per-LoRA-call and per-bitsandbytes-call costs are the least-squares solution over the variants
(the variants differ in which counts grow: adapted modules, checkpointing, quantization,
optimizer), so each cost is pinned by the variants that move its count. What a CPU run leaves
out, the CUDA launch itself (cudaLaunchKernel, the CUDA caching allocator and stream lookups), is
a separate sourced prior (loraplan/data/host-costs.json).

``--device cuda`` runs the same tiny steps on a GPU: the kernels still take about a microsecond,
so the step (wall time between ``torch.cuda.synchronize`` calls) is the host time of the CUDA
path, launches included; its solved costs replace ``cpu`` + ``cuda_launch_extra`` of
data/host-costs.json for that host (the one number the priors borrow from a publication).

Prints the CPU, the library versions, one row per variant (median step seconds and counts) and
the solved costs. Single-threaded (torch.set_num_threads(1)): a CUDA step's host work is one
Python thread plus autograd's device thread, never intra-op parallel CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loraplan.reference import REFERENCE_FILE  # noqa: E402

#: the widths a tiny variant keeps (the layer count, head structure and module tree stay the
#: reference model's): kernels on these shapes take ~1 us on a CPU, so the step is host-bound
TINY = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 512, "head_dim": 16}
BATCH, SEQ = 1, 16

#: variants: (model, quant, targets, gc, optimizer). Chosen so each count moves on its own:
#: qv -> all-linear moves the LoRA calls (and their ops / module calls); gc moves every forward
#: count; nf4 vs bf16 moves the bitsandbytes calls; sgd vs adamw the optimizer's ops
VARIANTS = [
    ("llama-2-7b", "bf16", "qv", False, "adamw"),
    ("llama-2-7b", "bf16", "all", False, "adamw"),
    ("llama-2-7b", "bf16", "qv", True, "adamw"),
    ("llama-2-7b", "bf16", "all", True, "adamw"),
    ("llama-2-7b", "nf4", "qv", False, "adamw"),
    ("llama-2-7b", "nf4", "qv", True, "adamw"),
    ("llama-2-7b", "nf4", "all", True, "adamw"),
    ("qwen2.5-0.5b", "bf16", "qv", True, "sgd"),
    ("qwen2.5-0.5b", "bf16", "all", False, "adamw"),
    ("open-llama-3b-v2", "nf4", "qv", True, "adamw"),
]
TARGETS = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def tiny_config(cfg: dict) -> dict:
    """The reference config with its widths shrunk (heads keep their count ratio)."""
    out = dict(cfg)
    n_h, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    heads = 4
    out.update(hidden_size=heads * TINY["head_dim"], intermediate_size=TINY["intermediate_size"],
               vocab_size=TINY["vocab_size"], num_attention_heads=heads,
               num_key_value_heads=max(1, heads * n_kv // n_h), head_dim=TINY["head_dim"],
               max_position_embeddings=max(SEQ, 64))
    out.pop("torch_dtype", None)
    out.pop("dtype", None)
    return out


def build(cfg: dict, quant: str, targets: list[str], gc: bool, folder: Path, device: str = "cpu"):
    """The reference protocol (h100-protocol.md steps 1-5) on the CPU."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    conf = AutoConfig.for_model(**cfg)
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).save_pretrained(folder)
    kw = {}
    if quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map={"": device if device == "cpu" else 0}, **kw)
    model.config.use_cache = False
    if quant == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                                             bias="none", task_type="CAUSAL_LM"))
    return model


def time_steps(model, optimizer: str, steps: int, device: str = "cpu") -> float:
    """Least CPU seconds of the process (``time.process_time``: other processes on a shared machine
    do not count; single-threaded, so it is the step's host time) of the protocol's step (h100-protocol.md step 7) after 2 warm-up steps."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if optimizer == "adamw" else torch.optim.SGD(params, lr=1e-4)
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ), device=device)
    cuda = device != "cpu"
    clock = time.perf_counter if cuda else time.process_time  # CUDA: wall time between synchronizes
    times = []
    for i in range(steps + 2):
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(clock() - t0)
    return min(times)


def counts(cfg: dict, name: str, quant: str, targets: list[str], gc: bool, optimizer: str):
    from loraplan.case import resolve_case
    from loraplan.estimate.time import step_work
    from loraplan.hf import spec_from_config

    model = spec_from_config(cfg, name)
    spec = resolve_case({"model": name, "quant": quant, "double_quant": False, "rank": 8, "alpha": 16,
                         "dropout": 0.05, "targets": ",".join(targets), "optimizer": optimizer,
                         "batch": BATCH, "seq": SEQ, "gradient_checkpointing": gc}, model=model)
    return step_work(*spec)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def solve(rows: list[dict]) -> dict:
    """Least squares on relative error: seconds = (ops + module_calls)·op + lora_calls·lora
    + bnb4_calls·bnb4 + gc_hooks·gc_hook (no intercept: a tiny step has no fixed cost the counts
    miss). Which variants pin which cost: op by all; lora by qv vs all-linear; bnb4 by nf4 vs bf16;
    gc_hook by gc vs no gc (the recompute's ops and LoRA calls are counted apart)."""
    A = np.array([[r["ops"] + r["module_calls"], r["lora_calls"], r["bnb4_calls"], r["gc_hooks"]] for r in rows], float)
    y = np.array([r["step_s"] for r in rows])
    x, *_ = np.linalg.lstsq(A / y[:, None], np.ones_like(y), rcond=None)
    pred = A @ x
    return {"op_s": x[0], "lora_call_s": x[1], "bnb4_call_s": x[2], "gc_hook_s": x[3],
            "errors": ((pred - y) / y).tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="run the variants whose id contains this")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    a = ap.parse_args(argv)
    import torch
    import transformers
    import peft
    import bitsandbytes

    torch.set_num_threads(1)
    ref = json.loads(Path(REFERENCE_FILE).read_text())
    print(f"CPU: {cpu_name()} ({platform.machine()}), python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, quant, tg, gc, optimizer in VARIANTS:
            vid = f"{name}-{quant}-{tg}-{'gc' if gc else 'nogc'}-{optimizer}"
            if a.only and a.only not in vid:
                continue
            cfg = tiny_config(ref["models"][name])
            model = build(cfg, quant, TARGETS[tg], gc, Path(tmp) / name, a.device)
            step_s = time_steps(model, optimizer, a.steps, a.device)
            w = counts(cfg, name, quant, TARGETS[tg], gc, optimizer)
            row = {"id": vid, "step_s": step_s, "ops": float(w.ops), "module_calls": float(w.module_calls),
                   "lora_calls": float(w.lora_calls), "bnb4_calls": float(w.bnb4_calls), "gc_hooks": float(w.gc_hooks)}
            rows.append(row)
            print(f"{vid:42s} {1e3 * step_s:8.2f} ms  ops {row['ops']:6.0f} module calls {row['module_calls']:5.0f} "
                  f"lora {row['lora_calls']:4.0f} bnb4 {row['bnb4_calls']:4.0f} gc hooks {row['gc_hooks']:5.0f}  "
                  f"{1e6 * step_s / (row['ops'] + row['module_calls']):5.1f} us per op+call", flush=True)
            del model
    sol = solve(rows) if len(rows) >= 3 else None
    if sol:
        print(f"per op or module call {1e6 * sol['op_s']:.2f} us; per peft LoRA call (extra) "
              f"{1e6 * sol['lora_call_s']:.1f} us; per bitsandbytes 4-bit call (extra) {1e6 * sol['bnb4_call_s']:.1f} us; "
              f"per checkpoint saved-tensor hook call {1e6 * sol['gc_hook_s']:.2f} us")
        print("fit errors: " + ", ".join(f"{100 * e:+.1f}%" for e in sol["errors"]))
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu_name(), "device": a.device, "torch": torch.__version__, "rows": rows,
                                            "solution": sol}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
