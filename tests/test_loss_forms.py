"""An older --stack's loss head (version rule ``causal_lm_loss_logits``) in both views: the analytic
ledger's forms and the trace's reproduction of them (trace/loss_paths.py::apply_loss_form).

Small configs (hidden 256, 2 layers, vocab 2048: the logits matter), b2 s256.
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from analytic_vs_trace import family_config, small_config  # noqa: E402

from loraplan.catalog import load_calibration, load_gpu  # noqa: E402
from loraplan.estimate.api import estimate  # noqa: E402
from loraplan.hf import spec_from_config  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.targets import default_targets  # noqa: E402

GPU = load_gpu("h100-sxm-80gb")
CAL = load_calibration(GPU.id)


@pytest.mark.slow
@pytest.mark.parametrize("stack,targets", [
    ("transformers=4.38", "default"),            # model_upcast: fp32 logits out of the model, shifted copy
    ("transformers=4.38", "q_proj,lm_head"),     # ... with LoRA on lm_head: the upcast after the LoRA sum
    ("transformers=4.47", "default"),            # loss_shift: bf16 logits out, fp32 + shifted copy in the loss
])
@pytest.mark.parametrize("gc", [True, False])
def test_older_loss_heads_agree_with_the_trace(stack, targets, gc):
    from loraplan.trace.run import trace_step

    cfg = small_config(family_config("llama"))
    model = spec_from_config(cfg, "llama-small")
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05,
                    targets=default_targets(model) if targets == "default" else tuple(targets.split(",")))
    train = TrainSpec(quant="bf16", batch=2, seq=256, gradient_checkpointing=gc, stack=stack)
    newest = trace_step(cfg, lora, TrainSpec(quant="bf16", batch=2, seq=256, gradient_checkpointing=gc),
                        GPU.compute_capability)
    tr = trace_step(cfg, lora, train, GPU.compute_capability)
    a = estimate(model, lora, train, GPU, CAL, with_time=False).memory.peak_allocated_bytes
    # the older heads hold more at the loss (the shifted fp32 copy), and the trace sees it
    assert tr["peak_allocated_bytes"] > newest["peak_allocated_bytes"]
    assert a == pytest.approx(tr["peak_allocated_bytes"], rel=0.005)  # measured: +0.02%


def test_newest_stack_leaves_the_model_loss_alone():
    """No --stack (or a stack at or after the rule's last boundary) patches nothing."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraplan.trace.loss_paths import apply_loss_form

    cfg = small_config(family_config("llama"))
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    before = m.loss_function
    apply_loss_form(m, TrainSpec(quant="bf16"), torch)
    assert m.loss_function == before and not m.get_output_embeddings()._forward_hooks
    apply_loss_form(m, TrainSpec(quant="bf16", stack="transformers=4.38"), torch)
    assert m.loss_function != before and m.get_output_embeddings()._forward_hooks
