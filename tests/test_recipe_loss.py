"""trl 1.16's fused chunked LM head (``--loss chunked``, ``--trainer trl``): analytic vs the meta trace.

The trace applies the real trl/trainer/utils.py::add_fused_lm_head and runs it on its CUDA path
(loraplan/trace/loss_paths.py::fused_head_cuda); the ledger is loraplan/estimate/steps.py::
fused_head_*. Small configs of every decoder-only family (hidden 256, 4 layers) with vocab 32000
so that the head matters, b2 s256: analytic peak allocated within 2% of the trace. Modes: trl's
defaults (bf16 autocast, nf4 base, bf16 adapters, clipping, SFTTrainer.compute_loss and its
metrics), a loop calling the fused head itself on a bf16 base, and on an nf4 base prepared for
k-bit training under bf16 autocast (fp32 lm_head: the head casts each weight tile), plus trl on a
bf16 base and under fp16 autocast. Two larger cases cross the tile boundaries (N > 4096 tokens,
V > 2·32768).
"""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from analytic_vs_trace import family_config, small_config  # noqa: E402

from loraplan.catalog import load_calibration, load_gpu  # noqa: E402
from loraplan.errors import InputError  # noqa: E402
from loraplan.estimate.api import estimate  # noqa: E402
from loraplan.hf import spec_from_config  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.targets import default_targets  # noqa: E402

FAMILIES = ("llama", "qwen2", "gemma2", "phi3", "gpt_neox", "opt", "falcon", "gemma3_text", "olmo2", "granite")
MODES = {
    "trl-nf4": dict(trainer="trl", quant="nf4"),
    "loop-chunked-bf16": dict(trainer="loop", quant="bf16", loss="chunked"),
    "loop-chunked-nf4-autocast": dict(trainer="loop", quant="nf4", loss="chunked", mixed_precision="bf16"),
    "trl-bf16": dict(trainer="trl", quant="bf16"),
    "trl-nf4-fp16": dict(trainer="trl", quant="nf4", mixed_precision="fp16", adapter_dtype="fp32"),
}
#: every family in the first three modes; the last two alternate over the families
CASES = ([(f, m) for f in FAMILIES for m in ("trl-nf4", "loop-chunked-bf16", "loop-chunked-nf4-autocast")]
         + [(f, ("trl-bf16", "trl-nf4-fp16")[i % 2]) for i, f in enumerate(FAMILIES)])


def _case(family, vocab=32000, layers=4, batch=2, seq=256, **fields):
    cfg = small_config(family_config(family), layers=layers, vocab=vocab)
    model = spec_from_config(cfg, f"{family}-small")
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=default_targets(model))
    train = TrainSpec(batch=batch, seq=seq, gradient_checkpointing=True, **fields)
    return cfg, model, lora, train


def _agree(cfg, model, lora, train, what):
    from loraplan.trace.run import trace_step

    gpu = load_gpu("h100-sxm-80gb")
    analytic = estimate(model, lora, train, gpu, load_calibration(gpu.id), with_time=False).memory.peak_allocated_bytes
    traced = trace_step(cfg, lora, train, gpu.compute_capability)["peak_allocated_bytes"]
    err = (analytic - traced) / traced
    assert abs(err) <= 0.02, f"{what}: analytic {analytic} vs trace {traced} ({err:+.2%})"


@pytest.mark.slow
@pytest.mark.parametrize("family,mode", CASES)
def test_fused_head_analytic_within_2_percent_of_trace(family, mode):
    _agree(*_case(family, **MODES[mode]), f"{family} {mode}")


@pytest.mark.slow
@pytest.mark.parametrize("fields", [dict(trainer="trl", quant="nf4", gradient_accumulation=2),
                                    dict(trainer="loop", quant="nf4", loss="chunked", mixed_precision="bf16")])
def test_fused_head_across_tile_boundaries(fields):
    """N = 3·1799 = 5397 tokens (two token chunks of 4096 and 1301) and V = 70000 (three
    vocabulary tiles): the rebinding moments of the tile loop's copies."""
    _agree(*_case("llama", vocab=70000, layers=2, batch=3, seq=1800, **fields), str(fields))


def _memory(family, **fields):
    gpu = load_gpu("h100-sxm-80gb")
    _, model, lora, train = _case(family, **fields)
    return estimate(model, lora, train, gpu, load_calibration(gpu.id), with_time=False).memory


def test_fused_head_never_makes_the_logits():
    std = _memory("llama", quant="bf16")
    fused = _memory("llama", quant="bf16", loss="chunked")
    assert fused.moments["forward"] < std.moments["forward"]
    assert fused.moments["loss backward"] < std.moments["loss backward"]


def test_fused_head_tile_does_not_grow_with_the_vocabulary():
    """mm_buf is [min(N, 4096), 32768] whatever V; without dtype copies (bf16 head, no autocast)
    the head's forward bytes are the same for V = 40000 and 80000 (the logits would double)."""
    from loraplan.estimate.memory import make_setup, moments
    from loraplan.targets import select_targets

    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    lines = []
    for vocab in (40000, 80000):
        _, model, lora, train = _case("llama", vocab=vocab, quant="bf16", loss="chunked")
        s = make_setup(model, lora, train, select_targets(model, lora.targets))
        lines.append(moments(s.structure, s.train, s.attention, s.shape, gpu, cal)["forward"]["logits_loss"])
    assert lines[0] == lines[1] > 0


def test_sft_metrics_keep_the_entropy_for_backward():
    """SFTTrainer asks for entropy and is_top1: ChunkedLogProbFunction saves the entropy (fp32 [N],
    N = b·(s − 1)) beside log_z; the loop's default head saves log_z twice (one tensor)."""
    from loraplan.estimate.memory import make_setup
    from loraplan.estimate.steps import fused_head_backward_bytes, step_recipe
    from loraplan.targets import select_targets

    _, model, lora, train = _case("llama", quant="bf16", loss="chunked")
    s = make_setup(model, lora, train, select_targets(model, lora.targets))
    rc = step_recipe(s.train)
    diff = (fused_head_backward_bytes(s.structure, s.shape, replace(rc, trainer="trl"))
            - fused_head_backward_bytes(s.structure, s.shape, rc))
    assert diff == -(-4 * 2 * 255 // 512) * 512


def test_fused_head_refuses_encoder_decoder_and_warns_about_lora_on_lm_head():
    with pytest.raises(InputError, match="chunked"):
        _memory("t5", vocab=256, loss="chunked")
    gpu = load_gpu("h100-sxm-80gb")
    _, model, lora, train = _case("llama", quant="bf16", loss="chunked")
    mem = estimate(model, replace(lora, targets=tuple(lora.targets) + ("lm_head",)), train, gpu,
                   load_calibration(gpu.id), with_time=False).memory
    assert any("lm_head is bypassed" in n for n in mem.notes)
    assert not any("bypassed" in n for n in _memory("llama", quant="bf16", loss="chunked").notes)


def test_trace_and_burst_both_run_the_fused_head():
    """trl's fused head: the trace emulates its CUDA path, the burst runs trl's own code (the real
    SFTTrainer, or add_fused_lm_head in the loop); only trl with Liger is refused (SFTTrainer is)."""
    from loraplan.train_step import check_supported

    for fields in (dict(trainer="trl"), dict(trainer="loop", loss="chunked")):
        train = TrainSpec(batch=1, seq=64, quant="bf16", **fields)
        check_supported(train)
        check_supported(train, runner="burst")


def test_fused_head_step_time_recomputes_the_projection_but_moves_no_logits():
    """estimate/time.py::fused_head_work replaces lm_head (2 GEMMs over T tokens) and the loss:
    3 GEMMs over the N = T − b scored tokens, and tile traffic instead of the logits' loss traffic."""
    from loraplan.estimate.time import step_work

    _, model, lora, train = _case("llama", quant="bf16")
    std = step_work(model, lora, train)
    fused = step_work(model, lora, replace(train, loss="chunked"))
    T, N, hV = 2 * 256, 2 * 255, model.hidden_size * model.vocab_size
    assert fused.flops_mm - std.flops_mm == pytest.approx(3 * 2 * N * hV - 2 * 2 * T * hV)  # 2·N·h·V per GEMM
    assert fused.bytes_moved < std.bytes_moved
