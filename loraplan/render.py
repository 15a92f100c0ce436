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


#: binary units, largest first: a size is shown in the largest unit it reaches
_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def size(nbytes: float | None, signed: bool = False) -> str:
    """Bytes with the unit chosen by magnitude: '4.68 GiB', '12.0 MiB', '768 B' (never '0.00 GiB'
    for a small nonzero figure); ``signed`` adds '+' to positive values."""
    if nbytes is None:
        return "-"
    sign = "-" if nbytes < 0 else ("+" if signed and nbytes > 0 else "")
    n = abs(nbytes)
    for unit, scale in _UNITS:
        if n >= scale:
            v = n / scale
            return f"{sign}{v:,.2f} {unit}" if unit == "GiB" or v < 100 else f"{sign}{v:,.0f} {unit}"
    return f"{sign}{n:,.0f} B"


def fit_columns(console, columns: list[tuple], rows: list[list], **table_kw):
    """A rich Table that fits ``console.width``: ``columns`` are (header, justify, priority);
    the lowest-priority columns (largest number) are dropped until the table's width fits.
    Returns (table, dropped headers)."""
    from rich.measure import Measurement
    from rich.table import Table

    keep = list(range(len(columns)))
    dropped: list[str] = []
    while True:
        t = Table(**table_kw)
        for i in keep:
            head, just, _ = columns[i]
            t.add_column(head, justify=just)
        for r in rows:
            t.add_row(*[r[i] for i in keep])
        width = Measurement.get(console, console.options.update_width(1 << 16), t).maximum
        droppable = [i for i in keep if columns[i][2] > 0]
        if width <= console.width or not droppable:
            return t, dropped
        worst = max(droppable, key=lambda i: (columns[i][2], i))
        keep.remove(worst)
        dropped.append(columns[worst][0])


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


#: rich styles of the fit verdicts (loraplan.estimate.result.VERDICTS)
VERDICT_STYLE = {"fits": "green", "fits, within the uncertainty": "yellow", "fits with paging": "yellow",
                 "does not fit": "red"}


#: the verdicts in a narrow table column (header "fits?")
VERDICT_SHORT = {"fits": "yes", "fits, within the uncertainty": "yes, in band", "fits with paging": "paging",
                 "does not fit": "no"}
#: the line under a table that uses VERDICT_SHORT
VERDICT_LEGEND = ("fits?: yes; yes, in band (headroom below the model's uncertainty); paging (only with the "
                  "paged optimizer state evicted); no")


def verdict_text(verdict: str | None, short: bool = False) -> str:
    """The verdict as rich markup ('-' without a GPU); ``short``: VERDICT_SHORT's word."""
    if verdict is None:
        return "-"
    style = VERDICT_STYLE.get(verdict, "")
    text = VERDICT_SHORT.get(verdict, verdict) if short else verdict
    return f"[{style}]{text}[/]" if style else text


def bullets(console, lines, indent: int = 0, mark: str = "-") -> None:
    """Print ``lines`` as a list with a hanging indent (wrapped lines align with the text)."""
    from rich.markup import escape
    from rich.table import Table

    g = Table.grid(padding=(0, 1))
    g.add_column(width=indent + len(mark), justify="right", no_wrap=True)
    g.add_column()
    for line in lines:
        g.add_row(mark, escape(line))
    console.print(g)


def verdict_line(d: dict) -> str:
    """'GPU: capacity -> verdict (headroom X; uncertainty +Z (one-sided), margin Y)' from an
    Estimate/Explanation dict (keys gpu, gpu_memory_bytes, verdict, headroom_bytes, margin_bytes,
    uncertainty_bytes). The band is one-sided: how much more the run may need than predicted (the
    largest under-predictions; over-predictions are not the verdict's risk); margin = headroom - band."""
    line = (f"{d['gpu']}: {size(d['gpu_memory_bytes'])} -> [bold]{verdict_text(d.get('verdict'))}[/] "
            f"(headroom {size(d['headroom_bytes'])}")
    if d.get("uncertainty_bytes") is not None:
        line += f"; uncertainty +{size(d['uncertainty_bytes'])} (one-sided), margin {size(d['margin_bytes'])}"
    return line + ")"


def console(width: int | None = None):
    """A rich Console for tables: the terminal's width, 80 columns when not a terminal."""
    from rich.console import Console

    con = Console(width=width) if width else Console()
    if width is None and not con.is_terminal:
        con = Console(width=80)
    return con


def per_gpu_summary(mem: dict) -> tuple[list[str], Any]:
    """Lines and (when the ranks differ) a rich Table for an estimate's ``memory`` dict on several
    GPUs (``memory.per_gpu``, ``memory.host_bytes``): the rank that peaks, each rank's peak
    allocated and its three largest lines, and the host RAM with its parts. One GPU: ([], None)."""
    per = mem.get("per_gpu") or {}
    lines: list[str] = []
    table = None
    if len(per) > 1:
        peaks = {k: sum(v.values()) for k, v in per.items()}
        if len(set(peaks.values())) == 1:
            lines.append(f"per GPU: all {len(per)} ranks alike, {size(next(iter(peaks.values())))} peak allocated each")
        else:
            from rich.table import Table

            worst = max(peaks, key=lambda k: peaks[k])
            table = Table(title=f"Per GPU (rank {worst} peaks)", title_justify="left")
            for head, just in (("rank", "right"), ("peak allocated", "right"), ("largest lines", "left")):
                table.add_column(head, justify=just)
            for k, v in per.items():
                top = sorted(v.items(), key=lambda kv: -kv[1])[:3]
                table.add_row(str(k), size(peaks[k]), ", ".join(f"{n.replace('_', ' ')} {size(b)}" for n, b in top))
    host = mem.get("host_components") or {}
    if len(per) > 1 or any(k != "model_load_copies" for k in host):
        parts = ", ".join(f"{k.replace('_', ' ')} {size(v)}" for k, v in host.items())
        lines.append(f"host RAM per machine {size(mem.get('host_bytes'))} "
                     + (f"(the larger of load time and the step: {parts})" if host else
                        "(no model copy or offloaded state on the host; see the notes)"))
    return lines, table
