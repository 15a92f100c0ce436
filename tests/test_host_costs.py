"""Host-cost priors and gradient checkpointing's saved-tensor hooks (issue 12): the counts the
step-time model bills, held to the real transformers/peft/bitsandbytes code run on the CPU."""

import json
import math
from dataclasses import replace

import pytest

from loraplan.case import resolve_case
from loraplan.catalog import load_calibration, load_gpu
from loraplan.estimate import host_costs
from loraplan.estimate.time import (GC_HOOKS_PER_SAVED, GC_SAVED_PER_LAYER, GC_SAVED_PER_LORA, coefficients,
                                    host_seconds, step_work)

QV = "q_proj,v_proj"
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _work(**case):
    return step_work(*resolve_case(case))


def test_priors_are_the_cpu_costs_plus_the_cuda_launch_extra():
    t = host_costs.table()
    cpu, pri = t["cpu"]["values"], host_costs.host_priors()
    assert pri["time_host_op_s"] == pytest.approx(cpu["time_host_op_s"] + t["cuda_launch_extra"]["value_s"], rel=1e-3)
    for k in ("time_host_lora_call_s", "time_host_bnb4_call_s", "time_host_gc_hook_s"):
        assert pri[k] == cpu[k]
    assert set(t["cpu"]["pinned_by"]) == set(cpu)  # every measured cost says which variants pinned it
    assert set(pri) <= set(load_calibration(None).coefficients)  # each prior names a real coefficient


@pytest.mark.parametrize("quant,targets,kind,adapted", [("bf16", QV, "half", 2), ("bf16", ALL, "half", 7),
                                                        ("nf4", QV, "bnb", 2), ("int8", ALL, "bnb", 7)])
def test_gc_hooks_count_three_calls_per_saved_tensor(quant, targets, kind, adapted):
    case = dict(model="llama-2-7b", quant=quant, targets=targets, batch=1, seq=512)
    on = _work(gradient_checkpointing=True, **case)
    off = _work(gradient_checkpointing=False, **case)
    saved = 32 * (GC_SAVED_PER_LAYER[kind] + GC_SAVED_PER_LORA * adapted)
    assert on.gc_hooks == GC_HOOKS_PER_SAVED * saved
    assert on.forward.gc_hooks == saved  # the forward packs once; recompute and unpack run in backward
    assert off.gc_hooks == 0


def test_gc_hooks_are_billed_at_their_cost_over_the_host_speed():
    w = _work(model="llama-2-7b", quant="bf16", targets=QV, batch=1, seq=512, gradient_checkpointing=True)
    coef = dict(coefficients(load_calibration("h100-sxm-80gb")), time_host_gc_hook_s=1e-5, time_host_speed=2.0)
    base = host_seconds(replace(w, gc_hooks=0.0), coef)["host_s"]
    assert host_seconds(w, coef)["host_s"] - base == pytest.approx(w.gc_hooks * 1e-5 / 2.0)


def _saved_per_layer(tmp_path, quant, targets):
    """Saved tensors of one decoder layer's forward: a 2-layer tiny llama built as the reference
    protocol builds it (bf16; nf4 through BitsAndBytesConfig), peft LoRA, counted by a
    saved_tensors_hooks pack hook while layer 0 runs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    conf = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    kw = {}
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
        kw["quantization_config"] = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                    bnb_4bit_compute_dtype=torch.bfloat16)
    transformers.AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).save_pretrained(tmp_path)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                                  attn_implementation="sdpa", **kw)
    except Exception as e:  # a bitsandbytes build without a CPU 4-bit path
        pytest.skip(f"cannot load nf4 on this CPU: {type(e).__name__}")
    if quant == "nf4":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                       target_modules=targets.split(","), task_type="CAUSAL_LM"))
    model.train()
    layer = model.base_model.model.model.layers[0]
    state = {"inside": False, "n": 0}

    def pack(t):
        state["n"] += state["inside"]
        return t

    layer.register_forward_pre_hook(lambda *a: state.update(inside=True))
    layer.register_forward_hook(lambda *a: state.update(inside=False))
    ids = torch.randint(0, 128, (1, 8))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return state["n"]


@pytest.mark.parametrize("quant,targets,kind,adapted", [("bf16", QV, "half", 2), ("bf16", ALL, "half", 7),
                                                        ("nf4", QV, "bnb", 2)])
def test_saved_tensor_counts_match_the_real_layer(tmp_path, quant, targets, kind, adapted):
    assert _saved_per_layer(tmp_path, quant, targets) == GC_SAVED_PER_LAYER[kind] + GC_SAVED_PER_LORA * adapted


def test_host_cost_data_is_json_with_sources():
    t = json.loads(host_costs.PATH.read_text())
    extra = t["cuda_launch_extra"]
    assert "TensorRT-LLM" in extra["derivation"] and math.isfinite(extra["value_s"]) and extra["value_s"] > 0
    assert t["cpu"]["machine"] and t["cpu"]["versions"]["torch"]
    assert load_gpu("h100-sxm-80gb")  # the priors serve every GPU through time_host_speed
