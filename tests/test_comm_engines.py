"""The analytic collective sizes (estimate/comm.py) against the real engines: DDP and FSDP2 run on
tiny-llama under torch's fake process group (world size 2, one CPU process; tests/_engine_collectives.py
records every all-reduce bucket, all-gather and reduce-scatter). Bytes and calls must be equal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraplan.case import resolve_case
from loraplan.estimate import comm

pytest.importorskip("torch")
pytest.importorskip("peft")

SCRIPT = Path(__file__).with_name("_engine_collectives.py")
CASES = {
    "ddp": {"strategy": "ddp"},
    "fsdp2": {"strategy": "fsdp", "fsdp_version": 2},
    "fsdp2_sgo": {"strategy": "fsdp", "fsdp_sharding": "shard-grad-op", "fsdp_version": 2},
    "fsdp2_mp": {"strategy": "fsdp", "mixed_precision": "bf16", "trainer": "hf", "fsdp_version": 2},
}


@pytest.fixture(scope="module")
def measured():
    p = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_collective_bytes_and_calls_equal_the_engines(measured, name):
    m, lora, t = resolve_case({"model": "tiny-llama", "quant": "bf16", "rank": 8, "targets": "q_proj,v_proj",
                               "batch": 2, "seq": 128, "num_gpus": 2,
                               "gradient_checkpointing": False, **CASES[name]})
    got: dict[str, list] = {}
    for c in comm.collectives(m, lora, t):
        g = got.setdefault(c.op, [0, 0])
        g[0] += c.bytes_per_step
        g[1] += c.calls
    assert {k: [int(b), int(n)] for k, (b, n) in got.items()} == measured[name]
