"""The training stack's physics checked by real steps, in CI, on CPU: for each recipe setting and
each trainer (the plain loop, the real transformers.Trainer, the real trl.SFTTrainer), the CPU
estimate (``loraplan.estimate.api.estimate`` with ``device='cpu'``) must land within 4% of the
peak a real burst measures (``loraplan.profile.burst.run_burst``: the live-tensor tracker in
512-byte blocks, as tests/test_cpu_ledger.py).

trl's fused chunked LM head is the exception: the analytic ledger models its CUDA (Triton) path,
while on CPU trl runs its torch tile fallback (trl/kernels/chunked_logprob.py::_forward_tile,
_backward_tile, _addmm_fp32's fp32 copies). For trl the CPU burst is checked against the meta
trace of that same fallback (``trace_step`` with ``device='cpu'``), and the analytic ledger against
the trace of the CUDA path in tests/test_recipe_loss.py: the three views still meet.

Run with ``-s`` to see every case's measured peak, estimate and error.
"""

import json
from dataclasses import replace

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("trl")

pytestmark = pytest.mark.slow

LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
         "max_position_embeddings": 1024, "tie_word_embeddings": False}
BASE = {"quant": "bf16", "targets": "q_proj,v_proj", "optimizer": "adamw", "gradient_checkpointing": True,
        "batch": 2, "seq": 128, "rank": 8}
LENGTHS = "40,90,128"

#: setting -> case options on top of BASE (CLI option names); the other recipe fields are the trainer's defaults
SETTINGS = {
    "mixed-precision-no": {"quant": "fp32", "mixed_precision": "no"},
    "mixed-precision-bf16": {"quant": "fp32", "mixed_precision": "bf16"},
    "reentrant": {"reentrant": True},
    "non-reentrant": {"reentrant": False},
    "accumulation-1": {"gradient_accumulation": 1},
    "accumulation-4": {"gradient_accumulation": 4},
    "clipping": {"max_grad_norm": 1.0},
    "padding-longest": {"padding": "longest", "lengths": LENGTHS},
    "padding-packing": {"padding": "packing", "lengths": LENGTHS},
    "nf4-prepare-kbit": {"quant": "nf4", "prepare_kbit": True},
    "nf4-no-prepare-kbit": {"quant": "nf4", "prepare_kbit": False},
    "adapters-bf16": {"adapter_dtype": "bf16"},
}
TRAINERS = ("loop", "hf", "trl")
CASES = [(t, s) for s in SETTINGS for t in TRAINERS]
TOLERANCE = 0.04
_RESULTS: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack-agreement") / "tiny-llama-128"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    return d


def _measure(model_dir, cache, trainer: str, setting: str) -> dict:
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.profile.burst import run_burst
    from loraplan.profile.runner import DeviceInfo, build_cases, worker_spec

    opts = dict(BASE, model=str(model_dir), trainer=trainer, **SETTINGS[setting])
    (case,) = build_cases([opts])
    dev = DeviceInfo("cpu", "cpu")
    res = run_burst(worker_spec(case, dev, steps=2, warmup=1, cache_dir=str(cache)))
    assert res["status"] == "ok", res.get("traceback") or res.get("error")
    gpu = "h100-sxm-80gb"
    measured = res["memory"]["peak_allocated_bytes"]
    if trainer == "trl":  # trl's torch tile fallback on CPU: the trace runs it (see the module docstring)
        from loraplan.trace.run import trace_step

        predicted = trace_step(LLAMA, case.lora, replace(case.train, device="cpu"), None)["peak_allocated_bytes"]
    else:
        est = estimate(case.model, case.lora, replace(case.train, device="cpu"), load_gpu(gpu), load_calibration(gpu))
        predicted = est.memory.peak_allocated_bytes
    return {"measured": measured, "estimate": predicted, "error": (predicted - measured) / measured}


@pytest.mark.parametrize("trainer,setting", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_cpu_estimate_matches_measured_peak(model_dir, tmp_path_factory, trainer, setting):
    cache = tmp_path_factory.getbasetemp() / "stack-agreement-models"
    r = _RESULTS[(trainer, setting)] = _measure(model_dir, cache, trainer, setting)
    print(f"\n{trainer:>4} {setting:<22} measured {r['measured']:>10,} B  estimate {r['estimate']:>10,} B  "
          f"error {100 * r['error']:+7.2f}%")
    assert abs(r["error"]) <= TOLERANCE, f"{trainer} {setting}: estimate {100 * r['error']:+.2f}% off the measured peak"
