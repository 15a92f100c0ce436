"""One ``loraplan profile`` run per records file and per GPU, and no stray temp folders.

- :func:`records_lock`: an exclusive ``flock`` on ``<records file>.lock`` for the whole run, so
  two runs never measure the same cases into one file (the second gets one line naming the
  first one's pid).
- :func:`device_lock`: the same on ``<temp dir>/loraplan-gpu-<device>.lock`` for ``--device
  cuda``, so two runs (with any records files) never share one GPU and distort each other's
  memory and time.
- :func:`remove_stale_temp_dirs`: ``loraplan-profile-<pid>-*`` folders whose run is dead (a
  ``kill -9`` gives the run no chance to remove its own).

The kernel drops a ``flock`` when its process dies, so a killed run never leaves a lock that
blocks the next one. Pure Python (no torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ProfileBusyError

#: prefix of the per-case temp folders of ``runner.run_worker``: ``loraplan-profile-<pid>-<random>``
TEMP_PREFIX = "loraplan-profile-"
#: a ``loraplan-profile-*`` folder without a pid in its name (written by an older loraplan) is
#: removed once it is this old: its run cannot still be going
LEGACY_TEMP_AGE_S = 24 * 3600


def temp_prefix() -> str:
    """``loraplan-profile-<our pid>-``: the pid lets a later run tell a dead run's folder."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs. A zombie (killed, not yet reaped — e.g. an orphaned
    worker whose new parent is a PID 1 that does not reap) counts as dead: it holds no files."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the field after "(comm)"
        return state not in (b"Z", b"X")
    except (OSError, IndexError):  # no /proc (not Linux): signal 0 succeeded
        return True


def remove_stale_temp_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove ``loraplan-profile-<pid>-*`` folders (ours: same uid) whose pid is not alive, and
    pid-less ones older than :data:`LEGACY_TEMP_AGE_S`; returns the removed folders."""
    base = Path(root or tempfile.gettempdir())
    removed = []
    pat = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-")
    try:
        entries = list(base.glob(TEMP_PREFIX + "*"))
    except OSError:
        return removed
    for d in entries:
        try:
            st = d.lstat()
            if not d.is_dir() or d.is_symlink() or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
                continue
            m = pat.match(d.name)
            stale = (not pid_alive(int(m.group(1)))) if m else time.time() - st.st_mtime > LEGACY_TEMP_AGE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _open_lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # a lock file another user created (shared temp dir): flock needs no write access
        return os.open(path, os.O_RDONLY)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # others' runs must be able to open (and so respect) it
    return fd


@contextlib.contextmanager
def exclusive(path: str | Path, busy: Callable[[dict], str], warn: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` while the block runs; the file holds
    the holder's pid, start time and command, and is removed on release.

    ``busy(holder)`` -> the message of the ProfileBusyError raised when another process holds it.
    Where locking is not supported (no ``fcntl``; a file system without ``flock``) the block runs
    unlocked after ``warn``.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        if warn:
            warn(f"cannot lock {path} on this platform; make sure no other 'loraplan profile' run uses it")
        yield
        return
    p = Path(path)
    while True:
        try:
            fd = _open_lock(p)
        except OSError as e:
            if warn:
                warn(f"cannot create the lock file {p} ({e.strerror or e}); running without it")
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ProfileBusyError(busy(holder)) from None
        except OSError as e:
            os.close(fd)
            if warn:
                warn(f"cannot lock {p} ({e.strerror or e}); running without it")
            yield
            return
        # the holder we raced with may have removed the file after we opened it: we must lock
        # the file that is there now, or a third run could lock a new one beside us
        try:
            same = os.fstat(fd).st_ino == os.stat(p).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps({"pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     "argv": sys.argv}).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(p)  # while still holding it (see the inode check above)
        os.close(fd)


def _who(holder: dict) -> str:
    pid = holder.get("pid")
    if not pid:
        return "another 'loraplan profile' run"
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"another 'loraplan profile' run (pid {pid}{since})"


def records_lock(records: str | Path, warn: Callable[[str], None] | None = None):
    """The run's exclusive hold on a records file (``<records>.lock`` beside it)."""
    lock = Path(str(records) + ".lock")

    def busy(h: dict) -> str:
        stop = f" (or stop it: kill {h['pid']})" if h.get("pid") else ""
        return (f"the records file {records} is in use by {_who(h)}; wait for it to finish{stop}, "
                f"or pass --out another file")

    return exclusive(lock, busy, warn)


def device_key(uuid: str | None = None) -> str:
    """The GPU a CUDA run uses (the workers' device 0): a MIG slice's id, else the GPU's UUID
    when known, else the first entry of CUDA_VISIBLE_DEVICES (``0`` when unset)."""
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    if first.startswith("MIG-"):  # a MIG slice: the parent GPU's UUID would lock its siblings out
        key = first
    else:
        key = uuid or (first if first.startswith("GPU-") else f"cuda{first}")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key)


def device_lock(key: str, name: str | None = None, warn: Callable[[str], None] | None = None,
                root: str | Path | None = None):
    """The run's exclusive hold on one GPU (``<temp dir>/loraplan-gpu-<key>.lock``)."""
    lock = Path(root or tempfile.gettempdir()) / f"loraplan-gpu-{key}.lock"

    def busy(h: dict) -> str:
        stop = f" (or stop it: kill {h['pid']})" if h.get("pid") else ""
        return (f"the GPU {name or key} is in use by {_who(h)}, and two bursts on one GPU distort each other's "
                f"memory and time; wait for it to finish{stop}, or pick another GPU with CUDA_VISIBLE_DEVICES")

    return exclusive(lock, busy, warn)
