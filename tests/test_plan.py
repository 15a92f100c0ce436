"""loraplan plan: search, ranking, suggestions, job arithmetic and one-line errors."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from loraplan.catalog import load_gpu
from loraplan.cli import main
from loraplan.case import resolve_case
from loraplan.errors import InputError
from loraplan.plan import Job, _largest, parse_prices, plan_job


def fake_estimate(model, lora, train, gpu, cal, with_time=True):
    """Memory = 1 GiB + 1 MiB per token + 2 GiB without checkpointing; no time (plan adds it)."""
    total = 2**30 + train.batch * train.seq * 2**20 + (0 if train.gradient_checkpointing else 2 * 2**30)
    return SimpleNamespace(memory=SimpleNamespace(device_total_bytes=total), time=None)


def test_largest_is_exact():
    for limit in (1, 2, 3, 37, 1000, 4096):
        assert _largest(lambda n: n <= limit, 1, 4096) == limit
    assert _largest(lambda n: False, 1, 100) == 0


def test_plan_search_and_marks():
    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 1024, "batch": 4})
    gpus = [load_gpu(g) for g in ("t4-16gb", "l4-24gb", "h100-sxm-80gb")]
    job = Job(examples=1000, epochs=2)
    p = plan_job(m, l, t, gpus, job, estimate_fn=fake_estimate, prices={"h100-sxm-80gb": 0.01})
    by = {g.gpu: g for g in p.gpus}
    t4 = by["t4-16gb"]
    assert t4.max_micro_batch == (t4.memory_bytes - 2**30) // (1024 * 2**20)
    assert t4.max_seq == (t4.memory_bytes - 2**30) // (4 * 2**20)
    assert all(g.fits for g in p.gpus)
    assert by["h100-sxm-80gb"].cheapest and by["h100-sxm-80gb"].fastest
    assert sum(g.cheapest for g in p.gpus) == sum(g.fastest for g in p.gpus) == 1
    assert t4.micro_steps == 500  # 1000 examples x 2 epochs / micro-batch 4
    assert t4.total_hours == pytest.approx(500 * t4.step_s / 3600)
    assert t4.total_usd == pytest.approx(t4.total_hours * t4.price_usd_per_hour)


def test_effective_batch_picks_micro_batch_and_accumulation():
    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 4096})
    gpu = load_gpu("t4-16gb")
    p = plan_job(m, l, t, [gpu], Job(tokens=10**7, effective_batch=32), fixed_batch=False, estimate_fn=fake_estimate)
    g = p.gpus[0]
    assert g.micro_batch == min(32, g.max_micro_batch) and g.grad_accum == -(-32 // g.micro_batch)


def test_suggestions_when_nothing_fits():
    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 8192, "batch": 2, "gradient_checkpointing": False})
    p = plan_job(m, l, t, [load_gpu("t4-16gb")], Job(tokens=10**6), estimate_fn=fake_estimate)
    g = p.gpus[0]
    assert not g.fits and not g.cheapest and not g.fastest
    opts = {s.option.split(" ")[0] for s in g.suggestions}
    assert "--gradient-checkpointing" in opts and "--batch" in opts and "--seq" in opts
    assert all(s.saving_bytes > 0 for s in g.suggestions)
    assert any(s.fits for s in g.suggestions)


def test_parse_prices_errors():
    ids = ["h100-sxm-80gb"]
    assert parse_prices(["h100-sxm-80gb=2.5"], ids) == {"h100-sxm-80gb": 2.5}
    with pytest.raises(InputError, match="not a number"):
        parse_prices(["h100-sxm-80gb=cheap"], ids)
    with pytest.raises(InputError, match="GPU_ID=USD"):
        parse_prices(["2.5"], ids)


def test_job_validation():
    with pytest.raises(InputError):
        Job().validate()
    with pytest.raises(InputError):
        Job(tokens=5, examples=5).validate()


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_json(capsys):
    code, out, err = run(capsys, "plan", "--model", "qwen2.5-0.5b", "--examples", "1000", "--tokens-per-example", "256",
                         "--gpu", "l4-24gb,h100-sxm-80gb", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert [g["gpu"] for g in d["gpus"]] == ["l4-24gb", "h100-sxm-80gb"]
    assert d["inputs"]["seq"] == 256
    assert all(g["fits"] and g["step_s"] > 0 and g["max_micro_batch"] >= 1 for g in d["gpus"])


def test_cli_plan_table_and_csv(capsys):
    code, out, _ = run(capsys, "plan", "--model", "qwen2.5-0.5b", "--tokens", "1e6", "--gpu", "l4-24gb")
    assert code == 0 and "l4-24gb" in out and "cheapest" in out
    code, out, _ = run(capsys, "plan", "--model", "qwen2.5-0.5b", "--tokens", "1e6", "--gpu", "l4-24gb", "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("gpu,")


@pytest.mark.parametrize("args, needle", [
    (["--gpu", "h100-sxm"], "did you mean"),
    (["--price", "h100-sxm-80gb=abc"], "not a number"),
    (["--price", "nogpu=1"], "unknown GPU"),
    ([], "job size"),
])
def test_cli_plan_errors(capsys, args, needle):
    base = ["plan", "--model", "qwen2.5-0.5b"] + ([] if args == [] else ["--tokens", "1000"])
    code, out, err = run(capsys, *base, *args)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
