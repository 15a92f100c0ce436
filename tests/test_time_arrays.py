"""The step-time model on numpy arrays (what ``loraplan sweep`` uses) equals it case by case."""

import subprocess
import sys
from dataclasses import replace

import pytest

from loraplan.catalog import load_calibration, load_gpu
from loraplan.case import resolve_case
from loraplan.estimate.time import coefficients, step_time, step_work

np = pytest.importorskip("numpy")

CASES = [
    dict(model="llama-2-7b", quant="nf4"),
    dict(model="llama-2-7b", quant="int8", targets="all-linear"),
    dict(model="flan-t5-base", quant="bf16", targets="all-linear", gradient_checkpointing=False),
    dict(model="mistral-7b", quant="bf16"),           # sliding window 4096: min(seq, window)
    dict(model="gemma-2-2b", quant="fp32"),           # eager attention
    dict(model="opt-6.7b", quant="fp4", double_quant=False, optimizer="adamw_8bit"),
    dict(model="llama-3.2-1b", quant="fp16", attention="math", targets="all-linear,lm_head"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['model']}-{c['quant']}")
@pytest.mark.parametrize("gpu_id", ["h100-sxm-80gb", "t4-16gb"])
def test_array_step_time_equals_scalar(case, gpu_id):
    model, lora, train = resolve_case(case)
    gpu = load_gpu(gpu_id)
    coef = coefficients(load_calibration(gpu.id))
    b = np.array([1, 2, 4, 8, 3, 1])
    s = np.array([512, 1024, 256, 8192, 4097, 16])
    ts = np.array([64, 512, 1024, 128, 7, 16]) if train.target_seq is not None else None
    r = np.array([8, 16, 64, 256, 1, 8])
    d = np.array([0.05, 0.0, 0.1, 0.05, 0.0, 0.3])
    work = step_work(model, replace(lora, rank=r, dropout=d), replace(train, batch=b, seq=s, target_seq=ts))
    t = step_time(work, gpu, coef)
    assert np.shape(t.step_s) == np.shape(t.tokens_per_s) == np.shape(t.bound) == (6,)
    for i in range(6):
        one = step_work(model, replace(lora, rank=int(r[i]), dropout=float(d[i])),
                        replace(train, batch=int(b[i]), seq=int(s[i]), target_seq=None if ts is None else int(ts[i])))
        for name, v in work.features().items():
            assert (v[i] if np.ndim(v) else v) == pytest.approx(one.features()[name], rel=1e-12), name
        assert (work.mm_dtype, work.syncs) == (one.mm_dtype, one.syncs)
        t1 = step_time(one, gpu, coef)
        assert t.step_s[i] == pytest.approx(t1.step_s, rel=1e-9)
        assert t.tokens_per_s[i] == pytest.approx(t1.tokens_per_s, rel=1e-9)
        assert t.bound[i] == t1.bound
        for k, v in t.components.items():
            assert (v[i] if np.ndim(v) else v) == pytest.approx(t1.components[k], rel=1e-9), k
        # a subset of an array StepWork is the work of those cases
        assert work.take([i]).features()["bytes_moved"][0] == pytest.approx(one.bytes_moved, rel=1e-12)


def test_scalar_path_stays_plain_python():
    """One case stays ints/floats/str (no numpy types) and does not import numpy."""
    code = ("import sys; from loraplan.case import resolve_case; "
            "from loraplan.estimate.time import step_work, step_time, coefficients; "
            "from loraplan.catalog import load_gpu, load_calibration; "
            "m, l, t = resolve_case({'model': 'mistral-7b', 'seq': 8192, 'dropout': 0.0}); g = load_gpu('l4-24gb'); "
            "w = step_work(m, l, t); r = step_time(w, g, coefficients(load_calibration(g.id))); "
            "assert type(r.step_s) is float and type(r.bound) is str and type(w.ops) in (int, float), r; "
            "assert 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
