"""Step-time model: accuracy on the shipped H100 reference, physics sanity, no torch."""

import subprocess
import sys
from dataclasses import replace

import pytest

from loraplan.catalog import load_calibration, load_gpu
from loraplan.case import resolve_case
from loraplan.estimate.time import COEFFICIENTS, estimate_step_time, step_work
from loraplan.reference import REFERENCE_GPU, reference_cases


def test_reference_mape_within_15_percent():
    """On the H100 reference shipped in the package (loraplan/data/h100-measurements.json)."""
    gpu = load_gpu(REFERENCE_GPU)
    cal = load_calibration(gpu.id)
    cases = [c for c in reference_cases() if c.step_s_median]
    errors = {c.id: (estimate_step_time(c.model, c.lora, c.train, gpu, cal).step_s - c.step_s_median)
              / c.step_s_median for c in cases}
    assert len(errors) == 10
    assert sum(abs(e) for e in errors.values()) / len(errors) <= 0.15, errors
    assert all(abs(e) < 0.35 for e in errors.values()), errors


def test_default_calibration_has_time_provenance_and_all_coefficients():
    """The fitted time coefficients live in calibrations/default.json (fitted on the H100
    reference); the GEMM / attention efficiencies are sourced priors per generation, not in it."""
    from loraplan.estimate.time import EFFICIENCY_COEFFICIENTS

    cal = load_calibration("h100-sxm-80gb")
    for name in COEFFICIENTS:
        assert (name in cal.coefficients) != (name in EFFICIENCY_COEFFICIENTS), name
    prov = cal.provenance["default"]["time"]
    assert len(prov["records"]) == 10 and "residuals" in prov and prov["date"]
    assert set(prov["coefficients"]) == set(COEFFICIENTS) - set(EFFICIENCY_COEFFICIENTS)
    assert set(prov["pinned_by"]) <= set(COEFFICIENTS)
    assert 0.1 <= cal.coefficients["time_eff_bw"] <= 1.0


def _t(gpu="h100-sxm-80gb", **case):
    m, l, t = resolve_case(case)
    g = load_gpu(gpu)
    return estimate_step_time(m, l, t, g, load_calibration(g.id))


def test_physics_directions():
    base = _t(model="llama-2-7b", quant="nf4", seq=512, batch=1)
    assert _t(model="llama-2-7b", quant="nf4", seq=512, batch=1, gradient_checkpointing=False).step_s < base.step_s
    assert _t(model="llama-2-7b", quant="nf4", seq=512, batch=1, targets="all-linear").step_s > base.step_s
    assert _t(model="llama-2-7b", quant="nf4", seq=4096, batch=8).step_s > base.step_s
    # a slower GPU is not faster; time at large token counts scales with bandwidth/TFLOPs
    big = dict(model="llama-2-7b", quant="bf16", seq=2048, batch=8)
    assert _t("t4-16gb", **big).step_s > _t("a100-sxm-80gb", **big).step_s > _t("h100-sxm-80gb", **big).step_s
    assert base.tokens_per_s == pytest.approx(512 / base.step_s)
    c = base.components
    assert max(c["host_s"], c["gpu_s"]) <= base.step_s <= c["host_s"] + c["gpu_s"]


def test_int8_adds_host_and_gpu():
    t = _t(model="llama-2-7b", quant="int8")
    assert t.step_s == pytest.approx(t.components["host_s"] + t.components["gpu_s"])


def test_flops_follow_the_4N_rule():
    m, l, t = resolve_case({"model": "llama-2-7b", "quant": "bf16", "gradient_checkpointing": False, "seq": 8, "batch": 1})
    w = step_work(m, l, t)
    n_frozen = sum(x.in_features * x.out_features for x in m.linears if x.role != "lm_head")
    lm = m.hidden_size * m.vocab_size
    attn = w.flops_mm - 4 * 8 * (n_frozen + lm)
    assert 0 <= attn < 1e-3 * w.flops_mm  # attention at s=8 is negligible
    w_gc = step_work(m, l, replace(t, gradient_checkpointing=True))
    assert w_gc.flops_mm - w.flops_mm == pytest.approx(2 * 8 * n_frozen, rel=1e-3)


def test_time_module_imports_no_torch():
    code = ("import sys; from loraplan.estimate.time import estimate_step_time; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_frozen_linears_billed_by_their_storage():
    """Falcon's Linears stay fp32 under bitsandbytes (no bnb calls); T5's wo is fp32 under nf4."""
    m, l, t = resolve_case(dict(model="falcon-7b", quant="nf4"))
    w = step_work(m, l, t)
    assert w.bnb4_calls == 0 and w.int8_calls == 0 and not w.syncs
    m, l, t = resolve_case(dict(model="flan-t5-base", quant="nf4", gradient_checkpointing=True))
    four_bit = [x for x in m.linears if x.role != "lm_head" and x.leaf != "wo"]
    assert step_work(m, l, t).bnb4_calls == 3 * len(four_bit)  # forward, recompute, backward


def test_time_prices_the_kernel_the_ledger_resolved():
    """issue 12 review: ``--attention auto`` resolving to sdpa's math kernel (fp32 stream with
    grouped-query heads: nf4 Llama-3) was priced as a fused kernel. The time takes the ledger's
    kernel (``Setup.attention``): auto and an explicit math give one step; the math kernel has no
    fused attention time, bills its bmms at the fp32 rate and its s² scores as traffic."""
    from loraplan.estimate.api import estimate

    case = dict(model="llama-3.1-8b", batch=2, seq=1024)
    auto, math = (estimate(*resolve_case(dict(case, attention=a)), load_gpu("rtx4090-24gb")) for a in ("auto", "math"))
    assert auto.inputs["attention_kernel"] == math.inputs["attention_kernel"] == "math"
    assert auto.time.step_s == pytest.approx(math.time.step_s, rel=1e-12)
    assert auto.time.components["gpu_attention_s"] == 0
    fa2 = estimate(*resolve_case(dict(case, attn_implementation="flash_attention_2")), load_gpu("rtx4090-24gb"))
    assert fa2.inputs["attention_kernel"] == "fa2"
    assert fa2.time.components["gpu_attention_s"] > 0 and fa2.time.step_s < auto.time.step_s
    # the math kernel's score traffic grows with s²: per score element more than the fused kernel's none
    m, l, t = resolve_case(case)
    w_math, w_fused = step_work(m, l, t, "math"), step_work(m, l, t, "efficient")
    scores = t.batch * m.num_heads * t.seq ** 2 * m.num_layers
    from loraplan.estimate.time import MATH_SCORE_BYTES
    fw = 2  # checkpointing: forward + recompute
    assert w_math.bytes_moved - w_fused.bytes_moved >= scores * (MATH_SCORE_BYTES[0] * fw + MATH_SCORE_BYTES[1])
    assert w_math.flops_attn == 0 and w_math.flops_fp32 > w_fused.flops_fp32


def test_array_kernels_price_each_case_as_its_scalar():
    """A grid whose cases resolve to different kernels (a sliding window reached at one length)
    prices each element as the scalar step_work with that element's kernel."""
    import numpy as np

    m, l, t = resolve_case(dict(model="llama-3.1-8b", batch=1, seq=512))
    kinds = np.asarray(["flash", "math"], dtype=object)
    w = step_work(m, l, replace(t, seq=np.asarray([512, 512]), batch=np.asarray([1, 1])), kinds)
    for i, k in enumerate(kinds):
        one = step_work(m, l, t, k)
        assert w.bytes_moved[i] == pytest.approx(one.bytes_moved, rel=1e-12)
        assert w.flops_fp32[i] == pytest.approx(one.flops_fp32, rel=1e-12)
        assert w.ops[i] == pytest.approx(one.ops, rel=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_paging_adds_to_the_step_and_the_plan():
    """issue 12 review: "fits with paging" moved its paging seconds into a note only. bitsandbytes'
    paged optimizer prefetches each state then updates and syncs on the same stream: the paging
    adds to the step (``paging_s``) and the plan's step and hours follow; a card that holds it all
    has no paging term."""
    from loraplan.estimate.api import estimate
    from loraplan.plan import Job, plan_job

    m, l, t = resolve_case({"model": "llama-2-7b", "rank": 256, "targets": "all-linear",
                            "optimizer": "paged_adamw_32bit", "seq": 512})
    a100 = load_gpu("a100-sxm-80gb")
    cal = load_calibration(a100.id)
    mem = estimate(m, l, t, a100, cal, with_time=False).memory
    paged = mem.outside_allocator_bytes["paged_optimizer_state"]
    card = replace(a100, memory_bytes=mem.device_total_bytes - paged // 2)
    full, paging = estimate(m, l, t, a100, cal), estimate(m, l, t, card, cal)
    assert full.verdict == "fits" and "paging_s" not in full.time.components
    assert paging.verdict == "fits with paging"
    p = paging.time.components["paging_s"]
    assert p == pytest.approx(paging.detail["paging"]["seconds_per_step"]) and p > 0
    assert paging.time.step_s == pytest.approx(full.time.step_s + p)
    assert paging.time.tokens_per_s == pytest.approx(full.time.tokens_per_s * full.time.step_s / paging.time.step_s)
    g = plan_job(m, l, t, [card], Job()).gpus[0]
    assert g.verdict == "fits with paging" and g.step_s == pytest.approx(paging.time.step_s)


def test_checkpoint_offload_copies_over_the_host_link():
    """issue 12 review: --checkpoint-offload (save_on_cpu(pin_memory=True)) copies every
    checkpointed layer's input a·T·h to the host in forward and back in backward, on the compute
    stream: GPU-stream time at the host link's rate, half of it in the forward phase."""
    from loraplan.estimate.time import host_link_bytes_per_s

    case = dict(model="llama-2-7b", quant="nf4", batch=2, seq=1024)
    m, l, t = resolve_case(case)
    off, on = step_work(m, l, t), step_work(m, l, replace(t, checkpoint_offload=True))
    moved = m.num_layers * 4 * m.hidden_size * 2 * 1024  # fp32 stream (prepare_model_for_kbit_training)
    assert off.bytes_host == 0 and on.bytes_host == 2 * moved and on.forward.bytes_host == moved
    assert on.gc_hooks == off.gc_hooks + 2 * m.num_layers
    t4, a100 = _t("t4-16gb", **case, checkpoint_offload=True), _t("a100-sxm-80gb", **case, checkpoint_offload=True)
    for g, te in (("t4-16gb", t4), ("a100-sxm-80gb", a100)):
        assert te.components["gpu_host_copy_s"] == pytest.approx(2 * moved / host_link_bytes_per_s(load_gpu(g)))
    assert a100.step_s > _t("a100-sxm-80gb", **case).step_s
    assert t4.components["gpu_host_copy_s"] == pytest.approx(2 * a100.components["gpu_host_copy_s"], rel=1e-3)


def test_emulated_bf16_says_what_fp16_gives():
    """issue 12 review: the default QLoRA compute dtype bf16 on a T4 (no bf16 tensor cores) is
    priced at the emulated (fp32) rate silently. estimate's time and plan's rows say so and give
    the step with fp16; an A100, or fp16 asked for, have no such note."""
    from loraplan.estimate.api import estimate
    from loraplan.plan import Job, plan_job

    t4 = load_gpu("t4-16gb")
    m, l, t = resolve_case(dict(model="llama-2-7b", quant="nf4", seq=512, batch=1))
    e = estimate(m, l, t, t4)
    fp16 = estimate(m, l, replace(t, compute_dtype="fp16"), t4)
    assert e.time.fp16_option == "--compute-dtype fp16"
    assert e.time.step_s_fp16 == pytest.approx(fp16.time.step_s) and e.time.step_s_fp16 < e.time.step_s
    assert any("emulated" in n and "--compute-dtype fp16" in n for n in e.time.notes)
    assert fp16.time.step_s_fp16 is None and not any("emulated" in n for n in fp16.time.notes)
    assert estimate(m, l, t, load_gpu("a100-sxm-80gb")).time.step_s_fp16 is None
    g = plan_job(m, l, t, [t4], Job()).gpus[0]
    assert g.step_s == pytest.approx(e.time.step_s) and g.step_s_fp16 == pytest.approx(fp16.time.step_s)
    assert g.fp16_option == "--compute-dtype fp16"
