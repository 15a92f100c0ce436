"""The time model's counted work (estimate.time.step_work) against the work of the real step
counted on the meta trace (trace.counts, ``trace_step(count_work=True)``), issue 12.

Every family's small config (benchmarks/analytic_vs_trace.py), bf16, checkpointing on, batch 2,
seq 128: matmul FLOPs per work class equal to 1e-6 (both count 2 FLOPs per multiply-add on the
same shapes; torch's flop_registry on the traced side), kernel launches of the whole step within
±35% (the analytic ``kernels = ops`` has no per-op launch rule). The disagreements found are
strict xfails, each with the library code that decides it (benchmarks/work_counts.py prints the
whole table):

- frozen Linears under non-reentrant checkpointing (``EARLY_STOP``): torch/utils/checkpoint.py
  stops the recompute once the last tensor saved for backward is re-made
  (``_enable_checkpoint_early_stop``, default True), so a layer's trailing frozen Linear whose
  output nothing saves (down_proj without LoRA, falcon's dense_4h_to_h) is not recomputed;
  ``frozen_linear_work`` bills it (npass_f = 2);
- attention of families that call sdpa with an explicit mask or run eager math (falcon: an
  explicit mask, no causal block skipping; t5/mt5: eager attention with relative bias, plus the
  decoder's cross-attention, which ``attention_work`` does not count): the trace counts more;
- (sparse-MoE families: ``time.expert_work`` bills the experts' grouped GEMMs, 2·T·k·h·(2·I_e) +
  2·T·k·I_e·h per pass, and the router's GEMM, 2·T·h·E; exact since the router was added -- the
  0.999 / 0.993 mixtral / qwen3_moe once read, 0.985 olmoe, was that GEMM);
- without checkpointing, the first layer's input does not require grad (transformers'
  ``enable_input_require_grads`` is called with checkpointing only), so the first layer's frozen
  and lora_A input-gradient GEMMs do not run; the analytic bills them.
"""

import functools
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from analytic_vs_trace import FAMILIES, MOE_FAMILIES  # noqa: E402
from work_counts import compare  # noqa: E402

import torch  # noqa: E402

from loraplan.trace.counts import ModuleOwners, WorkCounter, foreach_launches  # noqa: E402

FAMS = [*FAMILIES, *MOE_FAMILIES]
#: families whose layer ends in a frozen Linear whose output no saved tensor needs (see docstring)
EARLY_STOP = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "falcon", "gemma", "granite", "granite_attn_dropout", "smollm3",
              "mistral_hd", "phi4"}
#: families whose attention the trace counts above attention_work (explicit mask / eager / cross-attention)
ATTENTION_DIFFERS = {"falcon", "t5", "mt5"}
FLOPS_REL = 1e-6
KERNELS_BAND = (0.65, 1.35)


@functools.lru_cache(maxsize=None)
def _case(family: str, quant: str = "bf16", gc: bool = True):
    return compare(family, quant, gc, seq=128)


def _flops(r, cls):
    a = r["analytic"].get(cls, {}).get("flops", 0.0)
    t = r["traced"]["classes"].get(cls, {}).get("matmul_flops", 0)
    return a, t


def _xfail(request, cond: bool, reason: str):
    if cond:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


# ------------------------------------------------------------------------- the counter itself
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 32, bias=False)
        self.lm_head = torch.nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.lm_head(self.proj(x).transpose(0, 1).transpose(0, 1)).float().sum()


def test_counter_flops_launches_and_owners_forward_and_backward():
    m = _Tiny().to("meta")
    m.proj.weight.requires_grad_(False)
    m.lm_head.weight.requires_grad_(False)
    x = torch.empty(4, 16, device="meta", requires_grad=True)
    with ModuleOwners(m) as ow, WorkCounter(ow) as wc:
        m(x).backward()
    s = wc.summary()
    # forward 2·T·in·out and the input-gradient GEMM (frozen: no weight gradient), per Linear
    assert s["classes"]["frozen_linear"]["matmul_flops"] == 2 * (2 * 4 * 16 * 32)
    assert s["classes"]["lm_head"]["matmul_flops"] == 2 * (2 * 4 * 32 * 8)
    assert s["phases"]["backward"]["flops"] == 2 * 4 * 16 * 32 + 2 * 4 * 32 * 8
    views = [o for o in s["ops"] if o["op"] in ("t", "transpose")]
    assert views and all(o["launches"] == 0 and o["bytes"] == 0 for o in views)
    mm = [o for o in s["ops"] if o["op"] == "mm" and o["class"] == "frozen_linear" and o["phase"] == "forward"]
    assert mm[0]["launches"] == 1 and mm[0]["bytes"] == 4 * (4 * 16 + 16 * 32 + 4 * 32)
    assert s["module_calls"] == 3


def test_foreach_launches_follow_multi_tensor_apply_chunking():
    small = [torch.empty(10, device="meta")] * 250
    assert foreach_launches([small]) == 3          # 110 tensors per launch at depth 1
    assert foreach_launches([small, small]) == 4   # 64 at depth 2
    big = [torch.empty(65536 * 400, device="meta")]  # 400 chunks: 320 blocks, then 80
    assert foreach_launches([big]) == 2
    assert foreach_launches([[]]) == 1


def test_trace_without_count_work_has_no_work_key_and_the_same_peak():
    from work_counts import case

    from loraplan.trace.run import trace_step

    model, lora, train, cfg = case("llama", "bf16", True)
    plain = trace_step(cfg, lora, train, "9.0")
    counted = trace_step(cfg, lora, train, "9.0", count_work=True)
    assert "work" not in plain
    assert counted["peak_allocated_bytes"] == plain["peak_allocated_bytes"]
    assert not counted["work"]["errors"]


# ------------------------------------------------------------------------- analytic vs traced
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMS)
def test_lora_flops_equal(family):
    a, t = _flops(_case(family), "lora")
    assert t > 0 and a == pytest.approx(t, rel=FLOPS_REL)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMS)
def test_lm_head_flops_equal(family):
    a, t = _flops(_case(family), "lm_head")
    assert t > 0 and a == pytest.approx(t, rel=FLOPS_REL)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMS)
def test_attention_flops_equal(family, request):
    _xfail(request, family in ATTENTION_DIFFERS,
           "attention_work halves every max-length attention (causal block skipping) and counts one attention "
           "per layer; falcon passes an explicit mask (full s^2), t5 runs eager attention and a cross-attention")
    a, t = _flops(_case(family), "attention")
    assert t > 0 and a == pytest.approx(t, rel=FLOPS_REL)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMS)
def test_frozen_linear_flops_equal(family, request):
    _xfail(request, family in EARLY_STOP,
           "non-reentrant checkpoint stops the recompute at the last saved tensor: the layer's trailing frozen "
           "Linear is not recomputed (torch/utils/checkpoint.py _enable_checkpoint_early_stop)")
    a, t = _flops(_case(family), "frozen_linear")
    assert t > 0 and a == pytest.approx(t, rel=FLOPS_REL)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMS)
def test_kernel_launches_within_band(family):
    r = _case(family)
    ratio = r["step_work"].kernels / r["traced"]["total"]["launches"]
    assert KERNELS_BAND[0] <= ratio <= KERNELS_BAND[1], ratio


@pytest.mark.xfail(strict=True, reason="without checkpointing the first layer's input does not require grad "
                   "(enable_input_require_grads runs with checkpointing only): its input-gradient GEMMs do not run")
def test_first_layer_input_gradients_without_checkpointing():
    r = _case("llama", "bf16", False)
    a, t = _flops(r, "lora")
    assert a == pytest.approx(t, rel=FLOPS_REL)


def test_nf4_counts_bitsandbytes_matmuls_and_calls():
    r = _case("llama", "nf4", True)
    tr = r["traced"]
    ops = {(o["op"], o["phase"]): o for o in tr["ops"] if o["class"] == "frozen_linear"}
    assert ("gemm_4bit", "forward") in ops and ops[("gemm_4bit", "forward")]["flops"] > 0
    assert tr["python_calls"].get("bnb.MatMul4Bit.backward", 0) > 0
    # peft LoRA forward calls: 2 layers x (q_proj, v_proj) x (forward + checkpoint recompute)
    assert tr["lora_forward_calls"] == 2 * 2 * 2
    # every launching op has an owner: what is left in "other" is the backward seed
    assert tr["classes"].get("other", {}).get("launches", 0) <= 0.01 * tr["total"]["launches"]
    assert not tr["errors"]
    a, t = _flops(r, "lora")
    assert a == pytest.approx(t, rel=FLOPS_REL)
    a, t = _flops(r, "lm_head")
    assert a == pytest.approx(t, rel=FLOPS_REL)


def test_estimate_method_trace_puts_the_counted_work_in_detail(run_cli, tiny_llama_config):
    import json

    code, out, err = run_cli("estimate", "--model", str(tiny_llama_config), "--method", "trace", "--batch", "1",
                             "--seq", "32", "--format", "json")
    assert code == 0, err
    work = json.loads(out)["detail"]["work"]
    assert work["total"]["launches"] > 0 and work["classes"]["frozen_linear"]["matmul_flops"] > 0
    assert set(work["classes"]) <= {"frozen_linear", "lora", "lm_head", "attention", "elementwise", "loss",
                                     "embedding", "optimizer", "other"}


def test_flash_attention_2_emulation_flops_counted_from_its_calls():
    """The FA2 emulation only allocates; its FLOPs come from its q/k/v shapes (counts.add_fa2_call)."""
    import dataclasses

    from work_counts import analytic_classes, case

    from loraplan.trace.run import trace_step

    model, lora, train, cfg = case("llama", "bf16", True)
    train = dataclasses.replace(train, attn_implementation="flash_attention_2")
    w = trace_step(cfg, lora, train, "9.0", count_work=True)["work"]
    assert w["python_calls"]["flash_attn_2.forward"] == 4 and w["python_calls"]["flash_attn_2.backward"] == 2
    a = analytic_classes(model, lora, train)["attention"]["flops"]
    assert w["classes"]["attention"]["matmul_flops"] == pytest.approx(a, rel=FLOPS_REL)
