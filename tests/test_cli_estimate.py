"""`loraplan estimate`: output formats and one-line errors (exit 2, no traceback)."""

import json

import pytest

from conftest import run_module


def test_default_table_runs(run_cli):
    code, out, err = run_cli("estimate")
    assert code == 0, err
    assert "llama-2-7b" in out and "peak allocated" in out and "-> fits (headroom" in out
    assert "[analytic]" in out and "nf4 base" in out and "0.00 GiB" not in out


def test_json_has_the_contract_keys(run_cli):
    code, out, _ = run_cli("estimate", "--format", "json", "--model", "open-llama-3b-v2", "--rank", "8",
                           "--targets", "q_proj,v_proj")
    d = json.loads(out)
    assert d["params"]["trainable"] == 2_662_400
    for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes", "components"):
        assert k in d["memory"]
    assert d["fits"] is True and d["gpu"] == "h100-sxm-80gb"
    assert d["inputs"]["alpha"] == 16.0  # default 2 x rank
    assert sum(d["memory"]["components"].values()) == d["memory"]["peak_allocated_bytes"]


def test_csv_is_one_row(run_cli):
    code, out, _ = run_cli("estimate", "--format", "csv")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert "memory.peak_allocated_bytes" in lines[0]


def test_config_json_path_and_folder(run_cli, tiny_llama_config):
    for p in (tiny_llama_config, tiny_llama_config / "config.json"):
        code, out, err = run_cli("estimate", "--model", str(p), "--format", "json", "--gpu", "t4-16gb")
        assert code == 0, err
        assert json.loads(out)["params"]["trainable"] > 0


def _one_line_error(run_cli, *args, contains=()):
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for c in contains:
        assert c in err, err
    return err


def test_unknown_model_suggests(run_cli):
    _one_line_error(run_cli, "estimate", "--model", "llama-2-7", contains=("llama-2-7", "did you mean", "llama-2-7b"))


def test_unreadable_config(run_cli, tmp_path):
    _one_line_error(run_cli, "estimate", "--model", str(tmp_path / "nope" / "config.json"), contains=("cannot read",))


def test_malformed_config(run_cli, tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    _one_line_error(run_cli, "estimate", "--model", str(p), contains=("not valid JSON", "line 1"))


def test_config_without_model_type(run_cli, tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"hidden_size": 8}')
    _one_line_error(run_cli, "estimate", "--model", str(p), contains=("model_type",))


def test_unknown_model_type_without_torch_says_how(monkeypatch, tmp_path):
    import importlib.util

    from loraplan.errors import ConfigError
    from loraplan.hf import spec_from_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("torch", "transformers") else real(n, *a))
    with pytest.raises(ConfigError, match=r"pip install 'loraplan\[profile\]'"):
        spec_from_config({"model_type": "mamba_made_up", "hidden_size": 8}, "x")


def test_target_matching_nothing_lists_modules(run_cli):
    _one_line_error(run_cli, "estimate", "--targets", "query", contains=("'query'", "q_proj", "down_proj", "all-linear"))


@pytest.mark.parametrize("opt,val,needle", [("--rank", "0", "--rank 0"), ("--batch", "0", "--batch 0"),
                                            ("--rank", "abc", "not an integer"), ("--seq", "-5", "--seq -5"),
                                            ("--rank", "-8", "--rank -8"), ("--rank", "1.5", "not an integer"),
                                            ("--dropout", "1.5", "--dropout"), ("--dropout", "1", "[0, 1)"),
                                            ("--dropout", "-0.1", "[0, 1)"), ("--dropout", "nan", "--dropout"),
                                            ("--alpha", "0", "nonzero alpha"), ("--alpha", "-0.0", "nonzero alpha"),
                                            ("--alpha", "inf", "finite"), ("--alpha", "x", "not a number")])
def test_bad_numbers(run_cli, opt, val, needle):
    _one_line_error(run_cli, "estimate", opt, val, contains=(needle,))


def test_negative_alpha_is_a_mirrored_run(run_cli):
    """peft scales by alpha / r with lora_B starting at zero: -16 trains as 16 with B mirrored, so
    it is accepted (the prediction does not depend on alpha)."""
    import json

    runs = [run_cli("estimate", "--alpha", a, "--format", "json") for a in ("-16", "16")]
    assert [c for c, _, _ in runs] == [0, 0]
    neg, pos = (json.loads(out) for _, out, _ in runs)
    assert neg["inputs"]["alpha"] == -16.0
    assert neg["memory"]["peak_allocated_bytes"] == pos["memory"]["peak_allocated_bytes"]


def test_unknown_gpu_and_optimizer(run_cli):
    _one_line_error(run_cli, "estimate", "--gpu", "h100", contains=("unknown GPU 'h100'", "h100-"))
    _one_line_error(run_cli, "estimate", "--optimizer", "adam", contains=("'adam'", "adamw"))
    _one_line_error(run_cli, "estimate", "--quant", "int4", contains=("'int4'", "nf4"))


def test_unknown_option(run_cli):
    _one_line_error(run_cli, "estimate", "--ranks", "8", contains=("--ranks",))


def test_seq_beyond_positions_warns(run_cli):
    code, out, err = run_cli("estimate", "--seq", "8192")
    assert code == 0
    assert err.startswith("warning:") and "4096" in err


def test_estimate_path_never_imports_torch_or_pandas():
    r = run_module(
        "import sys; from loraplan.cli import main; main(['estimate', '--format', 'json']); "
        "bad=[m for m in ('torch','transformers','pandas','peft') if m in sys.modules]; "
        "assert not bad, bad")
    assert r.returncode == 0, r.stderr


def test_models_cli_family_filter():
    from click.testing import CliRunner

    from loraplan.cli import cli

    r = CliRunner().invoke(cli, ["models", "--family", "olmo2", "--format", "json"])
    assert r.exit_code == 0, r.output
    import json as _json

    rows = _json.loads(r.output)
    assert rows and {x["model_type"] for x in rows} == {"olmo2"}


def test_catalog_tables_leave_columns_out_whole_at_80_columns(monkeypatch, capsys):
    """At 80 columns 'models' and 'gpus' leave whole columns out and say which, never cut a number
    short (a vocab of 32000 printed as 3200 would be a wrong number)."""
    from loraplan.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["models", "--size", "7B"]) == 0
    out = capsys.readouterr().out
    assert max(len(l) for l in out.splitlines()) <= 80
    assert "not shown at this width: source, tied, vocab" in out and " 3200 " not in out
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["models", "--size", "7B"]) == 0
    assert "32000" in capsys.readouterr().out
