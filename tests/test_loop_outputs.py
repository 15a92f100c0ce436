"""A plain loop that binds the model's output (``--loop-outputs``): its logits stay alive through
backward and the optimizer step ("micro-step"), and into the next forward ("next-forward").

Small configs (hidden 256, 2 layers, vocab 2048 so that the logits matter), b2 s256: the ledger's
``model_output`` line against the meta-device trace running the same loop
(``loraplan.train_step.StepRunner._loop_step``).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from analytic_vs_trace import family_config, small_config  # noqa: E402

from loraplan.catalog import load_calibration, load_gpu  # noqa: E402
from loraplan.errors import InputError  # noqa: E402
from loraplan.estimate.api import estimate  # noqa: E402
from loraplan.hf import spec_from_config  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.targets import default_targets  # noqa: E402

GPU = load_gpu("h100-sxm-80gb")
CAL = load_calibration(GPU.id)


def _case(family, **fields):
    cfg = small_config(family_config(family))
    model = spec_from_config(cfg, f"{family}-small")
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=default_targets(model))
    train = TrainSpec(batch=2, seq=256, target_seq=256 if model.is_encoder_decoder else None, **fields)
    return cfg, model, lora, train


def _moments(model, lora, train):
    from loraplan.estimate.memory import make_setup, moments
    from loraplan.targets import select_targets

    s = make_setup(model, lora, train, select_targets(model, lora.targets), GPU.compute_capability)
    return moments(s.structure, s.train, s.attention, s.shape, GPU, CAL)


def test_dropped_is_the_protocol_and_adds_nothing():
    _, model, lora, train = _case("llama")
    default = estimate(model, lora, train, GPU, CAL, with_time=False).memory
    dropped = estimate(model, lora, TrainSpec(**{**train.__dict__, "loop_outputs": "dropped"}), GPU, CAL,
                       with_time=False).memory
    assert default.peak_allocated_bytes == dropped.peak_allocated_bytes
    assert "model_output" not in default.components


@pytest.mark.parametrize("mode", ["micro-step", "next-forward"])
def test_kept_logits_are_counted_after_the_forward(mode):
    _, model, lora, train = _case("llama", quant="bf16", gradient_checkpointing=True, loop_outputs=mode)
    ms = _moments(model, lora, train)
    logits = 2 * train.batch * train.seq * model.vocab_size  # bf16 [T, V], lm_head's dtype (loss_pad form)
    for name in ("loss backward", "layer backward", "optimizer step"):
        assert ms[name]["model_output"] == logits
    # the previous micro-step's output is still bound during the next forward only when rebound there
    assert ms["forward"].get("model_output", 0) == (logits if mode == "next-forward" else 0)


def test_old_transformers_return_fp32_logits():
    """transformers <= 4.45 LlamaForCausalLM.forward: logits = logits.float() is what the output holds
    (version rule causal_lm_loss_logits 'model_upcast')."""
    _, model, lora, train = _case("llama", quant="bf16", loop_outputs="micro-step", stack="transformers=4.38,torch=2.2")
    ms = _moments(model, lora, train)
    assert ms["optimizer step"]["model_output"] == 4 * train.batch * train.seq * model.vocab_size


def test_trainers_refuse_a_kept_output():
    _, model, lora, _ = _case("llama")
    for trainer in ("hf", "trl"):
        with pytest.raises(InputError, match=r"--loop-outputs micro-step is not available with .*--trainer loop"):
            estimate(model, lora, TrainSpec(trainer=trainer, loop_outputs="micro-step"), GPU, CAL, with_time=False)


def test_step_script_frees_the_kept_output():
    from loraplan.allocator import replay
    from loraplan.estimate.reserved import _events, step_script, weight_tensor_bytes
    from loraplan.targets import select_targets

    _, model, lora, _ = _case("llama")
    adapted = select_targets(model, lora.targets)
    w = weight_tensor_bytes(model, adapted, "bf16", False, lora.rank)
    peaks = {}
    for mode in ("dropped", "micro-step", "next-forward"):
        s = step_script(model, lora, TrainSpec(quant="bf16", batch=2, seq=256, loop_outputs=mode), adapted, "9.0")
        r = replay(_events(w, s, 2))
        live = len(w) + len(s.input_bytes) + len(s.optimizer_state_bytes)
        # "next-forward": the last step's output stays bound after the run (nothing rebinds it)
        assert r.live_at_end == live + (len(s.output_kept) if mode == "next-forward" else 0)
        peaks[mode] = r.peak_allocated
    assert peaks["dropped"] < peaks["micro-step"] <= peaks["next-forward"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2", "t5"])
@pytest.mark.parametrize("mode", ["micro-step", "next-forward"])
@pytest.mark.parametrize("gc", [True, False])
def test_kept_output_agrees_with_the_trace(family, mode, gc):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from loraplan.trace.run import trace_step

    fields = dict(gradient_checkpointing=gc, loop_outputs=mode, quant="nf4")
    if mode == "next-forward":
        fields["gradient_accumulation"] = 2
    cfg, model, lora, train = _case(family, **fields)
    e = estimate(model, lora, train, GPU, CAL, with_time=False).memory
    base = estimate(model, lora, TrainSpec(**{**train.__dict__, "loop_outputs": "dropped"}), GPU, CAL,
                    with_time=False).memory
    tr = trace_step(cfg, lora, train, GPU.compute_capability, steps=2)
    tb = trace_step(cfg, lora, TrainSpec(**{**train.__dict__, "loop_outputs": "dropped"}), GPU.compute_capability,
                    steps=2)
    # the output adds to both views alike (measured: the same offset as the dropped output's,
    # within 0.01 MiB), and the peak stays within 1.5% of the trace's
    assert e.peak_allocated_bytes - base.peak_allocated_bytes == pytest.approx(
        tr["peak_allocated_bytes"] - tb["peak_allocated_bytes"], abs=64 * 1024)
    assert e.peak_allocated_bytes == pytest.approx(tr["peak_allocated_bytes"], rel=0.015)
