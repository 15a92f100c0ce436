"""Output sanity as an invariant: no figure loraplan prints is negative, NaN or infinite
(headroom may be negative), over the whole catalog and a grid of options; and random configs
either give sane outputs or raise LoraplanError, never another exception."""

from __future__ import annotations

import math

import pytest

from loraplan.catalog import load_calibration, load_gpu, load_model, model_names
from loraplan.errors import LoraplanError
from loraplan.spec import OPTIMIZERS, QUANTS

#: figures that may be negative (headroom: the setup does not fit; margin: the headroom beyond the
#: uncertainty band, negative inside the band or over the card)
SIGNED = ("headroom_bytes", "margin_bytes")


def _targets(model: str) -> str | None:
    """all-linear, except on the MoE families where PEFT rewrites it (loraplan refuses it with the
    reason): there the family default."""
    return None if load_model(model).experts else "all-linear"


def _insane(obj, path=""):
    """The first negative / NaN / infinite number in a nested dict/list, as 'path = value'."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = _insane(v, f"{path}.{k}")
            if bad:
                return bad
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _insane(v, f"{path}[{i}]")
            if bad:
                return bad
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        if not math.isfinite(obj) or (obj < 0 and not path.endswith(SIGNED)):
            return f"{path} = {obj!r}"
    return None


def _estimate(model, quant, optimizer, gc, batch=1, seq=512, rank=8, gpu="h100-sxm-80gb"):
    from loraplan.case import resolve_case
    from loraplan.estimate.api import estimate

    m, lora, train = resolve_case({"model": model, "quant": quant, "optimizer": optimizer,
                                   "gradient_checkpointing": gc, "batch": batch, "seq": seq, "rank": rank,
                                   "targets": _targets(model)})
    g = load_gpu(gpu)
    return estimate(m, lora, train, g, load_calibration(g.id))


@pytest.mark.parametrize("model", model_names())
def test_estimate_figures_are_sane_over_the_catalog(model):
    for quant in QUANTS:
        for optimizer in OPTIMIZERS:
            for gc in (True, False):
                d = _estimate(model, quant, optimizer, gc).to_dict()
                assert _insane(d) is None, (model, quant, optimizer, gc, _insane(d))
    for batch, seq, rank in ((4, 2048, 64), (1, 64, 1)):
        d = _estimate(model, "nf4", "paged_adamw_8bit", True, batch, seq, rank, "t4-16gb").to_dict()
        assert _insane(d) is None, (model, batch, seq, rank, _insane(d))


def test_sweep_rows_are_sane_over_the_catalog():
    from loraplan.sweep import sweep_columns

    dense = [m for m in model_names() if _targets(m)]
    grid = {"quant": ",".join(QUANTS), "optimizer": ",".join(OPTIMIZERS), "gradient_checkpointing": "true,false",
            "batch": "1,4", "seq": "128,2048", "rank": "8,64", "gpu": "t4-16gb"}
    rows = list(sweep_columns({**grid, "model": ",".join(dense), "targets": ("all-linear",)}, confirm=True).rows())
    rows += list(sweep_columns({**grid, "model": ",".join(m for m in model_names() if m not in dense)},
                               confirm=True).rows())
    assert len(rows) == len(model_names()) * len(QUANTS) * len(OPTIMIZERS) * 2 * 2 * 2 * 2
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == len(rows), next(r["error"] for r in rows if r["error"])
    for r in ok:
        assert _insane(r) is None, (r["model"], r["quant"], r["optimizer"], _insane(r))


@pytest.mark.parametrize("model", ["llama-2-7b", "qwen2.5-0.5b", "flan-t5-base", "falcon-7b", "gemma-2-2b"])
def test_plan_rows_are_sane(model):
    from loraplan.case import resolve_case
    from loraplan.plan import Job, plan_job

    m, lora, train = resolve_case({"model": model, "quant": "nf4"})
    gpus = [load_gpu(g) for g in ("t4-16gb", "l4-24gb", "h100-sxm-80gb")]
    for job in (Job(tokens=10**6), Job(examples=1000, tokens_per_example=512, epochs=2.5, effective_batch=16)):
        plan = plan_job(m, lora, train, gpus, job, fixed_batch=job.effective_batch is None)
        assert _insane(plan.to_dict()) is None, (model, _insane(plan.to_dict()))


# ---- random configs ----------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def llama_like(draw):
    """A valid llama-family config: heads divide hidden, kv heads divide heads."""
    mt = draw(st.sampled_from(["llama", "mistral", "qwen2", "phi3"]))
    head_dim = draw(st.sampled_from([16, 32, 64, 128]))
    heads = draw(st.integers(1, 64))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    return {"model_type": mt, "hidden_size": heads * head_dim, "num_attention_heads": heads,
            "num_key_value_heads": kv, "num_hidden_layers": draw(st.integers(1, 48)),
            "intermediate_size": draw(st.integers(1, 65536)), "vocab_size": draw(st.integers(1, 300_000)),
            "tie_word_embeddings": draw(st.booleans()),
            "max_position_embeddings": draw(st.integers(1, 1 << 20))}


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                             st.integers(), max_size=1))
_KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
         "vocab_size", "head_dim", "max_position_embeddings", "sliding_window", "model_type", "tie_word_embeddings",
         "rms_norm_eps", "attention_dropout"]


def _sane_estimate(cfg, quant, optimizer, gc, batch, seq, rank):
    from loraplan.estimate.api import estimate
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec, TrainSpec

    model = spec_from_config(cfg, "random")
    g = load_gpu("h100-sxm-80gb")
    e = estimate(model, LoraSpec(rank=rank, targets=("all-linear",)),
                 TrainSpec(quant=quant, optimizer=optimizer, gradient_checkpointing=gc, batch=batch, seq=seq),
                 g, load_calibration(g.id))
    return e.to_dict()


_SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(cfg=llama_like(), quant=st.sampled_from(QUANTS), optimizer=st.sampled_from(OPTIMIZERS), gc=st.booleans(),
       batch=st.integers(1, 64), seq=st.integers(1, 32768), rank=st.integers(1, 256))
def test_random_valid_configs_give_sane_outputs(cfg, quant, optimizer, gc, batch, seq, rank):
    d = _sane_estimate(cfg, quant, optimizer, gc, batch, seq, rank)
    assert _insane(d) is None, _insane(d)
    assert d["memory"]["peak_allocated_bytes"] > 0


@_SETTINGS
@given(cfg=llama_like(), key=st.sampled_from(_KEYS), junk=_JUNK)
def test_random_invalid_configs_raise_loraplan_error(cfg, key, junk):
    """A config with one key set to anything: a sane estimate or a LoraplanError, nothing else."""
    cfg = dict(cfg, **{key: junk})
    try:
        d = _sane_estimate(cfg, "nf4", "adamw", True, 1, 256, 8)
    except LoraplanError as e:
        assert "\n" not in str(e)
        return
    assert _insane(d) is None, (key, junk, _insane(d))
