"""loraplan's target syntax -> PEFT LoraConfig.target_modules (targets.peft_target_modules):
PEFT 0.21 adapts exactly the Linear modules the analytic select_targets counts."""

from __future__ import annotations

import pytest

from loraplan.targets import ALL_LINEAR, default_targets, peft_target_modules, select_targets

LINEARS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
           "lm_head"]


def test_forms_peft_reads_itself_pass_through():
    assert peft_target_modules([ALL_LINEAR], LINEARS, "lm_head") == ALL_LINEAR  # only the whole string
    assert peft_target_modules(("q_proj", "v_proj"), LINEARS, "lm_head") == ["q_proj", "v_proj"]


def test_regexes_and_mixed_forms_become_full_names():
    assert peft_target_modules([r".*\.q_proj"], LINEARS, "lm_head") == ["model.layers.0.self_attn.q_proj"]
    assert peft_target_modules([ALL_LINEAR, "lm_head"], LINEARS, "lm_head") == LINEARS
    assert peft_target_modules([ALL_LINEAR], LINEARS[:3], None) == ALL_LINEAR
    assert peft_target_modules(["q_proj", r".*\.mlp\..*"], LINEARS, "lm_head") == \
        ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


TINY = {
    "llama": {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": False},
    "qwen2-tied": {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "tie_word_embeddings": True},
    "t5": {"model_type": "t5", "vocab_size": 256, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
           "num_decoder_layers": 2, "num_heads": 4, "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "vocab_size": 320, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
}
REGEX = {"llama": r".*\.mlp\..*", "qwen2-tied": r".*\.self_attn\.[qk]_proj", "t5": r"decoder\..*\.(q|wo)",
         "gpt2": r".*\.mlp\.c_fc"}
EXPLICIT = {"llama": ("q_proj", "v_proj", "down_proj"), "qwen2-tied": ("k_proj", "o_proj"), "t5": ("k", "wi"),
            "gpt2": ("c_attn", "c_proj")}


def _adapted(cfg: dict, targets: tuple[str, ...]) -> list[str]:
    """The modules get_peft_model adapts, given peft_target_modules' translation."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from loraplan._meta import _build, linear_modules, untie_like_checkpoint

    hf_cfg, model = _build(cfg)
    untie_like_checkpoint(model, cfg)
    tm = peft_target_modules(targets, *linear_modules(model))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=tm,
                                                  task_type="SEQ_2_SEQ_LM" if hf_cfg.is_encoder_decoder
                                                  else "CAUSAL_LM"))
    prefix = "base_model.model."
    return [n[len(prefix):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("form", ["all-linear", "all-linear,lm_head", "explicit", "default", "regex",
                                  "regex+name"])
def test_peft_adapts_what_select_targets_counts(family, form):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from loraplan.hf import spec_from_config

    cfg = TINY[family]
    spec = spec_from_config(cfg, family)
    if form == "default":
        if family == "gpt2":
            pytest.skip("PEFT's gpt2 default targets c_attn, loraplan has no default table entry for it")
        targets = default_targets(spec)
    else:
        targets = {"all-linear": (ALL_LINEAR,), "all-linear,lm_head": (ALL_LINEAR, spec.lm_head.leaf),
                   "explicit": EXPLICIT[family], "regex": (REGEX[family],),
                   "regex+name": (REGEX[family], EXPLICIT[family][0])}[form]
    want = [l.name for l in select_targets(spec, targets)]
    assert want and _adapted(cfg, targets) == want


def test_default_targets_are_pefts_mapping_for_every_family_it_knows():
    """The defaults are peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as data keyed by
    peft's version (version-rules.json, benchmarks/peft_targets.py), equal to the installed peft's
    source; gpt2 (not in the catalog) gets c_attn from it, and a config.json of it estimates."""
    import importlib.util
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from loraplan.targets import LORAPLAN_TARGETS, peft_default_targets

    mapping = peft_default_targets()
    assert mapping["gpt2"] == ("c_attn",) and mapping["bloom"] == ("query_key_value",)
    assert not set(LORAPLAN_TARGETS) & set(mapping)  # loraplan picks only where peft has no entry
    if importlib.util.find_spec("peft") is not None:  # the data holds the installed peft's mapping
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        try:
            from peft_targets import installed_mapping
        finally:
            sys.path.pop(0)
        _, src = installed_mapping()
        assert mapping == {k: (v,) if isinstance(v, str) else tuple(v) for k, v in src.items()}
    assert default_targets(SimpleNamespace(model_type="gpt2")) == ("c_attn",)


@pytest.mark.slow
def test_a_gpt2_config_estimates_with_pefts_default_targets(tmp_path):
    """End to end (a meta-device build of a family without a shape rule: seconds)."""
    import json

    from loraplan.catalog import load_model
    from loraplan.cli import main

    cfg = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128,
           "vocab_size": 256, "activation_function": "gelu_new"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert default_targets(load_model(str(tmp_path / "config.json"))) == ("c_attn",)
    assert main(["estimate", "--model", str(tmp_path / "config.json"), "--format", "json"]) == 0
