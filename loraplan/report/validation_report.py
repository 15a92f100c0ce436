"""``loraplan report validation``: predicted vs measured, as a document with plots."""

from __future__ import annotations

from ..calibrate import METRICS
from ..render import GiB
from ..estimate.result import ledger_color, ledger_label
from .document import Document, ledger_segments, pyplot
from .validation import TRACE, Validation, label


def _unit(metric: str) -> tuple[float, str]:
    return (1.0, "s") if metric == "step" else (GiB, "GiB")


def validation_document(v: Validation, title: str = "loraplan validation: estimate vs measurement",
                        sources: list[str] | None = None):
    import pandas as pd

    plt = pyplot()
    doc = Document(title)
    gpus = sorted({c.gpu or "?" for c in v.cases})
    doc.paragraph(f"{len(v.cases)} measured cases on {', '.join(gpus)}; calibration: {v.calibration}. "
                  f"Error = (predicted - measured) / measured. Estimator checked against "
                  + ", ".join(f"{k} {x}" for k, x in v.expected_versions.items() if x) + ".")
    if sources:
        doc.paragraph("Records: " + ", ".join(sources))
    if v.has_trace:
        n = sum(1 for c in v.cases if c.trace is not None)
        doc.paragraph(f"Three views of peak allocated memory for {n} case(s): analytic (loraplan's ledger), trace "
                      f"(the real transformers + peft step run on the meta device, its live tensors counted) and "
                      f"measured.")
    metrics = [m for m in METRICS if m in v.summary]

    doc.heading("Summary")
    doc.table(summary_frame(v), "MAPE, mean signed error (bias) and worst case per metric")

    doc.heading("Per case")
    doc.table(cases_frame(v), "GiB for memory, seconds for step time")

    # scatter per metric
    doc.heading("Predicted vs measured")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        div, unit = _unit(m)
        pts = [(c.metrics[m][1] / div, c.metrics[m][0] / div, c.id) for c in v.cases if m in c.metrics]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        tpts = ([(c.trace[1] / div, c.trace[0] / div) for c in v.cases if c.error(TRACE) is not None]
                if m == "allocated" and TRACE in v.summary else [])
        ax.scatter(xs, ys, s=28, color="#4c72b0", zorder=3, label="analytic" if tpts else None)
        if tpts:
            ax.scatter([p[0] for p in tpts], [p[1] for p in tpts], s=46, marker="x", color="#dd8452", zorder=4,
                       label="trace")
            xs, ys = xs + [p[0] for p in tpts], ys + [p[1] for p in tpts]
        lo, hi = 0, max(xs + ys) * 1.08
        ax.plot([lo, hi], [lo, hi], color="#888", lw=1, ls="--", label="identity (perfect)")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"measured {label(m)} ({unit})")
        ax.set_ylabel(f"predicted {label(m)} ({unit})")
        s = v.summary[m]
        title = f"{label(m)}: MAPE {100 * s['mape']:.2f}%, n={s['n']}"
        if tpts:
            st = v.summary[TRACE]
            title = f"{label(m)}: MAPE analytic {100 * s['mape']:.2f}%, trace {100 * st['mape']:.2f}%"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    doc.figure(fig, "Predicted vs measured", "each point is one case; the dashed line is a perfect estimate"
               + ("; peak allocated: dots analytic, crosses meta-device trace" if v.has_trace else ""))

    # error by case
    doc.heading("Error by case")
    ids = [c.id for c in v.cases if c.metrics]
    series = metrics[:1] + ([TRACE] if TRACE in v.summary and metrics[:1] == ["allocated"] else []) + metrics[1:]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(ids) * max(1, len(series)) ** 0.5 + 1.6))
    h = 0.8 / max(1, len(series))
    for j, m in enumerate(series):
        vals = [100 * (c.error(m) or 0) for c in v.cases if c.metrics]
        ax.barh([i + j * h for i in range(len(ids))], vals, height=h, label=label(m))
    ax.set_yticks([i + h * (len(series) - 1) / 2 for i in range(len(ids))])
    ax.set_yticklabels(ids, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="#444", lw=.8)
    ax.set_xlabel("signed error, (predicted - measured) / measured (%)")
    ax.grid(axis="x", alpha=.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    doc.figure(fig, "Signed error by case and metric")

    # error by component: phase-peak checks when present, and the predicted ledger vs measured total
    comps = v.component_keys
    doc.heading("Error by component")
    if comps:
        rows = [{"component": k.replace("_", " "), "cases": v.summary[k]["n"],
                 "MAPE": f"{100 * v.summary[k]['mape']:.2f}%", "worst": f"{100 * v.summary[k]['worst']:+.2f}%",
                 "worst case": v.summary[k]["worst_case"]} for k in comps]
        doc.table(pd.DataFrame(rows), "ledger lines checked against phase peaks of the records")
    else:
        doc.paragraph("The records hold no per-phase memory peaks, so no ledger line can be checked on its own; "
                      "below, the predicted ledger at the peak moment is drawn against the measured total.")
    fig = ledger_vs_measured(v, plt)
    doc.figure(fig, "Predicted ledger at the peak moment vs measured peak allocated",
               "stacked bars: predicted components; black marker: measured torch.cuda.max_memory_allocated"
               + ("; orange cross: the meta-device trace's peak" if v.has_trace else ""))
    return doc


def ledger_bars(v: Validation) -> dict:
    """The data of the ledger-vs-measured plot: case ids, the stacked segments (``ledger_segments``
    of each case's predicted ledger at its peak moment), predicted and measured peak allocated."""
    cases = [c for c in v.cases if "allocated" in c.metrics]
    return {"cases": [c.id for c in cases],
            "segments": ledger_segments([c.predicted_components for c in cases]),
            "predicted_peak_allocated_bytes": [c.metrics["allocated"][0] for c in cases],
            "measured_peak_allocated_bytes": [c.metrics["allocated"][1] for c in cases]}


def ledger_vs_measured(v: Validation, plt):
    cases = [c for c in v.cases if "allocated" in c.metrics]
    bars = ledger_bars(v)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cases) + 2))
    left = [0.0] * len(cases)
    for k, seg in bars["segments"].items():
        vals = [b / GiB for b in seg]
        ax.barh(range(len(cases)), vals, left=left, color=ledger_color(k), label=ledger_label(k))
        left = [a + b for a, b in zip(left, vals)]
    ax.scatter([c.metrics["allocated"][1] / GiB for c in cases], range(len(cases)), marker="D", color="black",
               zorder=4, label="measured peak allocated")
    tr = [(i, c.trace[0] / GiB) for i, c in enumerate(cases) if c.trace is not None]
    if tr:
        ax.scatter([x for _, x in tr], [i for i, _ in tr], marker="x", s=60, color="#dd8452", zorder=5,
                   label="trace peak allocated")
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([f"{c.id} ({c.peak_moment})" for c in cases], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("memory (GiB)")
    ax.grid(axis="x", alpha=.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def summary_frame(v: Validation):
    import pandas as pd

    rows = []
    for k, s in v.summary.items():
        rows.append({"metric": "peak allocated (analytic)" if k == "allocated" and v.has_trace else label(k), "cases": s["n"], "MAPE": f"{100 * s['mape']:.2f}%",
                     "bias": f"{100 * s['bias']:+.2f}%", "worst": f"{100 * s['worst']:+.2f}%",
                     "worst case": s["worst_case"]})
    return pd.DataFrame(rows)


def cases_frame(v: Validation):
    import pandas as pd

    rows = []
    with_trace = v.has_trace
    for c in v.cases:
        r = {"case": c.id, "status": c.status, "peak moment": c.peak_moment}
        for m in METRICS:
            if any(m in x.metrics for x in v.cases):
                div, unit = _unit(m)
                p, y = c.metrics.get(m, (None, None))
                fmt = "{:.3f}"
                name = "peak allocated analytic" if m == "allocated" and with_trace else f"{label(m)} predicted"
                r[f"{name} ({unit})"] = None if p is None else fmt.format(p / div)
                if m == "allocated" and with_trace:
                    r[f"peak allocated trace ({unit})"] = None if c.trace is None else fmt.format(c.trace[0] / div)
                r[f"{label(m)} measured ({unit})"] = None if y is None else fmt.format(y / div)
                r[f"{label(m)} {'analytic error' if m == 'allocated' and with_trace else 'error'}"] = (
                    None if p is None else f"{100 * c.error(m):+.2f}%")
                if m == "allocated" and with_trace:
                    e = c.error(TRACE)
                    r["peak allocated trace error"] = (None if c.trace is None else "not comparable (CPU record)"
                                                       if e is None else f"{100 * e:+.2f}%")
        r["flags"] = "; ".join(c.flags)
        rows.append(r)
    return pd.DataFrame(rows)
