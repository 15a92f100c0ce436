"""The validation layer wired in: every way in (config files, catalog, calibrations, grids,
options, report names) refuses a bad value with one line, exit 2, before anything is built."""

from __future__ import annotations

import json
import os

import pytest

from loraplan.catalog import model_entries
from loraplan.errors import ConfigError, InputError, LoraplanError


def _one_line_refusal(run_cli, *args):
    code, out, err = run_cli(*args)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, (args, out[-300:], err[-300:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---- config.json: the reader and one gate for every path --------------------------------------


def test_load_config_reads_through_the_reader(tmp_path):
    from loraplan.hf import load_config

    cfg = dict(model_entries()["qwen2.5-0.5b"]["config"])
    p = tmp_path / "config.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(cfg).encode())
    assert load_config(p)["model_type"] == "qwen2"
    p.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ConfigError, match="nests"):
        load_config(p)
    p.write_bytes(json.dumps(cfg).encode("utf-16"))
    with pytest.raises(ConfigError, match="UTF-16"):
        load_config(p)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/zero")


@pytest.mark.parametrize("key, value", [
    ("hidden_size", float("nan")), ("num_hidden_layers", 2**63), ("num_attention_heads", 0),
    ("vocab_size", "64"), ("intermediate_size", True), ("num_key_value_heads", 3), ("head_dim", {}),
    ("max_position_embeddings", [])])
def test_spec_from_config_refuses_before_building(key, value):
    from loraplan.hf import spec_from_config

    cfg = dict(model_entries()["llama-3.2-1b"]["config"], **{key: value})
    with pytest.raises(ConfigError) as e:
        spec_from_config(cfg, "bad")
    assert "\n" not in str(e.value) and key in str(e.value)


@pytest.mark.parametrize("base, refuse", [("llama-3.2-1b", True), ("gemma-2-2b", True), ("pythia-1b", True),
                                          ("opt-6.7b", True), ("falcon-7b", True),
                                          ("mistral-7b", False), ("qwen2.5-0.5b", False), ("phi-3-mini-4k", False)])
def test_hidden_not_a_multiple_of_heads_follows_transformers(base, refuse):
    """transformers 5.x: LlamaConfig, Gemma2Config, GPTNeoXConfig (validate_architecture),
    OPTAttention and FalconAttention refuse hidden % heads != 0; mistral, qwen2 and phi3 build
    with head_dim = hidden // heads (floor) when head_dim is absent, and so does the rule."""
    from loraplan.hf import spec_from_config

    cfg = dict(model_entries()[base]["config"])
    cfg.pop("head_dim", None)
    heads = cfg["num_attention_heads"]
    cfg["hidden_size"] = cfg["hidden_size"] + 1  # no longer a multiple of the heads
    cfg.pop("num_key_value_heads", None) if base != "falcon-7b" else None
    if refuse:
        with pytest.raises(ConfigError, match="multiple of num_attention_heads"):
            spec_from_config(cfg, "odd")
    else:
        spec = spec_from_config(cfg, "odd")
        assert spec.head_dim == cfg["hidden_size"] // heads > 0
        q = next(l for l in spec.linears if l.role in ("q", "qkv"))
        assert q.in_features == cfg["hidden_size"]


def test_head_dim_zero_and_bad_t5_activation_are_refused():
    from loraplan.hf import spec_from_config

    cfg = dict(model_entries()["qwen2.5-0.5b"]["config"], hidden_size=8, num_attention_heads=14,
               num_key_value_heads=2)
    with pytest.raises(ConfigError, match="head_dim"):
        spec_from_config(cfg, "tiny")
    t5 = dict(model_entries()["flan-t5-base"]["config"], feed_forward_proj="gated-gelu-x")
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        spec_from_config(t5, "t5")


def test_trace_step_refuses_before_building():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from loraplan.spec import LoraSpec, TrainSpec
    from loraplan.trace.run import trace_step

    cfg = dict(model_entries()["qwen2.5-0.5b"]["config"], num_hidden_layers=10**9)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        trace_step(cfg, LoraSpec(), TrainSpec(quant="bf16"))


def test_every_catalog_model_passes_the_gate():
    from loraplan.hf import check_config

    for name, e in model_entries().items():
        check_config(e["config"], name)


# ---- calibrations ----------------------------------------------------------------------------


def test_shipped_calibrations_are_in_range():
    from loraplan.catalog import HERE
    from loraplan.inputs import check_coefficients

    files = sorted((HERE / "calibrations").glob("*.json"))
    assert any(p.name == "default.json" for p in files)
    for p in files:
        check_coefficients(json.loads(p.read_text())["coefficients"], str(p))


@pytest.mark.parametrize("body, words", [
    ('{"coefficients": {"time_eff_mm": NaN}}', "time_eff_mm"),
    ('{"coefficients": {"time_eff_mm": 3}}', "allowed"),
    ('{"coefficients": {"cuda_context_bytes": -1}}', "cuda_context_bytes"),
    ('{"coefficients": {"time_host_op_s": "x"}}', "time_host_op_s"),
    ('{"coefficients": {"nonsense": 1}}', "unknown coefficient"),
    ('{"coefficients": [1]}', "coefficients"),
    ('[1, 2]', "not an object"),
    ('{"gpu": "h100-sxm-80gb"}', "no 'coefficients'"),
])
def test_calibration_files_are_checked(tmp_path, run_cli, body, words):
    p = tmp_path / "cal.json"
    p.write_text(body)
    line = _one_line_refusal(run_cli, "estimate", "--calibration", str(p), "--format", "json")
    assert words in line


def test_zero_where_zero_is_possible(tmp_path, run_cli):
    p = tmp_path / "cal.json"
    p.write_text('{"coefficients": {"allocator_overhead_bytes": 0, "time_host_op_s": 0, '
                 '"reserved_over_allocated_ratio": 0}}')
    code, out, err = run_cli("estimate", "--calibration", str(p), "--format", "json")
    assert code == 0, err


# ---- grids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, body", [
    ("g.json", "[" * 10_000 + "]" * 10_000),
    ("g.toml", "seq = " + "[" * 10_000 + "]" * 10_000),
    ("g.json", '{"rank": [null]}'),
    ("g.json", '{"rank": NaN}'),
    ("g.json", '{"rank": [{"a": 1}]}'),
    ("g.json", '{"gpu": [8, 16]}'),
    ("g.json", '{"rank": "8:64:x0"}'),
    ("g.json", '{"rank": [0]}'),
])
def test_bad_grids_are_one_line(tmp_path, run_cli, name, body):
    g = tmp_path / name
    g.write_text(body)
    _one_line_refusal(run_cli, "sweep", "--grid", str(g), "--out", str(tmp_path / "o.csv"))
    assert not (tmp_path / "o.csv").exists()


# ---- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--targets", ""], "--targets"),
    (["--targets", "*"], "regular expression"),
    (["--targets", "q_proj,,"], "empty name"),
    (["--targets", ","], "--targets"),
    (["--gpu", ""], "--gpu"),
    (["--model", ""], "--model"),
    (["--model", "x" * 5000], "characters"),
    (["--model", "x" * 300], "--model"),
])
def test_estimate_options(run_cli, args, words):
    assert words in _one_line_refusal(run_cli, "estimate", "--format", "json", *args)


@pytest.mark.parametrize("opt, value, words", [
    ("--rank", "99999999999999999999", "more than 65,536"),
    ("--batch", "65537", "more than 65,536"),
    ("--seq", "99999999999999999999", "more than 16,777,216"),
    ("--gradient-accumulation", "100000000", "more than 65,536"),  # was a minute and 11 GB of RAM
    ("--checkpoint-every-n-layers", "10001", "more than 10,000"),
    ("--lengths", "512,99999999999999999999", "more than 16,777,216"),
    ("--num-gpus", "99999999999999999999", "more than 1,048,576"),
])
def test_counts_beyond_any_run_are_refused_by_every_command(tmp_path, run_cli, opt, value, words):
    """spec.MAX_OPTION: one line, exit 2, in estimate and in the sweep (whose int64 columns raised
    OverflowError with a traceback)."""
    assert words in _one_line_refusal(run_cli, "estimate", "--model", "qwen2.5-0.5b", opt, value)
    out = tmp_path / "o.csv"
    assert words in _one_line_refusal(run_cli, "sweep", "--model", "qwen2.5-0.5b", "--out", str(out), opt, value)
    assert not out.exists()


def test_counts_at_the_bounds_are_estimated(run_cli):
    code, _, err = run_cli("estimate", "--model", "qwen2.5-0.5b", "--rank", "65536", "--gradient-accumulation", "65536",
                           "--format", "json")
    assert code == 0, err


@pytest.mark.parametrize("args, words", [
    (["--effective-batch", "1000000000"], "--effective-batch"),  # named as given, not as the accumulation it implies
    (["--tokens", "1e300"], "--tokens 1e+300"),
    (["--examples", "2e15"], "--examples"),
    (["--epochs", "1e300", "--tokens", "1e6"], "--epochs"),
])
def test_plan_job_sizes_beyond_any_job(run_cli, args, words):
    assert words in _one_line_refusal(run_cli, "plan", "--model", "qwen2.5-0.5b", "--gpu", "l4-24gb", *args)


def test_recipe_config_goes_through_the_reader(tmp_path, run_cli):
    """--config: a FIFO hung, /dev/zero was read until the process was killed, UTF-16 was a traceback."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    utf16 = tmp_path / "c.yaml"
    utf16.write_bytes("model_name_or_path: x\n".encode("utf-16"))
    deep = tmp_path / "d.yaml"
    deep.write_text("a: " + "[" * 100 + "]" * 100 + "\n")
    for path, words in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (utf16, "UTF-16"),
                        (deep, "nests 100 levels")):
        assert words in _one_line_refusal(run_cli, "estimate", "--model", "qwen2.5-0.5b", "--config", str(path))


@pytest.mark.parametrize("args", [["--timeout", "nan"], ["--timeout", "inf"], ["--trace-timeout", "nan"]])
def test_time_limits_are_finite(tmp_path, run_cli, args):
    """click's FloatRange lets NaN through; options.Seconds refuses it (and inf) before any case runs."""
    line = _one_line_refusal(run_cli, "profile", "--model", "qwen2.5-0.5b", "--device", "cpu",
                             "--out", str(tmp_path / "p.jsonl"), *args)
    assert "finite number of seconds" in line and not (tmp_path / "p.jsonl").exists()


def test_plan_gpu_empty_is_not_every_gpu(run_cli):
    assert "--gpu" in _one_line_refusal(run_cli, "plan", "--gpu", "", "--tokens", "1e6", "--format", "json")


@pytest.mark.parametrize("args, words", [
    (["--rank", "8:64:+0.5"], "whole"),
    (["--batch", "1:8:xnan"], "non-finite"),
    (["--rank", "8:64:+nan"], "non-finite"),
    (["--seq", "512:8192:x1.5:"], "range"),
    (["--seq", "100:1000:x1.5"], "not an integer"),
    (["--dropout", "inf"], "--dropout"),
    (["--rank", "0,8"], "--rank"),
    (["--alpha", "16,0"], "nonzero alpha"),  # every value of a list or range is checked
    (["--alpha", "-8:8:+8"], "nonzero alpha"),
    (["--targets", "nonexistent_proj"], "none of the"),
    (["--gpu", ""], "--gpu"),
    (["--model", "x" * 5000], "characters"),
])
def test_sweep_options(tmp_path, run_cli, args, words):
    out = tmp_path / "o.csv"
    assert words in _one_line_refusal(run_cli, "sweep", "--model", "qwen2.5-0.5b", "--out", str(out), *args)
    assert not out.exists()


@pytest.mark.parametrize("out, words", [
    ("{d}/missing/out.csv", "does not exist"),
    ("{d}/out.xyz", "extension"),
    ("/proc/forbidden.csv", "forbidden"),
])
def test_sweep_out(tmp_path, run_cli, out, words):
    assert words in _one_line_refusal(run_cli, "sweep", "--model", "qwen2.5-0.5b", "--out", out.format(d=tmp_path))
    assert not (tmp_path / "missing").exists()


def test_sweep_mixed_errors_write_and_warn(tmp_path, run_cli):
    out = tmp_path / "o.csv"
    code, _, err = run_cli("sweep", "--model", "qwen2.5-0.5b,flan-t5-base", "--targets", "q_proj", "--out", str(out))
    assert code == 0 and out.exists() and "1 of 2 cases could not be estimated" in err


# ---- reports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "", "x" * 300])
def test_report_name_stays_inside_out(tmp_path, run_cli, monkeypatch, name):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    _one_line_refusal(run_cli, "report", "validation", "reference", "--out", "rep/sub", "--name", name)
    assert not (tmp_path / "rep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_report_leaves_no_empty_folder(tmp_path, run_cli, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    _one_line_refusal(run_cli, "report", "validation", str(tmp_path / "missing.jsonl"), "--out", "rep")
    assert not (tmp_path / "rep").exists()


def test_library_errors_are_loraplan_errors():
    from loraplan.case import split_values

    with pytest.raises(InputError):
        split_values("rank", "8:64:+0.5")
    with pytest.raises(LoraplanError):
        split_values("batch", "1:8:xnan")


def test_opt_needs_a_position_table_size():
    """OPT's learned position table is [max_position_embeddings + 2, h]: null cannot be built (by
    transformers either), so it is refused in one line; absent means OPTConfig's 2048."""
    from loraplan.catalog import model_entries
    from loraplan.errors import ConfigError
    from loraplan.hf import spec_from_config

    cfg = dict(model_entries()["opt-6.7b"]["config"])
    with pytest.raises(ConfigError, match="lacks 'max_position_embeddings'"):
        spec_from_config({**cfg, "max_position_embeddings": None}, "opt")
    cfg.pop("max_position_embeddings")
    assert spec_from_config(cfg, "opt").max_positions == 2048


# ---- setups torch cannot run, and options that do nothing (issue 13 review) -------------------


@pytest.mark.parametrize("args, words", [
    # nf4 + prepare_kbit: an fp32 stream; sdpa_kernel([FLASH]) raises "No available kernel"
    (["--model", "llama-3-8b", "--attention", "flash"], "flash needs an fp16/bf16 stream"),
    # grouped-query heads reach sdpa with enable_gqa: mem-efficient rejects them
    (["--model", "llama-3-8b", "--attention", "efficient"], "rejects grouped-query attention"),
    (["--model", "llama-3-8b", "--quant", "bf16", "--attention", "flash", "--gpu", "v100-sxm2-16gb"], "needs sm80+"),
    (["--model", "llama-2-7b", "--quant", "bf16", "--attention", "efficient", "--gpu", "v100-sxm2-16gb"],
     "takes bf16 on sm80+ only"),
])
def test_attention_torch_cannot_run_is_refused(run_cli, args, words):
    line = _one_line_refusal(run_cli, "estimate", *args)
    assert words in line and "--attention auto" in line, line


def test_attention_refusals_are_what_explain_does_not_offer(run_cli):
    """One rule set: every kernel explain lists as not offered is one estimate refuses, and the
    kernel explain names is one estimate runs."""
    for args in (["--model", "llama-3-8b"], ["--model", "llama-2-7b", "--quant", "bf16", "--gpu", "v100-sxm2-16gb"]):
        code, out, _ = run_cli("explain", *args, "--format", "json")
        assert code == 0
        rejected = [r for r in json.loads(out)["rejected"] if r.startswith("--attention")]
        assert rejected
        for r in rejected:
            kind = r.split(":")[0].split()[-1]
            line = _one_line_refusal(run_cli, "estimate", *args, "--attention", kind)
            assert r.split(": ", 1)[1].removesuffix(" here") in line, (r, line)
    code, out, _ = run_cli("estimate", "--model", "llama-2-7b", "--quant", "fp16", "--gpu", "v100-sxm2-16gb",
                           "--attention", "efficient", "--format", "json")
    assert code == 0 and json.loads(out)["inputs"]["attention_kernel"] == "efficient"


def test_attention_refusal_per_gpu_in_plan_and_sweep(tmp_path, run_cli):
    """A GPU that cannot run the kernel is skipped (plan) or one row's error (sweep); the others run."""
    code, out, err = run_cli("plan", "--model", "llama-3-8b", "--quant", "bf16", "--attention", "flash",
                             "--gpu", "v100-sxm2-16gb,h100-sxm-80gb", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert [r["gpu"] for r in d["gpus"]] == ["h100-sxm-80gb"]
    assert any("needs sm80+" in why for _, why in (tuple(s) for s in d["skipped"])) or "needs sm80+" in out
    # no GPU of the list can run it, for the same reason: the input is wrong (exit 2), not an empty table
    line = _one_line_refusal(run_cli, "plan", "--model", "llama-3-8b", "--quant", "bf16", "--attention", "efficient",
                             "--gpu", "a100-sxm-80gb,h100-sxm-80gb")
    assert "rejects grouped-query attention" in line
    csv = tmp_path / "s.csv"
    code, _, err = run_cli("sweep", "--model", "llama-3-8b", "--quant", "bf16", "--attention", "flash",
                           "--gpu", "v100-sxm2-16gb,h100-sxm-80gb", "--out", str(csv))
    assert code == 0 and "needs sm80+" in err


def test_stack_beyond_the_rules_is_said_and_malformed_is_refused(run_cli):
    code, out, _ = run_cli("estimate", "--stack", "torch=9.9", "--format", "json")
    assert code == 0
    notes = json.loads(out)["memory"]["notes"]
    assert any("torch 9.9 is newer" in n and "2.15" in n for n in notes), notes
    code, out, _ = run_cli("estimate", "--stack", "torch=2.13", "--format", "json")
    assert not any("newer" in n for n in json.loads(out)["memory"]["notes"])
    assert "malformed" in _one_line_refusal(run_cli, "estimate", "--stack", "torch=abc")


@pytest.mark.parametrize("command", ["estimate", "explain", "plan"])
@pytest.mark.parametrize("args, words", [
    (["--quant", "bf16", "--double-quant"], "--double-quant has no effect here"),
    (["--quant", "bf16", "--compute-dtype", "fp16"], "--compute-dtype fp16 has no effect"),
    (["--quant", "nf4", "--int8-outlier-fraction", "0.1"], "--int8-outlier-fraction 0.1 has no effect"),
    (["--no-gradient-checkpointing", "--reentrant"], "--reentrant has no effect"),
    (["--no-gradient-checkpointing", "--checkpoint-offload"], "--checkpoint-offload has no effect"),
    (["--no-gradient-checkpointing", "--checkpoint-every-n-layers", "2"], "--checkpoint-every-n-layers 2"),
])
def test_options_without_effect_are_refused(run_cli, command, args, words):
    line = _one_line_refusal(run_cli, command, "--model", "qwen2.5-0.5b", *args)
    assert words in line and "drop" in line, line


def test_options_without_effect_off_values_and_grids(tmp_path, run_cli):
    # asking for nothing is fine: a bf16 base runs without double quant anyway
    code, _, err = run_cli("estimate", "--model", "qwen2.5-0.5b", "--quant", "bf16", "--no-double-quant")
    assert code == 0, err
    out = tmp_path / "g.csv"
    # a grid applies double quant where it acts (the nf4 points) and runs the bf16 points without it
    code, _, err = run_cli("sweep", "--model", "qwen2.5-0.5b", "--quant", "bf16,nf4", "--double-quant",
                           "--out", str(out))
    assert code == 0, err
    rows = out.read_text().splitlines()
    assert len(rows) == 3 and not any(r.endswith(",") is False and "error" in r for r in rows[1:])
    for cmd in (["sweep", "--out", str(out)], ["report", "compare"]):
        line = _one_line_refusal(run_cli, *cmd, "--model", "qwen2.5-0.5b", "--quant", "bf16", "--double-quant")
        assert "contradictory grid: --double-quant has no effect on any point" in line


def test_config_settings_without_effect_are_listed_as_ignored(tmp_path, run_cli):
    """A real recipe may carry use_reentrant with checkpointing off: listed as ignored, not refused;
    typing the same combination is refused."""
    cfg = tmp_path / "trl.yaml"
    cfg.write_text("model_name_or_path: Qwen/Qwen2.5-0.5B\ngradient_checkpointing: false\n"
                   "gradient_checkpointing_kwargs:\n  use_reentrant: true\n")
    code, _, err = run_cli("estimate", "--config", str(cfg))
    assert code == 0, err
    assert "ignored  gradient_checkpointing_kwargs.use_reentrant: no effect here" in err
    assert "used     gradient_checkpointing_kwargs.use_reentrant" not in err
    code, out, err = run_cli("estimate", "--config", str(cfg), "--format", "json")
    d = json.loads(out)
    assert d["inputs"]["reentrant"] is False and d["inputs"]["gradient_checkpointing"] is False
    assert any(i["key"] == "gradient_checkpointing_kwargs.use_reentrant" for i in d["inputs"]["config"]["ignored"]), d["inputs"]
    # with checkpointing turned on by the command line, the file's use_reentrant acts
    code, out, err = run_cli("estimate", "--config", str(cfg), "--gradient-checkpointing", "--format", "json")
    assert code == 0 and json.loads(out)["inputs"]["reentrant"] is True
    code, _, err = run_cli("estimate", "--config", str(cfg), "--reentrant")  # the account, then the refusal
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --reentrant has no effect here"), err


def test_plan_search_stops_where_an_explicit_kernel_stops(run_cli):
    """mistral-7b --attention flash: flash runs below the 4096-token sliding window and not at it, so
    plan's largest sequence is 4095 (not an error from the search's first probe past it)."""
    code, out, err = run_cli("plan", "--model", "mistral-7b", "--quant", "bf16", "--attention", "flash", "--seq", "2048",
                             "--gpu", "h100-sxm-80gb", "--format", "json")
    assert code == 0, err
    row = json.loads(out)["gpus"][0]
    assert row["max_seq"] == 4095 and row["fits"]
