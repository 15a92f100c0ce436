"""Profile records: one JSON object per line in ``profiles/<gpu-id>.jsonl``.

Writing is crash-safe: each record is one ``os.write`` of the whole line to an ``O_APPEND``
descriptor followed by ``fsync``, so a process killed at any moment (``kill -9`` included)
leaves only whole lines; a write that fails part way (full disk) is truncated back, so it
leaves no partial line either, and the record goes to a recovery file
(:func:`keep_record`) that the next run adds back (:func:`merge_recovered`). Reading never
rewrites a file: a line that does not parse is reported with its line number and skipped.
Pure Python (no torch).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import RecordsError

SCHEMA = 1

#: CUDA device names -> catalog GPU ids, used when the catalog entry does not list the name itself
KNOWN_DEVICE_NAMES = {
    "nvidia h100 80gb hbm3": "h100-sxm-80gb",
    "nvidia h100 pcie": "h100-pcie-80gb",
    "nvidia h100 nvl": "h100-nvl-94gb",
    "nvidia h200": "h200-sxm-141gb",
    "nvidia a100-sxm4-80gb": "a100-sxm-80gb",
    "nvidia a100-sxm4-40gb": "a100-sxm-40gb",
    "nvidia a100 80gb pcie": "a100-pcie-80gb",
    "nvidia a10g": "a10g-24gb",
    "nvidia l4": "l4-24gb",
    "nvidia geforce rtx 4090": "rtx-4090-24gb",
    "nvidia geforce rtx 3090": "rtx-3090-24gb",
}


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def gpu_id_for_name(device_name: str, entries: dict[str, dict] | None = None) -> str:
    """Catalog GPU id for a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100-sxm-80gb").

    A catalog entry matches when its ``name`` or one of its ``device_names`` equals the CUDA
    name (case and punctuation ignored); then the built-in table of common names (only ids the
    catalog holds, when it holds any); else a slug of the name.
    """
    if entries is None:
        from ..catalog import gpu_entries

        entries = gpu_entries()
    norm = slug(device_name)
    bare = slug(re.sub(r"^nvidia\s+", "", device_name.strip(), flags=re.I))
    for gid, e in entries.items():
        names = [e.get("name") or ""] + list(e.get("device_names") or []) + list(e.get("cuda_names") or [])
        if any(slug(n) in (norm, bare) for n in names if n):
            return gid
    known = KNOWN_DEVICE_NAMES.get(device_name.strip().lower())
    if known and (not entries or known in entries):
        return known
    return bare


def case_key(inputs: dict[str, Any]) -> str:
    """Stable key of a case: sha256 of its inputs as canonical JSON (first 16 hex digits).

    A one-GPU case (strategy single, one GPU, one node) hashes without the multi-GPU fields
    (:func:`one_gpu_inputs`), so its key is the one records written before those fields existed carry."""
    text = json.dumps(one_gpu_inputs(inputs), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def append_record(path: str | Path, record: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Append one record as one line (or a list of records, one line each, all in the same
    write: the records of one multi-GPU case land together or not at all): a single write to an
    O_APPEND fd, then fsync.

    A write that fails part way (ENOSPC, EIO) is undone: the file is truncated back to its size
    before this call, so no partial line is left to corrupt later appends; the OSError is raised
    (the caller keeps the record elsewhere, see :func:`keep_record`).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    recs = record if isinstance(record, list) else [record]
    data = "".join(json.dumps(r, sort_keys=False, separators=(",", ":"), default=_json_default) + "\n"
                   for r in recs).encode()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # a file whose last line lacks its newline (written by something else) keeps that line
        # as is: ours starts on a line of its own, in the same single write
        size = os.fstat(fd).st_size
        if size:
            with open(p, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        try:
            n = os.write(fd, data)
            while n < len(data):  # a short write: the disk filled up, or a signal; the next call says which
                k = os.write(fd, data[n:])
                if k <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                n += k
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)  # back to the last whole line (a later append starts a new line anyway)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


#: free space a records file's disk must have before a run starts (a record is 5-100 KB)
MIN_FREE_BYTES = 1 << 20


def check_writable(path: str | Path) -> None:
    """RecordsError (the path and the fix, one line) unless records can be appended to ``path``:
    its folder can be created and written, the file (when it exists) opened for appending, and
    the disk has :data:`MIN_FREE_BYTES` free. Creates nothing that stays."""
    p = Path(path)
    fix = "make it writable, or pass --out a file in a writable folder"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists():
            os.close(os.open(p, os.O_WRONLY | os.O_APPEND))
        else:
            fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=p.parent)
            os.close(fd)
            os.unlink(probe)
        st = os.statvfs(p.parent)
    except OSError as e:
        raise RecordsError(f"cannot write the records file {p} ({e.strerror or e}); {fix}") from None
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        raise RecordsError(f"the disk holding the records file {p} is full ({free} bytes free); "
                           f"free some space, or pass --out a file on another disk")


def recovery_paths(path: str | Path) -> list[Path]:
    """Where a record that could not be appended to ``path`` is kept, in the order tried: beside it
    (``<file>.recovered``), in the user's cache (``~/.cache/loraplan/recovered/``, or
    ``$LORAPLAN_CACHE/recovered/``), in the temp folder. None ends in ``.jsonl``, so readers of
    ``profiles/*.jsonl`` never count a record twice."""
    p = Path(os.path.abspath(path))
    tag = f"{slug(p.stem)}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}.jsonl.recovered"
    cache = Path(os.environ.get("LORAPLAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loraplan"))
    return [p.with_name(p.name + ".recovered"), cache / "recovered" / tag,
            Path(tempfile.gettempdir()) / f"loraplan-recovered-{tag}"]


def keep_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Append ``record`` to the first of :func:`recovery_paths` that takes it; returns that file.
    Raises the last OSError when none does."""
    err: OSError | None = None
    for rp in recovery_paths(path):
        try:
            append_record(rp, record)
            return rp
        except OSError as e:
            err = e
    assert err is not None
    raise err


def merge_recovered(path: str | Path) -> list[tuple[Path, int, bool]]:
    """Append to ``path`` the records that :func:`keep_record` kept for it (those not already
    there, by key and time), then remove the recovery files; returns (file, records added,
    removed). A recovery file with unreadable lines is left in place (removed False). Call with
    the records file locked. An OSError leaves the recovery file in place."""
    out = []
    have = {(r.get("key"), r.get("recorded_at")) for r in read_records(path).records}
    for rp in recovery_paths(path):
        if not rp.is_file():
            continue
        rf = read_records(rp)
        n = 0
        for rec in rf.records:
            ident = (rec.get("key"), rec.get("recorded_at"))
            if ident not in have:
                append_record(path, rec)
                have.add(ident)
                n += 1
        if not rf.problems:
            rp.unlink()
        out.append((rp, n, not rf.problems))
    return out


def _json_default(o):
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


@dataclass
class RecordFile:
    """What a records file holds: parsed records and the lines that could not be read."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)

    @property
    def keys(self) -> set[str]:
        return {r["key"] for r in self.records if isinstance(r.get("key"), str)}

    def messages(self) -> list[str]:
        return [f"{self.path}:{n}: skipped a corrupt record line ({why}); the file is left as it is"
                for n, why in self.problems]


def read_records(path: str | Path) -> RecordFile:
    """Parse a records file; a missing file is empty. Corrupt lines are reported, never fixed."""
    import stat

    from ..errors import ConfigError
    from ..inputs import MAX_JSON_DEPTH, json_depth

    p = Path(path)
    out = RecordFile(p)
    if not p.exists():
        return out
    if not stat.S_ISREG(os.stat(p).st_mode):  # a FIFO or a device would block or never end
        raise ConfigError(f"records file '{p}' is not a regular file; give profiles/<gpu-id>.jsonl files")
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                text = line.decode("utf-8")
                if json_depth(text) > MAX_JSON_DEPTH:  # json recurses per level
                    out.problems.append((n, f"nests deeper than {MAX_JSON_DEPTH} levels"))
                    continue
                rec = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                out.problems.append((n, f"not JSON: {e}"))
                continue
            if not isinstance(rec, dict):
                out.problems.append((n, "not a JSON object"))
                continue
            out.records.append(rec)
    return out


#: what a record's ``kernels`` (profile/kernels.py) may hold
KERNEL_ACTIVITIES = ("cuda", "cpu")


def check_kernels(k: Any) -> None:
    """A record's ``kernels`` summary (``profile.kernels.summarise``), by type and range; a
    ConfigError of one line naming the bad value. ``{"skipped": why}`` is accepted. Otherwise:
    ``schema`` 1, ``activity`` cuda|cpu, ``step_wall_s`` and ``device_time_s`` finite >= 0,
    ``classes`` an object of class -> {time_s >= 0, count >= 0 whole, flops >= 0 whole}."""
    from ..errors import ConfigError

    def bad(where: str, v: Any, want: str) -> ConfigError:
        return ConfigError(f"kernels {where} = {json.dumps(v, default=str)[:80]} must be {want}; "
                           f"re-run 'loraplan profile --kernel-summary'")

    def nonneg(where: str, v: Any, whole: bool = False) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if not ok or (whole and float(v) != int(v)):
            raise bad(where, v, "a whole number >= 0" if whole else "a finite number >= 0")

    if not isinstance(k, dict):
        raise bad("", k, "an object")
    if "skipped" in k:
        if not isinstance(k["skipped"], str):
            raise bad("skipped", k["skipped"], "a reason (text)")
        return
    if k.get("schema") != 1:
        raise bad("schema", k.get("schema"), "1")
    if k.get("activity") not in KERNEL_ACTIVITIES:
        raise bad("activity", k.get("activity"), "cuda or cpu")
    for key in ("step_wall_s", "device_time_s"):
        nonneg(key, k.get(key))
    classes = k.get("classes")
    if not isinstance(classes, dict):
        raise bad("classes", classes, "an object of class: {time_s, count, flops}")
    for name, c in classes.items():
        if not isinstance(c, dict):
            raise bad(f"classes.{name}", c, "an object {time_s, count, flops}")
        nonneg(f"classes.{name}.time_s", c.get("time_s"))
        nonneg(f"classes.{name}.count", c.get("count"), whole=True)
        nonneg(f"classes.{name}.flops", c.get("flops", 0), whole=True)


def default_out_path(gpu_id: str, root: str | Path = "profiles") -> Path:
    return Path(root) / f"{gpu_id}.jsonl"


def done_keys(records: Iterable[dict[str, Any]]) -> set[str]:
    """Keys of cases already recorded (any status: an OOM or a timeout is a result too)."""
    return {r["key"] for r in records if isinstance(r.get("key"), str)}


# ---- several GPUs (issue 13): per-rank records and the summary record ------------------------
#
# A multi-GPU case (``--strategy ddp|fsdp... --num-gpus N``) writes N + 1 records in one append:
# one per rank (``"record": "rank"``, ``rank``, ``case_key``: the summary's key, ``run``: the run
# id both share; its own ``key`` is the case key with the rank) and then the summary
# (``"record": "summary"``, ``key``: the case key, so a rerun skips the case; ``memory`` the worst
# rank's peaks, ``time`` the ranks' mean step and total tokens/s, ``ranks``: [{rank, key, status,
# peak}]). One-GPU records carry no ``record`` field.

#: record kinds of a multi-GPU case
RANK, SUMMARY = "rank", "summary"


def one_gpu_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` without the multi-GPU fields (``spec.PARALLEL_FIELDS``) when they describe one
    GPU (strategy single or absent, num_gpus and nodes 1 or absent); else ``inputs`` unchanged."""
    from ..spec import PARALLEL_FIELDS

    if inputs.get("strategy", "single") != "single" or int(inputs.get("num_gpus") or 1) != 1 \
            or int(inputs.get("nodes") or 1) != 1:
        return inputs
    return {k: v for k, v in inputs.items() if k not in PARALLEL_FIELDS}


def rank_key(inputs: dict[str, Any], rank: int) -> str:
    """Key of one rank's record of a multi-GPU case."""
    return case_key({**inputs, "rank": int(rank)})


def record_kind(rec: dict[str, Any]) -> str | None:
    """"rank", "summary", or None (a one-GPU record)."""
    k = rec.get("record")
    return k if k in (RANK, SUMMARY) else None
