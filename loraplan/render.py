"""Formatting helpers shared by the CLI commands: units, flattening, one JSON/CSV writer.

Library code returns data; only commands and reports call these.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Iterable

GiB = float(1 << 30)


def gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GiB:,.2f}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become comma-joined strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def to_csv(rows: Iterable[dict]) -> str:
    rows = [flatten(r) for r in rows]
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
