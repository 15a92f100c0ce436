"""The black-box fuzzer (benchmarks/fuzz.py) on a few hundred fixed cases: no traceback, no hang,
no wrong success, no wrong refusal."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"
N, SEED = 300, 15


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("loraplan_fuzz", FUZZ)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_finds_nothing():
    fuzz = _fuzz_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fuzz.fuzz(N, SEED, timeout_s=10.0)
    found = [(case.what, verdict, detail) for case, verdict, detail in res["findings"]]
    assert not found, "\n".join(f"{v}: {w} -> {d}" for w, v, d in found[:20])
    assert res["counts"]["ok"] == N
