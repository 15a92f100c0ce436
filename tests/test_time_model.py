"""The step-time model's physics (issue 12): kernel-class roofline with sourced efficiencies,
the CUDA-queue overlap of host and GPU, compute dtypes per GPU, host speed. No torch."""

import json

import pytest

from loraplan.catalog import gpu_entries, load_calibration, load_gpu
from loraplan.case import resolve_case
from loraplan.estimate import efficiency
from loraplan.estimate.time import coefficients, gpu_seconds, queue_time, step_time, step_work


def _work(**case):
    m, l, t = resolve_case(case)
    return step_work(m, l, t)


def test_every_efficiency_has_a_source_and_a_status():
    data = efficiency.table()
    for gen, entry in data["generations"].items():
        assert set(entry) == set(efficiency.CLASS_COEFFICIENT), gen
        for cls, v in entry.items():
            assert 0 < v["value"] <= 1, (gen, cls)
            assert v["status"] in ("sourced", "borrowed"), (gen, cls)
            assert v["status"] == "sourced" or v.get("from"), (gen, cls)
            src = data["sources"][v["source"]]
            assert src["url"].startswith("https://") and src["quote"] and src["setup"], (gen, cls)


def test_every_catalog_gpu_has_a_generation():
    for gid in gpu_entries():
        eff = efficiency.efficiencies(load_gpu(gid))
        assert set(eff) == {"time_eff_mm", "time_eff_fp32", "time_eff_attn"}


def test_fitted_coefficients_say_what_pinned_them():
    prov = load_calibration("h100-sxm-80gb").provenance["default"]["time"]
    for name in prov["coefficients"]:
        assert name in prov["pinned_by"] or name in ("time_gpu_kernel_s", "time_host_speed"), name


def test_queue_limits():
    """One phase: max(host, gpu); phases never shorter than max of the sums, never longer than the sum."""
    assert queue_time([(1.0, 0.3, False)]) == pytest.approx(1.0)
    assert queue_time([(0.2, 0.9, False)]) == pytest.approx(0.9)
    phases = [(0.5, 0.1, False), (0.1, 0.5, False), (0.05, 0.05, False)]
    t = queue_time(phases)
    H, G = sum(p[0] for p in phases), sum(p[1] for p in phases)
    assert max(H, G) <= t <= H + G
    # a host-heavy forward cannot hide the GPU-heavy backward that follows
    assert t == pytest.approx(0.5 + 0.5 + 0.05)
    # a sync after a phase makes the host wait for the GPU: never faster
    assert queue_time([(0.1, 0.5, True), (0.5, 0.1, False)]) >= queue_time([(0.1, 0.5, False), (0.5, 0.1, False)])
    # without the sync the host enqueues phase 2 while the GPU still runs phase 1: 0.6; with it 0.5 + 0.5
    assert queue_time([(0.1, 0.5, False), (0.5, 0.1, False)]) == pytest.approx(0.6)
    assert queue_time([(0.1, 0.5, True), (0.5, 0.1, False)]) == pytest.approx(1.0)


def test_queue_is_monotone_in_host_and_gpu():
    base = [(0.3, 0.2, False), (0.2, 0.4, False), (0.01, 0.02, False)]
    t0 = queue_time(base)
    for i in range(3):
        for j in range(2):
            more = [list(p) for p in base]
            more[i][j] *= 1.5
            assert queue_time([tuple(p) for p in more]) >= t0


def test_step_between_max_and_sum_and_host_speed():
    w = _work(model="llama-2-7b", quant="nf4", seq=1024, batch=2)
    g = load_gpu("a100-sxm-80gb")
    coef = coefficients(load_calibration(g.id))
    t = step_time(w, g, coef)
    c = t.components
    assert max(c["host_s"], c["gpu_s"]) <= t.step_s <= c["host_s"] + c["gpu_s"]
    fast = step_time(w, g, dict(coef, time_host_speed=2.0))
    assert fast.components["host_s"] < c["host_s"] and fast.step_s <= t.step_s
    assert fast.components["gpu_s"] == pytest.approx(c["gpu_s"])


def test_gemm_roofline_classes():
    """Large-T GEMMs are compute-bound (FLOPs / (peak x eff)); tiny T is bound by the weight reads."""
    g = load_gpu("h100-sxm-80gb")
    coef = coefficients(load_calibration(g.id))
    big = _work(model="llama-2-7b", quant="bf16", seq=4096, batch=4, gradient_checkpointing=False)
    small = _work(model="llama-2-7b", quant="bf16", seq=16, batch=1, gradient_checkpointing=False)
    eff = efficiency.efficiencies(g)["time_eff_mm"]
    gb = gpu_seconds(big, g, coef)
    assert gb["gpu_gemm_s"] == pytest.approx((big.flops_mm - big.flops_attn) / (g.bf16_tflops * 1e12 * eff))
    gs = gpu_seconds(small, g, coef)
    assert gs["gpu_gemm_s"] == pytest.approx(small.bytes_gemm / (g.bandwidth_gb_s * 1e9 * coef["time_eff_bw"]))
    assert 0 < big.flops_attn < big.flops_mm and big.bytes_gemm < big.bytes_moved


def test_calibration_overrides_the_sourced_prior():
    g = load_gpu("h100-sxm-80gb")
    w = _work(model="llama-2-7b", quant="bf16", seq=4096, batch=4, gradient_checkpointing=False)
    coef = coefficients(load_calibration(g.id))
    half = gpu_seconds(w, g, dict(coef, time_eff_mm=efficiency.efficiencies(g)["time_eff_mm"] / 2))
    assert half["gpu_gemm_s"] == pytest.approx(2 * gpu_seconds(w, g, coef)["gpu_gemm_s"])


def test_t4_fp16_runs_on_tensor_cores_and_bf16_does_not():
    t4 = load_gpu("t4-16gb")
    coef = coefficients(load_calibration(t4.id))
    case = dict(model="llama-3.2-1b", seq=2048, batch=4, gradient_checkpointing=False)
    fp16 = _work(quant="fp16", **case)
    bf16 = _work(quant="bf16", **case)
    assert fp16.mm_dtype == "fp16"
    assert t4.fp16_tflops > 5 * t4.bf16_tflops
    assert gpu_seconds(fp16, t4, coef)["gpu_gemm_s"] * 5 < gpu_seconds(bf16, t4, coef)["gpu_gemm_s"]


def test_autocast_prices_lora_at_the_half_rate():
    """Under the HF Trainer's bf16 autocast the fp32 adapters run at the bf16 rate (flops_mm)."""
    loop = _work(model="llama-2-7b", quant="bf16", targets="all-linear", rank=64, seq=1024)
    hf = _work(model="llama-2-7b", quant="bf16", targets="all-linear", rank=64, seq=1024, trainer="hf",
               mixed_precision="bf16")
    assert loop.flops_fp32 > 0 and hf.flops_fp32 == 0


def test_forward_part_is_one_pass_and_trainer_syncs():
    w = _work(model="llama-2-7b", quant="bf16", seq=512, gradient_checkpointing=True)
    nogc = _work(model="llama-2-7b", quant="bf16", seq=512, gradient_checkpointing=False)
    assert w.forward.flops_mm == pytest.approx(nogc.forward.flops_mm)
    assert 0 < w.forward.flops_mm < w.flops_mm and w.optimizer.ops > 0
    assert not w.sync_after_forward and not w.sync_before_optimizer
    hf = _work(model="llama-2-7b", quant="bf16", seq=512, trainer="hf", mixed_precision="bf16")
    assert hf.sync_before_optimizer


def test_published_speed_benchmark_runs_on_a_subset():
    """benchmarks/published_speed.py: every record has its provenance; two rows predicted."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import published_speed as ps

    from loraplan.catalog import model_entries

    data = ps.load()
    pins: dict[str, int] = {}
    for c in data["cases"]:
        src = data["sources"][c["source"]]
        assert src["url"].startswith("https://") and src["quote"] and src["stack"] and src["differs"], c["id"]
        assert c["published_s"] > 0 and c["gpu"] in gpu_entries() and c["published"], c["id"]
        assert c["case"]["model"] in data["models"] or c["case"]["model"] in model_entries(), c["id"]
        pins[c["source"]] = pins.get(c["source"], 0) + bool(c.get("pins_host_speed"))
    assert len({c["id"] for c in data["cases"]}) == len(data["cases"])
    assert max(pins.values()) == 1  # one host speed per source at most, pinned by one row
    rows = ps.rows(data, {"qwen7b-lora-a100-s2048", "litgpt-l2-7b-bf16-a100-40gb"})
    assert len(rows) == 2
    for r in rows:
        assert r["predicted_s"] > 0 and 0.1 < r["ratio"] < 10
        assert r["predicted_s"] >= max(r["host_s"], r["gpu_s"]) - 1e-12


def test_host_speed_option_reaches_the_step_time():
    from click.testing import CliRunner

    from loraplan.cli import cli as main

    args = ["estimate", "--model", "llama-2-7b", "--quant", "nf4", "--gpu", "h100-sxm-80gb", "--format", "json"]
    r1 = CliRunner().invoke(main, args)
    r3 = CliRunner().invoke(main, args + ["--host-speed", "3"])
    assert r1.exit_code == 0 and r3.exit_code == 0, r1.output + r3.output
    t1, t3 = json.loads(r1.output)["time"], json.loads(r3.output)["time"]
    assert t3["step_s"] < t1["step_s"]
    from loraplan.cli import main as entry

    assert entry(args + ["--host-speed", "-1"]) == 2  # InputError: one line naming the value, exit 2


def test_moe_expert_flops_are_tokens_times_top_k():
    """Sparse-MoE: each token runs top_k experts' two grouped GEMMs and the router's [h, E] GEMM
    (forward + input gradient)."""
    from loraplan.estimate.time import expert_work

    m, l, t = resolve_case(dict(model="qwen3-30b-a3b", quant="bf16", seq=512, batch=1, gradient_checkpointing=False))
    per_token = sum(2 * e.in_features * e.out_features for e in m.experts)
    inc = dict()
    for name, v in expert_work(m, "bf16", 512, 1, 2):
        inc[name] = inc.get(name, 0) + v
    router = 2 * m.hidden_size * m.moe.num_experts * len(m.moe.layers)
    assert inc["flops_mm"] == pytest.approx(512 * (m.moe.top_k * per_token + router) * 2)
    w = step_work(m, l, t)
    assert w.flops_mm > inc["flops_mm"]
    # under a bitsandbytes base the experts stay unquantized and are upcast to fp32: the fp32 rate
    m4, l4, t4 = resolve_case(dict(model="qwen3-30b-a3b", quant="nf4", seq=512, batch=1, gradient_checkpointing=False))
    assert step_work(m4, l4, t4).flops_fp32 >= inc["flops_mm"]
