"""Shape rules (loraplan.hf) against transformers itself: every catalog model is built on the meta
device (no memory, no download) and compared Linear by Linear, parameter by parameter, and
against PEFT's own trainable/total counts. Needs torch + transformers + peft; skipped otherwise.

T5 note: transformers 5.x forces T5Config/MT5Config.tie_word_embeddings=True, so ``from_config``
ties lm_head to ``shared``; ``from_pretrained`` unties it when the checkpoint holds a different
lm_head (flan-t5, mt0: config.json ``tie_word_embeddings: false``). ``build_meta`` does the same.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loraplan.catalog import model_entries, model_names  # noqa: E402
from loraplan.errors import ConfigError, TargetError  # noqa: E402
from loraplan.estimate.params import count_params  # noqa: E402
from loraplan.hf import RULES, spec_from_config  # noqa: E402
from loraplan.spec import LoraSpec  # noqa: E402
from loraplan.targets import PEFT_MOE_ALL_LINEAR_REWRITE  # noqa: E402

pytestmark = pytest.mark.slow
transformers.logging.set_verbosity_error()

#: the attention targets of the common "q,v" LoRA recipe, per family (fused qkv where there is no q/v)
ATTN_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "gpt2": ["c_attn"],
    "gemma": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "olmo2": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"], "smollm3": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "qwen3_moe": ["q_proj", "v_proj"], "qwen2_moe": ["q_proj", "v_proj"],
    "olmoe": ["q_proj", "v_proj"],
}

#: small configs that take the branches the catalog does not (rules must match transformers there too)
EXTRA = {
    "llama-biases": {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "attention_bias": True, "mlp_bias": True,
                     "head_dim": 32, "tie_word_embeddings": True},
    "mistral-no-kv-key": {"model_type": "mistral", "vocab_size": 320, "hidden_size": 128, "intermediate_size": 96,
                          "num_hidden_layers": 2, "num_attention_heads": 16},
    "qwen2-no-kv-key": {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 128, "intermediate_size": 96,
                        "num_hidden_layers": 2, "num_attention_heads": 32, "attention_bias": False},
    "qwen3-default-head-dim": {"model_type": "qwen3", "vocab_size": 320, "hidden_size": 64,
                               "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "attention_bias": True},
    "gemma2-bias-untied": {"model_type": "gemma2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
                           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1,
                           "attention_bias": True, "tie_word_embeddings": False},
    "phi3-gqa-head-dim": {"model_type": "phi3", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
    "gpt-neox-sequential-nobias": {"model_type": "gpt_neox", "vocab_size": 320, "hidden_size": 64,
                                   "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "use_parallel_residual": False, "attention_bias": False,
                                   "tie_word_embeddings": True},
    "opt-350m-like": {"model_type": "opt", "vocab_size": 320, "hidden_size": 64, "ffn_dim": 96,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 32,
                      "do_layer_norm_before": False, "max_position_embeddings": 100},
    "opt-no-affine-no-bias": {"model_type": "opt", "vocab_size": 320, "hidden_size": 64, "ffn_dim": 96,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "enable_bias": False,
                              "layer_norm_elementwise_affine": False, "tie_word_embeddings": False},
    "falcon-40b-like": {"model_type": "falcon", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 8, "num_kv_heads": 2, "new_decoder_architecture": True,
                        "parallel_attn": True, "bias": False, "ffn_hidden_size": 96},
    "falcon-rw-like": {"model_type": "falcon", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "multi_query": False, "parallel_attn": False, "bias": True,
                       "alibi": True},
    "falcon-parallel-2ln": {"model_type": "falcon", "vocab_size": 320, "hidden_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_ln_in_parallel_attn": 2},
    "t5-asymmetric-relu": {"model_type": "t5", "vocab_size": 320, "d_model": 64, "d_kv": 8, "d_ff": 96,
                           "num_layers": 3, "num_decoder_layers": 2, "num_heads": 4,
                           "relative_attention_num_buckets": 16},
    "gemma-defaults": {"model_type": "gemma", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
    "gemma-bias-untied-mqa": {"model_type": "gemma", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                              "head_dim": 32, "attention_bias": True, "tie_word_embeddings": False},
    "gemma3-text-defaults": {"model_type": "gemma3_text", "vocab_size": 320, "hidden_size": 64,
                             "intermediate_size": 96, "num_hidden_layers": 7, "num_attention_heads": 4},
    "gemma3-text-layer-types-bias": {"model_type": "gemma3_text", "vocab_size": 320, "hidden_size": 64,
                                     "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "head_dim": 32, "attention_bias": True,
                                     "tie_word_embeddings": False, "sliding_window": 16,
                                     "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "olmo2-gqa-bias-tied": {"model_type": "olmo2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "attention_bias": True, "tie_word_embeddings": True},
    "granite-defaults-biases": {"model_type": "granite", "vocab_size": 320, "hidden_size": 64,
                                "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "attention_bias": True, "mlp_bias": True, "embedding_multiplier": 12.0,
                                "logits_scaling": 8.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125},
    "smollm3-defaults-untied": {"model_type": "smollm3", "vocab_size": 320, "hidden_size": 64,
                                "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 8,
                                "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "mt5-default-untied": {"model_type": "mt5", "vocab_size": 320, "d_model": 64, "d_kv": 8, "d_ff": 96,
                           "num_layers": 2, "num_heads": 4},
}

#: decoder-only models deeper than this are counted against PEFT on a 2-layer copy
PEFT_FULL_MAX_LAYERS = 32

CASES = {**{n: model_entries()[n]["config"] for n in model_names()}, **EXTRA}


def build_meta(cfg: dict):
    """The model transformers builds for ``cfg`` (config.json values), on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kwargs = dict(cfg)
    mt = kwargs.pop("model_type")
    hf_cfg = AutoConfig.for_model(mt, **kwargs)
    auto = AutoModelForSeq2SeqLM if hf_cfg.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_cfg)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    untied = cfg.get("tie_word_embeddings", mt != "mt5") is False
    if untied and out.weight is inp.weight:  # what from_pretrained does for flan-t5 / mt0 checkpoints
        out.weight = torch.nn.Parameter(torch.empty_like(out.weight))
    return model


def _linears(model) -> list[tuple[str, int, int, bool]]:
    return [(n, m.in_features, m.out_features, m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def timings():
    t: dict[str, float] = {}
    yield t
    if t:
        slowest = sorted(t.items(), key=lambda kv: -kv[1])[:5]
        print("\nslowest meta builds + peft wraps:", ", ".join(f"{k} {v:.1f}s" for k, v in slowest))


@pytest.mark.parametrize("name", list(CASES))
def test_linears_and_params_match_transformers(name):
    cfg = CASES[name]
    spec = spec_from_config(cfg, name)
    model = build_meta(cfg)
    # every Linear: same name, same order, same shape, same bias
    assert [(l.name, l.in_features, l.out_features, l.bias) for l in spec.linears] == _linears(model)
    head = model.get_output_embeddings()
    assert spec.lm_head is not None and model.get_submodule(spec.lm_head.name) is head
    tied = head.weight is model.get_input_embeddings().weight
    assert spec.tie_word_embeddings == tied
    # every other parameter (deduplicated as named_parameters does): same names and sizes
    linear_ids = {id(p) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  for p in m.parameters(recurse=False)}
    theirs = {n: p.numel() for n, p in model.named_parameters()
              if id(p) not in linear_ids or (tied and p is head.weight)}
    if tied:  # a tied head's weight is reported under the input embedding's name
        theirs = {n: v for n, v in theirs.items() if not n.startswith(spec.lm_head.name + ".")}
    # sparse-MoE families: the fused 3-D expert parameters are ModelSpec.experts
    assert {**{p.name: p.numel for p in spec.others}, **{e.name: e.numel for e in spec.experts}} == theirs
    for e in spec.experts:
        assert tuple(model.get_parameter(e.name).shape) == (e.num_experts, e.out_features, e.in_features)
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    # hidden-state roles are consistent with the Linear shapes
    for l in spec.linears:
        assert l.role in {"q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "fc_in", "fc_out",
                          "lm_head", "project_in", "project_out", "cross_q", "cross_k", "cross_v", "cross_o",
                          "shared_expert_gate"}
    assert spec.arch.attention == ("eager" if model.config._attn_implementation == "eager" else "sdpa")


@pytest.mark.parametrize("targets", ["attn", "all-linear"])
@pytest.mark.parametrize("name", list(CASES))
def test_counts_match_peft(name, targets, timings):
    from peft import LoraConfig, get_peft_model

    cfg = CASES[name]
    if cfg.get("num_hidden_layers", 0) > PEFT_FULL_MAX_LAYERS:
        # wrapping 80-126 layers takes PEFT 4-12 s; layers repeat, and the full-size shapes and
        # totals are checked above, so count a 2-layer copy against the spec of the same copy
        cfg = {**cfg, "num_hidden_layers": 2}
    spec = spec_from_config(cfg, name)
    tm = ATTN_TARGETS[cfg["model_type"]] if targets == "attn" else "all-linear"
    t0 = time.perf_counter()
    model = get_peft_model(build_meta(cfg), LoraConfig(r=8, target_modules=tm))
    trainable, total = model.get_nb_trainable_parameters()
    timings[f"{name}/{targets}"] = time.perf_counter() - t0
    lora = LoraSpec(rank=8, targets=tuple(tm) if targets == "attn" else ("all-linear",))
    if targets == "all-linear" and cfg["model_type"] in PEFT_MOE_ALL_LINEAR_REWRITE:
        # PEFT rewrites all-linear into LoRA on routers and fused experts too: loraplan refuses it
        assert any(".mlp.experts." in n for n, p in model.named_parameters() if p.requires_grad)
        with pytest.raises(TargetError, match="rewrites it"):
            count_params(spec, lora)
        return
    ours = count_params(spec, lora)
    assert (ours.trainable, ours.total) == (trainable, total)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "flan-t5-base", "opt-350m-like", "falcon-40b-like",
                                  "gemma2-bias-untied", "t5-asymmetric-relu"])
def test_meta_fallback_matches_rules(name):
    from loraplan._meta import spec_from_meta_build

    cfg = CASES[name]
    rule, meta = spec_from_config(cfg, name), spec_from_meta_build(cfg, name)
    assert [(l.name, l.in_features, l.out_features, l.bias) for l in meta.linears] == \
           [(l.name, l.in_features, l.out_features, l.bias) for l in rule.linears]
    assert meta.tie_word_embeddings == rule.tie_word_embeddings
    assert meta.total_params == rule.total_params
    assert {p.name: p.numel for p in meta.others} == {p.name: p.numel for p in rule.others}
    assert (meta.num_layers, meta.is_encoder_decoder, meta.num_encoder_layers) == \
           (rule.num_layers, rule.is_encoder_decoder, rule.num_encoder_layers)
    for targets in (("all-linear",), ("all-linear", "lm_head")):
        lora = LoraSpec(rank=4, targets=targets)
        assert count_params(meta, lora) == count_params(rule, lora)


def test_meta_fallback_for_a_family_without_rule():
    """gpt2 has no rule: spec_from_config builds it on meta (Conv1D read as Linear) and matches PEFT."""
    from peft import LoraConfig, get_peft_model

    cfg = {"model_type": "gpt2", "vocab_size": 320, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}
    assert "gpt2" not in RULES
    spec = spec_from_config(cfg, "tiny-gpt2")
    assert spec.tie_word_embeddings and spec.lm_head is not None
    assert {l.leaf for l in spec.linears} == {"c_attn", "c_proj", "c_fc", "lm_head"}
    for tm in (["c_attn"], "all-linear"):
        model = get_peft_model(build_meta(cfg), LoraConfig(r=8, target_modules=tm))
        ours = count_params(spec, LoraSpec(rank=8, targets=tuple(tm) if isinstance(tm, list) else (tm,)))
        assert (ours.trainable, ours.total) == model.get_nb_trainable_parameters()


def test_meta_fallback_unknown_model_type_is_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        spec_from_config({"model_type": "no-such-family", "hidden_size": 8}, "x")
    assert "no-such-family" in str(e.value) and "\n" not in str(e.value)


def test_meta_fallback_estimate_says_which_terms_are_generic():
    """An estimate for a family without a shape rule notes that its activation terms are generic."""
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.spec import TrainSpec

    cfg = {"model_type": "gpt2", "vocab_size": 320, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}
    spec = spec_from_config(cfg, "tiny-gpt2")
    assert spec.arch.from_meta_build
    gpu = load_gpu("h100-sxm-80gb")
    e = estimate(spec, LoraSpec(rank=4, targets=("c_attn",)), TrainSpec(quant="bf16", seq=32), gpu,
                 load_calibration(gpu.id), with_time=False)
    assert any("no shape rule" in n and "generic" in n for n in e.memory.notes)
    assert not spec_from_config(CASES["olmo2-gqa-bias-tied"], "o").arch.from_meta_build
