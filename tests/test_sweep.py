"""loraplan sweep: grid building, outputs, guards and one-line errors."""

import csv
import json

import pytest

from loraplan.cli import main
from loraplan.errors import ConfigError, InputError
from loraplan.sweep import build_cases, count_cases, evaluate, load_grid


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_cases_product_and_gpu():
    cases = build_cases({"model": "qwen2.5-0.5b", "seq": "512,1024", "rank": "8:32:x2", "gpu": "l4-24gb,t4-16gb"})
    assert len(cases) == 2 * 3 * 2 == count_cases({"model": "qwen2.5-0.5b", "seq": "512,1024", "rank": "8:32:x2",
                                                    "gpu": "l4-24gb,t4-16gb"})
    assert {c["gpu"] for c in cases} == {"l4-24gb", "t4-16gb"}


def test_evaluate_rows_match_estimate():
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.commands.options import resolve_case
    from loraplan.estimate.api import estimate

    rows = list(evaluate(build_cases({"model": "qwen2.5-0.5b", "seq": "256,512", "gpu": "h100-sxm-80gb"})))
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 512})
    g = load_gpu("h100-sxm-80gb")
    e = estimate(m, l, t, g, load_calibration(g.id))
    assert rows[1]["device_total_bytes"] == e.memory.device_total_bytes
    assert rows[1]["step_s"] == pytest.approx(e.time.step_s)
    assert rows[1]["fits"] == e.fits


def test_bad_case_becomes_error_row():
    rows = list(evaluate([{"model": "qwen2.5-0.5b", "targets": "nonexistent_proj", "gpu": "l4-24gb"}]))
    assert "nonexistent_proj" in rows[0]["error"]


def test_grid_files(tmp_path):
    t = tmp_path / "g.toml"
    t.write_text('model = "qwen2.5-0.5b"\nseq = [256, 512]\nquant = ["nf4", "bf16"]\ngpu = ["l4-24gb"]\n')
    assert len(build_cases({}, load_grid(t))) == 4
    j = tmp_path / "g.json"
    j.write_text(json.dumps([{"model": "qwen2.5-0.5b", "rank": [8, 16]}, {"model": "qwen2.5-0.5b", "batch": 2}]))
    assert len(build_cases({}, load_grid(j))) == 3
    bad = tmp_path / "bad.json"
    bad.write_text('{"sequence": [1]}')
    with pytest.raises(ConfigError, match="unknown option"):
        load_grid(bad)
    empty = tmp_path / "empty.json"
    empty.write_text('{"seq": []}')
    with pytest.raises(InputError, match="empty list"):
        load_grid(empty)


def test_contradictory_grid():
    with pytest.raises(InputError, match="contradictory"):
        build_cases({"quant": "bf16", "int8_outlier_fraction": "0.1"})
    with pytest.raises(InputError, match="both on the command line and in the grid"):
        build_cases({"seq": "512"}, [{"seq": [256]}])


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_cli_sweep_writes(capsys, tmp_path, ext):
    if ext == "parquet":
        pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
    out = tmp_path / f"s.{ext}"
    code, _, err = run(capsys, "sweep", "--model", "qwen2.5-0.5b", "--seq", "256,512", "--batch", "1,2",
                       "--gpu", "l4-24gb", "--out", str(out))
    assert code == 0, err
    if ext == "csv":
        rows = list(csv.DictReader(out.open()))
    elif ext == "jsonl":
        rows = [json.loads(x) for x in out.read_text().splitlines()]
    else:
        import pandas as pd

        rows = pd.read_parquet(out).to_dict("records")
    assert len(rows) == 4 and "step_s" in rows[0] and "device_total_bytes" in rows[0]


@pytest.mark.parametrize("args, needle", [
    (["--gpu", "h100-sxm", "--out", "x.csv"], "did you mean"),
    (["--seq", "1:100000:+1", "--rank", "1:2:+1", "--out", "x.csv"], "--yes"),
    (["--out", "x.txt"], "extension"),
])
def test_cli_sweep_errors(capsys, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "sweep", "--model", "qwen2.5-0.5b", *args)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_cli_sweep_bad_grid(capsys, tmp_path):
    g = tmp_path / "g.json"
    g.write_text('{"seq": []}')
    code, _, err = run(capsys, "sweep", "--grid", str(g), "--out", str(tmp_path / "o.csv"))
    assert code == 2 and "empty list" in err
