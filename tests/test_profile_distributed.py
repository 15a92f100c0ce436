"""``loraplan profile --strategy ddp|fsdp --num-gpus 2`` on the CPU: torchrun with gloo, two
ranks of a tiny llama, one record per rank plus a summary record, resume, a failing rank, and
the one-line refusals (issue 13)."""

import pytest

from profile_cli_helpers import lines, run_cli


@pytest.fixture(scope="module")
def work(tmp_path_factory, write_tiny_config):
    root = tmp_path_factory.mktemp("profile-dist")
    return {"root": root, "cache": root / "models", "llama": write_tiny_config(root, "llama")}


def base_args(work, out, *extra):
    return ["--device", "cpu", "--model", work["llama"], "--steps", 2, "--warmup", 1, "--batch", 1, "--seq", 16,
            "--rank", 4, "--quant", "bf16", "--optimizer", "adamw", "--cache-dir", work["cache"], "--out", out,
            "--num-gpus", 2, *extra]


def check_case_records(recs, strategy):
    """The N + 1 records of one 2-rank case: their kinds, keys and links, and the summary's numbers."""
    from loraplan.profile.records import case_key, rank_key

    *ranks, summ = recs
    assert [r.get("record") for r in recs] == ["rank", "rank", "summary"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in recs)
    assert summ["key"] == case_key(summ["inputs"]) and summ["inputs"]["strategy"] == strategy
    assert summ["inputs"]["num_gpus"] == 2
    for r in ranks:
        assert r["inputs"] == summ["inputs"] and r["case_key"] == summ["key"] and r["run"] == summ["run"]
        assert r["key"] == rank_key(r["inputs"], r["rank"]) != summ["key"]
        assert r["env"]["rank"] == r["rank"] and r["env"]["world_size"] == 2
        assert r["protocol"]["engine"]["strategy"] == strategy and r["protocol"]["engine"]["backend"] == "gloo"
        assert "wrap" in r["memory"]["phases"] and len(r["time"]["step_s"]) == 2
    assert [x["key"] for x in summ["ranks"]] == [r["key"] for r in ranks]
    peaks = [r["memory"]["peak_allocated_bytes"] for r in ranks]
    assert all(p > 0 for p in peaks)
    assert summ["memory"]["peak_allocated_bytes"] == max(peaks)
    assert summ["memory"]["worst_rank"] == peaks.index(max(peaks))
    meds = [r["time"]["step_s_median"] for r in ranks]
    assert summ["time"]["step_s_median"] == pytest.approx(sum(meds) / 2)
    toks = sum(r["time"]["tokens_per_step"] for r in ranks)
    assert summ["time"]["tokens_per_s"] == pytest.approx(toks / summ["time"]["step_s_median"])
    return ranks, summ


# ---- fast: no burst ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, want", [
    (("--strategy", "single"), "--num-gpus 2 with --strategy single"),
    (("--strategy", "zero3"), "--strategy zero3: deepspeed is not installed"),
    (("--strategy", "device-map"), "--strategy device-map splits the model"),
    (("--strategy", "ddp", "--nodes", 2), "--nodes 2: 'loraplan profile' starts the ranks of this machine only"),
    (("--strategy", "ddp", "--trainer", "hf"), "--trainer hf with --strategy ddp"),
    (("--strategy", "fsdp", "--quant", "nf4"), "use --quant-storage bf16"),
    (("--strategy", "fsdp", "--quant", "int8"), "--quant int8 with --strategy fsdp"),
    (("--strategy", "fsdp-offload",), "--strategy fsdp-offload on --device cpu"),
])
def test_refusals_are_one_line_exit_2(run_cli, work, tmp_path, extra, want):
    import importlib.util

    if "zero3" in extra and importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    out = tmp_path / "x.jsonl"
    code, _, err = run_cli("profile", *map(str, base_args(work, out, *extra)))
    assert code == 2, err
    assert want in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_bad_num_gpus_exits_2(run_cli, work, tmp_path):
    code, _, err = run_cli("profile", *map(str, base_args(work, tmp_path / "x.jsonl", "--strategy", "ddp")[:-2]),
                           "--num-gpus", "0", "--strategy", "ddp")
    assert code == 2 and "num-gpus" in err and "0" in err and "Traceback" not in err


def test_summarise_worst_rank_mean_step_and_failures():
    from loraplan.profile.distributed import summarise

    ok = {0: {"status": "ok", "memory": {"peak_allocated_bytes": 100, "peak_reserved_bytes": 120},
              "time": {"step_s_median": 1.0, "tokens_per_step": 32}},
          1: {"status": "ok", "memory": {"peak_allocated_bytes": 300, "peak_reserved_bytes": 310},
              "time": {"step_s_median": 3.0, "tokens_per_step": 32}}}
    s = summarise(ok, 2)
    assert s["status"] == "ok" and s["error"] is None
    assert s["memory"]["peak_allocated_bytes"] == 300 and s["memory"]["worst_rank"] == 1
    assert s["memory"]["peak_reserved_bytes"] == 310
    assert s["time"]["step_s_median"] == 2.0 and s["time"]["tokens_per_s"] == 32.0
    bad = dict(ok)
    bad[1] = {"status": "oom", "phase": "first_backward", "error": "OutOfMemoryError: x", "memory": {}}
    bad[0] = {"status": "error", "phase": "first_backward", "error": "stopped by torchrun", "memory": {}}
    s = summarise(bad, 2)
    assert s["status"] == "oom" and s["error"].startswith("rank 1: OutOfMemoryError") and s["phase"] == "first_backward"
    assert s["memory"]["peak_allocated_bytes"] is None and s["time"] == {}
    bad[0] = dict(bad[0], root_cause=True, status="error", error="died", phase="first_forward")
    s = summarise(bad, 2)  # the rank torchrun saw fail first explains the others
    assert s["status"] == "error" and s["error"] == "rank 0: died" and s["phase"] == "first_forward"


def test_torchrun_failure_table_names_the_first_failure():
    from loraplan.profile.distributed import torchrun_failures

    table = ("Failures:\n[1]:\n  time      : t\n  host      : h\n  rank      : 1 (local_rank: 1)\n"
             "  exitcode  : 1 (pid: 33)\n  error_file: <N/A>\n-----\nRoot Cause (first observed failure):\n[0]:\n"
             "  time      : t\n  host      : h\n  rank      : 0 (local_rank: 0)\n  exitcode  : -9 (pid: 32)\n")
    assert torchrun_failures("noise\n" + table) == (0, {1: 1, 0: -9})
    assert torchrun_failures("no table") == (None, {})


def test_one_gpu_key_ignores_the_multi_gpu_fields():
    """Records written before the multi-GPU fields existed keep their keys (a rerun skips them)."""
    from loraplan.profile.records import case_key

    old = {"model": "m", "quant": "bf16", "seq": 16}
    assert case_key({**old, "strategy": "single", "num_gpus": 1, "nodes": 1, "fsdp_sharding": "full",
                     "fsdp_version": None, "use_orig_params": None}) == case_key(old)
    assert case_key({**old, "strategy": "ddp", "num_gpus": 2, "nodes": 1}) != case_key(old)


def test_a_list_of_records_is_one_append(tmp_path):
    from loraplan.profile.records import append_record, read_records

    p = tmp_path / "r.jsonl"
    append_record(p, {"key": "a"})
    append_record(p, [{"key": "b", "record": "rank"}, {"key": "c", "record": "summary"}])
    assert [r["key"] for r in read_records(p).records] == ["a", "b", "c"]


def test_measurements_read_rank_and_summary_records(profile_record, write_jsonl, tmp_path):
    """validate/calibrate/report read multi-GPU records: the summary is the case (worst rank's
    peak), each rank record a measurement of its rank; calibrate leaves both out."""
    from loraplan.calibrate import calibration_measurements
    from loraplan.measurements import load_measurements

    single = profile_record(1_000_000_000, seq=512)
    summ = dict(profile_record(3_000_000_000, seq=1024), record="summary", world_size=2)
    summ["inputs"] = dict(summ["inputs"], strategy="fsdp", num_gpus=2)
    ranks = [dict(profile_record(p, seq=1024), record="rank", rank=i, world_size=2, key=f"r{i}")
             for i, p in enumerate((2_000_000_000, 3_000_000_000))]
    for r in ranks:
        r["inputs"] = dict(summ["inputs"])
    ms = load_measurements([write_jsonl(tmp_path / "x.jsonl", [single, *ranks, summ])])
    assert not ms.problems
    kinds = [(m.record, m.rank, m.world_size) for m in ms]
    assert kinds == [(None, None, 1), ("rank", 0, 2), ("rank", 1, 2), ("summary", None, 2)]
    assert ms.measurements[-1].train.strategy == "fsdp" and ms.measurements[-1].train.num_gpus == 2
    assert ms.measurements[-1].peak_allocated_bytes == 3_000_000_000
    assert [m.id for m in calibration_measurements(list(ms))] == [ms.measurements[0].id]


# ---- slow: real torchrun jobs on the CPU ---------------------------------------------------------

@pytest.mark.slow
def test_ddp_two_ranks_records_then_resume_skips(work):
    pytest.importorskip("torch")
    out = work["root"] / "ddp.jsonl"
    p = run_cli(*base_args(work, out, "--strategy", "ddp"))
    assert p.returncode == 0, p.stderr
    recs = lines(out)
    assert [r["status"] for r in recs] == ["ok"] * 3, [r.get("error") for r in recs]
    ranks, summ = check_case_records(recs, "ddp")
    assert summ["protocol"]["launcher"]["exit_status"] == 0
    assert ranks[0]["protocol"]["engine"]["engine"] == "DistributedDataParallel"
    # DDP replicates: both ranks hold the same tensors
    assert ranks[0]["memory"]["peak_allocated_bytes"] == ranks[1]["memory"]["peak_allocated_bytes"]
    assert "ddp x2" in p.stdout.replace("\n", " ") and "rank 1" in p.stdout
    before = out.read_bytes()
    p2 = run_cli(*base_args(work, out, "--strategy", "ddp"))
    assert p2.returncode == 0 and out.read_bytes() == before and "already recorded" in " ".join(p2.stderr.split())


@pytest.mark.slow
def test_fsdp2_two_ranks_shard_and_record(work):
    pytest.importorskip("torch")
    out = work["root"] / "fsdp.jsonl"
    p = run_cli(*base_args(work, out, "--strategy", "fsdp", "--fsdp-version", 2))
    assert p.returncode == 0, p.stderr
    recs = lines(out)
    assert [r["status"] for r in recs] == ["ok"] * 3, [r.get("error") for r in recs]
    ranks, summ = check_case_records(recs, "fsdp")
    eng = ranks[0]["protocol"]["engine"]
    # accelerate's FSDP2 units for a 2-layer llama: 2 decoder layers, the embedding, the tail, the root
    assert eng["engine"] == "fully_shard" and eng["units"] == 5 and eng["reshard_after_forward"] is True
    assert eng["mesh"] == [2]
    for r in ranks:  # each rank keeps half of the base weights once fully_shard has sharded them
        ph = r["memory"]["phases"]
        assert ph["wrap"]["allocated_bytes"] < 0.75 * ph["lora"]["allocated_bytes"], ph
    print("measured per-rank peaks (bytes):", [r["memory"]["peak_allocated_bytes"] for r in ranks],
          "estimate:", (summ.get("estimate") or {}).get("memory", {}).get("per_gpu"))


@pytest.mark.slow
def test_a_rank_out_of_memory_is_recorded_and_the_other_rank_says_why_it_stopped(work):
    pytest.importorskip("torch")
    out = work["root"] / "oom.jsonl"
    p = run_cli(*base_args(work, out, "--strategy", "ddp", "--gradient-accumulation", 2),
                env={"LORAPLAN_PROFILE_FAULT": "memory@first_backward", "LORAPLAN_PROFILE_FAULT_RANK": "1"})
    assert p.returncode == 0, p.stderr
    r0, r1, summ = lines(out)
    assert r1["status"] == "oom" and r1["phase"] == "first_backward" and "MemoryError" in r1["error"]
    assert summ["status"] == "oom" and summ["error"].startswith("rank 1:")
    assert r0["rank"] == 0 and r0["record"] == "rank"
    # rank 0 either finished, or says that rank 1 failed first (gloo loses its peer, or torchrun stops it)
    assert r0["status"] == "ok" or "after rank 1 failed first (oom in first_backward)" in r0["error"], r0["error"]


@pytest.mark.slow
def test_a_crashed_rank_leaves_a_record_saying_so(work):
    pytest.importorskip("torch")
    out = work["root"] / "crash.jsonl"
    p = run_cli(*base_args(work, out, "--strategy", "ddp"),
                env={"LORAPLAN_PROFILE_FAULT": "exit@first_forward", "LORAPLAN_PROFILE_FAULT_RANK": "0"})
    assert p.returncode == 0, p.stderr
    r0, r1, summ = lines(out)
    assert r0["status"] == "error" and r0["phase"] == "first_forward", r0["error"]
    assert "rank 0 died without a result (exit code 9) in phase 'first_forward'" in r0["error"], r0["error"]
    assert r1["status"] == "ok" or "after rank 0 failed first" in r1["error"], r1["error"]
    assert summ["status"] == "error" and summ["error"].startswith("rank 0: rank 0 died without a result")
    assert summ["ranks"][0]["status"] == "error"


def test_validate_shows_rank_records_and_checks_the_summary(run_cli, profile_record, write_jsonl, tmp_path):
    """``loraplan validate`` on a multi-GPU case: the summary is compared with the estimate's
    worst rank and summarised; rank records are listed, never summarised; nothing crashes."""
    from loraplan.catalog import load_calibration
    from loraplan.measurements import load_measurements
    from loraplan.report.validation import validate

    summ = dict(profile_record(3_000_000_000, seq=1024), record="summary", world_size=2, label="fsdp case")
    summ["inputs"] = dict(summ["inputs"], strategy="fsdp", num_gpus=2)
    ranks = []
    for i, peak in enumerate((2_900_000_000, 3_000_000_000)):
        r = dict(profile_record(peak, seq=1024), record="rank", rank=i, world_size=2, key=f"r{i}",
                 label=f"fsdp case rank {i}")
        r["inputs"] = dict(summ["inputs"])
        ranks.append(r)
    path = write_jsonl(tmp_path / "h100-sxm-80gb.jsonl", [*ranks, summ])
    v = validate(list(load_measurements([path])), load_calibration)
    by_id = {c.id: c for c in v.cases}
    assert set(by_id) == {"fsdp case", "fsdp case rank 0", "fsdp case rank 1"}
    assert any("rank 0 of 2" in f for f in by_id["fsdp case rank 0"].flags)
    assert "allocated" in by_id["fsdp case"].metrics
    assert v.summary["allocated"]["n"] == 1 and v.summary["allocated"]["worst_case"] == "fsdp case"
    code, out, err = run_cli("validate", str(path))
    assert code in (0, 1) and "Traceback" not in err, err
    assert "rank 1" in out


@pytest.mark.slow
def test_fsdp1_two_ranks_flat_params_with_peft_wrap_policy(work):
    pytest.importorskip("torch")
    out = work["root"] / "fsdp1.jsonl"
    p = run_cli(*base_args(work, out, "--strategy", "fsdp", "--fsdp-version", 1))
    assert p.returncode == 0, p.stderr
    recs = lines(out)
    assert [r["status"] for r in recs] == ["ok"] * 3, [r.get("error") for r in recs]
    ranks, summ = check_case_records(recs, "fsdp")
    eng = ranks[0]["protocol"]["engine"]
    assert eng["engine"] == "FullyShardedDataParallel" and eng["sharding_strategy"] == "FULL_SHARD"
    assert eng["use_orig_params"] is False and eng["units"] > 3
    for r in ranks:  # FSDP frees the unsharded flat parameters by resizing their storage to 0
        ph = r["memory"]["phases"]
        assert ph["wrap"]["allocated_bytes"] < 0.75 * ph["lora"]["allocated_bytes"], ph


@pytest.mark.slow
def test_a_rank_that_hangs_times_the_case_out(work):
    pytest.importorskip("torch")
    out = work["root"] / "hang.jsonl"
    p = run_cli(*base_args(work, out, "--strategy", "ddp", "--timeout", 25),
                env={"LORAPLAN_PROFILE_FAULT": "sleep@first_forward", "LORAPLAN_PROFILE_FAULT_RANK": "1"})
    assert p.returncode == 0, p.stderr
    r0, r1, summ = lines(out)
    assert r1["status"] == "timeout" and r1["phase"] == "first_forward" and "--timeout 25s" in r1["error"]
    assert r0["status"] == "timeout" and summ["status"] == "timeout"
    assert summ["protocol"]["launcher"]["timed_out"] is True


def test_calibrate_on_multi_gpu_records_only_is_a_one_line_error(run_cli, profile_record, write_jsonl, tmp_path):
    summ = dict(profile_record(3_000_000_000, seq=1024), record="summary", world_size=2)
    summ["inputs"] = dict(summ["inputs"], strategy="ddp", num_gpus=2)
    path = write_jsonl(tmp_path / "h100-sxm-80gb.jsonl", [summ])
    code, _, err = run_cli("calibrate", str(path), "--gpu", "h100-sxm-80gb")
    assert code == 2 and "multi-GPU records" in err and len(err.strip().splitlines()) == 1, err
