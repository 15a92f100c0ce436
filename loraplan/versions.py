"""Library versions as inputs: rules keyed by version (data/version-rules.json), read without torch.

A *stack* is ``{library: version}`` for torch, transformers, peft, bitsandbytes, trl. By default
the installed versions (``importlib.metadata``, nothing imported); without torch installed, the
newest known set (the estimate then describes the newest stack, and says so). ``--stack
torch=2.11,transformers=5.17`` overrides single libraries. ``rule(name, stack)`` is the value of a
rule for that stack: the last entry whose ``since`` <= the library's version.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import json
import re
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError

_PATH = Path(__file__).resolve().parent / "data" / "version-rules.json"
_VERSION = re.compile(r"^\d+(\.\d+){0,3}$")


@functools.lru_cache(maxsize=1)
def rules_data() -> dict:
    return json.loads(_PATH.read_text())


def libraries() -> tuple[str, ...]:
    return tuple(rules_data()["libraries"])


def newest_known() -> dict[str, str]:
    return dict(rules_data()["newest_known"])


def version_tuple(v: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '5.0.0rc1' -> (5, 0, 0): the leading numeric release."""
    nums = []
    for part in str(v).split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(nums) or (0,)


@functools.lru_cache(maxsize=1)
def installed() -> dict[str, str]:
    """The installed versions of the known libraries, or the newest known set when torch is not
    installed (a planner without torch describes the newest stack). Missing others: newest known."""
    known = newest_known()
    try:
        md.version("torch")
    except md.PackageNotFoundError:
        return known
    out = {}
    for lib in libraries():
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            out[lib] = known[lib]
    return out


def parse_stack(text: str | Mapping[str, str] | None) -> tuple[tuple[str, str], ...] | None:
    """``"torch=2.11,transformers=5.17"`` (or a mapping) -> sorted ((library, version), ...).

    One-line InputError for an unknown library or a malformed version."""
    if text is None or text == "" or text == ():
        return None
    if isinstance(text, Mapping):
        items = list(text.items())
    elif isinstance(text, (tuple, list)):
        items = [tuple(p) for p in text]
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            lib, sep, ver = part.partition("=")
            if not sep:
                raise InputError(f"--stack '{part}' is not library=version (e.g. --stack torch=2.11,transformers=5.17)")
            items.append((lib.strip(), ver.strip()))
    known = libraries()
    out = {}
    for lib, ver in items:
        if lib not in known:
            raise InputError(f"--stack library '{lib}' is unknown; known: {', '.join(known)}")
        if not _VERSION.match(str(ver)):
            raise InputError(f"--stack {lib} version '{ver}' is malformed; give numbers like 2.11 or 5.17.1")
        out[lib] = str(ver)
    return tuple(sorted(out.items()))


def resolve(stack=None) -> dict[str, str]:
    """The full stack: the defaults (``installed()``) overlaid by ``stack`` (parsed or text)."""
    out = dict(installed())
    for lib, ver in (parse_stack(stack) or ()):
        out[lib] = ver
    return out


def rule(name: str, stack=None) -> Any:
    """The value of rule ``name`` for ``stack`` (None: the default stack)."""
    r = rules_data()["rules"][name]
    v = version_tuple(resolve(stack)[r["library"]])
    value = None
    for entry in r["values"]:
        if version_tuple(entry["since"]) <= v:
            value = entry["value"]
    return value


def beyond_known(stack=None) -> tuple[tuple[str, str, str], ...]:
    """(library, version, newest known) for each library of ``stack`` newer than ``newest_known``:
    its rules are ranges ("the last entry whose since <= version"), so a newer release gets the
    newest known release's rules, which it may have changed. Only given versions are listed (an
    installed release newer than the data is the maintainers' to index)."""
    known = newest_known()
    return tuple((lib, ver, known[lib]) for lib, ver in (parse_stack(stack) or ())
                 if lib in known and version_tuple(ver) > version_tuple(known[lib]))


def stack_note(stack=None) -> str | None:
    """The note for :func:`beyond_known` versions (None when every given version is known)."""
    newer = beyond_known(stack)
    if not newer:
        return None
    return ("; ".join(f"{lib} {ver} is newer than the newest {lib} loraplan's version rules know ({known})"
                      for lib, ver, known in newer)
            + ": the rules of the newest known releases are applied (loraplan/data/version-rules.json)")


def describe(stack=None) -> str:
    """One line for tables: 'torch 2.13.0, transformers 5.3.0, ...' plus where it came from."""
    full = resolve(stack)
    given = dict(parse_stack(stack) or ())
    src = "given" if given else ("installed" if full == installed() and _torch_installed() else "newest known")
    return ", ".join(f"{k} {v}" for k, v in full.items()) + f" ({src})"


def _torch_installed() -> bool:
    try:
        md.version("torch")
        return True
    except md.PackageNotFoundError:
        return False
