"""Sequence handling and the attention implementation (issue 11): padding (max-length, longest,
packing, padding-free), the length distribution, attn_implementation (sdpa, eager,
flash_attention_2).

- the worst batch and the expected batch (``estimate.sequences``), by hand;
- flash_attention_2's refusals (one line, exit 2);
- the analytic ledger within 2% of the meta-device trace (FA2 emulated on meta, the masks
  transformers builds for padded and packed batches) on small configs of several families;
- the time model: attention per document for varlen FA2, tokens/s of real tokens.
"""

import itertools
import sys
from pathlib import Path

import pytest

from loraplan.errors import InputError
from loraplan.estimate.sequences import (attention_span, batch_layout, expected_longest, expected_tokens,
                                         explicit_mask)
from loraplan.spec import TrainSpec


def _train(**kw):
    return TrainSpec(**{"quant": "bf16", "batch": 4, "seq": 512, **kw})


# ---------------------------------------------------------------------------- worst / expected batch
def test_worst_batch_of_each_padding_mode():
    assert batch_layout(_train()) == batch_layout(_train(padding="max-length"))
    lay = batch_layout(_train())
    assert (lay.rows, lay.row_len, lay.padded, lay.packed) == (4, 512, False, False)
    lay = batch_layout(_train(padding="longest", lengths=(100, 300, 900)))  # max capped at seq
    assert (lay.rows, lay.row_len, lay.padded, lay.packed) == (4, 512, True, False)
    lay = batch_layout(_train(padding="longest", lengths=(100, 300)))
    assert (lay.rows, lay.row_len, lay.padded) == (4, 300, True)
    lay = batch_layout(_train(padding="longest", lengths=(600, 700)))  # every row truncated to seq: no pad
    assert (lay.row_len, lay.padded) == (512, False)
    lay = batch_layout(_train(padding="packing", lengths=(100, 300)))
    assert (lay.rows, lay.row_len, lay.padded, lay.packed) == (4, 512, False, True)
    lay = batch_layout(_train(padding="padding-free", lengths=(100, 300)))
    assert (lay.rows, lay.row_len, lay.packed) == (1, 4 * 300, True)


def test_opt_builds_no_packed_mask():
    lay = batch_layout(_train(padding="packing"))
    assert explicit_mask(lay, "llama") and not explicit_mask(lay, "opt")
    assert explicit_mask(batch_layout(_train(padding="longest", lengths=(10, 20))), "opt")


@pytest.mark.parametrize("mode", ["longest", "padding-free"])
def test_lengths_required(mode):
    with pytest.raises(InputError, match="--lengths"):
        batch_layout(_train(padding=mode))


def test_expected_longest_matches_enumeration():
    lengths, b, cap = (50, 120, 120, 400, 900), 3, 512
    vals = [min(v, cap) for v in lengths]
    brute = sum(max(c) for c in itertools.product(vals, repeat=b)) / len(vals) ** b
    assert expected_longest(lengths, b, cap) == pytest.approx(brute)
    assert expected_longest((7,), 5, 100) == 7


def test_expected_tokens_count_real_tokens():
    t = _train(padding="longest", lengths=(100, 300))
    processed, real = expected_tokens(t)
    assert real == 4 * 200
    assert processed == pytest.approx(4 * (100 * 0.5 ** 4 + 300 * (1 - 0.5 ** 4)))
    assert expected_tokens(_train(padding="padding-free", lengths=(100, 300))) == (800, 800)
    assert expected_tokens(_train(padding="packing")) == (2048, 2048)


# ---------------------------------------------------------------------------- flash_attention_2 refusals
@pytest.mark.parametrize("args, word", [
    (["--gpu", "t4-16gb"], "compute capability"),
    (["--gpu", "h100-sxm-80gb", "--quant", "fp32"], "fp16/bf16"),
])
def test_fa2_refusals_are_one_line_exit_2(run_cli, args, word):
    code, out, err = run_cli("estimate", "--model", "llama-3.2-1b", "--attn-implementation", "flash_attention_2", *args)
    assert code == 2
    assert word in err and len(err.strip().splitlines()) == 1


def test_fa2_on_cpu_refused():
    from loraplan.estimate.sequences import check_attention

    with pytest.raises(InputError, match="NVIDIA GPU"):
        check_attention(_train(attn_implementation="flash_attention_2", device="cpu"), None, 2)
    check_attention(_train(attn_implementation="flash_attention_2", quant="nf4"), "8.0", 4)  # cast to bf16: fine


def test_padding_refused_on_encoder_decoder(run_cli):
    code, out, err = run_cli("estimate", "--model", "flan-t5-base", "--padding", "packing")
    assert code == 2 and "encoder-decoder" in err


def test_sequence_notes():
    from loraplan.estimate.sequences import sequence_notes

    assert sequence_notes("llama", _train()) == []
    assert sequence_notes("llama", _train(padding="longest", lengths=(1, 2))) == []
    assert "attend to each other" in sequence_notes("llama", _train(padding="packing",
                                                                     attn_implementation="flash_attention_2"))[0]
    assert sequence_notes("llama", _train(batch=1, padding="packing", attn_implementation="flash_attention_2")) == []
    assert "without position ids" in sequence_notes("opt", _train(padding="packing"))[0]
    assert "[1, 1, 1200, 1200]" in sequence_notes("llama", _train(padding="padding-free", lengths=(100, 300)))[0]


# ---------------------------------------------------------------------------- the ledger's kernel choice
def test_mask_takes_sdpa_off_flash():
    from loraplan.catalog import load_model
    from loraplan.estimate.activations import choose_attention

    m = load_model("llama-3.2-1b")
    assert choose_attention(m, _train(), "9.0") == "flash"
    assert choose_attention(m, _train(padding="packing"), "9.0") == "efficient"
    assert choose_attention(m, _train(padding="longest", lengths=(100, 300)), "9.0") == "efficient"
    assert choose_attention(m, _train(padding="longest", lengths=(600, 700)), "9.0") == "flash"  # no pad
    assert choose_attention(m, _train(padding="packing", attn_implementation="flash_attention_2"), "9.0") == "fa2"
    assert choose_attention(m, _train(attn_implementation="eager"), "9.0") == "eager"


# ---------------------------------------------------------------------------- time
def test_attention_span_per_document_for_varlen_fa2():
    lengths = (100, 300)
    pf = _train(padding="padding-free", lengths=lengths)
    fa2 = attention_span(pf, "fa2")
    sdpa = attention_span(pf, "efficient")
    assert fa2.causal and fa2.pairs == 4 * (100 ** 2 + 300 ** 2) / 2  # b documents, E[len²] each
    assert not sdpa.causal and sdpa.pairs == (4 * 200) ** 2  # one row of T with the packed mask
    one_row = attention_span(_train(batch=1, padding="packing", lengths=lengths), "fa2")
    assert one_row.causal and one_row.pairs == pytest.approx(512 / 200 * (100 ** 2 + 300 ** 2) / 2)


def test_time_counts_real_tokens_and_fewer_attention_flops():
    from loraplan.catalog import load_gpu, load_model
    from loraplan.estimate.time import step_work
    from loraplan.spec import LoraSpec

    m, lora = load_model("llama-3.2-1b"), LoraSpec(rank=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))
    lengths = (200, 600, 2000)
    full = step_work(m, lora, _train(seq=2048))
    longest = step_work(m, lora, _train(seq=2048, padding="longest", lengths=lengths))
    pf_sdpa = step_work(m, lora, _train(seq=2048, padding="padding-free", lengths=lengths))
    pf_fa2 = step_work(m, lora, _train(seq=2048, padding="padding-free", lengths=lengths,
                                       attn_implementation="flash_attention_2"))
    assert full.tokens == 4 * 2048
    assert longest.tokens == pytest.approx(4 * 2800 / 3)  # real tokens only
    assert pf_fa2.tokens == longest.tokens
    assert pf_fa2.flops_mm < pf_sdpa.flops_mm  # per-document causal vs the full masked row
    assert longest.flops_mm < full.flops_mm
    assert load_gpu("h100-sxm-80gb")  # the catalog GPU the estimate tests use


# ---------------------------------------------------------------------------- analytic vs trace
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from analytic_vs_trace import family_config, small_config  # noqa: E402

#: (family, case) pairs: every padding mode with sdpa (explicit masks, mem-efficient kernel, k/v
#: repeated or not), eager, and FA2 (plain, padded ``_upad_input``, varlen padding-free / packed
#: one row), bf16 and nf4 (FA2 casts the fp32 stream to bf16), checkpointing on and off
SEQ_CASES = {
    "packing": dict(seq=512, padding="packing", lengths=(100, 300), gradient_checkpointing=False),
    "longest-nf4": dict(seq=512, padding="longest", lengths=(100, 300, 700), quant="nf4"),
    "padding-free": dict(seq=512, padding="padding-free", lengths=(100, 300), gradient_checkpointing=False),
    "padding-free-gc": dict(seq=256, padding="padding-free", lengths=(60, 200), quant="nf4"),
    "eager-packing": dict(seq=256, padding="packing", attn_implementation="eager", gradient_checkpointing=False),
    "eager-padding-free-gc": dict(seq=512, padding="padding-free", lengths=(100, 300, 700), attn_implementation="eager"),
    # one row with a single kv head: eager's k, v are views at one head (activations.eager_kv_heads)
    "eager-padding-free-nf4": dict(seq=512, padding="padding-free", lengths=(100, 300, 700), attn_implementation="eager",
                                   quant="nf4", gradient_checkpointing=False),
    "fa2-nf4": dict(seq=512, attn_implementation="flash_attention_2", quant="nf4"),
    "fa2-padding-free": dict(seq=512, attn_implementation="flash_attention_2", padding="padding-free",
                             lengths=(100, 300), gradient_checkpointing=False),
    "fa2-longest-nf4": dict(seq=512, attn_implementation="flash_attention_2", padding="longest",
                            lengths=(100, 300, 700), quant="nf4", gradient_checkpointing=False),
    "fa2-packed-row": dict(seq=512, batch=1, attn_implementation="flash_attention_2", padding="packing",
                           lengths=(100, 300)),
}
FAMILY_CASES = (
    [("llama", c) for c in SEQ_CASES]
    + [(f, c) for f in ("qwen3", "phi3", "gpt_neox", "gemma2")
       for c in ("packing", "longest-nf4", "fa2-longest-nf4", "fa2-padding-free")]
    + [("mistral", "padding-free"), ("opt", "packing"), ("opt", "longest-nf4"), ("falcon", "padding-free"),
       ("opt", "eager-padding-free-gc"), ("gemma2", "eager-padding-free-gc"),
       ("olmo2", "fa2-nf4"), ("gemma3_text", "padding-free-gc"), ("gemma3_text", "eager-padding-free-nf4"),
       ("granite_attn_dropout", "eager-padding-free-nf4")]
)


@pytest.mark.slow
@pytest.mark.parametrize("family, case", FAMILY_CASES)
def test_sequences_analytic_within_2_percent_of_trace(family, case):
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec
    from loraplan.targets import default_targets
    from loraplan.trace.run import trace_step

    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    cfg = small_config(family_config(family))
    model = spec_from_config(cfg, f"{family}-small")
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=default_targets(model))
    train = TrainSpec(**{"quant": "bf16", "batch": 2, "gradient_checkpointing": True, **SEQ_CASES[case]})
    analytic = estimate(model, lora, train, gpu, cal, with_time=False)
    traced = trace_step(cfg, lora, train, gpu.compute_capability, steps=2)
    err = (analytic.memory.peak_allocated_bytes - traced["peak_allocated_bytes"]) / traced["peak_allocated_bytes"]
    assert abs(err) <= 0.02, (family, case, f"{err:+.2%}", analytic.inputs["attention_kernel"], traced["sdpa_backends"])
    if train.attn_implementation == "flash_attention_2":
        assert not traced["sdpa_backends"]  # the emulated FA2 ran, never sdpa


@pytest.mark.slow
@pytest.mark.parametrize("targets, quant", [(("k_proj",), "bf16"), (("v_proj",), "bf16"), (("q_proj", "k_proj"), "bf16"),
                                            (("v_proj",), "nf4")])
def test_eager_first_layer_saves_per_adapted_projection(targets, quant):
    """Without checkpointing the first layer's eager products keep q, k, v and the probabilities
    only for the adapted side's gradient (activations.first_layer_not_saved): to 0.5% of the trace."""
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec
    from loraplan.trace.run import trace_step

    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    cfg = small_config(family_config("llama"))
    model = spec_from_config(cfg, "llama-small")
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=targets)
    train = TrainSpec(quant=quant, batch=2, seq=512, gradient_checkpointing=False, attn_implementation="eager")
    a = estimate(model, lora, train, gpu, cal, with_time=False).memory.peak_allocated_bytes
    p = trace_step(cfg, lora, train, gpu.compute_capability, steps=2)["peak_allocated_bytes"]
    assert abs(a - p) <= 0.005 * p, (targets, quant, f"{(a - p) / p:+.2%}")


@pytest.mark.slow
def test_fa2_trace_refuses_like_the_estimate():
    from loraplan.trace.run import trace_step
    from loraplan.spec import LoraSpec

    cfg = small_config(family_config("llama"))
    with pytest.raises(InputError, match="compute capability"):
        trace_step(cfg, LoraSpec(rank=8, alpha=16, dropout=0.0, targets=("q_proj",)),
                   TrainSpec(quant="bf16", batch=1, seq=64, attn_implementation="flash_attention_2"), "7.5", steps=1)


# ---------------------------------------------------------------------------- real CPU steps
LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
         "max_position_embeddings": 1024, "tie_word_embeddings": False}


@pytest.mark.slow
def test_cpu_estimate_matches_real_padded_and_packed_steps(run_cli, tmp_path):
    """Real CPU bursts (transformers builds the padding and packed-sequence masks from real
    tensors; sdpa's math kernel) vs the CPU estimate: within 4%, as tests/test_cpu_ledger.py."""
    import json

    from loraplan.profile.records import read_records

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    out = tmp_path / "cpu.jsonl"
    cases = [("longest", "40,90,200", "bf16", False), ("longest", "40,90,200", "nf4", True),
             ("packing", "40,90", "nf4", True), ("packing", "40,90", "bf16", False),
             ("padding-free", "40,90", "nf4", False)]
    for padding, lengths, quant, gc in cases:
        code, _, err = run_cli(
            "profile", "--device", "cpu", "--model", str(d), "--quant", quant, "--targets", "q_proj,v_proj",
            "--padding", padding, "--lengths", lengths,
            "--gradient-checkpointing" if gc else "--no-gradient-checkpointing",
            "--batch", "2", "--seq", "128", "--rank", "8", "--steps", "3", "--warmup", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
        assert code == 0, err
    recs = read_records(out).records
    assert len(recs) == len(cases) and all(r["status"] == "ok" for r in recs)
    errors = {}
    for r in recs:
        assert r["estimate"]["inputs"]["padding"] != "max-length"
        measured = r["memory"]["peak_allocated_bytes"]
        errors[r["label"]] = (r["estimate"]["memory"]["peak_allocated_bytes"] - measured) / measured
    bad = {k: f"{100 * v:+.2f}%" for k, v in errors.items() if abs(v) > 0.04}
    assert not bad, bad
