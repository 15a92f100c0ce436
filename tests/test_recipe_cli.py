"""The training-stack options (issue 11) in every command: sweep axes, plan, explain, report
compare, the estimate table, and the one-line refusal of a setting the trainer does not have."""

import csv
import json
from dataclasses import replace

import pytest

from loraplan.case import resolve_case
from loraplan.errors import InputError
from loraplan.spec import RECIPE_FIELDS, run_inputs
from loraplan.trainers import options_of, recipe_levers, resolve_recipe, trainers_data

M = ("--model", "qwen2.5-0.5b")


def _one_line_exit_2(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---------------------------------------------------------------------------------------------
# The trainer option table
# ---------------------------------------------------------------------------------------------


def test_trainer_options_table_is_consistent():
    """Every trainer's default is one of the values it has, and every restriction names its source."""
    data = trainers_data()["trainers"]
    for t, entry in data.items():
        for key, allowed in entry.get("options", {}).items():
            assert entry["option_sources"][key].strip(), (t, key)
            assert entry["defaults"][key] in allowed, (t, key)
            assert options_of(t, key) == tuple(allowed)
        assert resolve_recipe(replace(resolve_case({})[2], trainer=t)).loss == entry["defaults"]["loss"]


@pytest.mark.parametrize("trainer,loss,fix", [("hf", "chunked", "--loss standard or liger"),
                                              ("trl", "standard", "--loss chunked"),
                                              ("trl", "liger", "--trainer loop or hf")])
def test_resolve_recipe_refuses_a_loss_the_trainer_lacks(trainer, loss, fix):
    with pytest.raises(InputError) as e:
        resolve_case({"model": "qwen2.5-0.5b", "trainer": trainer, "loss": loss})
    msg = str(e.value)
    assert f"--loss {loss}" in msg and fix in msg and "\n" not in msg


def test_trl_refuses_encoder_decoder_models(run_cli):
    code, _, err = run_cli("estimate", "--model", "flan-t5-base", "--trainer", "trl")
    _one_line_exit_2(code, err, "--trainer trl", "encoder-decoder", "--trainer hf")
    code, _, err = run_cli("estimate", "--model", "flan-t5-base", "--trainer", "hf")
    assert code == 0, err


BAD = ("--trainer", "hf", "--loss", "chunked")


@pytest.mark.parametrize("cmd", [("estimate",), ("explain",), ("plan", "--gpu", "l4-24gb")])
def test_single_case_commands_refuse_with_one_line(run_cli, cmd):
    code, _, err = run_cli(*cmd, *M, *BAD)
    _one_line_exit_2(code, err, "--loss chunked", "transformers.Trainer", "use --loss standard or liger")


def test_sweep_and_compare_refuse_with_one_line(run_cli, tmp_path):
    code, _, err = run_cli("sweep", *M, *BAD, "--out", str(tmp_path / "o.csv"))
    _one_line_exit_2(code, err, "--loss chunked", "use --loss standard or liger")
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    code, _, err = run_cli("report", "compare", *M, *BAD, "--gpu", "l4-24gb", "--out", str(tmp_path))
    _one_line_exit_2(code, err, "--loss chunked", "use --loss standard or liger")


@pytest.mark.parametrize("args,needle", [(("--gradient-accumulation", "0"), "--gradient-accumulation 0"),
                                         (("--max-grad-norm", "-1"), "--max-grad-norm -1"),
                                         (("--checkpoint-every-n-layers", "0"), "--checkpoint-every-n-layers 0"),
                                         (("--trainer", "deepspeed"), "--trainer 'deepspeed'")])
def test_bad_recipe_numbers_stop_the_sweep(run_cli, tmp_path, args, needle):
    code, _, err = run_cli("sweep", *M, *args, "--out", str(tmp_path / "o.csv"))
    _one_line_exit_2(code, err, needle)
    assert not (tmp_path / "o.csv").exists()


# ---------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_recipe_options_are_axes(run_cli, tmp_path):
    out = tmp_path / "o.csv"
    code, _, err = run_cli("sweep", *M, "--trainer", "loop,hf", "--mixed-precision", "no,bf16",
                           "--gradient-accumulation", "1,4", "--lengths", "100,300,900", "--padding", "longest",
                           "--gpu", "l4-24gb", "--out", str(out), "--quiet")
    assert code == 0, err
    rows = _csv(out)
    assert len(rows) == 2 * 2 * 2  # lengths is one value (a distribution), not an axis
    assert set(RECIPE_FIELDS) <= set(rows[0])
    assert {(r["trainer"], r["mixed_precision"], r["gradient_accumulation"]) for r in rows} == {
        (t, mp, ga) for t in ("loop", "hf") for mp in ("no", "bf16") for ga in ("1", "4")}
    assert {r["lengths"] for r in rows} == {"100,300,900"} and {r["padding"] for r in rows} == {"longest"}
    # unset settings are the trainer's defaults, as the estimate's inputs say
    assert {r["max_grad_norm"] for r in rows if r["trainer"] == "loop"} == {"0.0"}
    assert {r["max_grad_norm"] for r in rows if r["trainer"] == "hf"} == {"1.0"}
    assert {r["compute_dtype"] for r in rows if r["trainer"] == "hf"} == {"fp32"}


def test_sweep_grid_file_recipe_keys(run_cli, tmp_path):
    g = tmp_path / "g.toml"
    g.write_text('model = "qwen2.5-0.5b"\ntrainer = ["hf", "trl"]\nprepare_kbit = [true, false]\n'
                 'lengths = [128, 512, 2048]\npadding = "longest"\ncheckpoint-every-n-layers = [1, 2]\n'
                 'gpu = "a100-sxm-80gb"\n')
    out = tmp_path / "o.jsonl"
    code, _, err = run_cli("sweep", "--grid", str(g), "--out", str(out), "--quiet")
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8 and all(r["error"] is None for r in rows)
    assert {r["lengths"] for r in rows} == {"128,512,2048"}
    assert {(r["trainer"], r["prepare_kbit"], r["checkpoint_every_n_layers"]) for r in rows} == {
        (t, p, n) for t in ("hf", "trl") for p in (True, False) for n in (1, 2)}
    assert {r["loss"] for r in rows if r["trainer"] == "trl"} == {"chunked"}
    # the command line wins over the grid, as for every other key
    code, _, err = run_cli("sweep", "--grid", str(g), "--trainer", "loop", "--out", str(out), "--quiet")
    assert code == 0, err
    assert {json.loads(x)["trainer"] for x in out.read_text().splitlines()} == {"loop"}


def test_sweep_passes_the_recipe_to_the_estimator(monkeypatch):
    """Every case's resolved recipe reaches the functions the vectorized path evaluates (the
    recipe keys used to be dropped silently): record what memory.moments and time.step_work get."""
    import numpy as np

    import loraplan.estimate.memory as memory
    import loraplan.estimate.time as time_model
    from loraplan.sweep import evaluate_table, expand_cases

    seen = []
    real_moments, real_work = memory.moments, time_model.step_work

    def moments(*args, **kw):
        train, x = kw.get("train", args[1]), kw.get("x", args[3] if len(args) > 3 else None)
        n = int(np.size(x.b))
        seen.append({k: np.broadcast_to(np.asarray(getattr(train, k), dtype=object), (n,)).tolist()
                     if k in ("gradient_accumulation", "max_grad_norm", "checkpoint_every_n_layers")
                     else [getattr(train, k)] * n for k in RECIPE_FIELDS})
        return real_moments(*args, **kw)

    monkeypatch.setattr(memory, "moments", moments)
    def step_work(model, lora, train, *args, **kw):
        seen.append({"work": train.trainer})
        return real_work(model, lora, train, *args, **kw)

    monkeypatch.setattr(time_model, "step_work", step_work)
    grid = {"model": "qwen2.5-0.5b", "batch": "1,2", "trainer": "loop,hf,trl", "gradient_accumulation": "1,8",
            "max_grad_norm": "0,0.5", "checkpoint_every_n_layers": "1,3", "mixed_precision": "no,fp16",
            "reentrant": ("true", "false"), "gpu": "l4-24gb"}
    table = expand_cases({k: (",".join(v) if isinstance(v, tuple) else v) for k, v in grid.items()})
    rows = list(evaluate_table(table).rows())
    assert len(rows) == 2 * 3 * 2 * 2 * 2 * 2 * 2 and all(r["error"] is None for r in rows)
    got = {}
    for rec in (s for s in seen if "work" not in s):
        for i in range(len(rec["trainer"])):
            got.setdefault(tuple(tuple((k, rec[k][i]) for k in RECIPE_FIELDS)), 0)
    want = set()
    for i in range(len(table)):
        _, _, t = resolve_case(table.case(i))
        r = resolve_recipe(t)
        want.add(tuple((k, getattr(r, k)) for k in RECIPE_FIELDS))
    assert set(got) == want
    assert {s["work"] for s in seen if "work" in s} == {"loop", "hf", "trl"}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sweep_recipe_rows_equal_estimate():
    """The sweep's row of a recipe case is estimate()'s for that case: memory, time, and the
    recipe columns are the estimate's resolved inputs."""
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.sweep import evaluate_table, expand_cases

    table = expand_cases({}, [{"model": ["qwen2.5-0.5b", "flan-t5-base"], "quant": ["nf4", "int8"],
                               "trainer": ["loop", "hf", "trl"], "mixed_precision": ["bf16", "no"],
                               "max_grad_norm": [0.3], "gradient_accumulation": [2], "seq": [256, 1024],
                               "padding": "packing", "attn_implementation": ["sdpa", "eager"],
                               "gpu": ["t4-16gb", "h100-sxm-80gb"]}])
    rows = list(evaluate_table(table).rows())
    # flan-t5: packing is for decoder-only models (and trl trains none); T4: no bf16 autocast
    refused = [r for r in rows if r["model"] == "flan-t5-base" or (r["gpu"] == "t4-16gb" and
                                                                     r["mixed_precision"] != "no")]
    assert {r["error"] is None for r in rows if r not in refused} == {True}
    assert all("encoder-decoder" in r["error"] for r in refused if r["model"] == "flan-t5-base")
    assert all("t4-16gb" in r["error"] for r in refused if r["model"] != "flan-t5-base")
    for i in range(0, len(rows), 7):
        r = rows[i]
        if r["error"]:
            continue
        m, l, t = resolve_case(table.case(i))
        g = load_gpu(r["gpu"])
        e = estimate(m, l, t, g, load_calibration(g.id))
        assert (r["peak_allocated_bytes"], r["device_total_bytes"]) == (e.memory.peak_allocated_bytes,
                                                                         e.memory.device_total_bytes)
        assert r["step_s"] == pytest.approx(e.time.step_s, rel=1e-9)
        for k in RECIPE_FIELDS:
            assert r[k] == e.inputs[k], k


# ---------------------------------------------------------------------------------------------
# estimate, plan, explain, report compare
# ---------------------------------------------------------------------------------------------


def test_estimate_table_shows_the_resolved_recipe(run_cli):
    code, out, err = run_cli("estimate", *M, "--trainer", "trl", "--gpu", "l4-24gb")
    assert code == 0, err
    flat = " ".join(out.split())
    for part in ("recipe trainer trl", "autocast bf16", "adapters bf16", "clipping at 1", "loss chunked",
                 "checkpointing non-reentrant", "padding max-length"):
        assert part in flat, part
    code, out, err = run_cli("estimate", *M, "--reentrant", "--checkpoint-every-n-layers", "2", "--quant", "bf16",
                             "--gradient-accumulation", "4", "--max-grad-norm", "0.5")
    flat = " ".join(out.split())
    assert code == 0 and "trainer loop" in flat and "checkpointing reentrant every 2 layers" in flat
    assert "accumulation x4" in flat and "clipping at 0.5" in flat and "prepare_kbit" not in flat
    code, out, _ = run_cli("estimate", "--help")
    assert "transformers.Trainer" in out and "trl.SFTTrainer" in out and "trainer's default" in " ".join(out.split())


def test_plan_passes_the_recipe_and_its_accumulation():
    from loraplan.catalog import load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.plan import Job, plan_job

    seen = []

    def fn(model, lora, train, gpu, cal, with_time=False):
        seen.append(train)
        return estimate(model, lora, train, gpu, cal, with_time=with_time)

    m, lo, t = resolve_case({"model": "qwen2.5-0.5b", "trainer": "hf", "loss": "liger", "mixed_precision": "bf16"})
    p = plan_job(m, lo, t, [load_gpu("l4-24gb")], Job(effective_batch=8), fixed_batch=False, estimate_fn=fn)
    row = p.gpus[0]
    assert row.grad_accum * row.micro_batch >= 8
    final = [s for s in seen if s.batch == row.micro_batch and s.seq == t.seq]
    assert final and all(s.gradient_accumulation == row.grad_accum for s in final)
    assert all((s.trainer, s.loss, s.mixed_precision) == ("hf", "liger", "bf16") for s in seen)
    assert p.inputs["trainer"] == "hf" and p.inputs["max_grad_norm"] == 1.0
    seen.clear()
    m, lo, t = resolve_case({"model": "qwen2.5-0.5b", "gradient_accumulation": 4})
    p = plan_job(m, lo, t, [load_gpu("l4-24gb")], Job(), estimate_fn=fn)
    assert p.gpus[0].grad_accum == 4 and all(s.gradient_accumulation == 4 for s in seen)
    with pytest.raises(InputError, match="--gradient-accumulation 4 with --effective-batch 8"):
        plan_job(m, lo, t, [load_gpu("l4-24gb")], Job(effective_batch=8), estimate_fn=fn)


def test_plan_cli_recipe(run_cli):
    code, out, err = run_cli("plan", *M, "--trainer", "hf", "--gpu", "l4-24gb", "--format", "json")
    assert code == 0, err
    inp = json.loads(out)["inputs"]
    assert (inp["trainer"], inp["max_grad_norm"], inp["compute_dtype"]) == ("hf", 1.0, "fp32")
    code, out, err = run_cli("plan", *M, "--trainer", "trl", "--gpu", "l4-24gb")
    assert code == 0 and "recipe trainer trl" in " ".join(out.split())
    code, _, err = run_cli("plan", *M, "--effective-batch", "8", "--gradient-accumulation", "2", "--gpu", "l4-24gb")
    _one_line_exit_2(code, err, "--gradient-accumulation 2", "--effective-batch 8")


def test_explain_shows_the_recipe_and_offers_only_computed_recipe_levers():
    import loraplan.explain as ex
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate

    g = load_gpu("l4-24gb")
    cal = load_calibration(g.id)
    m, lo, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 2048})
    x = ex.explain(m, lo, t, g, cal)
    assert any(f.startswith("recipe: trainer loop") for f in x.facts)
    # every lever offered is a re-estimate that saves (or changes the verdict)
    for lv in x.levers:
        assert lv.saving_bytes > 0 or lv.verdict != x.estimate.verdict
    # trl's fused head never holds the 2048 x 151936 logits: offered, with the saving re-estimation gives
    chunked = [lv for lv in x.levers if lv.option == "--loss chunked"]
    alt = estimate(m, lo, replace(t, loss="chunked"), g, cal)
    assert len(chunked) == 1
    assert chunked[0].saving_bytes == x.estimate.memory.device_total_bytes - alt.memory.device_total_bytes > 1 << 30
    # transformers.Trainer has no chunked loss: never offered there
    m, lo, t = resolve_case({"model": "qwen2.5-0.5b", "seq": 2048, "trainer": "hf"})
    x = ex.explain(m, lo, t, g, cal)
    assert "--loss chunked" not in {lv.option for lv in x.levers}


def test_explain_half_batch_keeps_the_optimizer_batch():
    from loraplan.explain import _candidates

    m, lo, t = resolve_case({"model": "qwen2.5-0.5b", "batch": 4, "gradient_accumulation": 3})
    half = [c for c in _candidates(m, lo, t, "9.0")[0] if c[1].startswith("--batch")]
    assert half and half[0][1] == "--batch 2 --gradient-accumulation 6"
    assert (half[0][3].batch, half[0][3].gradient_accumulation) == (2, 6)


def test_recipe_levers_follow_the_trainer():
    _, _, t = resolve_case({"model": "qwen2.5-0.5b"})
    opts = {o for _, o, _ in recipe_levers(t)}
    assert {"--loss chunked", "--loss liger", "--mixed-precision bf16", "--no-prepare-kbit"} <= opts
    _, _, t = resolve_case({"model": "qwen2.5-0.5b", "trainer": "trl"})
    opts = {o for _, o, _ in recipe_levers(t)}
    assert not {o for o in opts if o.startswith("--loss") or o.startswith("--mixed")}  # trl: chunked, bf16 already
    _, _, t = resolve_case({"model": "qwen2.5-0.5b", "quant": "bf16", "trainer": "hf"})
    opts = {o for _, o, _ in recipe_levers(t)}
    assert "--loss chunked" not in opts and "--no-prepare-kbit" not in opts and "--loss liger" in opts
    for _, _, t2 in recipe_levers(t):
        resolve_recipe(t2)  # every candidate is a recipe the trainer has


def test_plan_suggests_a_recipe_lever_only_when_it_saves():
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.plan import Job, plan_job

    m, lo, t = resolve_case({"model": "llama-2-7b", "quant": "bf16", "seq": 4096, "batch": 4})
    g = load_gpu("l4-24gb")
    plain = plan_job(m, lo, t, [g], Job())
    assert not plain.gpus[0].fits
    base = estimate(m, lo, t, g, load_calibration(g.id)).memory.device_total_bytes
    losses = [s for s in plain.gpus[0].suggestions if s.option.startswith("--loss")]
    assert {s.option for s in losses} == {"--loss chunked", "--loss liger"}  # the loop has both fused heads
    for s in losses:  # each one what re-estimating with it saves
        alt = estimate(m, lo, replace(t, loss=s.option.split()[-1]), g, load_calibration(g.id))
        assert s.saving_bytes == base - alt.memory.device_total_bytes > 0


def test_compare_passes_the_recipe(run_cli, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    from loraplan.case import expand_grid
    from loraplan.report.compare import configs_from_cases

    configs, _ = configs_from_cases(expand_grid({"model": "qwen2.5-0.5b", "trainer": "loop,trl",
                                                 "gradient_accumulation": "2"}))
    assert [(c.train.trainer, c.train.gradient_accumulation) for c in configs] == [("loop", 2), ("trl", 2)]
    assert [c.label for c in configs] == ["trainer=loop", "trainer=trl"]
    code, _, err = run_cli("report", "compare", *M, "--trainer", "loop,trl", "--gpu", "l4-24gb",
                           "--out", str(tmp_path), "--name", "c")
    assert code == 0, err
    md = (tmp_path / "c.md").read_text()
    assert "trainer=trl" in md and "loss chunked" in md and "loss standard" in md
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"model": "qwen2.5-0.5b", "mixed_precision": ["no", "bf16"], "lengths": [64, 256]}))
    code, _, err = run_cli("report", "compare", "--grid", str(g), "--gpu", "l4-24gb", "--out", str(tmp_path))
    assert code == 0, err
    md = (tmp_path / "compare.md").read_text()
    assert "mp=bf16" in md and "lengths 64,256" in md


def test_run_inputs_and_sweep_agree_on_the_recipe():
    from loraplan.sweep import evaluate, build_cases

    rows = list(evaluate(build_cases({"model": "qwen2.5-0.5b", "trainer": "hf,trl", "quant": "nf4,bf16",
                                      "gpu": "l4-24gb"})))
    for r in rows:
        m, lo, t = resolve_case({k: r[k] for k in ("model", "trainer", "quant")})
        inp = run_inputs(m, lo, t)
        assert {k: r[k] for k in RECIPE_FIELDS} == {k: inp[k] for k in RECIPE_FIELDS}


def test_plan_skips_gpus_that_cannot_run_the_recipe(run_cli):
    """bf16 autocast on a T4 (sm75): among several GPUs it is listed as not planned, with the
    reason; asked for alone it is the one-line error."""
    code, out, err = run_cli("plan", *M, "--mixed-precision", "bf16", "--gpu", "t4-16gb,l4-24gb", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert {g["gpu"] for g in d["gpus"]} == {"l4-24gb"}  # (1, 2, 4, 8 of it: plan compares GPU counts)
    assert d["skipped"][0]["gpu"] == "t4-16gb" and "fp16" in d["skipped"][0]["reason"]
    code, out, err = run_cli("plan", *M, "--mixed-precision", "bf16", "--gpu", "t4-16gb,l4-24gb")
    assert code == 0 and "t4-16gb not planned" in " ".join(out.split())
    code, _, err = run_cli("plan", *M, "--mixed-precision", "bf16", "--gpu", "t4-16gb")
    _one_line_exit_2(code, err, "--mixed-precision bf16", "t4-16gb")
