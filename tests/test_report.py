import base64
import re

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

from loraplan.catalog import load_calibration, load_gpu  # noqa: E402
from loraplan.case import resolve_case  # noqa: E402
from loraplan.estimate.api import estimate  # noqa: E402
from loraplan.render import GiB  # noqa: E402

PNG = b"\x89PNG"


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)]


def test_compare_report_content(run_cli, tmp_path):
    code, out, err = run_cli("report", "compare", "--model", "qwen2.5-0.5b", "--quant", "nf4,bf16",
                             "--gpu", "a10g-24gb,h100-sxm-80gb", "--out", str(tmp_path), "--name", "c")
    assert code == 0, err
    html = (tmp_path / "c.html").read_text()
    md = (tmp_path / "c.md").read_text()
    imgs = _images(html)
    assert len(imgs) == 4 and all(i.startswith(PNG) for i in imgs)  # ledger, vs seq, vs batch, time/cost
    assert html.count("<table") == 2 and "Side by side" in html and "Step time and cost" in html
    assert len(re.findall(r"!\[[^\]]+\]\(c-fig\d\.png\)", md)) == 4
    assert all((tmp_path / f"c-fig{i}.png").read_bytes().startswith(PNG) for i in range(1, 5))
    # numbers match the estimates
    for q in ("nf4", "bf16"):
        m, lo, t = resolve_case({"model": "qwen2.5-0.5b", "quant": q})
        for gid in ("a10g-24gb", "h100-sxm-80gb"):
            e = estimate(m, lo, t, load_gpu(gid), load_calibration(gid))
            assert f"{e.time.step_s:.3f}" in md
        e = estimate(m, lo, t, load_gpu("a10g-24gb"), load_calibration("a10g-24gb"))
        for v in (e.memory.peak_allocated_bytes, e.memory.device_total_bytes):
            assert f"{v / GiB:.2f}" in md and f"{v / GiB:.2f}" in html
    assert "quant=nf4" in md and "quant=bf16" in md


def test_compare_grid_file_and_empty_grid(run_cli, tmp_path):
    g = tmp_path / "g.json"
    g.write_text('{"model": "qwen2.5-0.5b", "rank": [8, 16]}')
    code, _, err = run_cli("report", "compare", "--grid", str(g), "--gpu", "h100-sxm-80gb", "--out", str(tmp_path))
    assert code == 0, err
    assert "rank=16" in (tmp_path / "compare.md").read_text()
    e = tmp_path / "e.json"
    e.write_text("[]")
    code, _, err = run_cli("report", "compare", "--grid", str(e), "--out", str(tmp_path))
    assert code == 2 and ("empty" in err or "no grid" in err)


def test_empty_grid_from_library():
    from loraplan.errors import InputError
    from loraplan.report.compare import configs_from_cases

    with pytest.raises(InputError, match="empty"):
        configs_from_cases([])


def test_unwritable_out(run_cli, tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    code, _, err = run_cli("report", "compare", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm-80gb",
                           "--out", str(blocker / "sub"))
    assert code == 2 and "cannot write the report" in err and "--out" in err


def test_validation_report_content(run_cli, tmp_path):
    code, _, err = run_cli("report", "validation", "reference", "--out", str(tmp_path))
    assert code == 0, err
    html = (tmp_path / "validation.html").read_text()
    md = (tmp_path / "validation.md").read_text()
    assert len(_images(html)) == 3
    from loraplan.calibrate import predict
    from loraplan.measurements import load_measurements

    for m in load_measurements(["reference"]):
        e = predict(m, load_calibration(m.gpu))
        err_pct = 100 * (e.memory.peak_allocated_bytes - m.peak_allocated_bytes) / m.peak_allocated_bytes
        row = next(line for line in md.splitlines() if line.startswith(f"| {m.id} |"))
        assert f"{e.memory.peak_allocated_bytes / GiB:.3f}" in row and f"{err_pct:+.2f}%" in row
    assert "MAPE" in md and "Predicted vs measured" in md


def test_validation_report_mixed_gpus(run_cli, tmp_path, profile_record, write_jsonl):
    f = write_jsonl(tmp_path / "a.jsonl", [profile_record(2 * 2**30, gpu="a10g-24gb")])
    code, _, err = run_cli("report", "validation", str(f), "reference", "--out", str(tmp_path))
    assert code == 2 and "--gpu" in err


@pytest.mark.parametrize("tokens", ["nan", "inf", "-1", "1e300"])
def test_compare_job_tokens_are_a_finite_count(run_cli, tmp_path, tokens):
    """NaN passed 'tokens <= 0' and wrote a report with NaN hours; now one line, exit 2, nothing written."""
    code, _, err = run_cli("report", "compare", "--model", "qwen2.5-0.5b", "--gpu", "l4-24gb", "--tokens", tokens,
                           "--out", str(tmp_path))
    assert code == 2 and "--tokens" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
