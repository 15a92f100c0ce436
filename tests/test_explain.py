"""loraplan explain, the fit verdict against the uncertainty band, and 80-column output."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from loraplan.case import resolve_case
from loraplan.catalog import load_calibration, load_gpu, load_model, model_names
from loraplan.estimate.activations import choose_attention
from loraplan.estimate.api import estimate
from loraplan.estimate.result import VERDICTS, Estimate, MemoryEstimate, ledger_label, uncertainty_band
from loraplan.explain import attention_reason, explain, valid_kernels
from loraplan.spec import TrainSpec

from conftest import run_module

GiB = 1 << 30


def _case(**opts):
    return resolve_case({k: str(v) if not isinstance(v, bool) else v for k, v in opts.items()})


def test_levers_are_re_estimates_ranked_by_saving():
    model, lora, train = _case()
    gpu = load_gpu("h100-sxm-80gb")
    x = explain(model, lora, train, gpu)
    base = estimate(model, lora, train, gpu).memory.device_total_bytes
    assert x.estimate.memory.device_total_bytes == base
    assert x.levers and [lv.saving_bytes for lv in x.levers] == sorted((lv.saving_bytes for lv in x.levers), reverse=True)
    lv = next(lv for lv in x.levers if lv.option == "--dropout 0")
    again = estimate(model, replace(lora, dropout=0.0), train, gpu)
    assert lv.saving_bytes == base - again.memory.device_total_bytes > 0
    assert x.drivers[0].key == "frozen_linear_weights" and "nf4" in x.drivers[0].label
    # sdpa's flash kernel needs a half-precision stream: never offered for a quantized base (FA2
    # casts q, k, v to the model's dtype first, so --attn-implementation flash_attention_2 may be)
    assert not any(lv.option.startswith("--attention flash") for lv in x.levers)
    assert any("flash" in r for r in x.rejected)


def test_does_not_fit_on_24gb_says_why_and_what_makes_it_fit():
    model, lora, train = _case(model="llama-3-8b", seq=4096, gradient_checkpointing=False)
    x = explain(model, lora, train, load_gpu("rtx4090-24gb"))
    assert x.estimate.verdict == "does not fit"
    acts = next(d for d in x.drivers if d.key == "activations")
    why = " ".join(acts.why)
    assert "math kernel" in why and "grouped-query" in why and "B·H·T²" in why
    assert any(d.key == "logits_loss" and "12 B x T·V" in " ".join(d.why) for d in x.drivers)
    gc = x.levers[0]
    assert gc.option == "--gradient-checkpointing" and gc.verdict == "fits"
    assert [lv.option for lv in x.fitting_levers] == ["--gradient-checkpointing"]
    d = x.to_dict()
    json.dumps(d)
    assert d["verdict"] == "does not fit" and d["levers"][0]["saving_bytes"] == gc.saving_bytes


@pytest.mark.parametrize("quant", ["bf16", "nf4", "fp32"])
def test_attention_reason_names_the_kernel_choose_attention_picks(quant):
    for name in model_names():
        model = load_model(name)
        train = TrainSpec(quant=quant, double_quant=quant == "nf4", seq=8192)
        kind = choose_attention(model, train, "9.0")
        reason = attention_reason(model, train, "9.0")
        assert kind in reason.replace("mem-efficient", "efficient"), (name, kind, reason)
        assert valid_kernels(model, train, "9.0").get(kind, "") == "", (name, kind)


def _memory(device_gib: float, paged_gib: float = 0.0) -> MemoryEstimate:
    alloc = int(device_gib * GiB / 1.1)
    outside = {"cuda_context_and_libraries": 0}
    if paged_gib:
        outside["paged_optimizer_state"] = int(paged_gib * GiB)
    return MemoryEstimate(components={}, peak_allocated_bytes=alloc, peak_reserved_bytes=int(alloc * 1.1),
                          device_total_bytes=int(device_gib * GiB), peak_moment="forward",
                          outside_allocator_bytes=outside)


def _est(mem: MemoryEstimate, cap_gib: float) -> Estimate:
    model, lora, train = _case()
    e = estimate(model, lora, train, load_gpu("l4-24gb"))
    return replace(e, memory=mem, gpu_memory_bytes=int(cap_gib * GiB))


def test_verdicts_and_margin():
    coef = load_calibration(None).coefficients
    band = uncertainty_band(_memory(20), coef)
    # the band: 1% of reserved + 5% of allocated + 0.25 GiB context, all from default.json
    assert band == int(0.01 * _memory(20).peak_reserved_bytes + 0.05 * _memory(20).peak_allocated_bytes + GiB / 4)
    assert _est(_memory(10), 24).verdict == "fits"
    within = _est(_memory(23.5), 24)
    assert within.verdict == "fits, within the uncertainty" and within.fits and within.margin_bytes < 0
    assert within.margin_bytes == within.headroom_bytes - within.uncertainty_bytes
    paged = _est(_memory(26, paged_gib=4), 24)
    assert paged.verdict == "fits with paging" and not paged.fits
    assert _est(_memory(26, paged_gib=1), 24).verdict == "does not fit"
    d = within.to_dict()
    assert d["verdict"] in VERDICTS and {"fits", "headroom_bytes", "margin_bytes", "uncertainty_bytes"} <= set(d)


def test_uncertainty_is_data_with_a_source():
    cal = load_calibration(None)
    for k in ("peak_allocated_uncertainty_ratio", "reserved_over_allocated_uncertainty",
              "cuda_context_uncertainty_bytes"):
        assert k in cal.coefficients and k in cal.provenance["default"]


def test_labels_say_what_is_true_for_the_setup():
    assert ledger_label("frozen_linear_weights", "bf16") == "frozen Linear weights (bf16)"
    assert ledger_label("frozen_linear_weights", "nf4") == "frozen Linear weights (nf4 base)"
    assert ledger_label("frozen_linear_weights", "nf4", load_model("falcon-7b")) == \
        "frozen Linear weights (fp32, not quantized)"
    assert ledger_label("unquantized_weights", "nf4").endswith("(fp32)")
    assert ledger_label("unquantized_weights", "bf16").endswith("(bf16)")


def _width_ok(out: str) -> bool:
    return max(len(line.rstrip()) for line in out.splitlines()) <= 80


@pytest.mark.parametrize("args", [
    ("estimate",), ("estimate", "--quant", "bf16", "--gpu", "rtx4090-24gb", "--explain"),
    ("explain",), ("explain", "--model", "llama-3-8b", "--seq", "4096", "--no-gradient-checkpointing",
                   "--gpu", "rtx4090-24gb"),
    ("plan", "--model", "qwen2.5-0.5b", "--tokens", "1e7", "--effective-batch", "16"),
])
def test_tables_fit_80_columns(run_cli, args):
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert _width_ok(out), out


def test_rich_console_80(tmp_path):
    """The renderers on an explicit rich Console(width=80)."""
    from rich.console import Console

    from loraplan.commands.explain import print_explanation

    model, lora, train = _case(model="llama-2-7b", quant="int8", gpu="l4-24gb")
    con = Console(width=80, record=True, file=open(tmp_path / "out.txt", "w"))
    print_explanation(con, explain(model, lora, train, load_gpu("l4-24gb")).to_dict())
    text = con.export_text()
    assert _width_ok(text) and "LLM.int8 keeps each int8 Linear's input" in text


def test_tiny_cpu_model_has_no_zero_gib(run_cli, tiny_llama_config):
    code, out, err = run_cli("estimate", "--model", str(tiny_llama_config / "config.json"))
    assert code == 0, err
    assert "0.00 GiB" not in out and "KiB" in out


def test_estimate_explain_json(run_cli):
    code, out, err = run_cli("estimate", "--explain", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["verdict"] == "fits" and d["explain"]["levers"] and d["explain"]["drivers"]
    code, out, err = run_cli("estimate", "--explain", "--format", "csv")
    assert code == 2 and "--explain" in err and len(err.strip().splitlines()) == 1


def test_explain_never_imports_torch():
    r = run_module("import sys; from loraplan.cli import main; main(['explain']); "
                   "assert not {'torch', 'numpy', 'pandas'} & set(sys.modules), sorted(sys.modules)")
    assert r.returncode == 0, r.stderr


def test_stream_fact_follows_the_recipe():
    """The residual-stream fact says what the recipe does: prepare_kbit's upcast only when it runs,
    trl's bf16 stream without it, autocast's promotion of an fp16 stream."""
    from loraplan.explain import stream_fact

    assert "prepare_model_for_kbit_training" in stream_fact(TrainSpec(quant="nf4")) and "fp32" in stream_fact(
        TrainSpec(quant="nf4"))
    trl = stream_fact(TrainSpec(quant="nf4", trainer="trl"))
    assert trl.startswith("the residual stream is bf16") and "prepare_model_for_kbit_training" not in trl
    assert "promotion" in stream_fact(TrainSpec(quant="fp16", mixed_precision="bf16"))


def test_levers_column_and_attention_say_which_figure(run_cli):
    """The saving is the drop in device total (explain.explain: base - device_total_bytes), and the
    column and title say so next to a header that prints both peak allocated and device total; the
    header's attention is the kernel sdpa dispatches to, the recipe's is the attn_implementation."""
    code, out, err = run_cli("explain", "--model", "llama-3-8b", "--quant", "bf16", "--gpu", "rtx4090-24gb")
    assert code == 0, err
    assert "total saved" in out and "(total saved: drop in device total)" in out
    assert "│ step" in out or "step ┃" in out  # the step column still fits 80 columns
    assert "attention kernel flash" in out and "attn_implementation sdpa" in out
    assert " attention sdpa" not in out


def test_verdict_band_prints_as_one_sided(run_cli):
    """The uncertainty band is one-sided (the largest under-predictions; README): '+X (one-sided)',
    never '±X', and margin = headroom - band."""
    code, out, err = run_cli("estimate", "--quant", "bf16", "--gpu", "rtx4090-24gb", "--format", "json")
    d = json.loads(out)
    assert d["margin_bytes"] == d["headroom_bytes"] - d["uncertainty_bytes"]
    code, out, err = run_cli("estimate", "--quant", "bf16", "--gpu", "rtx4090-24gb")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "±" not in flat and "(one-sided), margin" in flat


def test_profile_summary_names_the_records_file_it_wrote(capsys):
    """Columns dropped at 80 columns point at the --out file, not a fixed profiles/ folder."""
    from types import SimpleNamespace

    from loraplan.commands.profile import _summary

    rec = {"status": "ok", "memory": {"peak_allocated_bytes": 2**30}, "time": {"step_s_median": 0.5, "tokens_per_s": 1e3},
           "estimate": {"memory": {"peak_allocated_bytes": 2**30}, "time": {"step_s": 0.5}}, "trace": {"peak_allocated_bytes": 2**30}}
    res = [SimpleNamespace(record=rec, skipped=False, case=SimpleNamespace(label="llama-3-8b nf4 b1 s512 " * 3))]
    _summary(res, SimpleNamespace(device="cpu", gpu_id="cpu"), "/tmp/x.jsonl")
    out = " ".join(capsys.readouterr().out.split())
    assert "not shown at this width" in out and "the records in /tmp/x.jsonl have them" in out
    assert "profiles/" not in out
