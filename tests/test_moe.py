"""Sparse-MoE families (transformers 5 fused 3-D experts): shape rules against meta builds, LoRA
counts against PEFT's target_parameters, the storage of experts under a bitsandbytes base, and
the analytic ledger against the meta-device trace (bf16; the nf4 trace fails in torch's
grouped_mm on the fp32 experts, which the estimate's note states)."""

from __future__ import annotations

import pytest

from loraplan.errors import TargetError
from loraplan.estimate.api import estimate
from loraplan.hf import MOE_RULES, spec_from_config
from loraplan.spec import LoraSpec, TrainSpec

#: small configs that take every branch: GQA, qwen2_moe's shared expert and a dense layer
#: (mlp_only_layers), qwen3_moe's decoder_sparse_step and per-head norms, olmoe's full q/k norms
CFGS = {
    "mixtral": {"model_type": "mixtral", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 512,
                  "mlp_only_layers": [1]},
    "qwen3_moe": {"model_type": "qwen3_moe", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
                  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 256, "decoder_sparse_step": 2,
                  "head_dim": 64},
    "olmoe": {"model_type": "olmoe", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 6, "num_experts_per_tok": 2,
              "eos_token_id": 1, "pad_token_id": 1},
}
EXPERT_TARGETS = [("q_proj", "v_proj", "experts"), ("experts.gate_up_proj",), ("o_proj", "experts.down_proj")]


def test_families_have_rules():
    assert set(CFGS) == set(MOE_RULES)


def test_experts_are_their_own_ledger_line_and_bnb_leaves_them_fp32():
    m = spec_from_config(CFGS["mixtral"], "mixtral-small")
    n = sum(e.numel for e in m.experts)
    bf16 = estimate(m, LoraSpec(), TrainSpec(quant="bf16"))
    nf4 = estimate(m, LoraSpec(), TrainSpec(quant="nf4"))
    assert bf16.memory.components["expert_weights"] == 2 * n
    assert nf4.memory.components["expert_weights"] == 4 * n  # not quantized, then upcast to fp32
    assert any(s.startswith("WARNING: nf4 does NOT quantize") for s in nf4.memory.notes)
    assert not any("does NOT quantize" in s for s in bf16.memory.notes)


def test_expert_lora_needs_dropout_zero():
    m = spec_from_config(CFGS["mixtral"], "mixtral-small")
    with pytest.raises(TargetError, match="--dropout 0"):
        estimate(m, LoraSpec(targets=("experts",), dropout=0.05), TrainSpec(quant="bf16"))
    with pytest.raises(TargetError, match="no fused experts"):
        estimate(spec_from_config({**CFGS["mixtral"], "model_type": "mistral"}, "x"),
                 LoraSpec(targets=("experts",), dropout=0.0), TrainSpec(quant="bf16"))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CFGS))
def test_shapes_match_meta_build(family):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CFGS[family])
    spec = spec_from_config(cfg, family)
    mt = cfg.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg))
    assert [(l.name, l.in_features, l.out_features, l.bias) for l in spec.linears] == \
           [(n, m.in_features, m.out_features, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linear_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(False)}
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters() if id(p) not in linear_ids}
    ours = {**{p.name: (p.numel,) for p in spec.others},
            **{e.name: (e.num_experts, e.out_features, e.in_features) for e in spec.experts}}
    assert set(ours) == set(theirs)
    for n, shape in ours.items():
        assert shape == theirs[n] if len(shape) == 3 else shape[0] == torch.Size(theirs[n]).numel(), n
    assert spec.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("targets", EXPERT_TARGETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("family", list(CFGS))
def test_counts_match_peft_target_parameters(family, targets):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraplan._meta import linear_modules
    from loraplan.estimate.params import count_params
    from loraplan.targets import peft_target_modules, peft_target_parameters

    cfg = dict(CFGS[family])
    spec = spec_from_config(cfg, family)
    mt = cfg.pop("model_type")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg))
    tm = peft_target_modules(targets, *linear_modules(model)) or None
    pm = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules=tm,
                                          target_parameters=peft_target_parameters(spec, targets)))
    ours = count_params(spec, LoraSpec(rank=4, targets=targets, dropout=0.0))
    assert (ours.trainable, ours.total) == pm.get_nb_trainable_parameters()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CFGS))
def test_analytic_within_2_percent_of_trace_bf16(family):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.trace.run import trace_step

    gpu = load_gpu("h100-sxm-80gb")
    cal = load_calibration(gpu.id)
    cfg = CFGS[family]
    model = spec_from_config(cfg, f"{family}-small")
    worst = []
    for targets, dropout in ((("q_proj", "v_proj"), 0.05), (("q_proj", "k_proj", "v_proj", "o_proj"), 0.0)):
        for gc in (True, False):
            lora = LoraSpec(rank=8, alpha=16, dropout=dropout, targets=targets)
            train = TrainSpec(quant="bf16", batch=2, seq=256, gradient_checkpointing=gc)
            analytic = estimate(model, lora, train, gpu, cal, with_time=False).memory.peak_allocated_bytes
            traced = trace_step(cfg, lora, train, gpu.compute_capability)["peak_allocated_bytes"]
            worst.append((abs(analytic - traced) / traced, targets, gc))
    assert max(worst)[0] < 0.02, max(worst)
