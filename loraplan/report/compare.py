"""``loraplan report compare``: several configurations side by side, on several GPUs."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InputError
from ..render import GiB
from ..spec import GpuSpec, LoraSpec, ModelSpec, TrainSpec
from ..estimate.result import ledger_color, ledger_label
from .document import Document, ledger_segments, pyplot

SEQ_SWEEP = [256 * 2 ** i for i in range(8)]  # 256 .. 32768
BATCH_SWEEP = [2 ** i for i in range(8)]  # 1 .. 128
#: the GPUs drawn when none are given
DEFAULT_GPUS = ("rtx4090-24gb", "l40s-48gb", "a100-sxm-80gb", "h100-sxm-80gb")


@dataclass
class Config:
    label: str
    model: ModelSpec
    lora: LoraSpec
    train: TrainSpec
    raw: dict


def configs_from_cases(cases: list[dict]) -> tuple[list[Config], list[str]]:
    """Case dicts (from expand_grid, may hold 'gpu') -> distinct configurations and GPU ids."""
    from ..case import resolve_case

    if not cases:
        raise InputError("the grid is empty: no configuration to compare; give option values "
                         "(e.g. --quant nf4,bf16) or a grid file with at least one case")
    gpus: list[str] = []
    seen: dict[tuple, dict] = {}
    for c in cases:
        g = c.get("gpu")
        if g and g not in gpus:
            gpus.append(g)
        key = tuple(sorted((k, str(v)) for k, v in c.items() if k != "gpu"))
        seen.setdefault(key, {k: v for k, v in c.items() if k != "gpu"})
    raw = list(seen.values())
    varying = [k for k in raw[0] if len({str(r.get(k)) for r in raw}) > 1]
    out = []
    for i, r in enumerate(raw, start=1):
        model, lora, train = resolve_case(r)
        lab = " ".join(f"{_short(k)}={r.get(k)}" for k in varying) or f"{model.name} {train.quant} r{lora.rank}"
        out.append(Config(lab, model, lora, train, r))
    return out, gpus


def _short(k: str) -> str:
    return {"gradient_checkpointing": "gc", "double_quant": "dq", "optimizer": "opt", "mixed_precision": "mp",
            "gradient_accumulation": "ga", "max_grad_norm": "clip", "attn_implementation": "attn",
            "checkpoint_every_n_layers": "ckpt_every", "checkpoint_offload": "offload",
            "loop_outputs": "outputs"}.get(k, k)


def compare_document(configs: list[Config], gpus: list[GpuSpec], calibration_for, tokens: float,
                     title: str = "loraplan: configurations compared") -> tuple[Document, dict]:
    """The document and the numbers it shows: ``estimates`` ({label: {gpu: Estimate}}), ``ledger``
    (the stacked bars' data, see ``document.ledger_segments``) and ``curves``."""
    import pandas as pd

    from ..estimate.api import estimate
    from ..trainers import recipe_summary

    if not configs:
        raise InputError("the grid is empty: no configuration to compare")
    if not gpus:
        raise InputError("no GPU to compare on; give --gpu ID[,ID...] (see 'loraplan gpus')")
    plt = pyplot()
    ests: dict[str, dict[str, object]] = {}
    for c in configs:
        ests[c.label] = {g.id: estimate(c.model, c.lora, c.train, g, calibration_for(g.id)) for g in gpus}
    doc = Document(title)
    doc.paragraph(f"{len(configs)} configurations on {len(gpus)} GPUs ({', '.join(g.id for g in gpus)}). "
                  "Memory: torch peak allocated, itemised; device total adds the allocator's reserve, the CUDA "
                  "context and paged optimizer buffers (what must fit in the GPU). Step time and cost from the "
                  f"time model with each GPU's calibration; cost for a job of {tokens:,.0f} training tokens at "
                  "the catalog's on-demand price.")

    # side-by-side table (memory on the first GPU's compute capability; identical unless cc differs)
    ref = gpus[0].id
    rows: dict[str, dict[str, object]] = {}
    for c in configs:
        e = ests[c.label][ref]
        t, lo = c.train, c.lora
        col = {
            "model": c.model.name, "quant": t.quant + (" + dq" if t.double_quant else ""),
            "LoRA rank / alpha": f"{lo.rank} / {lo.alpha:g}", "targets": ",".join(lo.targets),
            "optimizer": t.optimizer, "batch x seq": f"{t.batch} x {t.seq}",
            "gradient checkpointing": "on" if t.gradient_checkpointing else "off",
            "recipe": recipe_summary(e.inputs),
            "trainable params": f"{e.params.trainable:,}",
            "peak moment": e.memory.peak_moment,
            "peak allocated (GiB)": f"{e.memory.peak_allocated_bytes / GiB:.2f}",
            "peak reserved (GiB)": f"{e.memory.peak_reserved_bytes / GiB:.2f}",
            "device total (GiB)": f"{e.memory.device_total_bytes / GiB:.2f}",
        }
        for g in gpus:
            eg = ests[c.label][g.id]
            col[f"fits {g.id} ({g.memory_bytes / GiB:.0f} GiB)"] = "yes" if eg.fits else "NO"
        for g in gpus:
            eg = ests[c.label][g.id]
            col[f"step time {g.id} (s)"] = f"{eg.time.step_s:.3f}" if eg.time else "-"
        rows[c.label] = col
    df = pd.DataFrame(rows)
    df.index.name = "configuration"
    doc.heading("Side by side")
    doc.table(df, f"memory figures for {ref}")

    # stacked ledger
    doc.heading("Memory ledger")
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(configs) + 4), 5))
    ledger = {"gpu": ref, "configs": [c.label for c in configs],
              "segments": ledger_segments([ests[c.label][ref].memory.components for c in configs]),
              "peak_allocated_bytes": [ests[c.label][ref].memory.peak_allocated_bytes for c in configs]}
    bottom = [0.0] * len(configs)
    xs = range(len(configs))
    for k, seg in ledger["segments"].items():
        vals = [b / GiB for b in seg]
        ax.bar(xs, vals, bottom=bottom, color=ledger_color(k), label=ledger_label(k), width=0.6)
        bottom = [a + b for a, b in zip(bottom, vals)]
    extra = [(ests[c.label][ref].memory.device_total_bytes - ests[c.label][ref].memory.peak_allocated_bytes) / GiB
             for c in configs]
    ax.bar(xs, extra, bottom=bottom, color="white", edgecolor="#999", hatch="//", width=0.6,
           label="reserve, CUDA context, paged (outside peak allocated)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_wrap(c.label) for c in configs], fontsize=8)
    ax.set_ylabel("memory (GiB)")
    ax.set_title(f"Itemised peak memory ({ref})")
    ax.grid(axis="y", alpha=.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    doc.figure(fig, "Memory ledger per configuration", "stacked: the components of peak allocated at its peak "
               "moment; hatched: the rest of the device total")

    # memory vs seq and batch
    doc.heading("Memory vs sequence length and batch")
    curves = {}
    for what, sweep in (("seq", SEQ_SWEEP), ("batch", BATCH_SWEEP)):
        fig, ax = plt.subplots(figsize=(9, 5))
        for c in configs:
            ys = [estimate(c.model, c.lora, replace(c.train, **{what: v}), gpus[0], calibration_for(ref),
                           with_time=False).memory.device_total_bytes / GiB for v in sweep]
            curves[(c.label, what)] = ys
            ax.plot(sweep, ys, marker="o", ms=3, label=c.label)
        caps: dict[float, list[str]] = {}
        for g in gpus:
            caps.setdefault(round(g.memory_bytes / GiB), []).append(g.id)
        top = max(max(caps), 1.0)
        for cap, ids in caps.items():
            ax.axhline(cap, color="#555", lw=1, ls="--")
            ax.annotate(f"{', '.join(ids)} ({cap:.0f} GiB)", (sweep[0], cap), textcoords="offset points",
                        xytext=(2, 3), fontsize=7, color="#333")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sweep)
        ax.set_xticklabels([str(v) for v in sweep])
        ax.set_ylim(0, top * 1.6)  # curves above stay visible up to 1.6x the largest GPU
        ax.set_xlabel("sequence length (tokens)" if what == "seq" else "micro-batch size (sequences)")
        ax.set_ylabel("device total memory (GiB)")
        other = "batch as configured" if what == "seq" else "sequence length as configured"
        ax.set_title(f"Device memory vs {'sequence length' if what == 'seq' else 'batch'} ({other})")
        ax.grid(alpha=.3, which="both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        doc.figure(fig, f"Memory vs {'sequence length' if what == 'seq' else 'batch size'}",
                   "dashed lines: GPU memory capacities; a configuration fits where its curve is below a line "
                   "(the axis stops at 1.6x the largest GPU; steeper curves leave the top)")

    # step time and cost
    if all(ests[c.label][g.id].time for c in configs for g in gpus):
        doc.heading("Step time and cost per GPU")
        trows = []
        for c in configs:
            for g in gpus:
                e = ests[c.label][g.id]
                hours = tokens / e.time.tokens_per_s / 3600 if e.time.tokens_per_s else None
                cost = hours * g.price_usd_per_hour if hours is not None and g.price_usd_per_hour else None
                trows.append({"configuration": c.label, "GPU": g.id, "fits": "yes" if e.fits else "NO",
                              "step time (s)": round(e.time.step_s, 4), "tokens/s": round(e.time.tokens_per_s),
                              "hours": None if hours is None else round(hours, 2),
                              "cost (USD)": None if cost is None else round(cost, 2),
                              "price (USD/h)": g.price_usd_per_hour})
        tdf = pd.DataFrame(trows)
        doc.table(tdf, f"job of {tokens:,.0f} tokens; a GPU where the run does not fit would need a smaller "
                       "micro-batch or sequence (see 'loraplan plan')")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        w = 0.8 / len(gpus)
        for j, g in enumerate(gpus):
            sub = tdf[tdf["GPU"] == g.id]
            pos = [i + j * w for i in range(len(configs))]
            axes[0].bar(pos, sub["step time (s)"], width=w, label=g.id)
            axes[1].bar(pos, sub["cost (USD)"].fillna(0), width=w, label=g.id)
        for ax, yl in zip(axes, ("step time (s)", "job cost (USD)")):
            ax.set_xticks([i + w * (len(gpus) - 1) / 2 for i in range(len(configs))])
            ax.set_xticklabels([_wrap(c.label) for c in configs], fontsize=8)
            ax.set_ylabel(yl)
            ax.grid(axis="y", alpha=.3)
        axes[0].set_title("Step time per GPU")
        axes[1].set_title(f"Cost of {tokens:,.0f} tokens per GPU")
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        doc.figure(fig, "Step time and job cost per GPU", "bars include GPUs where the configuration does not fit "
                   "(see the table's 'fits' column)")
    return doc, {"estimates": ests, "ledger": ledger, "curves": curves}


def _wrap(text: str, width: int = 12) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text
