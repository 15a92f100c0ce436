"""The ledger's physics checked by real training steps, in CI, on CPU.

Real transformers + peft + bitsandbytes bursts of tiny llama/qwen2 configs run through
``loraplan profile --device cpu`` (a live-tensor tracker counts storage bytes in 512-B blocks,
as CUDA's allocator counts); each record carries loraplan's own estimate for the same inputs
with ``device="cpu"`` (math attention, unfused dropout noise, no cuBLAS workspaces, int8 via
MatMul8bitFp). The estimate must land within 4% of the measured peak in every case.
"""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
         "max_position_embeddings": 1024, "tie_word_embeddings": False}
QWEN2 = dict(LLAMA, model_type="qwen2", tie_word_embeddings=True)

# (config, quant, targets, optimizer, gradient checkpointing)
GRID = [
    (LLAMA, "bf16", "q_proj,v_proj", "adamw", True),
    (LLAMA, "nf4", "all-linear", "adamw", False),
    (LLAMA, "int8", "q_proj,v_proj", "adamw", True),
    (LLAMA, "int8", "all-linear", "sgd", False),
    (QWEN2, "bf16", "all-linear", "sgd", False),
    (QWEN2, "nf4", "q_proj,v_proj", "adamw", True),
]


@pytest.mark.slow
def test_estimate_matches_cpu_measured_peak(run_cli, tmp_path):
    from loraplan.profile.records import read_records

    out = tmp_path / "cpu.jsonl"
    for i, (cfg, quant, targets, opt, gc) in enumerate(GRID):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        code, stdout, err = run_cli(
            "profile", "--device", "cpu", "--model", str(d), "--quant", quant, "--targets", targets,
            "--optimizer", opt, "--gradient-checkpointing" if gc else "--no-gradient-checkpointing",
            "--batch", "2", "--seq", "128", "--rank", "8", "--steps", "3", "--warmup", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
        assert code == 0, err
    recs = read_records(out).records
    assert len(recs) == len(GRID) and all(r["status"] == "ok" for r in recs)
    errors = {}
    for r in recs:
        measured = r["memory"]["peak_allocated_bytes"]
        predicted = r["estimate"]["memory"]["peak_allocated_bytes"]
        assert r["estimate"]["inputs"]["device"] == "cpu"
        errors[r["label"]] = (predicted - measured) / measured
    bad = {k: f"{100 * v:+.2f}%" for k, v in errors.items() if abs(v) > 0.04}
    assert not bad, bad
