"""Real (tiny) CPU bursts in this process: every quant/optimizer/checkpointing path of the
protocol, and failures as data."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from loraplan.profile.burst import MEMORY_PHASES, model_cache_path, run_burst  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def spec(cache, tiny_configs):
    """spec(kind="llama", quant="bf16", ...) -> the worker spec of a tiny CPU burst."""
    def make(kind="llama", quant="bf16", optimizer="adamw", gc=True, targets=("q_proj", "v_proj"),
             double_quant=True, steps=3, warmup=1, batch=2, seq=16, target_seq=None, dropout=0.05):
        return {"model": {"name": f"tiny-{kind}", "config": tiny_configs[kind]},
                "lora": {"rank": 4, "alpha": 8.0, "dropout": dropout, "targets": list(targets)},
                "train": {"quant": quant, "double_quant": double_quant, "optimizer": optimizer, "batch": batch,
                          "seq": seq, "target_seq": target_seq, "gradient_checkpointing": gc, "attention": "auto",
                          "int8_outlier_fraction": None},
                "device": "cpu", "steps": steps, "warmup": warmup, "cache_dir": str(cache)}

    return make


CASES = {
    "llama-bf16-adamw-gc": dict(),
    "llama-bf16-sgd-nogc": dict(optimizer="sgd", gc=False),
    "llama-nf4-adamw-gc": dict(quant="nf4"),
    "llama-fp4-nodq-sgd-nogc-alllinear-lmhead": dict(quant="fp4", double_quant=False, optimizer="sgd", gc=False,
                                                     targets=("all-linear", "lm_head")),
    "llama-int8-sgd-nogc": dict(quant="int8", optimizer="sgd", gc=False),
    "qwen2-bf16-adamw-alllinear": dict(kind="qwen2", targets=("all-linear",), dropout=0.0),
    "t5-bf16-adamw-gc": dict(kind="t5", targets=("q", "v"), target_seq=8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_burst(spec, name):
    events = []
    s = spec(**CASES[name])
    r = run_burst(s, events.append)
    assert r["status"] == "ok", r.get("traceback")
    assert r["phase"] == "done" and r["error"] is None
    mem = r["memory"]
    assert set(MEMORY_PHASES) <= set(mem["phases"])
    assert len(mem["step_peaks"]) == 3
    load = mem["phases"]["load"]["max_allocated_bytes"]
    assert 0 < load <= mem["peak_allocated_bytes"] == max(p["max_allocated_bytes"] for p in mem["step_peaks"])
    assert mem["process_peak_allocated_bytes"] >= mem["peak_allocated_bytes"]
    assert mem["source"].startswith("live-tensor tracker")
    assert r["nvml"] == {"available": False, "reason": "--device cpu: NVML measures GPUs only"}
    t = r["time"]
    assert len(t["step_s"]) == 3 and t["step_s_median"] > 0 and t["tokens_per_step"] == 2 * 16
    assert t["tokens_per_s"] == pytest.approx(32 / t["step_s_median"])
    assert 0 < r["params"]["trainable"] < r["params"]["total"]
    assert r["protocol"]["attention"].startswith("sdpa:math") or "eager" in r["protocol"]["attention"]
    assert r["env"]["versions"]["torch"] and r["env"]["device"] == "cpu"
    phases = [e["phase"] for e in events if e["ev"] == "phase"]
    assert phases[-1] == "done" and phases.index("load") < phases.index("first_forward") < phases.index("steps")
    if s["train"]["quant"] != "bf16":
        assert r["protocol"]["quantization"]["quant_method"] == "bitsandbytes"
    if name.startswith("t5"):
        assert r["protocol"]["loader"] == "AutoModelForSeq2SeqLM" and t["decoder_tokens_per_step"] == 16
    if "lmhead" in name:
        assert "lm_head" in r["protocol"]["target_modules"]


def test_quantized_weights_are_smaller(spec, cache, tiny_configs):
    bf16 = run_burst(spec(steps=1, warmup=0))
    nf4 = run_burst(spec(quant="nf4", steps=1, warmup=0))
    assert nf4["memory"]["phases"]["load"]["max_allocated_bytes"] < bf16["memory"]["phases"]["load"]["max_allocated_bytes"]
    # adamw state exists from the first step on: step 2's peak holds it, sgd's does not
    assert model_cache_path("tiny-llama", tiny_configs["llama"], cache).is_dir()


@pytest.mark.parametrize("kind,phase,status", [("oom", "first_backward", "oom"), ("memory", "prepare", "oom"),
                                               ("error", "lora", "error")])
def test_failures_are_data(spec, monkeypatch, kind, phase, status):
    monkeypatch.setenv("LORAPLAN_PROFILE_FAULT", f"{kind}@{phase}")
    r = run_burst(spec())
    assert r["status"] == status and r["phase"] == phase
    assert ("OutOfMemoryError" if kind == "oom" else "Error") in r["error"]
    assert "load" in r["memory"]["phases"] and r["time"] == {}


def test_real_oom_from_a_monkeypatched_step(spec, monkeypatch):
    def boom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.optim.AdamW, "step", boom)
    r = run_burst(spec())
    assert r["status"] == "oom" and r["phase"] == "first_optimizer_step"
    assert "Tried to allocate" in r["error"]
    assert "first_backward" in r["memory"]["phases"]


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_cuda_burst(spec, quant):
    """The CUDA path of the protocol on a tiny llama: allocator peaks, NVML, the params PEFT adapted
    equal the analytic count, and the measured peak allocated is near the analytic estimate."""
    from loraplan.catalog import gpu_entries, load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.hf import spec_from_config
    from loraplan.profile.records import gpu_id_for_name
    from loraplan.spec import LoraSpec, TrainSpec

    s = dict(spec(quant=quant, batch=4, seq=128), device="cuda")
    r = run_burst(s)
    assert r["status"] == "ok", r.get("traceback") or r.get("error")
    mem = r["memory"]
    assert 0 < mem["peak_allocated_bytes"] <= mem["peak_reserved_bytes"]
    assert r["env"]["device"] == "cuda" and r["env"]["gpu_name"]
    model = spec_from_config(s["model"]["config"], "tiny-llama")
    lora = LoraSpec(rank=4, alpha=8.0, dropout=0.05, targets=("q_proj", "v_proj"))
    train = TrainSpec(quant=quant, batch=4, seq=128)
    gid = gpu_id_for_name(r["env"]["gpu_name"])
    gpu = load_gpu(gid) if gid in gpu_entries() else None
    e = estimate(model, lora, train, gpu, load_calibration(gid if gpu else None), with_time=False)
    assert r["params"]["trainable"] == e.params.trainable
    assert mem["peak_allocated_bytes"] == pytest.approx(e.memory.peak_allocated_bytes, rel=0.25)


def test_partial_cache_entry_is_rebuilt_and_dead_builds_removed(tmp_path, tiny_configs):
    import subprocess
    import sys

    from loraplan.profile.burst import checkpoint_complete, ensure_model

    cfg = tiny_configs["llama"]
    good = ensure_model("tiny-llama", cfg, tmp_path)
    assert checkpoint_complete(good) and good == model_cache_path("tiny-llama", cfg, tmp_path)
    weights = good / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a half-written entry (an older loraplan, a kill)
    assert not checkpoint_complete(good)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".{good.name}.tmp-{dead.pid}-x1y2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    other = tmp_path / ".not-ours"
    other.mkdir()
    assert ensure_model("tiny-llama", cfg, tmp_path) == good
    assert checkpoint_complete(good) and len(weights.read_bytes()) == len(whole)
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([good.name, ".not-ours"])
