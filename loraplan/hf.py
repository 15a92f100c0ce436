"""ModelSpec from a Hugging Face config.json: pure-Python shape rules per model family.

Each rule derives every weight matrix with its exact shape and the module name transformers
gives it (checked against meta-device builds in tests/test_hf_shapes.py). For a model_type
without a rule, ``spec_from_meta`` builds the model on the meta device (needs torch +
transformers) and reads its modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .spec import ArchSpec, LinearSpec, ModelSpec, ParamSpec


def _req(cfg: Mapping[str, Any], key: str, model_type: str):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"config.json for model_type '{model_type}' lacks '{key}'; add it to the config")
    return cfg[key]


def _llama_like(cfg: Mapping[str, Any], name: str, *, qkv_bias: bool, o_bias: bool = False,
                mlp_bias: bool = False, arch: ArchSpec, extra_norm_numel: Callable[[int, int], dict] | None = None,
                ) -> ModelSpec:
    """llama / mistral / qwen2 / qwen3 / gemma2: separate q,k,v,o and gate,up,down projections.

    Shapes: q [n_h*d, h], k,v [n_kv*d, h], o [h, n_h*d], gate,up [I, h], down [h, I];
    embed_tokens [V, h]; lm_head [V, h] unless tied; RMSNorm weights [h].
    """
    mt = cfg.get("model_type", "llama")
    h = _req(cfg, "hidden_size", mt)
    L = _req(cfg, "num_hidden_layers", mt)
    n_h = _req(cfg, "num_attention_heads", mt)
    n_kv = cfg.get("num_key_value_heads") or n_h
    d = cfg.get("head_dim") or h // n_h
    inter = _req(cfg, "intermediate_size", mt)
    V = _req(cfg, "vocab_size", mt)
    tie = bool(cfg.get("tie_word_embeddings", mt in ("gemma2",)))
    qkv_bias = bool(cfg.get("attention_bias", qkv_bias))
    o_bias = bool(cfg.get("attention_bias", o_bias)) if mt in ("llama", "mistral") else o_bias
    mlp_bias = bool(cfg.get("mlp_bias", mlp_bias))
    linears: list[LinearSpec] = []
    others: list[ParamSpec] = [ParamSpec("model.embed_tokens.weight", V * h, "embedding")]
    for i in range(L):
        p = f"model.layers.{i}"
        linears += [
            LinearSpec(f"{p}.self_attn.q_proj", h, n_h * d, qkv_bias, "q", "decoder", i),
            LinearSpec(f"{p}.self_attn.k_proj", h, n_kv * d, qkv_bias, "k", "decoder", i),
            LinearSpec(f"{p}.self_attn.v_proj", h, n_kv * d, qkv_bias, "v", "decoder", i),
            LinearSpec(f"{p}.self_attn.o_proj", n_h * d, h, o_bias, "o", "decoder", i),
            LinearSpec(f"{p}.mlp.gate_proj", h, inter, mlp_bias, "gate", "decoder", i),
            LinearSpec(f"{p}.mlp.up_proj", h, inter, mlp_bias, "up", "decoder", i),
            LinearSpec(f"{p}.mlp.down_proj", inter, h, mlp_bias, "down", "decoder", i),
        ]
        others += [
            ParamSpec(f"{p}.input_layernorm.weight", h, "norm"),
            ParamSpec(f"{p}.post_attention_layernorm.weight", h, "norm"),
        ]
        if extra_norm_numel:
            others += [ParamSpec(f"{p}.{k}", n, "norm") for k, n in extra_norm_numel(h, d).items()]
    others.append(ParamSpec("model.norm.weight", h, "norm"))
    linears.append(LinearSpec("lm_head", h, V, False, "lm_head", "head", None))
    return ModelSpec(
        name=name, model_type=mt, config=dict(cfg), hidden_size=h, num_layers=L, num_heads=n_h,
        num_kv_heads=n_kv, head_dim=d, intermediate_size=inter, vocab_size=V,
        max_positions=cfg.get("max_position_embeddings"), tie_word_embeddings=tie,
        linears=tuple(linears), others=tuple(others), arch=arch,
    )


def _llama(cfg, name):
    return _llama_like(cfg, name, qkv_bias=False, arch=ArchSpec())


def _mistral(cfg, name):
    return _llama_like(cfg, name, qkv_bias=False, arch=ArchSpec(sliding_window=cfg.get("sliding_window")))


def _qwen2(cfg, name):
    # Qwen2 has biases on q,k,v only (transformers Qwen2Attention: bias=True for q/k/v, False for o).
    sw = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return _llama_like(cfg, name, qkv_bias=True, arch=ArchSpec(sliding_window=sw))


def _qwen3(cfg, name):
    # Qwen3: no q/k/v bias by default; per-head RMSNorm on q and k (weights [head_dim]).
    return _llama_like(
        cfg, name, qkv_bias=False,
        arch=ArchSpec(extra_norms=("q_norm", "k_norm")),
        extra_norm_numel=lambda h, d: {"self_attn.q_norm.weight": d, "self_attn.k_norm.weight": d},
    )


#: model_type -> rule. Families added by their own functions below.
RULES: dict[str, Callable[[Mapping[str, Any], str], ModelSpec]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
}


def load_config(path: str | Path) -> dict:
    """Read a config.json (or a folder holding one); one-line ConfigError if unreadable."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read model config '{p}': {e.strerror}; give a catalog name "
                          f"(see 'loraplan models') or a path to a config.json") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{p}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                          f"fix the file or give a catalog name") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ConfigError(f"'{p}' has no 'model_type'; a Hugging Face config.json names its model_type")
    return cfg


def spec_from_config(cfg: Mapping[str, Any], name: str | None = None) -> ModelSpec:
    """ModelSpec for a config dict, by pure rules, or by a meta-device build when no rule exists."""
    mt = cfg.get("model_type")
    name = name or cfg.get("_name_or_path") or str(mt)
    rule = RULES.get(mt)
    if rule is not None:
        return rule(cfg, name)
    return spec_from_meta(cfg, name)


def spec_from_meta(cfg: Mapping[str, Any], name: str) -> ModelSpec:
    """Fallback for families without a rule: build on the meta device and read Linear modules."""
    import importlib.util

    mt = cfg.get("model_type")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise ConfigError(
            f"model_type '{mt}' has no built-in shape rule (known: {', '.join(sorted(RULES))}); "
            f"install torch and transformers (pip install 'loraplan[profile]') to read it from a meta-device build")
    from ._meta import spec_from_meta_build

    return spec_from_meta_build(cfg, name)
