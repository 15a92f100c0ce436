"""plan over N x GPU configurations (issue 13): the layouts it searches, the ranking by fit, $ and time,
the job arithmetic with data-parallel ranks, and the options a layout needs. The memory of each
configuration comes from an injected estimate function (per-GPU memory is another part of the issue);
the call shape is estimate(model, lora, train_with_strategy_and_num_gpus, gpu, calibration)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from loraplan.case import resolve_case
from loraplan.catalog import load_gpu
from loraplan.cli import main
from loraplan.errors import InputError
from loraplan.estimate.result import TimeEstimate
from loraplan.plan import SEARCH_STRATEGIES, Job, Layout, plan_job, search_layouts

GiB = 2**30
SHARDED = ("fsdp", "fsdp-offload", "zero3", "zero3-offload")


def fake_estimate(calls=None):
    """Per-GPU memory: 40 GiB of weights, divided by N when sharded (or split by device_map), plus
    1 MiB per token; time: 1 s of compute + 5% per extra GPU of communication (none for device_map,
    whose ranks work one at a time); tokens/s counts every data-parallel rank."""

    def fn(model, lora, train, gpu, cal, with_time=True):
        if calls is not None:
            calls.append(train)
        n = train.num_gpus
        weights = 40 * GiB / (n if train.strategy in SHARDED + ("device-map",) else 1)
        total = int(weights + train.batch * train.seq * 2**20)
        step = 1.0 * train.gradient_accumulation + (0.05 * (n - 1) if train.strategy != "device-map" else 0.0)
        dp = n if train.strategy not in ("single", "device-map") else 1
        tokens = train.batch * train.seq * train.gradient_accumulation * dp
        t = TimeEstimate(step_s=step, tokens_per_s=tokens / step, components={}, bound="compute")
        return SimpleNamespace(memory=SimpleNamespace(device_total_bytes=total, notes=()), time=t,
                               verdict="fits" if total <= gpu.memory_bytes else "does not fit", margin_bytes=0)

    return fn


def test_search_layouts():
    _, _, t = resolve_case({"model": "qwen2.5-0.5b"})
    every = search_layouts(t, False, False)
    assert every[0] == Layout("single", 1) and len(every) == 1 + len(SEARCH_STRATEGIES) * 3
    assert {lay.num_gpus for lay in every} == {1, 2, 4, 8}
    # the plan command resolves the one-GPU case and puts the given layout fields on it
    assert [lay.num_gpus for lay in search_layouts(replace(t, strategy="fsdp"), True, False)] == [2, 4, 8]
    # a multi-GPU engine on one GPU is refused (trainers.check_parallel), offload included
    assert [lay.num_gpus for lay in search_layouts(replace(t, strategy="fsdp-offload"), True, False)] == [2, 4, 8]
    assert {lay.strategy for lay in search_layouts(replace(t, num_gpus=4), False, True)} == set(SEARCH_STRATEGIES)
    _, _, t = resolve_case({"model": "qwen2.5-0.5b", "num_gpus": 4, "strategy": "zero2"})
    assert search_layouts(t, True, True) == [Layout("zero2", 4)]


def test_ranking_by_fit_then_dollars_then_time():
    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 1024, "batch": 2})
    gpus = [load_gpu("rtx4090-24gb"), load_gpu("h100-sxm-80gb")]
    calls = []
    p = plan_job(m, l, t, gpus, Job(tokens=10**8), estimate_fn=fake_estimate(calls),
                 layouts=search_layouts(t, False, False))
    rows = p.gpus
    # the estimate function got the layout in the TrainSpec
    assert {(c.strategy, c.num_gpus) for c in calls} >= {("fsdp", 2), ("ddp", 8), ("device-map", 4)}
    # 40 GiB does not fit a 24 GB card unless sharded or split: 1x and DDP rows of the 4090 do not fit
    by = {(r.gpu, r.strategy, r.num_gpus): r for r in rows}
    assert not by[("rtx4090-24gb", "single", 1)].fits and not by[("rtx4090-24gb", "ddp", 8)].fits
    assert by[("rtx4090-24gb", "fsdp", 2)].fits and by[("rtx4090-24gb", "device-map", 2)].fits
    # fitting rows first, then by total dollars (price x GPUs x hours), then hours
    fits = [r.fits for r in rows]
    assert fits == sorted(fits, reverse=True)
    usd = [r.total_usd for r in rows if r.fits]
    assert usd == sorted(usd)
    for r in rows:
        assert r.total_usd == pytest.approx(r.total_hours * r.price_usd_per_hour * r.num_gpus)
    # FSDP and ZeRO-3 cost and take the same here: ties, each marked (plan.TIE_REL)
    assert [(r.strategy, r.num_gpus) for r in rows if r.cheapest] == [("fsdp", 2), ("zero3", 2)]
    fastest = [r for r in rows if r.fastest]
    assert fastest == [r for r in rows if r.fits and r.num_gpus == 8 and r.strategy != "device-map"]
    assert len(fastest) > 1
    assert rows[0].cheapest
    # one H100 fits: more H100s are not searched (the cheapest answer cannot be several of a GPU one fits)
    assert [k for k in by if k[0] == "h100-sxm-80gb"] == [("h100-sxm-80gb", "single", 1)]
    # data-parallel ranks split the job; device_map's do not
    one = by[("rtx4090-24gb", "single", 1)]
    ddp4 = by[("rtx4090-24gb", "ddp", 4)]
    dm4 = by[("rtx4090-24gb", "device-map", 4)]
    assert ddp4.micro_steps == math.ceil(one.micro_steps / 4)
    assert dm4.micro_steps == one.micro_steps and dm4.total_usd == pytest.approx(4 * one.total_usd)
    assert ddp4.total_hours == pytest.approx(ddp4.micro_steps * ddp4.step_s / 3600)
    assert ddp4.usd_per_mtok == pytest.approx(ddp4.price_usd_per_hour * 4 / (ddp4.tokens_per_s * 3600) * 1e6)


def test_effective_batch_counts_every_data_parallel_rank():
    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 512, "batch": 2})
    gpu = load_gpu("h100-sxm-80gb")
    by = {lay.num_gpus: plan_job(m, l, t, [gpu], Job(tokens=10**7, effective_batch=32), estimate_fn=fake_estimate(),
                                 layouts=[lay]).gpus[0] for lay in (Layout("single", 1), Layout("ddp", 4))}
    assert by[1].grad_accum == 16 and by[4].grad_accum == 4  # 32 = 2 x 16 = 2 x 4 x 4
    # the job's hours are its optimizer steps x the step time (which covers the accumulation)
    for r in by.values():
        assert r.total_hours == pytest.approx(math.ceil(r.micro_steps / r.grad_accum) * r.step_s / 3600)


def test_layout_options_and_what_does_not_apply():
    calls = []
    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "quant": "nf4"})
    p = plan_job(m, l, t, [load_gpu("a100-sxm-80gb")], Job(), estimate_fn=fake_estimate(calls),
                 layouts=[Layout("fsdp", 2), Layout("ddp", 16)])
    (row,) = [r for r in p.gpus if r.strategy == "fsdp"]
    # FSDP-QLoRA needs a float storage, and FSDP1 one dtype per layer (no fp32 upcast of the norms)
    assert row.layout_options == "--strategy fsdp --num-gpus 2 --quant-storage bf16 --no-prepare-kbit"
    assert {(c.quant_storage, c.prepare_kbit) for c in calls if c.strategy == "fsdp"} == {("bf16", False)}
    assert not [r for r in p.gpus if r.num_gpus == 16]  # 8 GPUs per HGX node: 16 need --nodes 2
    t2 = replace(t, nodes=2)
    (row16,) = plan_job(m, l, t2, [load_gpu("a100-sxm-80gb")], Job(), estimate_fn=fake_estimate(),
                        layouts=[Layout("ddp", 16)]).gpus
    assert row16.nodes == 2 and row16.layout_options == "--strategy ddp --num-gpus 16 --nodes 2"
    # int8 cannot be sharded: searching leaves those layouts out; fixed, one GPU type: the one-line error
    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "quant": "int8"})
    p = plan_job(m, l, t, [load_gpu("rtx4090-24gb")], Job(), estimate_fn=fake_estimate(),
                 layouts=search_layouts(t, False, False))  # one 4090 does not fit: several are searched
    assert {r.strategy for r in p.gpus} == {"single", "ddp", "device-map"}
    with pytest.raises(InputError, match="--quant int8"):
        plan_job(m, l, t, [load_gpu("a100-sxm-80gb")], Job(), estimate_fn=fake_estimate(), layouts=[Layout("zero3", 2)])


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_fixed_layout_and_search(capsys):
    code, out, err = _run(capsys, "plan", "--model", "qwen2.5-0.5b", "--tokens", "1e6", "--gpu", "l4-24gb,a100-sxm-80gb",
                          "--strategy", "fsdp", "--num-gpus", "2", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert [(g["gpu"], g["num_gpus"], g["strategy"]) for g in d["gpus"]] == [("l4-24gb", 2, "fsdp"),
                                                                             ("a100-sxm-80gb", 2, "fsdp")]
    code, out, err = _run(capsys, "plan", "--model", "llama-2-13b", "--quant", "bf16", "--tokens", "1e6",
                          "--gpu", "l4-24gb")  # 26 GB of weights: one L4 does not fit, several are searched
    assert code == 0, err
    assert "2x l4-24gb" in out and max(len(line) for line in out.splitlines()) <= 80
    code, out, err = _run(capsys, "plan", "--model", "qwen2.5-0.5b", "--tokens", "1e6", "--gpu", "l4-24gb",
                          "--strategy", "ddp", "--num-gpus", "16")
    assert code == 2 and "--nodes 2" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, estimate_also", [
    (["--quant", "int8", "--strategy", "fsdp", "--num-gpus", "2"], []),  # LLM.int8 cannot be sharded
    (["--quant", "int8", "--strategy", "fsdp"], ["--num-gpus", "2"]),  # plan searches 2, 4, 8 GPUs: none applies
    (["--strategy", "fsdp", "--fsdp-version", "2", "--fsdp-backward-prefetch", "backward-pre", "--num-gpus", "2"], []),
    (["--quant", "fp32", "--attn-implementation", "flash_attention_2"], []),  # fp32 inputs on every GPU
])
def test_cli_plan_refuses_what_no_gpu_can_run_as_estimate_does(capsys, args, estimate_also):
    """An input every GPU refuses for the same reason is the input's error: plan exits 2 with the
    line estimate prints, not a table of 'not planned' rows (``estimate_also``: the GPU count
    estimate needs where plan searches GPU counts)."""
    code, out, err = _run(capsys, "estimate", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm-80gb", *args,
                          *estimate_also)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    line = err
    code, out, err = _run(capsys, "plan", "--model", "qwen2.5-0.5b", "--gpu", "t4-16gb,l4-24gb,h100-sxm-80gb", *args)
    assert code == 2 and err == line and not out


def test_cli_plan_keeps_the_table_when_the_refusal_is_the_gpus(capsys):
    """flash_attention_2 needs sm80 and bf16 autocast needs bf16 tensor cores: the T4 is listed as
    not planned, the other GPUs are planned (exit 0)."""
    for args in (["--attn-implementation", "flash_attention_2"], ["--mixed-precision", "bf16"]):
        code, out, err = _run(capsys, "plan", "--model", "qwen2.5-0.5b", "--gpu", "t4-16gb,l4-24gb", *args,
                              "--format", "json")
        assert code == 0, err
        d = json.loads(out)
        assert {g["gpu"] for g in d["gpus"]} == {"l4-24gb"}
        assert [s["gpu"] for s in d["skipped"]] == ["t4-16gb"] and "7.5" in d["skipped"][0]["reason"]
