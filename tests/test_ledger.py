"""The ledger's one vocabulary (estimate.result.LEDGER): every line the analytic ledger or the
trace can emit is in it, and the reports' stacked bars add up to the peaks they print."""

from __future__ import annotations

from itertools import product

import pytest

from loraplan.catalog import load_calibration, load_gpu, load_model, model_entries
from loraplan.estimate.api import estimate
from loraplan.estimate.memory import make_setup, moments
from loraplan.estimate.result import LEDGER, LEDGER_BY_KEY, ledger_keys, ledger_label, ledger_order
from loraplan.spec import OPTIMIZERS, LoraSpec, TrainSpec
from loraplan.targets import PEFT_MOE_ALL_LINEAR_REWRITE, select_expert_targets, select_targets


def _one_model_per_family() -> list[str]:
    by_type: dict[str, str] = {}
    for name, e in sorted(model_entries().items()):
        by_type.setdefault(e["config"]["model_type"], name)
    return sorted(by_type.values())


def test_vocabulary_is_well_formed():
    keys = [line.key for line in LEDGER]
    assert len(keys) == len(set(keys)) == len(LEDGER_BY_KEY)
    assert all(line.label and line.color.startswith("#") and line.views for line in LEDGER)
    assert len({line.color for line in LEDGER}) == len(LEDGER)  # every segment tells apart
    assert ledger_order(["other", "zzz", "activations", "aaa"]) == ["activations", "other", "aaa", "zzz"]
    assert ledger_label("unknown_line") == "unknown line"


@pytest.mark.parametrize("name", _one_model_per_family())
def test_every_analytic_key_is_in_the_vocabulary(name):
    model = load_model(name)
    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    lora = LoraSpec(rank=8, alpha=16, targets=("all-linear",))
    if model.model_type in PEFT_MOE_ALL_LINEAR_REWRITE:  # PEFT rewrites all-linear there: list them
        lora = LoraSpec(rank=8, alpha=16, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "experts"))
    seen: set[str] = set()
    for quant, opt, gc in product(("bf16", "nf4", "int8"), OPTIMIZERS, (True, False)):
        train = TrainSpec(quant=quant, optimizer=opt, gradient_checkpointing=gc, batch=2, seq=256,
                          target_seq=128 if model.is_encoder_decoder else None)
        e = estimate(model, lora, train, gpu, cal, with_time=False)
        seen.update(e.memory.components)
        s = make_setup(model, lora, train, select_targets(model, lora.targets)
                       + select_expert_targets(model, lora.targets), gpu.compute_capability)
        for ledger in moments(s.structure, s.train, s.attention, s.shape, gpu, cal).values():
            seen.update(ledger)
    assert seen <= set(ledger_keys("analytic")), seen - set(ledger_keys("analytic"))


def test_trace_categories_are_vocabulary_keys():
    from loraplan.trace.run import CATEGORIES

    assert set(CATEGORIES) <= set(LEDGER_BY_KEY) and "lora_gradients" in CATEGORIES


def test_compare_report_stacked_bar_sums_to_the_peak():
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    from loraplan.report.compare import compare_document, configs_from_cases

    configs, _ = configs_from_cases([{"model": "qwen2.5-0.5b", "quant": q} for q in ("int8", "nf4")])
    _, data = compare_document(configs, [load_gpu("a10g-24gb")], load_calibration, tokens=1e6)
    bars = data["ledger"]
    int8 = data["estimates"][configs[0].label]["a10g-24gb"]
    assert "previous_step_input_grad" in int8.memory.components  # a line the old colour list lacked
    for i, peak in enumerate(bars["peak_allocated_bytes"]):
        assert sum(seg[i] for seg in bars["segments"].values()) == peak
    assert list(bars["segments"]) == [k for k in ledger_keys() if k in bars["segments"]]  # all in the vocabulary



def test_validation_report_stacked_bars_sum_to_the_predicted_peak():
    from loraplan.measurements import load_measurements
    from loraplan.report.validation import validate
    from loraplan.report.validation_report import ledger_bars

    v = validate(list(load_measurements(["reference"])), load_calibration)
    bars = ledger_bars(v)
    assert bars["cases"] and set(bars["segments"]) <= set(ledger_keys("analytic"))
    for i, peak in enumerate(bars["predicted_peak_allocated_bytes"]):
        assert sum(seg[i] for seg in bars["segments"].values()) == peak
