"""loraplan plan: search, ranking, suggestions, job arithmetic and one-line errors."""

import json
import math
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
    Job().validate()  # no size: fit, largest batch and sequence only
    assert not Job().sized and Job().micro_steps(1, 512) is None
    for bad in (Job(tokens=5, examples=5), Job(tokens=0), Job(tokens=-3), Job(examples=10, epochs=float("inf")),
                Job(tokens=10, epochs=float("nan")), Job(tokens=10, epochs=0), Job(tokens=10, effective_batch=0),
                Job(tokens_per_example=512)):
        with pytest.raises(InputError):
            bad.validate()


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_json(capsys):
    code, out, err = run(capsys, "plan", "--model", "qwen2.5-0.5b", "--examples", "1000", "--tokens-per-example", "256",
                         "--gpu", "l4-24gb,h100-sxm-80gb", "--format", "json", "--num-gpus", "1")  # one row per GPU
    assert code == 0, err
    d = json.loads(out)
    assert [g["gpu"] for g in d["gpus"]] == ["l4-24gb", "h100-sxm-80gb"]
    assert d["inputs"]["seq"] == 256
    assert all(g["fits"] and g["step_s"] > 0 and g["max_micro_batch"] >= 1 for g in d["gpus"])


def test_cli_plan_table_and_csv(capsys):
    code, out, _ = run(capsys, "plan", "--model", "qwen2.5-0.5b", "--tokens", "1e6", "--gpu", "l4-24gb")
    assert code == 0 and "l4-24gb" in out and "cheapest" in out
    assert max(len(line) for line in out.splitlines()) <= 80  # captured: an 80-column console
    code, out, _ = run(capsys, "plan", "--model", "qwen2.5-0.5b", "--tokens", "1e6", "--gpu", "l4-24gb", "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("gpu,")


@pytest.mark.parametrize("args, needle", [
    (["--gpu", "h100-sxm"], "did you mean"),
    (["--price", "h100-sxm-80gb=abc"], "not a number"),
    (["--price", "nogpu=1"], "unknown GPU"),
    (["--epochs", "inf"], "--epochs"),
    (["--epochs", "nan"], "--epochs"),
    (["--epochs", "-1"], "--epochs"),
    (["--effective-batch", "0"], "--effective-batch"),
    (["--price", "l4-24gb=nan"], "l4-24gb"),
    (["--price", "l4-24gb=-1"], "l4-24gb"),
    (["--price", "l4-24gb=x"], "not a number"),
    (["--tokens", "nan"], "--tokens"),
    (["--tokens", "inf"], "--tokens"),
    (["--tokens", "0"], "--tokens"),
    (["--tokens", "-5"], "--tokens"),
    (["--tokens", "2.5"], "--tokens"),
    (["--examples", "nan"], "--examples"),
    (["--examples", "10", "--tokens-per-example", "0"], "--tokens-per-example"),
])
def test_cli_plan_errors(capsys, args, needle):
    base = ["plan", "--model", "qwen2.5-0.5b", "--gpu", "l4-24gb"]
    if "--tokens" not in args and "--examples" not in args:
        base += ["--tokens", "1000"]
    code, out, err = run(capsys, *base, *args)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_plan_without_job_size_answers_fit_batch_and_sequence(capsys):
    code, out, err = run(capsys, "plan", "--model", "llama-2-7b", "--gpu", "t4-16gb,h100-sxm-80gb", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    for g in d["gpus"]:
        assert g["total_hours"] is None and g["total_usd"] is None and g["micro_steps"] is None
        assert g["verdict"] == "fits" and g["margin_bytes"] > 0 and g["max_micro_batch"] > 1
        # llama-2-7b has 4,096 positions: memory allows more, and the plan says RoPE scaling is needed
        assert g["max_seq"] == 4096 == g["max_positions"] and g["max_seq_memory"] > 4096
        assert "RoPE scaling" in g["seq_limit"]
    code, out, err = run(capsys, "plan", "--model", "llama-2-7b", "--gpu", "t4-16gb,h100-sxm-80gb")
    assert code == 0 and "no job size" in out and "RoPE scaling" in out and "total $" not in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_plan_carries_the_setup_warnings_and_searches_t5_sequences_by_memory():
    """plan shows what the estimate warns about on every GPU (MoE experts left unquantized), and
    for a model without a position limit (T5) the largest sequence is memory's, not 4 x --seq."""
    from loraplan.catalog import load_gpu, load_model
    from loraplan.plan import Job, plan_job
    from loraplan.spec import LoraSpec, TrainSpec

    gpus = [load_gpu("a100-sxm-80gb"), load_gpu("mi300x-192gb")]
    p = plan_job(load_model("mixtral-8x7b"), LoraSpec(), TrainSpec(quant="nf4"), gpus, Job())
    assert any(n.startswith("WARNING") and "experts" in n for n in p.notes)
    assert "notes" in p.to_dict()
    t5 = load_model("flan-t5-xl")
    g = plan_job(t5, LoraSpec(), TrainSpec(quant="nf4", seq=512, target_seq=128), [load_gpu("t4-16gb")], Job()).gpus[0]
    assert g.max_seq > 4 * 512 and g.max_seq == g.max_seq_memory


def test_plan_says_where_the_largest_batch_and_seq_leave_the_uncertainty_band():
    """max batch / seq fit; the *_clear ones fit with the band to spare (verdict "fits") and the
    next step up does not."""
    from dataclasses import replace

    from loraplan.catalog import load_gpu, load_model
    from loraplan.estimate.api import estimate
    from loraplan.plan import Job, plan_job
    from loraplan.spec import LoraSpec, TrainSpec

    gpu, model, lora = load_gpu("a100-sxm-80gb"), load_model("qwen2.5-7b"), LoraSpec()
    train = TrainSpec(quant="bf16", seq=2048)
    g = plan_job(model, lora, train, [gpu], Job()).gpus[0]
    assert 0 < g.max_micro_batch_clear <= g.max_micro_batch and 0 < g.max_seq_clear <= g.max_seq
    assert estimate(model, lora, replace(train, batch=g.max_micro_batch_clear), gpu).verdict == "fits"
    assert estimate(model, lora, replace(train, batch=g.max_micro_batch_clear + 1), gpu).verdict != "fits"
    assert estimate(model, lora, replace(train, seq=g.max_seq_clear), gpu).verdict == "fits"


def test_plan_fits_with_paging_and_reads_the_allocator_aware_total():
    """The plan's fit predicate is the estimate's verdict: a card that holds everything but the paged
    optimizer state (managed memory the driver evicts) fits ("fits with paging"), one byte less than
    the rest does not; the device total is the allocator's closed-form reserved + the CUDA context."""
    from loraplan.catalog import load_calibration
    from loraplan.estimate.api import estimate

    m, l, t = resolve_case({"model": "llama-2-7b", "rank": 256, "targets": "all-linear",
                            "optimizer": "paged_adamw_32bit", "gpu": "a100-sxm-80gb"})
    a100 = load_gpu("a100-sxm-80gb")
    mem = estimate(m, l, t, a100, load_calibration(a100.id), with_time=False).memory
    paged = mem.outside_allocator_bytes["paged_optimizer_state"]
    assert paged > 2**30
    ctx = mem.outside_allocator_bytes["cuda_context_and_libraries"]
    assert mem.device_total_bytes == mem.peak_reserved_bytes + ctx + paged
    resident = mem.device_total_bytes - paged
    card = replace(a100, id="a100-sxm-80gb", memory_bytes=resident + paged // 2)
    g = plan_job(m, l, t, [card], Job()).gpus[0]
    assert g.fits and g.verdict == "fits with paging" and g.max_micro_batch >= 1 and not g.suggestions
    small = replace(a100, id="a100-sxm-80gb", memory_bytes=resident - 1)
    g = plan_job(m, l, t, [small], Job()).gpus[0]
    assert not g.fits and g.verdict == "does not fit" and g.max_micro_batch == 0 and g.suggestions


def test_job_rows_count_tokens_per_example_against_seq():
    """--examples with --tokens-per-example and --seq: one row per example, padded or truncated to
    --seq, unless the rows are packed, where examples x tokens fill tokens / seq rows; a note says
    which when the two differ."""
    long, short = Job(examples=10_000, tokens_per_example=2000), Job(examples=10_000, tokens_per_example=300)
    assert long.micro_steps(8, 512) == short.micro_steps(8, 512) == 1250
    assert long.micro_steps(8, 512, "packing") == math.ceil(10_000 * 2000 / 512 / 8)
    assert long.rows(512, "packing") == pytest.approx(10_000 * 2000 / 512)
    assert short.rows(512, "padding-free") == pytest.approx(10_000 * 300 / 512)
    assert "truncated to --seq 512" in long.assumption(512) and "74%" in long.assumption(512)
    assert "padded to --seq 512" in short.assumption(512) and "41%" in short.assumption(512)
    assert "packed" in long.assumption(512, "packing")
    assert Job(examples=10, tokens_per_example=512).assumption(512) is None
    assert Job(tokens=10**6).assumption(512) is None


def test_cli_plan_tokens_per_example_with_seq_is_counted_or_said(capsys):
    base = ["plan", "--model", "llama-3-8b", "--quant", "bf16", "--batch", "8", "--seq", "512",
            "--examples", "10000", "--gpu", "h100-sxm-80gb"]
    hours = {}
    for tpe in ("2000", "300"):
        code, out, err = run(capsys, *base, "--tokens-per-example", tpe, "--padding", "packing", "--format", "json")
        assert code == 0, err
        d = json.loads(out)
        hours[tpe] = d["gpus"][0]["total_hours"]
        assert any("packed (packing)" in n for n in d["notes"])
    assert hours["2000"] > 5 * hours["300"]  # 2,000 / 300 tokens per example, packed
    code, out, err = run(capsys, *base, "--tokens-per-example", "2000")
    assert code == 0, err
    assert "of 2,000 tokens" in out and "truncated to --seq" in out


def _timed_estimate(step_s):
    def est(model, lora, train, gpu, cal, with_time=True):
        e = fake_estimate(model, lora, train, gpu, cal)
        e.time = SimpleNamespace(step_s=step_s(gpu), tokens_per_s=train.batch * train.seq / step_s(gpu),
                                 bound="host", step_s_host_range=None)
        return e
    return est


def test_a_tie_for_fastest_marks_every_row_and_says_tie():
    """Host-bound steps take the same time on several GPUs: none of them is 'the' fastest."""
    from loraplan.commands.plan import _mark

    m, l, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 1024, "batch": 4})
    gpus = [load_gpu(g) for g in ("l4-24gb", "rtx4090-24gb", "h100-sxm-80gb")]
    p = plan_job(m, l, t, gpus, Job(tokens=10**7),
                 estimate_fn=_timed_estimate(lambda g: 1.0 if g.id == "l4-24gb" else 0.5))
    by = {g.gpu: g for g in p.gpus}
    assert by["rtx4090-24gb"].fastest and by["h100-sxm-80gb"].fastest and not by["l4-24gb"].fastest
    text = _mark("fastest", [g.to_dict() for g in p.gpus if g.fastest])
    assert text.startswith("fastest: 2 tie at") and "(host-bound)" in text
    assert "rtx4090-24gb" in text and "h100-sxm-80gb" in text
    assert _mark("fastest", [by["l4-24gb"].to_dict()]) == "fastest: [bold]l4-24gb[/]"


def test_plan_max_batch_column_is_the_clear_maximum(capsys):
    """The 'max batch' / 'max seq' cells keep the uncertainty band to spare (max_*_clear); the
    in-band maxima are in the footnote."""
    base = ["plan", "--model", "llama-3-8b", "--tokens", "1e7", "--gpu", "rtx4090-24gb"]
    code, out, err = run(capsys, *base, "--format", "json")
    assert code == 0, err
    g = json.loads(out)["gpus"][0]
    assert g["max_micro_batch_clear"] < g["max_micro_batch"]
    code, out, err = run(capsys, *base)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("rtx4090-24gb"))
    cells = row.split()
    assert str(g["max_micro_batch_clear"]) in cells and str(g["max_micro_batch"]) not in cells
    assert f"{g['max_seq_clear']:,}" in cells
    assert f"rtx4090-24gb batch {g['max_micro_batch']}, seq {g['max_seq']:,}" in " ".join(out.split())


def test_position_cap_footnote_names_the_field_when_its_column_is_hidden(capsys):
    """The '*' of 'max seq' marks a cell; when 80 columns drop that column, the footnote names the
    field instead of pointing at a mark nobody sees."""
    code, out, err = run(capsys, "plan", "--model", "llama-2-7b", "--tokens", "1e7", "--strategy", "ddp",
                         "--gpu", "h100-sxm-80gb")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "max seq" in flat.split("not shown at this width:")[1]
    assert "max seq (in --format json / csv) is capped at max_position_embeddings 4,096" in flat
    assert "* capped" not in flat
    code, out, err = run(capsys, "plan", "--model", "llama-2-7b", "--gpu", "h100-sxm-80gb")
    assert code == 0, err
    assert "4,096*" in out and "* capped at max_position_embeddings 4,096" in out
