"""Library versions as inputs (issue 14): data/version-rules.json, read by loraplan.versions, used
by the analytic kernel choice, the cuBLAS workspace term and the trace emulation. Each rule is
checked on both sides of its boundary."""

import pytest

from loraplan import versions
from loraplan.catalog import load_calibration, load_gpu, load_model
from loraplan.errors import InputError
from loraplan.estimate.activations import choose_attention
from loraplan.estimate.transients import cuda_workspaces
from loraplan.spec import TrainSpec


def test_every_rule_names_a_known_library_and_a_source():
    data = versions.rules_data()
    for name, r in data["rules"].items():
        assert r["library"] in data["libraries"], name
        assert r["source"] and r["values"], name
        sinces = [versions.version_tuple(e["since"]) for e in r["values"]]
        assert sinces == sorted(sinces), name


@pytest.mark.parametrize("text,expected", [
    ("torch=2.11,transformers=5.17", (("torch", "2.11"), ("transformers", "5.17"))),
    ("peft=0.21.2", (("peft", "0.21.2"),)),
    (None, None),
])
def test_parse_stack(text, expected):
    assert versions.parse_stack(text) == expected


@pytest.mark.parametrize("text,word", [("tensorflow=2.1", "unknown"), ("torch=2.x", "malformed"),
                                       ("torch", "library=version")])
def test_parse_stack_errors_are_one_line(text, word):
    with pytest.raises(InputError) as e:
        versions.parse_stack(text)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_trainspec_validates_its_stack():
    with pytest.raises(InputError):
        TrainSpec(stack="nolib=1")
    assert TrainSpec(stack="torch=2.11").stack == (("torch", "2.11"),)


def test_version_tuple():
    assert versions.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert versions.version_tuple("5.0.0rc1") == (5, 0, 0)


@pytest.mark.parametrize("rule,lib,before,after,v_before,v_after", [
    ("sdpa_flash_gqa", "torch", "2.4", "2.5", False, True),
    ("cublas_workspace_in_allocator", "torch", "2.14", "2.15", True, False),
    ("peft_autocast_adapter_dtype", "peft", "0.11", "0.12", False, True),
])
def test_rule_boundaries(rule, lib, before, after, v_before, v_after):
    assert versions.rule(rule, f"{lib}={before}") == v_before
    assert versions.rule(rule, f"{lib}={after}") == v_after


def test_single_valued_rules_hold_for_every_release():
    for stack in ("torch=2.0", "torch=2.15"):
        assert versions.rule("sdpa_efficient_gqa", stack) is False
        assert versions.rule("sdpa_flash_dtypes", stack) == ["float16", "bfloat16"]


def test_default_stack_is_installed_or_newest_known():
    full = versions.resolve(None)
    assert set(full) == set(versions.libraries())
    assert versions.resolve("torch=2.11")["torch"] == "2.11"


def test_analytic_kernel_choice_follows_torch_version():
    """fp32 stream (nf4) with grouped-query heads and no mask: with enable_gqa (torch >= 2.5) the
    heads reach sdpa, mem-efficient refuses them -> math; before, transformers repeats k, v ->
    mem-efficient."""
    m = load_model("llama-3.2-1b")
    assert m.num_kv_heads != m.num_heads
    new = TrainSpec(quant="nf4", seq=512, stack="torch=2.5")
    old = TrainSpec(quant="nf4", seq=512, stack="torch=2.4")
    assert choose_attention(m, new, "9.0") == "math"
    assert choose_attention(m, old, "9.0") == "efficient"
    assert choose_attention(m, TrainSpec(quant="bf16", seq=512, stack="torch=2.4"), "9.0") == "flash"


def test_sliding_window_mask_from_seq_equal_window():
    m = load_model("mistral-7b")
    w = m.arch.sliding_window
    assert choose_attention(m, TrainSpec(quant="bf16", seq=w - 1), "9.0") == "flash"
    assert choose_attention(m, TrainSpec(quant="bf16", seq=w), "9.0") == "efficient"
    assert choose_attention(m, TrainSpec(quant="nf4", seq=w), "9.0") == "efficient"


def test_cublas_workspace_follows_torch_version():
    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    assert cuda_workspaces(gpu, cal, "cuda", "torch=2.14") == 64 * 2**20
    assert cuda_workspaces(gpu, cal, "cuda", "torch=2.15") == 0


def test_emulation_follows_the_same_rules():
    torch = pytest.importorskip("torch")
    from loraplan.trace import emulation as em

    args = (torch.float32, 64, 64, False, "9.0", "auto")
    assert em.choose_sdpa_backend(*args, gqa=True, stack="torch=2.13") == "math"
    assert em.choose_sdpa_backend(*args, gqa=False, stack="torch=2.13") == "efficient"
    assert em.choose_sdpa_backend(torch.bfloat16, 64, 64, False, "9.0", "auto", gqa=True) == "flash"
    assert em.cublas_workspace_bytes("9.0", "torch=2.14") == 32 * 2**20
    assert em.cublas_workspace_bytes("9.0", "torch=2.15") == 0
    assert em.cublas_workspace_bytes("8.0", "torch=2.14") < 32 * 2**20


def test_estimate_json_names_the_stack():
    from loraplan.case import resolve_case
    from loraplan.estimate.api import estimate

    model, lora, train = resolve_case({"model": "qwen2.5-0.5b", "stack": "torch=2.15"})
    d = estimate(model, lora, train, load_gpu("h100-sxm-80gb"), load_calibration("h100-sxm-80gb")).to_dict()
    assert d["inputs"]["stack"]["torch"] == "2.15"
    assert d["memory"]["components"].get("cuda_workspaces", 0) == 0


def test_logits_upcast_follows_transformers_version():
    """bf16 logits at the loss, T·V = seq·vocab: transformers 4.38 llama (``logits =
    logits.float()`` in the model, then the shift's fp32 .contiguous() copy) holds 2·T·V more at
    the end of the forward than 5.x ForCausalLMLoss (bf16 logits + fp32 copy, labels padded),
    4.46 llama (bf16 logits + fp32 copy + fp32 shift copy) 4·T·V more; the head of backward is
    the same 12·T·V. qwen2 at 4.46 is not listed by the rule: the newest form."""
    from loraplan.case import resolve_case
    from loraplan.estimate.api import estimate
    from loraplan.estimate.steps import lm_loss_form, lm_loss_forms

    assert lm_loss_form("llama", lm_loss_forms("transformers=4.45")) == "model_upcast"
    assert lm_loss_form("llama", lm_loss_forms("transformers=4.46")) == "loss_shift"
    assert lm_loss_form("llama", lm_loss_forms("transformers=4.49")) == "loss_pad"
    assert lm_loss_form("gpt2", lm_loss_forms("transformers=4.38")) == "loss_pad"
    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)

    def moments(name, stack):
        case = {"model": name, "quant": "bf16", "batch": 1, "seq": 256}
        model, lora, train = resolve_case(dict(case, stack=stack) if stack else case)
        return estimate(model, lora, train, gpu, cal, with_time=False).memory.moments, model

    for name, stack, extra in (("llama-3.2-1b", "transformers=4.38", 2), ("llama-3.2-1b", "transformers=4.46", 4),
                               ("llama-3.2-1b", "transformers=4.49", 0), ("qwen2.5-0.5b", "transformers=4.38", 2),
                               ("qwen2.5-0.5b", "transformers=4.46", 0)):
        new, m = moments(name, None)
        old, _ = moments(name, stack)
        assert old["forward"] - new["forward"] == extra * 256 * m.vocab_size, (name, stack)
        assert old["loss backward"] == new["loss backward"], (name, stack)
