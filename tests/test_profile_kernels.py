"""Profile records' torch.profiler kernel summary (profile/kernels.py, issue 12): the CPU path
of a real tiny burst, the kernel-name classes, the record check, and calibrate's matmul
efficiency from synthetic CUDA summaries."""

import math

import pytest

from loraplan.errors import ConfigError
from loraplan.profile.kernels import class_efficiencies, kernel_class, matmul_dtype, summarise, wanted
from loraplan.profile.records import check_kernels


@pytest.mark.parametrize("name,cls", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_32x1_tn_align8>(...)", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>(Flash_fwd_params)", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps<float>>>", "reduce"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, int)", "quantization"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", "communication"),
    ("Memcpy DtoH (Device -> Pinned)", "copy"),
    ("aten::mm", "matmul"), ("aten::_foreach_add_", "optimizer"), ("aten::mul", "elementwise"),
    ("something_unheard_of", "other"),
])
def test_kernel_names_map_to_classes(name, cls):
    assert kernel_class(name) == cls


def test_matmul_dtype_from_kernel_name():
    assert matmul_dtype("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn") == "bf16"
    assert matmul_dtype("ampere_sgemm_128x64_tn") == "fp32"
    assert matmul_dtype("ampere_h16816gemm_256x128") == "fp16"
    assert matmul_dtype("gemm_unnamed", "bf16") == "bf16"


def test_summary_sums_device_time_and_op_flops():
    ev = [("sm90_xmma_gemm_bf16bf16", 2e-3, None, "kernel"), ("sm90_xmma_gemm_bf16bf16", 1e-3, None, "kernel"),
          ("aten::mm", 0.0, 4_000_000_000, "op"), ("vectorized_elementwise_kernel", 5e-4, None, "kernel")]
    s = summarise(ev, "cuda", 0.01, "bf16")
    check_kernels(s)
    assert s["classes"]["matmul"] == {"time_s": pytest.approx(3e-3), "count": 2, "flops": 4_000_000_000}
    assert s["classes"]["elementwise"]["count"] == 1
    assert s["device_time_s"] == pytest.approx(3.5e-3)
    assert s["matmul_by_dtype"]["bf16"]["count"] == 2


@pytest.mark.parametrize("bad", [
    [], {"schema": 2, "activity": "cuda", "step_wall_s": 1, "device_time_s": 1, "classes": {}},
    {"schema": 1, "activity": "tpu", "step_wall_s": 1, "device_time_s": 1, "classes": {}},
    {"schema": 1, "activity": "cuda", "step_wall_s": -1, "device_time_s": 1, "classes": {}},
    {"schema": 1, "activity": "cuda", "step_wall_s": 1, "device_time_s": math.inf, "classes": {}},
    {"schema": 1, "activity": "cuda", "step_wall_s": 1, "device_time_s": 1, "classes": {"matmul": {"time_s": 1, "count": 1.5}}},
    {"skipped": 3},
])
def test_check_kernels_refuses_bad_summaries(bad):
    with pytest.raises(ConfigError, match="kernels"):
        check_kernels(bad)


def test_kernel_summary_on_by_default_only_on_cuda():
    assert wanted(None, "cuda") and not wanted(None, "cpu")
    assert wanted(True, "cpu") and not wanted(False, "cuda")


def _summary(flops, time_s, dtype="bf16"):
    return summarise([(f"sm90_xmma_gemm_{dtype}{dtype}", time_s, None, "kernel"), ("aten::mm", 0.0, flops, "op")],
                     "cuda", time_s * 2, dtype)


def test_matmul_efficiency_from_synthetic_h100_summaries():
    from loraplan.catalog import load_gpu

    gpu = load_gpu("h100-sxm-80gb")
    peak = gpu.bf16_tflops * 1e12
    recs = [("a", _summary(0.5 * peak * 0.01, 0.01), "bf16"), ("b", _summary(0.7 * peak * 0.03, 0.03), "bf16"),
            ("cpu", {**_summary(1e9, 1.0), "activity": "cpu"}, "bf16"), ("none", None, "bf16")]
    fit = class_efficiencies(recs, gpu)["matmul"]
    assert fit["records"] == ["a", "b"] and fit["dtype"] == "bf16"
    assert fit["per_record"]["a"] == pytest.approx(0.5) and fit["per_record"]["b"] == pytest.approx(0.7)
    assert fit["efficiency"] == pytest.approx((0.5 * 0.01 + 0.7 * 0.03) / 0.04)  # FLOP-weighted
    assert class_efficiencies([("cpu", {**_summary(1e9, 1.0), "activity": "cpu"}, "bf16")], gpu) == {}


@pytest.mark.slow
def test_cpu_burst_records_a_kernel_summary(tmp_path, tiny_configs):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from loraplan.profile.burst import run_burst

    spec = {"model": {"name": "tiny-llama", "config": tiny_configs["llama"]},
            "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
            "train": {"quant": "bf16", "double_quant": True, "optimizer": "adamw", "batch": 2, "seq": 16,
                      "target_seq": None, "gradient_checkpointing": True, "attention": "auto",
                      "int8_outlier_fraction": None},
            "device": "cpu", "steps": 2, "warmup": 1, "cache_dir": str(tmp_path), "kernel_summary": True}
    r = run_burst(spec)
    assert r["status"] == "ok", r.get("traceback")
    k = r["kernels"]
    check_kernels(k)
    assert k["activity"] == "cpu" and k["classes"]["matmul"]["count"] > 0 and k["classes"]["matmul"]["flops"] > 0
    assert k["classes"]["elementwise"]["count"] > 0 and k["step_wall_s"] > 0
    assert len(r["time"]["step_s"]) == 2  # the profiled step is not a timed one
    off = run_burst({**spec, "kernel_summary": None})
    assert "kernels" not in off


def test_calibrate_takes_the_matmul_efficiency_from_kernel_summaries(profile_record):
    from loraplan.calibrate import calibrate
    from loraplan.catalog import load_gpu
    from loraplan.measurements import measurement_from_record

    peak = load_gpu("h100-sxm-80gb").bf16_tflops * 1e12
    recs = []
    for seq, eff in ((512, 0.6), (1024, 0.8)):
        r = profile_record(2 * 2**30, int(2.4 * 2**30), seq=seq)
        r["kernels"] = _summary(eff * peak * 0.02, 0.02)
        recs.append(r)
    ms = [measurement_from_record(r) for r in recs]
    assert ms[0].kernels["classes"]["matmul"]["count"] == 1
    res = calibrate(ms, "h100-sxm-80gb", parts=["time"])
    f = res.fits["time_eff_mm"]
    assert f.fitted and f.after == pytest.approx(0.7) and f.records == 2
    assert "kernel summaries" in f.method and ms[0].id in f.method
    assert res.calibration.provenance["fitted"]["time_eff_mm"]["method"] == f.method
    # without summaries the kernel fit adds nothing
    plain = calibrate([measurement_from_record(profile_record(2 * 2**30, seq=s)) for s in (512, 1024)],
                      "h100-sxm-80gb", parts=["time"])
    assert "kernel summaries" not in plain.fits["time_eff_mm"].method


def test_a_record_with_a_bad_kernel_summary_is_refused(profile_record):
    from loraplan.measurements import measurement_from_record

    r = profile_record(2 * 2**30)
    r["kernels"] = {"schema": 1, "activity": "cuda", "step_wall_s": 1, "device_time_s": -2, "classes": {}}
    with pytest.raises(ConfigError, match="device_time_s"):
        measurement_from_record(r)


@pytest.mark.slow
@pytest.mark.gpu
def test_cuda_burst_kernel_summary_is_on_by_default_and_names_its_kernels(tmp_path, tiny_configs):
    """The device check (run where a GPU is lent): a CUDA burst records the summary without being
    asked; matmul kernels are found by name, carry the profiler's FLOPs, and little device time
    falls outside the classes; the matmul efficiency against the catalog peak is a fraction."""
    from loraplan.catalog import gpu_entries, load_gpu
    from loraplan.profile.burst import run_burst
    from loraplan.profile.records import gpu_id_for_name

    cfg = dict(tiny_configs["llama"], hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
               num_key_value_heads=8)
    spec = {"model": {"name": "tiny-llama-1024", "config": cfg},
            "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
            "train": {"quant": "bf16", "double_quant": True, "optimizer": "adamw", "batch": 4, "seq": 512,
                      "target_seq": None, "gradient_checkpointing": True, "attention": "auto",
                      "int8_outlier_fraction": None},
            "device": "cuda", "steps": 3, "warmup": 1, "cache_dir": str(tmp_path)}
    r = run_burst(spec)
    assert r["status"] == "ok", r.get("traceback")
    k = r["kernels"]
    check_kernels(k)
    assert k["activity"] == "cuda" and k["device_time_s"] > 0
    mm = k["classes"]["matmul"]
    assert mm["count"] > 0 and mm["time_s"] > 0 and mm["flops"] > 0
    assert k["classes"].get("other", {}).get("time_s", 0) < 0.2 * k["device_time_s"], k["top"]
    gid = gpu_id_for_name(r["env"]["gpu_name"])
    if gid in gpu_entries():
        fit = class_efficiencies([("r", k, "bf16")], load_gpu(gid))
        assert 0 < fit["matmul"]["efficiency"] < 1, fit
