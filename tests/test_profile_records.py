"""Records file, case keys, GPU ids and grid files (pure Python, no torch)."""

import json
import os

import pytest

from loraplan.errors import ConfigError
from loraplan.profile.grid import load_grid_file, merge_grids
from loraplan.profile.records import append_record, case_key, gpu_id_for_name, read_records


def test_append_and_read_whole_lines(tmp_path):
    p = tmp_path / "sub" / "g.jsonl"
    append_record(p, {"key": "a", "x": 1})
    append_record(p, {"key": "b", "x": (1, 2)})
    data = p.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 2
    rf = read_records(p)
    assert [r["key"] for r in rf.records] == ["a", "b"] and rf.problems == [] and rf.keys == {"a", "b"}
    assert rf.records[1]["x"] == [1, 2]


def test_append_after_line_without_newline_keeps_it(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_bytes(b'{"key": "a"}\n{"key": "tr')  # a torn line written by something else
    append_record(p, {"key": "b"})
    assert p.read_bytes().startswith(b'{"key": "a"}\n{"key": "tr\n')
    rf = read_records(p)
    assert [r["key"] for r in rf.records] == ["a", "b"]
    assert [n for n, _ in rf.problems] == [2]


def test_corrupt_line_reported_with_number_and_never_rewritten(tmp_path):
    p = tmp_path / "g.jsonl"
    raw = b'{"key": "a"}\nnot json at all\n\n[1, 2]\n{"key": "b"}\n'
    p.write_bytes(raw)
    before = os.stat(p).st_mtime_ns
    rf = read_records(p)
    assert [r["key"] for r in rf.records] == ["a", "b"]
    assert [n for n, _ in rf.problems] == [2, 4]
    assert "g.jsonl:2:" in rf.messages()[0]
    assert p.read_bytes() == raw and os.stat(p).st_mtime_ns == before


def test_missing_file_is_empty(tmp_path):
    rf = read_records(tmp_path / "none.jsonl")
    assert rf.records == [] and rf.problems == []


def test_case_key_is_stable_and_order_free():
    a = {"model": "m", "rank": 8, "targets": ["q_proj"], "device": "cpu"}
    b = dict(reversed(list(a.items())))
    assert case_key(a) == case_key(b) and len(case_key(a)) == 16
    assert case_key(a) != case_key({**a, "rank": 16})


def test_gpu_id_for_name():
    entries = {"h100-sxm-80gb": {"name": "NVIDIA H100 SXM5 80GB", "device_names": ["NVIDIA H100 80GB HBM3"]},
               "l4-24gb": {"name": "NVIDIA L4"}}
    assert gpu_id_for_name("NVIDIA H100 80GB HBM3", entries) == "h100-sxm-80gb"
    assert gpu_id_for_name("NVIDIA L4", entries) == "l4-24gb"
    assert gpu_id_for_name("NVIDIA H100 80GB HBM3", {}) == "h100-sxm-80gb"  # built-in table
    assert gpu_id_for_name("NVIDIA GeForce GTX 1080 Ti", {}) == "geforce-gtx-1080-ti"


def test_grid_files(tmp_path):
    t = tmp_path / "g.toml"
    t.write_text('model = "x"\nquant = ["bf16", "nf4"]\nseq = [32, 64]\ntargets = ["q_proj,v_proj", "all-linear"]\n'
                 'gradient-checkpointing = [true, false]\n')
    (g,) = load_grid_file(t)
    assert g["quant"] == ["bf16", "nf4"] and g["gradient_checkpointing"] == [True, False]
    from loraplan.case import expand_grid

    (opts,) = merge_grids({"seq": "128", "rank": None, "targets": ()}, [g])
    cases = expand_grid(opts)
    assert len(cases) == 2 * 1 * 2 * 2 and {c["seq"] for c in cases} == {128}
    assert {c["targets"] for c in cases} == {"q_proj,v_proj", "all-linear"}
    j = tmp_path / "g.json"
    j.write_text(json.dumps([{"quant": "bf16"}, {"quant": "int8", "optimizer": ["sgd", "adamw"]}]))
    grids = load_grid_file(j)
    assert sum(len(expand_grid(o)) for o in merge_grids({}, grids)) == 3
    bad = tmp_path / "bad.json"
    bad.write_text('{"quantt": "bf16"}')
    with pytest.raises(ConfigError, match="unknown option 'quantt'"):
        load_grid_file(bad)
    bad.write_text('{"quant": ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_grid_file(bad)


# ---- a records file that cannot be written: no partial line, no lost record -------------------

def test_full_disk_mid_write_leaves_no_partial_line(tmp_path, monkeypatch):
    p = tmp_path / "g.jsonl"
    append_record(p, {"key": "a"})
    before = p.read_bytes()
    calls = []
    real = os.write

    def write(fd, data):  # writes half of the line, then the disk is full
        calls.append(len(data))
        if b'"key":"big"' in bytes(data) or len(calls) > 1:
            if len(calls) == 1:
                return real(fd, bytes(data)[: len(data) // 2])
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError) as ei:
        append_record(p, {"key": "big", "x": "y" * 1000})
    monkeypatch.undo()
    assert ei.value.errno == 28 and len(calls) == 2  # the short write, then ENOSPC
    assert p.read_bytes() == before  # truncated back to the last whole line
    append_record(p, {"key": "c"})  # later appends are clean
    rf = read_records(p)
    assert [r["key"] for r in rf.records] == ["a", "c"] and rf.problems == []


def test_check_writable(tmp_path, monkeypatch):
    from loraplan.errors import RecordsError
    from loraplan.profile import records
    from loraplan.profile.records import check_writable

    check_writable(tmp_path / "new" / "g.jsonl")  # creates the folder, leaves no file
    assert list((tmp_path / "new").iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RecordsError, match=r"cannot write the records file .*file/g\.jsonl .*pass --out"):
        check_writable(blocker / "g.jsonl")  # its "folder" is a file
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        (ro / "g.jsonl").write_text("")
        ro.chmod(0o555)
        (ro / "g.jsonl").chmod(0o444)
        try:
            with pytest.raises(RecordsError, match="Permission denied"):
                check_writable(ro / "g.jsonl")
            with pytest.raises(RecordsError, match="Permission denied"):
                check_writable(ro / "other.jsonl")
        finally:
            ro.chmod(0o755)

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(records.os, "statvfs", lambda p: Full)
    with pytest.raises(RecordsError, match=r"is full \(40960 bytes free\)"):
        check_writable(tmp_path / "g.jsonl")


def test_recovery_file_is_added_back_once(tmp_path, monkeypatch):
    from loraplan.profile.records import keep_record, merge_recovered, recovery_paths

    monkeypatch.setenv("LORAPLAN_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "g.jsonl"
    append_record(p, {"key": "a", "recorded_at": "t1"})
    kept = keep_record(p, {"key": "b", "recorded_at": "t2"})
    assert kept == recovery_paths(p)[0] and not kept.name.endswith(".jsonl")
    # the folder became read-only: the next recovery file goes to the user's cache
    real_append = append_record

    def no_beside(path, rec):
        if os.path.dirname(os.path.abspath(path)) == str(tmp_path):
            raise PermissionError(13, "Permission denied")
        real_append(path, rec)

    import loraplan.profile.records as records

    monkeypatch.setattr(records, "append_record", no_beside)
    kept2 = keep_record(p, {"key": "c", "recorded_at": "t3"})
    assert kept2 == recovery_paths(p)[1] and str(tmp_path / "cache" / "recovered") in str(kept2)
    monkeypatch.setattr(records, "append_record", real_append)
    added = merge_recovered(p)
    assert [(rp, n, gone) for rp, n, gone in added] == [(kept, 1, True), (kept2, 1, True)]
    assert [r["key"] for r in read_records(p).records] == ["a", "b", "c"]
    assert not kept.exists() and not kept2.exists() and merge_recovered(p) == []
    # a run killed between adding and removing: nothing is added twice
    keep_record(p, {"key": "b", "recorded_at": "t2"})
    assert merge_recovered(p) == [(kept, 0, True)] and len(read_records(p).records) == 3
