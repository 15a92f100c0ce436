"""The analytical ledger: accuracy against the H100 reference, structure, physics sanity."""

from dataclasses import replace

import pytest

from loraplan.catalog import load_calibration, load_gpu, load_model
from loraplan.estimate.api import estimate
from loraplan.estimate.memory import make_setup
from loraplan.estimate.weights import quantized_linear_bytes
from loraplan.reference import REFERENCE_GPU, reference_cases
from loraplan.spec import LinearSpec, LoraSpec, TrainSpec
from loraplan.targets import select_targets

CASES = reference_cases()
GPU = load_gpu(REFERENCE_GPU)


def _err(case):
    e = estimate(case.model, case.lora, case.train, GPU, load_calibration(GPU.id), with_time=False)
    return (e.memory.peak_allocated_bytes - case.peak_allocated_bytes) / case.peak_allocated_bytes


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_case_within_5_percent(case):
    assert abs(_err(case)) <= 0.05


def test_reference_mape_within_3_percent():
    errs = [abs(_err(c)) for c in CASES]
    assert len(errs) == 10
    assert sum(errs) / len(errs) <= 0.03


def test_ledger_lines_sum_to_peak():
    c = CASES[0]
    e = estimate(c.model, c.lora, c.train, GPU)
    m = e.memory
    assert sum(m.components.values()) == m.peak_allocated_bytes
    assert m.moments[m.peak_moment] == m.peak_allocated_bytes
    assert m.peak_reserved_bytes >= m.peak_allocated_bytes
    assert m.device_total_bytes > m.peak_reserved_bytes


def test_4bit_bytes_per_weight_follow_blocksize_64():
    big = LinearSpec("x", 4096, 11008, False, "up")
    n = 4096 * 11008
    nf4_dq = quantized_linear_bytes(big, "nf4", True) / n
    nf4 = quantized_linear_bytes(big, "nf4", False) / n
    assert nf4_dq == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)
    assert nf4 == pytest.approx(0.5 + 4 / 64, rel=1e-3)
    assert quantized_linear_bytes(big, "fp4", True) == quantized_linear_bytes(big, "nf4", True)
    assert quantized_linear_bytes(big, "int8", False) == pytest.approx(n + 11008 * 4, rel=1e-3)
    assert quantized_linear_bytes(big, "bf16", False) == 2 * n


def _peak(model="llama-2-7b", **kw):
    m = load_model(model)
    lora = LoraSpec(rank=kw.pop("rank", 8), alpha=16, dropout=kw.pop("dropout", 0.05),
                    targets=kw.pop("targets", ("q_proj", "v_proj")))
    train = TrainSpec(**kw)
    return estimate(m, lora, train, GPU, with_time=False).memory


def test_more_tokens_more_memory_and_checkpointing_saves():
    assert _peak(batch=4).peak_allocated_bytes > _peak(batch=1).peak_allocated_bytes
    assert _peak(seq=2048).peak_allocated_bytes > _peak(seq=512).peak_allocated_bytes
    no_gc = _peak(seq=2048, gradient_checkpointing=False).peak_allocated_bytes
    assert _peak(seq=2048, gradient_checkpointing=True).peak_allocated_bytes < 0.5 * no_gc


def test_quantization_orders_weight_bytes():
    w = {q: _peak(quant=q).components.get("frozen_linear_weights", 0) for q in ("nf4", "int8", "bf16", "fp32")}
    assert w["nf4"] < w["int8"] < w["bf16"] < w["fp32"]
    assert w["bf16"] / w["nf4"] == pytest.approx(2 / 0.51587, rel=0.01)


def test_optimizers_order_state_bytes():
    st = {o: _peak(optimizer=o, rank=64).components.get("optimizer_state", 0)
          for o in ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")}
    assert st["sgd"] == 0
    assert st["adamw"] > 3.5 * st["adamw_8bit"]
    assert st["paged_adamw_8bit"] < st["adamw_8bit"]  # large buffers are paged, outside torch


def test_paged_state_is_reported_outside_the_allocator():
    m = _peak(optimizer="paged_adamw_8bit", rank=64)
    assert m.outside_allocator_bytes.get("paged_optimizer_state", 0) > 0


def test_large_rank_peaks_in_optimizer_step():
    m = _peak(rank=256, targets=("all-linear",))
    assert m.peak_moment == "optimizer step"


def test_int8_outlier_fraction_is_an_input():
    lo = _peak(quant="int8", int8_outlier_fraction=0.0).peak_allocated_bytes
    hi = _peak(quant="int8", int8_outlier_fraction=1.0).peak_allocated_bytes
    default = _peak(quant="int8").peak_allocated_bytes
    assert lo < default < hi


def test_flash_attention_for_bf16_efficient_for_fp32_stream():
    m = load_model("llama-2-7b")
    lora = LoraSpec(8, 16, 0.05, ("q_proj",))
    ad = select_targets(m, lora.targets)
    assert make_setup(m, lora, TrainSpec(quant="bf16"), ad).attention == "flash"
    assert make_setup(m, lora, TrainSpec(quant="nf4"), ad).attention == "efficient"
    assert make_setup(m, lora, TrainSpec(quant="bf16", attention="math"), ad).attention == "math"


def test_tied_lm_head_counted_once():
    m = load_model("qwen2.5-0.5b")
    assert m.tie_word_embeddings
    untied = replace(m, tie_word_embeddings=False)
    lora = LoraSpec(8, 16, 0.05, ("q_proj",))
    a = estimate(m, lora, TrainSpec(quant="bf16"), GPU, with_time=False).memory.components["unquantized_weights"]
    b = estimate(untied, lora, TrainSpec(quant="bf16"), GPU, with_time=False).memory.components["unquantized_weights"]
    assert b - a == pytest.approx(2 * m.vocab_size * m.hidden_size, rel=0.01)


def test_fit_verdict_against_gpu_memory():
    m = load_model("llama-2-70b") if "llama-2-70b" in __import__("loraplan.catalog", fromlist=["x"]).model_names() else load_model("llama-2-7b")
    e = estimate(m, LoraSpec(8, 16, 0.05, ("q_proj",)), TrainSpec(quant="bf16"), load_gpu("t4-16gb"), with_time=False)
    assert e.fits is False and e.headroom_bytes < 0
    e = estimate(load_model("qwen2.5-0.5b"), LoraSpec(8, 16, 0.05, ("q_proj",)), TrainSpec(quant="nf4"), GPU, with_time=False)
    assert e.fits is True and e.headroom_bytes > 0


def test_array_path_equals_scalar_path():
    """The sweep evaluates the same formulas on numpy arrays: results must be identical."""
    np = pytest.importorskip("numpy")
    from loraplan.estimate.activations import Shape, choose_attention
    from loraplan.estimate.memory import moments, peak_of
    from loraplan.estimate.weights import structure

    gpu, cal = GPU, load_calibration(GPU.id)
    for model, quant, opt, gc in [("llama-2-7b", "nf4", "adamw", True), ("qwen2.5-0.5b", "bf16", "paged_adamw_8bit", False),
                                  ("llama-2-7b", "int8", "adamw_8bit", True)]:
        m = load_model(model)
        lora = LoraSpec(8, 16, 0.05, ("all-linear",))
        ad = select_targets(m, lora.targets)
        st = structure(m, ad, quant, True)
        b = np.array([1, 2, 4, 8]); s = np.array([512, 1024, 256, 2048]); r = np.array([8, 16, 64, 256])
        d = np.array([0.05, 0.0, 0.1, 0.05])
        train = TrainSpec(quant=quant, optimizer=opt, gradient_checkpointing=gc)
        kind = choose_attention(m, train, "9.0")
        arr, names = peak_of(moments(st, train, kind, Shape(b, s, s, r, d), gpu, cal))
        for i in range(4):
            one, name = peak_of(moments(st, train, kind, Shape(int(b[i]), int(s[i]), int(s[i]), int(r[i]),
                                                                float(d[i])), gpu, cal))
            assert arr[i] == one
            assert names[i] == name


def test_gemma3_global_layers_take_their_own_kernel():
    """gemma3 ``layer_types``: once the sequence reaches the window, the sliding layers get a mask
    (mem-efficient, k/v repeated) while the global layers get none; under nf4's fp32 stream with
    grouped-query heads those take the math kernel (torch 2.13: mem-efficient refuses GQA), whose
    saved fp32 scores make the global layers the heavier ones. The layer's saved bytes are the
    average over the layer kinds, between the all-sliding and all-global figures."""
    from loraplan.estimate.activations import layer_saved

    model = load_model("gemma-3-270m")
    assert 0 < model.arch.sliding_layers < model.num_layers
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))
    train = TrainSpec(quant="nf4", batch=2, seq=model.arch.sliding_window, gradient_checkpointing=True,
                      stack="torch=2.13")
    s = make_setup(model, lora, train, select_targets(model, lora.targets), "9.0")
    assert (s.attention, s.shape.global_attention) == ("efficient", "math")
    mixed = layer_saved(s.structure, s.attention, s.shape)
    sliding = layer_saved(s.structure, s.attention, replace(s.shape, global_attention=None))
    glob = layer_saved(s.structure, "math", replace(s.shape, global_attention=None))
    assert sliding < mixed < glob
