"""A report as data: headings, paragraphs, tables and figures -> one self-contained HTML file
(figures embedded as base64 PNG) and a markdown twin (figures as PNG files beside it).

Needs the ``[report]`` extra (pandas, matplotlib; the Agg backend, no display).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import InputError, require_extra
from ..estimate.result import ledger_order


def require_report_extra() -> None:
    require_extra("matplotlib", "report")
    require_extra("pandas", "report")


def ledger_segments(ledgers: Sequence[Mapping[str, int]]) -> dict[str, list[int]]:
    """What a stacked ledger bar draws: key -> bytes in each bar, keys in the vocabulary's order.

    Every key of every ledger is kept, so bar ``i`` sums to ``sum(ledgers[i].values())``.
    """
    keys = ledger_order({k for ledger in ledgers for k in ledger})
    return {k: [int(ledger.get(k, 0)) for ledger in ledgers] for k in keys}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    require_report_extra()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ensure_writable(out_dir: str | Path, name: str | None = None) -> Path:
    """Check, before any plot is drawn, that ``out_dir`` can be written (it, or the nearest folder
    above it that exists, is a writable folder) and that ``name`` is a plain file stem
    (:func:`check_name`). Creates nothing: the folder is made when the report is written, so a
    report that fails leaves no empty folder behind."""
    import os

    d = Path(out_dir)
    if name is not None:
        check_name(name)
    if not str(out_dir).strip():
        raise InputError("--out is empty; give a folder such as reports")
    probe = d
    try:
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            raise InputError(f"cannot write the report into '{d}': '{probe}' is not a folder; choose a folder with --out")
    except OSError as e:
        raise InputError(f"cannot write the report into '{d}': {e.strerror or e}; "
                         f"choose a writable folder with --out") from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the report into '{d}': '{probe}' is not writable; "
                         f"choose a writable folder with --out")
    return d


#: the longest report name (file names are at most 255 bytes; the name gets -figN.png added)
MAX_NAME_CHARS = 200


def check_name(name: str) -> str:
    """``name`` as a file stem inside ``--out``: no path separators, not '.'/'..', not empty."""
    import os

    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name
            or (os.sep in name) or "\0" in name or len(name) > MAX_NAME_CHARS):
        raise InputError(f"--name {name[:60]!r} is not a plain file name (no '/', not '..', at most "
                         f"{MAX_NAME_CHARS} characters); the report is written inside --out, e.g. --name my-report")
    return name


@dataclass
class Figure:
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, df, caption: str = "") -> None:
        """A pandas DataFrame (index shown when named)."""
        self.blocks.append(("table", (df, caption)))

    def figure(self, fig, title: str, caption: str = "") -> Figure:
        """A matplotlib figure, saved as PNG at 110 dpi with a tight bounding box (nothing cut off)."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        pyplot().close(fig)
        f = Figure(title, buf.getvalue(), caption)
        self.blocks.append(("figure", f))
        return f

    @property
    def figures(self) -> list[Figure]:
        return [b for k, b in self.blocks if k == "figure"]

    @property
    def tables(self) -> list:
        return [b[0] for k, b in self.blocks if k == "table"]

    # ---- output ---------------------------------------------------------------------------

    def to_html(self) -> str:
        parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(self.title)}</title>",
                 f"<style>{CSS}</style></head><body>", f"<h1>{_e(self.title)}</h1>"]
        for kind, b in self.blocks:
            if kind == "heading":
                parts.append(f"<h{b[0]}>{_e(b[1])}</h{b[0]}>")
            elif kind == "paragraph":
                parts.append(f"<p>{_e(b)}</p>")
            elif kind == "table":
                df, cap = b
                t = df.to_html(index=df.index.name is not None, border=0, classes="data", na_rep="-", escape=True)
                parts.append(f"<figure class='table'>{t}" + (f"<figcaption>{_e(cap)}</figcaption>" if cap else "")
                             + "</figure>")
            else:
                data = base64.b64encode(b.png).decode()
                parts.append(f"<figure><img alt='{_e(b.title)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption><b>{_e(b.title)}</b>" + (f" {_e(b.caption)}" if b.caption else "")
                             + "</figcaption></figure>")
        parts.append("</body></html>\n")
        return "\n".join(parts)

    def to_markdown(self, image_names: list[str]) -> str:
        out = [f"# {self.title}", ""]
        figs = iter(image_names)
        for kind, b in self.blocks:
            if kind == "heading":
                out += ["#" * b[0] + " " + b[1], ""]
            elif kind == "paragraph":
                out += [b, ""]
            elif kind == "table":
                out += [markdown_table(b[0]), ""] + ([f"*{b[1]}*", ""] if b[1] else [])
            else:
                out += [f"![{b.title}]({next(figs)})", "", f"*{b.title}.*" + (f" {b.caption}" if b.caption else ""), ""]
        return "\n".join(out)

    def write(self, out_dir: str | Path, name: str) -> tuple[Path, Path]:
        """Write ``<out>/<name>.html`` and ``<out>/<name>.md`` (+ ``<name>-figN.png``)."""
        check_name(name)
        d = Path(out_dir)
        made = _missing_folders(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
            imgs = []
            for i, f in enumerate(self.figures, start=1):
                p = d / f"{name}-fig{i}.png"
                p.write_bytes(f.png)
                imgs.append(p.name)
            h, m = d / f"{name}.html", d / f"{name}.md"
            h.write_text(self.to_html())
            m.write_text(self.to_markdown(imgs))
        except OSError as e:
            for f in made:  # leave no empty folder behind
                try:
                    f.rmdir()
                except OSError:
                    break
            raise InputError(f"cannot write the report into '{d}': {e.strerror or e}; "
                             f"choose a writable folder with --out") from None
        return h, m


def _missing_folders(d: Path) -> list[Path]:
    """The folders ``d.mkdir(parents=True)`` would create, deepest first."""
    out = []
    try:
        while not d.exists() and d.parent != d:
            out.append(d)
            d = d.parent
    except OSError:
        return []
    return out


def markdown_table(df) -> str:
    show_index = df.index.name is not None
    cols = ([df.index.name] if show_index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for idx, row in df.iterrows():
        cells = ([idx] if show_index else []) + list(row.values)
        lines.append("| " + " | ".join(_md(_cell(c)) for c in cells) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    try:
        import math

        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
    except TypeError:
        pass
    return str(v)


def _md(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _e(s) -> str:
    return html.escape(str(s))


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #ddd}
table.data{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.data th,table.data td{border:1px solid #ccc;padding:3px 7px;text-align:right}
table.data th{background:#f3f3f3}table.data td:first-child,table.data th:first-child{text-align:left}
figure{margin:1em 0;overflow-x:auto}figure img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#444}
"""
