"""ModelSpec from a Hugging Face config.json: pure-Python shape rules per model family.

Each rule derives every weight matrix with its exact shape and the module name transformers
5.x gives it (checked against meta-device builds in tests/test_hf_shapes.py), plus every other
parameter (embeddings, norm weights and biases, position tables). Missing config keys take the
defaults of the transformers config class of that family. For a model_type without a rule,
``spec_from_meta`` builds the model on the meta device (needs torch + transformers) and reads
its modules.

Roles (LinearSpec.role) name what a matrix computes, across families:

- attention: ``q k v o``, or ``qkv`` for a fused projection (phi3 ``qkv_proj``, gpt-neox and
  falcon ``query_key_value``); T5 decoder cross-attention: ``cross_q cross_k cross_v cross_o``;
- MLP: ``gate up down`` for a gated MLP (act(gate)·up -> down; T5 v1.1 ``wi_0 wi_1 wo``),
  ``gate_up`` for a fused gate+up (phi3 ``gate_up_proj``), ``fc_in fc_out`` for a plain MLP
  (OPT ``fc1 fc2``, gpt-neox/falcon ``dense_h_to_4h dense_4h_to_h``, T5 v1.0 ``wi wo``);
- ``project_in`` / ``project_out``: OPT's embedding projections when word_embed_proj_dim differs
  from hidden_size; ``lm_head``: the output embedding.

ArchSpec.norms_per_layer counts the hidden-size norms of one (decoder) layer; per-head norms
(qwen3 q_norm/k_norm) are listed in ArchSpec.extra_norms instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .spec import ArchSpec, ExpertSpec, LinearSpec, ModelSpec, MoeSpec, ParamSpec


def _req(cfg: Mapping[str, Any], key: str, model_type: str):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"config.json for model_type '{model_type}' lacks '{key}'; add it to the config")
    return cfg[key]


def _get(cfg: Mapping[str, Any], key: str, default):
    """cfg[key], or the family default when the key is absent or null."""
    v = cfg.get(key)
    return default if v is None else v


def _kv_heads(cfg: Mapping[str, Any], n_h: int, default: int | None) -> int:
    """num_key_value_heads; absent -> the config class default (None there means n_h)."""
    if "num_key_value_heads" in cfg:
        return cfg["num_key_value_heads"] or n_h
    return default or n_h


def _attention_linears(p: str, i: int, h: int, n_h: int, n_kv: int, d: int, qkv_bias: bool,
                       o_bias: bool) -> list[LinearSpec]:
    """Layer ``i``'s separate q, k, v, o projections under ``{p}.self_attn``: q [n_h·d, h],
    k, v [n_kv·d, h], o [h, n_h·d] (LlamaAttention and the families built like it)."""
    return [
        LinearSpec(f"{p}.self_attn.q_proj", h, n_h * d, qkv_bias, "q", "decoder", i),
        LinearSpec(f"{p}.self_attn.k_proj", h, n_kv * d, qkv_bias, "k", "decoder", i),
        LinearSpec(f"{p}.self_attn.v_proj", h, n_kv * d, qkv_bias, "v", "decoder", i),
        LinearSpec(f"{p}.self_attn.o_proj", n_h * d, h, o_bias, "o", "decoder", i),
    ]


def _llama_like(cfg: Mapping[str, Any], name: str, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                head_dim: int, n_kv: int, tie: bool, arch: ArchSpec,
                layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"),
                head_norms: tuple[str, ...] = ()) -> ModelSpec:
    """llama / mistral / qwen2 / qwen3 / gemma2: separate q,k,v,o and gate,up,down projections.

    Shapes: q [n_h*d, h], k,v [n_kv*d, h], o [h, n_h*d], gate,up [I, h], down [h, I];
    embed_tokens [V, h]; lm_head [V, h] (shares embed_tokens when tied); RMSNorm weights [h]
    (``layer_norms`` per layer, plus model.norm); per-head norms [d] (``head_norms``, qwen3).
    """
    mt = cfg.get("model_type", "llama")
    h = _req(cfg, "hidden_size", mt)
    L = _req(cfg, "num_hidden_layers", mt)
    n_h = _req(cfg, "num_attention_heads", mt)
    inter = _req(cfg, "intermediate_size", mt)
    V = _req(cfg, "vocab_size", mt)
    d = head_dim
    linears: list[LinearSpec] = []
    others: list[ParamSpec] = [ParamSpec("model.embed_tokens.weight", V * h, "embedding")]
    for i in range(L):
        p = f"model.layers.{i}"
        linears += _attention_linears(p, i, h, n_h, n_kv, d, qkv_bias, o_bias) + [
            LinearSpec(f"{p}.mlp.gate_proj", h, inter, mlp_bias, "gate", "decoder", i),
            LinearSpec(f"{p}.mlp.up_proj", h, inter, mlp_bias, "up", "decoder", i),
            LinearSpec(f"{p}.mlp.down_proj", inter, h, mlp_bias, "down", "decoder", i),
        ]
        others += [ParamSpec(f"{p}.self_attn.{n}.weight", d, "norm") for n in head_norms]
        others += [ParamSpec(f"{p}.{n}.weight", h, "norm") for n in layer_norms]
    others.append(ParamSpec("model.norm.weight", h, "norm"))
    linears.append(LinearSpec("lm_head", h, V, False, "lm_head", "head", None))
    return ModelSpec(
        name=name, model_type=mt, config=dict(cfg), hidden_size=h, num_layers=L, num_heads=n_h,
        num_kv_heads=n_kv, head_dim=d, intermediate_size=inter, vocab_size=V,
        max_positions=cfg.get("max_position_embeddings"), tie_word_embeddings=tie,
        linears=tuple(linears), others=tuple(others), arch=arch,
    )


def _heads(cfg, mt):
    h = _req(cfg, "hidden_size", mt)
    n_h = _req(cfg, "num_attention_heads", mt)
    return h, n_h


def _llama(cfg, name):
    # LlamaConfig: attention_bias (q,k,v,o) and mlp_bias default False; head_dim default h // n_h.
    h, n_h = _heads(cfg, "llama")
    ab = bool(cfg.get("attention_bias", False))
    return _llama_like(cfg, name, qkv_bias=ab, o_bias=ab, mlp_bias=bool(cfg.get("mlp_bias", False)),
                       head_dim=_get(cfg, "head_dim", h // n_h), n_kv=_kv_heads(cfg, n_h, None),
                       tie=bool(cfg.get("tie_word_embeddings", False)), arch=ArchSpec())


def _mistral(cfg, name):
    # MistralAttention/MLP: bias=False hard-coded; num_key_value_heads default 8; sliding_window 4096.
    h, n_h = _heads(cfg, "mistral")
    sw = cfg.get("sliding_window", 4096)
    return _llama_like(cfg, name, qkv_bias=False, o_bias=False, mlp_bias=False,
                       head_dim=_get(cfg, "head_dim", h // n_h), n_kv=_kv_heads(cfg, n_h, 8),
                       tie=bool(cfg.get("tie_word_embeddings", False)), arch=ArchSpec(sliding_window=sw))


def _qwen2(cfg, name):
    # Qwen2Attention: q,k,v bias=True, o bias=False (hard-coded); num_key_value_heads default 32.
    h, n_h = _heads(cfg, "qwen2")
    sw = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window") else None
    return _llama_like(cfg, name, qkv_bias=True, o_bias=False, mlp_bias=False,
                       head_dim=_get(cfg, "head_dim", h // n_h), n_kv=_kv_heads(cfg, n_h, 32),
                       tie=bool(cfg.get("tie_word_embeddings", False)), arch=ArchSpec(sliding_window=sw))


def _qwen3(cfg, name):
    # Qwen3: attention_bias (q,k,v,o) default False; head_dim default 128 (not h // n_h);
    # per-head RMSNorm q_norm, k_norm (weights [head_dim]).
    h, n_h = _heads(cfg, "qwen3")
    ab = bool(cfg.get("attention_bias", False))
    sw = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window") else None
    return _llama_like(cfg, name, qkv_bias=ab, o_bias=ab, mlp_bias=False,
                       head_dim=_get(cfg, "head_dim", 128), n_kv=_kv_heads(cfg, n_h, 32),
                       tie=bool(cfg.get("tie_word_embeddings", False)),
                       arch=ArchSpec(sliding_window=sw, extra_norms=("q_norm", "k_norm")),
                       head_norms=("q_norm", "k_norm"))


def _gemma2(cfg, name):
    # Gemma2: attention_bias (q,k,v,o) default False; head_dim default 256; 4 RMSNorms per layer
    # (pre/post attention, pre/post MLP); tied embeddings by default; every other layer uses a
    # sliding window (Gemma2Config ``layer_types`` default: layers 0, 2, ... sliding).
    # transformers runs it with eager attention (attention-logit softcapping).
    h, n_h = _heads(cfg, "gemma2")
    ab = bool(cfg.get("attention_bias", False))
    L = _req(cfg, "num_hidden_layers", "gemma2")
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    sw = cfg.get("sliding_window", 4096)
    arch = ArchSpec(attention="eager", sliding_window=sw, norms_per_layer=4,
                    sliding_layers=sum(t == "sliding_attention" for t in types[:L]) if sw else None,
                    final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0))
    return _llama_like(cfg, name, qkv_bias=ab, o_bias=ab, mlp_bias=False,
                       head_dim=_get(cfg, "head_dim", 256), n_kv=_kv_heads(cfg, n_h, 4),
                       tie=bool(cfg.get("tie_word_embeddings", True)), arch=arch,
                       layer_norms=("input_layernorm", "post_attention_layernorm",
                                    "pre_feedforward_layernorm", "post_feedforward_layernorm"))


def _gemma(cfg, name):
    # Gemma (1): attention_bias (q,k,v,o) default False; head_dim default 256 (not h // n_h);
    # num_key_value_heads default 16; tied by default; GemmaRMSNorm (weight [h], applied as
    # 1 + w); the embedding output is scaled by sqrt(h) (modeling_gemma.py::GemmaTextScaledWordEmbedding).
    h, n_h = _heads(cfg, "gemma")
    ab = bool(cfg.get("attention_bias", False))
    return _llama_like(cfg, name, qkv_bias=ab, o_bias=ab, mlp_bias=False,
                       head_dim=_get(cfg, "head_dim", 256), n_kv=_kv_heads(cfg, n_h, 16),
                       tie=bool(cfg.get("tie_word_embeddings", True)),
                       arch=ArchSpec(**MODEL_TYPE_FACTS["gemma"]))


def _gemma3_text(cfg, name):
    # Gemma 3 text (Gemma3ForCausalLM, modeling_gemma3.py): gemma2's four RMSNorms per layer plus
    # per-head q_norm/k_norm [head_dim]; head_dim default 256, num_key_value_heads default 4;
    # tied by default; sdpa (attn_logit_softcapping default None). ``layer_types`` (default: every
    # ``sliding_window_pattern``-th layer global, pattern 6) marks the sliding-window layers.
    h, n_h = _heads(cfg, "gemma3_text")
    L = _req(cfg, "num_hidden_layers", "gemma3_text")
    ab = bool(cfg.get("attention_bias", False))
    types = cfg.get("layer_types")
    if not types:
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    sw = cfg.get("sliding_window", 4096)
    n_sliding = sum(t == "sliding_attention" for t in types[:L]) if sw else 0
    arch = ArchSpec(sliding_window=sw, sliding_layers=n_sliding, norms_per_layer=4,
                    global_top_layer=bool(sw) and types[L - 1] == "full_attention",
                    extra_norms=("q_norm", "k_norm"),
                    attention="eager" if cfg.get("attn_logit_softcapping") else "sdpa",
                    final_logit_softcapping=cfg.get("final_logit_softcapping"), **MODEL_TYPE_FACTS["gemma3_text"])
    return _llama_like(cfg, name, qkv_bias=ab, o_bias=ab, mlp_bias=False,
                       head_dim=_get(cfg, "head_dim", 256), n_kv=_kv_heads(cfg, n_h, 4),
                       tie=bool(cfg.get("tie_word_embeddings", True)), arch=arch,
                       layer_norms=("input_layernorm", "post_attention_layernorm",
                                    "pre_feedforward_layernorm", "post_feedforward_layernorm"),
                       head_norms=("q_norm", "k_norm"))


def _olmo2(cfg, name):
    # OLMo 2 (modeling_olmo2.py): attention_bias (q,k,v,o) default False; no input norm: the
    # layer normalises the attention and MLP *outputs* (post_attention_layernorm,
    # post_feedforward_layernorm, [h]); q_norm [n_h*d] and k_norm [n_kv*d] over the whole
    # projection (before the head split); untied by default; head_dim h // n_h.
    h, n_h = _heads(cfg, "olmo2")
    ab = bool(cfg.get("attention_bias", False))
    n_kv = _kv_heads(cfg, n_h, None)
    d = _get(cfg, "head_dim", h // n_h)
    spec = _llama_like(cfg, name, qkv_bias=ab, o_bias=ab, mlp_bias=False, head_dim=d, n_kv=n_kv,
                       tie=bool(cfg.get("tie_word_embeddings", False)),
                       arch=ArchSpec(extra_norms=("q_norm", "k_norm"), qk_norm_scope="projection",
                                     norms_after_attention=2),
                       layer_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
    from dataclasses import replace

    others = []
    for p in spec.others:  # q_norm / k_norm cover the whole projection
        others.append(p)
        if p.name.endswith(".post_attention_layernorm.weight"):
            pre = p.name.rsplit(".post_attention_layernorm.weight", 1)[0]
            others[-1:-1] = [ParamSpec(f"{pre}.self_attn.q_norm.weight", n_h * d, "norm"),
                             ParamSpec(f"{pre}.self_attn.k_norm.weight", n_kv * d, "norm")]
    return replace(spec, others=tuple(others))


def _granite(cfg, name):
    # Granite (modeling_granite.py): llama shapes; attention_bias (q,k,v,o) and mlp_bias default
    # False; num_key_value_heads default n_h; untied by default. embedding_multiplier,
    # residual_multiplier, attention_multiplier and logits_scaling scale values, not shapes.
    h, n_h = _heads(cfg, "granite")
    ab = bool(cfg.get("attention_bias", False))
    return _llama_like(cfg, name, qkv_bias=ab, o_bias=ab, mlp_bias=bool(cfg.get("mlp_bias", False)),
                       head_dim=_get(cfg, "head_dim", h // n_h), n_kv=_kv_heads(cfg, n_h, None),
                       tie=bool(cfg.get("tie_word_embeddings", False)),
                       arch=ArchSpec(**MODEL_TYPE_FACTS["granite"]))


def _smollm3(cfg, name):
    # SmolLM3 (modeling_smollm3.py): llama shapes; attention_bias (q,k,v,o) and mlp_bias default
    # False; num_key_value_heads default 4; tied by default; ``no_rope_layers`` skips RoPE in some
    # layers (no shape change); a sliding window only when use_sliding_window.
    h, n_h = _heads(cfg, "smollm3")
    ab = bool(cfg.get("attention_bias", False))
    sw = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    return _llama_like(cfg, name, qkv_bias=ab, o_bias=ab, mlp_bias=bool(cfg.get("mlp_bias", False)),
                       head_dim=_get(cfg, "head_dim", h // n_h), n_kv=_kv_heads(cfg, n_h, 4),
                       tie=bool(cfg.get("tie_word_embeddings", True)), arch=ArchSpec(sliding_window=sw))


def _spec(cfg, name, mt, *, h, L, n_h, n_kv, d, inter, V, tie, linears, others, arch, max_pos,
          enc_dec=False, enc_layers=0) -> ModelSpec:
    return ModelSpec(
        name=name, model_type=mt, config=dict(cfg), hidden_size=h, num_layers=L, num_heads=n_h,
        num_kv_heads=n_kv, head_dim=d, intermediate_size=inter, vocab_size=V, max_positions=max_pos,
        tie_word_embeddings=tie, linears=tuple(linears), others=tuple(others), arch=arch,
        is_encoder_decoder=enc_dec, num_encoder_layers=enc_layers,
    )


def _phi3(cfg, name):
    """Phi-3: fused qkv_proj [(n_h + 2·n_kv)·d, h] and gate_up_proj [2·I, h]; no biases.

    Phi3Attention registers o_proj before qkv_proj; RMSNorm; untied by default.
    """
    mt = "phi3"
    h, n_h = _heads(cfg, mt)
    L = _req(cfg, "num_hidden_layers", mt)
    inter = _req(cfg, "intermediate_size", mt)
    V = _req(cfg, "vocab_size", mt)
    n_kv = _kv_heads(cfg, n_h, None)
    d = _get(cfg, "head_dim", h // n_h)
    linears: list[LinearSpec] = []
    others = [ParamSpec("model.embed_tokens.weight", V * h, "embedding")]
    for i in range(L):
        p = f"model.layers.{i}"
        linears += [
            LinearSpec(f"{p}.self_attn.o_proj", n_h * d, h, False, "o", "decoder", i),
            LinearSpec(f"{p}.self_attn.qkv_proj", h, (n_h + 2 * n_kv) * d, False, "qkv", "decoder", i),
            LinearSpec(f"{p}.mlp.gate_up_proj", h, 2 * inter, False, "gate_up", "decoder", i),
            LinearSpec(f"{p}.mlp.down_proj", inter, h, False, "down", "decoder", i),
        ]
        others += [ParamSpec(f"{p}.input_layernorm.weight", h, "norm"),
                   ParamSpec(f"{p}.post_attention_layernorm.weight", h, "norm")]
    others.append(ParamSpec("model.norm.weight", h, "norm"))
    linears.append(LinearSpec("lm_head", h, V, False, "lm_head", "head", None))
    return _spec(cfg, name, mt, h=h, L=L, n_h=n_h, n_kv=n_kv, d=d, inter=inter, V=V,
                 tie=bool(cfg.get("tie_word_embeddings", False)), linears=linears, others=others,
                 arch=ArchSpec(sliding_window=cfg.get("sliding_window"), **MODEL_TYPE_FACTS[mt]),
                 max_pos=cfg.get("max_position_embeddings", 4096))


def _layernorm(name: str, n: int) -> list[ParamSpec]:
    """nn.LayerNorm: weight [n] and bias [n]."""
    return [ParamSpec(f"{name}.weight", n, "norm"), ParamSpec(f"{name}.bias", n, "norm")]


def _gpt_neox(cfg, name):
    """GPT-NeoX / Pythia: fused query_key_value [3h, h] and dense [h, h] (bias: attention_bias,
    default True); MLP dense_h_to_4h [I, h], dense_4h_to_h [h, I] with bias; LayerNorms with bias.

    Rotary on rotary_pct (partial_rotary_factor) of each head, default 0.25; parallel residual
    (use_parallel_residual, default True); lm_head untied by default.
    """
    mt = "gpt_neox"
    h, n_h = _heads(cfg, mt)
    L = _req(cfg, "num_hidden_layers", mt)
    inter = _req(cfg, "intermediate_size", mt)
    V = _req(cfg, "vocab_size", mt)
    ab = bool(cfg.get("attention_bias", True))
    linears: list[LinearSpec] = []
    others = [ParamSpec("gpt_neox.embed_in.weight", V * h, "embedding")]
    for i in range(L):
        p = f"gpt_neox.layers.{i}"
        others += _layernorm(f"{p}.input_layernorm", h) + _layernorm(f"{p}.post_attention_layernorm", h)
        linears += [
            LinearSpec(f"{p}.attention.query_key_value", h, 3 * h, ab, "qkv", "decoder", i),
            LinearSpec(f"{p}.attention.dense", h, h, ab, "o", "decoder", i),
            LinearSpec(f"{p}.mlp.dense_h_to_4h", h, inter, True, "fc_in", "decoder", i),
            LinearSpec(f"{p}.mlp.dense_4h_to_h", inter, h, True, "fc_out", "decoder", i),
        ]
    others += _layernorm("gpt_neox.final_layer_norm", h)
    linears.append(LinearSpec("lm_head", h, V, False, "lm_head", "head", None))
    arch = ArchSpec(mlp="plain", norm="layer", parallel_attn=bool(cfg.get("use_parallel_residual", True)),
                    **MODEL_TYPE_FACTS[mt])
    return _spec(cfg, name, mt, h=h, L=L, n_h=n_h, n_kv=n_h, d=h // n_h, inter=inter, V=V,
                 tie=bool(cfg.get("tie_word_embeddings", False)), linears=linears, others=others,
                 arch=arch, max_pos=cfg.get("max_position_embeddings", 2048))


def _opt(cfg, name):
    """OPT: k,v,q,out_proj [h, h] and fc1 [F, h], fc2 [h, F], all with bias (enable_bias, default True).

    embed_tokens [V, P] with P = word_embed_proj_dim (default h); learned positions
    embed_positions [max_position_embeddings + 2, h] (OPT's offset of 2); when P != h,
    project_out [P, h] and project_in [h, P] (bias-free Linears). LayerNorms with bias when
    layer_norm_elementwise_affine (default True); the final one only when do_layer_norm_before
    (default True). lm_head [V, P], tied by default.
    """
    mt = "opt"
    h, n_h = _heads(cfg, mt)
    L = _req(cfg, "num_hidden_layers", mt)
    F = _req(cfg, "ffn_dim", mt)
    V = _req(cfg, "vocab_size", mt)
    P = _get(cfg, "word_embed_proj_dim", h)
    # OPTConfig default 2048; an explicit null reaches OPTLearnedPositionalEmbedding(None + 2) in
    # transformers too, which fails: the learned table needs a size
    max_pos = _req(cfg, "max_position_embeddings", mt) if "max_position_embeddings" in cfg else 2048
    b = bool(cfg.get("enable_bias", True))
    affine = bool(cfg.get("layer_norm_elementwise_affine", True))
    ln = (lambda n: _layernorm(n, h)) if affine else (lambda n: [])
    pre = "model.decoder"
    others = [ParamSpec(f"{pre}.embed_tokens.weight", V * P, "embedding"),
              ParamSpec(f"{pre}.embed_positions.weight", (max_pos + 2) * h, "position")]
    linears: list[LinearSpec] = []
    if P != h:
        linears += [LinearSpec(f"{pre}.project_out", h, P, False, "project_out", "decoder", None),
                    LinearSpec(f"{pre}.project_in", P, h, False, "project_in", "decoder", None)]
    if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False):
        others += ln(f"{pre}.final_layer_norm")
    for i in range(L):
        p = f"{pre}.layers.{i}"
        linears += [
            LinearSpec(f"{p}.self_attn.k_proj", h, h, b, "k", "decoder", i),
            LinearSpec(f"{p}.self_attn.v_proj", h, h, b, "v", "decoder", i),
            LinearSpec(f"{p}.self_attn.q_proj", h, h, b, "q", "decoder", i),
            LinearSpec(f"{p}.self_attn.out_proj", h, h, b, "o", "decoder", i),
            LinearSpec(f"{p}.fc1", h, F, b, "fc_in", "decoder", i),
            LinearSpec(f"{p}.fc2", F, h, b, "fc_out", "decoder", i),
        ]
        others += ln(f"{p}.self_attn_layer_norm") + ln(f"{p}.final_layer_norm")
    linears.append(LinearSpec("lm_head", P, V, False, "lm_head", "head", None))
    return _spec(cfg, name, mt, h=h, L=L, n_h=n_h, n_kv=n_h, d=h // n_h, inter=F, V=V,
                 tie=bool(cfg.get("tie_word_embeddings", True)), linears=linears, others=others,
                 arch=ArchSpec(mlp="plain", norm="layer", position="learned", **MODEL_TYPE_FACTS[mt]),
                 max_pos=max_pos)


def _falcon(cfg, name):
    """Falcon: fused query_key_value and dense, MLP dense_h_to_4h [F, h] / dense_4h_to_h (F =
    ffn_hidden_size, default 4h); bias on all four when ``bias`` (default False).

    query_key_value out: (n_h + 2·n_kv)·d with new_decoder_architecture (n_kv = num_kv_heads,
    default n_h), h + 2·d with multi_query (default True), else 3h. LayerNorms with bias:
    parallel_attn (default True) has one input_layernorm, or ln_attn + ln_mlp when
    num_ln_in_parallel_attn is 2 (the default with new_decoder_architecture); sequential layers
    have input_layernorm + post_attention_layernorm. Rotary, or ALiBi when ``alibi``. Tied by default.
    """
    mt = "falcon"
    h = cfg.get("hidden_size") or cfg.get("n_embed") or _req(cfg, "hidden_size", mt)
    n_h = _req(cfg, "num_attention_heads", mt)
    L = _req(cfg, "num_hidden_layers", mt)
    V = _req(cfg, "vocab_size", mt)
    d = h // n_h
    F = _get(cfg, "ffn_hidden_size", 4 * h)
    new = bool(cfg.get("new_decoder_architecture", False))
    mq = bool(cfg.get("multi_query", True))
    parallel = bool(cfg.get("parallel_attn", True))
    b = bool(cfg.get("bias", False))
    if new:
        n_kv = _get(cfg, "num_kv_heads", n_h)
        qkv_out = (n_h + 2 * n_kv) * d
    elif mq:
        n_kv, qkv_out = 1, h + 2 * d
    else:
        n_kv, qkv_out = n_h, 3 * h
    n_ln = cfg.get("num_ln_in_parallel_attn")
    if n_ln is None and new:
        n_ln = 2
    if not parallel:
        norms = ("post_attention_layernorm", "input_layernorm")
    elif n_ln == 2:
        norms = ("ln_attn", "ln_mlp")
    else:
        norms = ("input_layernorm",)
    linears: list[LinearSpec] = []
    others = [ParamSpec("transformer.word_embeddings.weight", V * h, "embedding")]
    for i in range(L):
        p = f"transformer.h.{i}"
        linears += [
            LinearSpec(f"{p}.self_attention.query_key_value", h, qkv_out, b, "qkv", "decoder", i),
            LinearSpec(f"{p}.self_attention.dense", h, h, b, "o", "decoder", i),
            LinearSpec(f"{p}.mlp.dense_h_to_4h", h, F, b, "fc_in", "decoder", i),
            LinearSpec(f"{p}.mlp.dense_4h_to_h", F, h, b, "fc_out", "decoder", i),
        ]
        for n in norms:
            others += _layernorm(f"{p}.{n}", h)
    others += _layernorm("transformer.ln_f", h)
    linears.append(LinearSpec("lm_head", h, V, False, "lm_head", "head", None))
    # FalconLinear subclasses nn.Linear: transformers' bnb integration leaves it unquantized.
    arch = ArchSpec(mlp="plain", norm="layer", parallel_attn=parallel,
                    position="alibi" if cfg.get("alibi", False) else "rope", norms_per_layer=len(norms),
                    norms_after_attention=0 if parallel else None, bnb_converts_linears=False, sdpa_mask=True)
    return _spec(cfg, name, mt, h=h, L=L, n_h=n_h, n_kv=n_kv, d=d, inter=F, V=V,
                 tie=bool(cfg.get("tie_word_embeddings", True)), linears=linears, others=others,
                 arch=arch, max_pos=cfg.get("max_position_embeddings", 2048))


#: transformers 4.x defaults of tie_word_embeddings (T5Config True, MT5Config False)
_T5_TIE_DEFAULT = {"t5": True, "mt5": False}


def _t5(cfg, name):
    """T5 / mT5 (T5ForConditionalGeneration): encoder and decoder stacks of ``block``s.

    Per block: SelfAttention q,k,v [n_h·d_kv, d_model], o [d_model, n_h·d_kv] (no biases);
    decoder blocks add EncDecAttention (roles cross_q/k/v/o); MLP DenseReluDense ``wi``/``wo``
    (feed_forward_proj "relu"/"gelu": roles fc_in/fc_out) or ``wi_0``/``wi_1``/``wo``
    ("gated-*": roles gate/up/down). Norms: T5LayerNorm (RMS, weight only) per sub-layer and
    one final per stack. relative_attention_bias [buckets, n_h] in block 0 of each stack.
    ``shared`` [V, d_model] is the one input embedding (encoder/decoder embed_tokens share it).

    lm_head: transformers 5.x forces config.tie_word_embeddings=True for T5/mT5, but
    from_pretrained keeps lm_head separate when the checkpoint holds a different one: T5 v1.0
    checkpoints tie, T5 v1.1 / flan-t5 / mT5 / mT0 (config.json ``tie_word_embeddings: false``)
    do not. The rule follows the config.json value (default: True for t5, False for mt5).
    """
    mt = cfg.get("model_type", "t5")
    dm = _req(cfg, "d_model", mt)
    dkv = _req(cfg, "d_kv", mt)
    dff = _req(cfg, "d_ff", mt)
    n_h = _req(cfg, "num_heads", mt)
    V = _req(cfg, "vocab_size", mt)
    enc_L = _req(cfg, "num_layers", mt)
    dec_L = _get(cfg, "num_decoder_layers", enc_L)
    buckets = cfg.get("relative_attention_num_buckets", 32)
    ffp = cfg.get("feed_forward_proj", "relu" if mt == "t5" else "gated-gelu")
    gated = ffp.split("-")[0] == "gated"
    inner = n_h * dkv
    linears: list[LinearSpec] = []
    others = [ParamSpec("shared.weight", V * dm, "embedding")]

    def attn(prefix, stack, i, kind, roles):
        return [LinearSpec(f"{prefix}.{kind}.q", dm, inner, False, roles[0], stack, i),
                LinearSpec(f"{prefix}.{kind}.k", dm, inner, False, roles[1], stack, i),
                LinearSpec(f"{prefix}.{kind}.v", dm, inner, False, roles[2], stack, i),
                LinearSpec(f"{prefix}.{kind}.o", inner, dm, False, roles[3], stack, i)]

    def mlp(prefix, stack, i):
        q = f"{prefix}.DenseReluDense"
        if gated:
            return [LinearSpec(f"{q}.wi_0", dm, dff, False, "gate", stack, i),
                    LinearSpec(f"{q}.wi_1", dm, dff, False, "up", stack, i),
                    LinearSpec(f"{q}.wo", dff, dm, False, "down", stack, i)]
        return [LinearSpec(f"{q}.wi", dm, dff, False, "fc_in", stack, i),
                LinearSpec(f"{q}.wo", dff, dm, False, "fc_out", stack, i)]

    for stack, L in (("encoder", enc_L), ("decoder", dec_L)):
        for i in range(L):
            p = f"{stack}.block.{i}.layer"
            linears += attn(f"{p}.0", stack, i, "SelfAttention", ("q", "k", "v", "o"))
            if i == 0:
                others.append(ParamSpec(f"{p}.0.SelfAttention.relative_attention_bias.weight",
                                        buckets * n_h, "position"))
            others.append(ParamSpec(f"{p}.0.layer_norm.weight", dm, "norm"))
            ff = 1
            if stack == "decoder":
                linears += attn(f"{p}.1", stack, i, "EncDecAttention",
                                ("cross_q", "cross_k", "cross_v", "cross_o"))
                others.append(ParamSpec(f"{p}.1.layer_norm.weight", dm, "norm"))
                ff = 2
            linears += mlp(f"{p}.{ff}", stack, i)
            others.append(ParamSpec(f"{p}.{ff}.layer_norm.weight", dm, "norm"))
        others.append(ParamSpec(f"{stack}.final_layer_norm.weight", dm, "norm"))
    linears.append(LinearSpec("lm_head", dm, V, False, "lm_head", "head", None))
    # T5PreTrainedModel._keep_in_fp32_modules = ["wo"]: bnb never quantizes wo
    # T5LayerNorm keeps its input; T5's dropout (``dropout_rate``) on every sub-layer output and on
    # the FFN's inner activation; T5ForConditionalGeneration's CrossEntropyLoss on the raw logits;
    # the activation from ``dense_act_fn`` / ``feed_forward_proj`` (modeling_t5.py)
    arch = ArchSpec(mlp="gated" if gated else "plain", norm="rms", position="relative_bias", norms_per_layer=3,
                    keep_fp32_leaves=("wo",), hidden_dropout_key="dropout_rate", hidden_dropout_default=0.1,
                    sublayer_dropout=True, ffn_inner_dropout=True, norm_keeps_input=True,
                    loss_upcasts_logits=False, activation_from="feed_forward_proj")
    return _spec(cfg, name, mt, h=dm, L=dec_L, n_h=n_h, n_kv=n_h, d=dkv, inter=dff, V=V,
                 tie=bool(cfg.get("tie_word_embeddings", _T5_TIE_DEFAULT.get(mt, True))),
                 linears=linears, others=others, arch=arch, max_pos=None,
                 enc_dec=True, enc_layers=enc_L)


# ---- sparse mixture-of-experts families (transformers 5: fused 3-D expert parameters) ----------
#
# transformers 5 stores a MoE block's routed experts as two fused parameters per layer,
# ``mlp.experts.gate_up_proj`` [E, 2·I_e, h] and ``mlp.experts.down_proj`` [E, h, I_e]
# (modeling_mixtral.py::MixtralExperts, ``@use_experts_implementation``), and the router as a bare
# parameter ``mlp.gate.weight`` [E, h] (MixtralTopKRouter: ``F.linear(x, self.weight)``): neither
# is an nn.Linear. They are ModelSpec.experts (ExpertSpec) and a ParamSpec of kind "router".


def _moe_decoder(cfg: Mapping[str, Any], name: str, mt: str, *, n_kv_default: int | None, head_dim: int,
                 qkv_bias: bool, o_bias: bool, num_experts_key: str, expert_inter_key: str,
                 moe_layers: Callable[[int], bool], shared_inter: int, head_norm_sizes: tuple[int, int] | None,
                 moe: dict, arch: ArchSpec) -> ModelSpec:
    """Llama-like attention + a sparse MoE block per MoE layer (a dense gated MLP elsewhere).

    Per MoE layer: router ``mlp.gate.weight`` [E, h]; experts ``mlp.experts.gate_up_proj``
    [E, 2·I_e, h], ``mlp.experts.down_proj`` [E, h, I_e]; with a shared expert (qwen2_moe)
    ``mlp.shared_expert.{gate,up,down}_proj`` (I_s) and ``mlp.shared_expert_gate`` [1, h].
    """
    h = _req(cfg, "hidden_size", mt)
    L = _req(cfg, "num_hidden_layers", mt)
    n_h = _req(cfg, "num_attention_heads", mt)
    inter = _req(cfg, "intermediate_size", mt)
    V = _req(cfg, "vocab_size", mt)
    E = _req(cfg, num_experts_key, mt)
    I_e = _req(cfg, expert_inter_key, mt)
    n_kv = _kv_heads(cfg, n_h, n_kv_default)
    d = head_dim
    linears: list[LinearSpec] = []
    experts: list[ExpertSpec] = []
    others: list[ParamSpec] = [ParamSpec("model.embed_tokens.weight", V * h, "embedding")]
    sparse: list[int] = []
    for i in range(L):
        p = f"model.layers.{i}"
        linears += _attention_linears(p, i, h, n_h, n_kv, d, qkv_bias, o_bias)
        if head_norm_sizes:
            others += [ParamSpec(f"{p}.self_attn.q_norm.weight", head_norm_sizes[0], "norm"),
                       ParamSpec(f"{p}.self_attn.k_norm.weight", head_norm_sizes[1], "norm")]
        if moe_layers(i):
            sparse.append(i)
            others.append(ParamSpec(f"{p}.mlp.gate.weight", E * h, "router"))
            experts += [ExpertSpec(f"{p}.mlp.experts.gate_up_proj", E, h, 2 * I_e, "gate_up", i),
                        ExpertSpec(f"{p}.mlp.experts.down_proj", E, I_e, h, "down", i)]
            if shared_inter:
                linears += [
                    LinearSpec(f"{p}.mlp.shared_expert.gate_proj", h, shared_inter, False, "gate", "decoder", i),
                    LinearSpec(f"{p}.mlp.shared_expert.up_proj", h, shared_inter, False, "up", "decoder", i),
                    LinearSpec(f"{p}.mlp.shared_expert.down_proj", shared_inter, h, False, "down", "decoder", i),
                    LinearSpec(f"{p}.mlp.shared_expert_gate", h, 1, False, "shared_expert_gate", "decoder", i),
                ]
        else:
            linears += [
                LinearSpec(f"{p}.mlp.gate_proj", h, inter, False, "gate", "decoder", i),
                LinearSpec(f"{p}.mlp.up_proj", h, inter, False, "up", "decoder", i),
                LinearSpec(f"{p}.mlp.down_proj", inter, h, False, "down", "decoder", i),
            ]
        others += [ParamSpec(f"{p}.input_layernorm.weight", h, "norm"),
                   ParamSpec(f"{p}.post_attention_layernorm.weight", h, "norm")]
    others.append(ParamSpec("model.norm.weight", h, "norm"))
    linears.append(LinearSpec("lm_head", h, V, False, "lm_head", "head", None))
    spec = MoeSpec(num_experts=E, top_k=_req(cfg, "num_experts_per_tok", mt), expert_intermediate_size=I_e,
                   layers=tuple(sparse), shared_expert_intermediate_size=shared_inter,
                   output_router_logits=bool(cfg.get("output_router_logits", False)), **moe)
    return ModelSpec(
        name=name, model_type=mt, config=dict(cfg), hidden_size=h, num_layers=L, num_heads=n_h,
        num_kv_heads=n_kv, head_dim=d, intermediate_size=inter, vocab_size=V,
        max_positions=cfg.get("max_position_embeddings"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        linears=tuple(linears), others=tuple(others), arch=arch, experts=tuple(experts), moe=spec,
    )


def _qwen_moe_layers(cfg: Mapping[str, Any]) -> Callable[[int], bool]:
    """Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer: a MoE block when ``layer_idx not in
    mlp_only_layers and num_experts > 0 and (layer_idx + 1) % decoder_sparse_step == 0``."""
    only = set(cfg.get("mlp_only_layers") or [])
    step = _get(cfg, "decoder_sparse_step", 1)
    n = cfg.get("num_experts", 0) or 0
    return lambda i: i not in only and n > 0 and (i + 1) % step == 0


def _mixtral(cfg, name):
    # MixtralConfig: num_key_value_heads 8, num_local_experts 8, num_experts_per_tok 2, experts of
    # intermediate_size, sliding_window None; no biases; MixtralTopKRouter always renormalises its
    # top-k weights and returns them in fp32.
    h, n_h = _heads(cfg, "mixtral")
    return _moe_decoder(cfg, name, "mixtral", n_kv_default=8, head_dim=_get(cfg, "head_dim", h // n_h),
                        qkv_bias=False, o_bias=False, num_experts_key="num_local_experts",
                        expert_inter_key="intermediate_size", moe_layers=lambda i: True, shared_inter=0,
                        head_norm_sizes=None,
                        moe=dict(norm_topk_prob=True, router_weights_in_stream_dtype=False),
                        arch=ArchSpec(sliding_window=cfg.get("sliding_window")))


def _qwen2_moe(cfg, name):
    # Qwen2MoeConfig: num_key_value_heads 16, qkv_bias True (o_proj bias-free), 60 experts of
    # moe_intermediate_size 1408, top-4, shared expert 5632 with a sigmoid gate, norm_topk_prob False.
    h, n_h = _heads(cfg, "qwen2_moe")
    sw = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window") else None
    return _moe_decoder(cfg, name, "qwen2_moe", n_kv_default=16, head_dim=_get(cfg, "head_dim", h // n_h),
                        qkv_bias=bool(cfg.get("qkv_bias", True)), o_bias=False, num_experts_key="num_experts",
                        expert_inter_key="moe_intermediate_size", moe_layers=_qwen_moe_layers(cfg),
                        shared_inter=_get(cfg, "shared_expert_intermediate_size", 5632), head_norm_sizes=None,
                        moe=dict(norm_topk_prob=bool(cfg.get("norm_topk_prob", False))),
                        arch=ArchSpec(sliding_window=sw))


def _qwen3_moe(cfg, name):
    # Qwen3MoeConfig: num_key_value_heads 4, attention_bias False, head_dim h // n_h unless given
    # (Qwen3MoeAttention: getattr(config, "head_dim", ...)), per-head q_norm/k_norm [d],
    # 128 experts of moe_intermediate_size 768, top-8, no shared expert.
    h, n_h = _heads(cfg, "qwen3_moe")
    d = _get(cfg, "head_dim", h // n_h)
    ab = bool(cfg.get("attention_bias", False))
    sw = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window") else None
    return _moe_decoder(cfg, name, "qwen3_moe", n_kv_default=4, head_dim=d, qkv_bias=ab, o_bias=ab,
                        num_experts_key="num_experts", expert_inter_key="moe_intermediate_size",
                        moe_layers=_qwen_moe_layers(cfg), shared_inter=0, head_norm_sizes=(d, d),
                        moe=dict(norm_topk_prob=bool(cfg.get("norm_topk_prob", False))),
                        arch=ArchSpec(sliding_window=sw, extra_norms=("q_norm", "k_norm")))


def _olmoe(cfg, name):
    # OlmoeConfig: num_key_value_heads = n_h, attention_bias False, 64 experts of
    # intermediate_size, top-8; q_norm over all of q [h] and k_norm over k [(h // n_h)·n_kv]
    # (OlmoeAttention), not per head.
    h, n_h = _heads(cfg, "olmoe")
    n_kv = _kv_heads(cfg, n_h, None)
    ab = bool(cfg.get("attention_bias", False))
    return _moe_decoder(cfg, name, "olmoe", n_kv_default=None, head_dim=_get(cfg, "head_dim", h // n_h),
                        qkv_bias=ab, o_bias=ab, num_experts_key="num_experts",
                        expert_inter_key="intermediate_size", moe_layers=lambda i: True, shared_inter=0,
                        head_norm_sizes=(h, (h // n_h) * n_kv),
                        moe=dict(norm_topk_prob=bool(cfg.get("norm_topk_prob", False))),
                        arch=ArchSpec(extra_norms=("q_norm", "k_norm"), qk_norm_scope="projection"))


#: model_type -> rule.
#: ArchSpec facts keyed by model_type, shared by the shape rules and the meta-device fallback:
#: phi3 and gpt-neox slice q, k, v out of the fused output as views (modeling_phi3.py,
#: modeling_gpt_neox.py); OPT applies its
#: ``dropout`` (0.1) to the attention and FFN outputs (modeling_opt.py)
MODEL_TYPE_FACTS: dict[str, dict[str, Any]] = {
    "phi3": dict(fused_qkv_views=True),
    # gpt-neox: ``self.query_key_value(x).view(...).transpose(1, 2).chunk(3, dim=-1)``: v is a view of
    # the whole fused output and sdpa saves it (modeling_gpt_neox.py GPTNeoXAttention.forward)
    "gpt_neox": dict(fused_qkv_views=True),
    # opt: ``hidden_states = inputs_embeds + pos_embeds``; granite: ``inputs_embeds *
    # self.embedding_multiplier`` (modeling_opt.py OPTDecoder.forward, modeling_granite.py
    # GraniteModel.forward): the first layer's input is not the embedding output
    "opt": dict(hidden_dropout_key="dropout", hidden_dropout_default=0.1, sublayer_dropout=True,
                embedding_leaf_apart=True),
    "gemma": dict(),
    "gemma3_text": dict(),
    "granite": dict(embedding_leaf_apart=True),
}

RULES: dict[str, Callable[[Mapping[str, Any], str], ModelSpec]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma": _gemma,
    "gemma3_text": _gemma3_text,
    "olmo2": _olmo2,
    "granite": _granite,
    "smollm3": _smollm3,
    "phi3": _phi3,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "falcon": _falcon,
    "t5": _t5,
    "mt5": _t5,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
}
#: the sparse-MoE families among RULES (fused 3-D experts)
MOE_RULES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def load_config(path: str | Path) -> dict:
    """Read a config.json (or a folder holding one) through :func:`loraplan.inputs.read_json_file`
    (regular files only, size and depth capped, UTF-8); one-line ConfigError if unreadable.
    The values are checked by :func:`spec_from_config`."""
    from .inputs import read_json_file

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    cfg = read_json_file(p, "model config", "give a catalog name (see 'loraplan models') or a path to a config.json")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ConfigError(f"'{p}' has no 'model_type'; a Hugging Face config.json names its model_type")
    return cfg


def spec_from_config(cfg: Mapping[str, Any], name: str | None = None) -> ModelSpec:
    """ModelSpec for a config dict, by pure rules, or by a meta-device build when no rule exists."""
    where = str(name or (cfg.get("_name_or_path") if isinstance(cfg, Mapping) else None) or "config.json")
    check_config(cfg, where)  # every path (catalog, rules, meta build, trace) refuses the same values
    mt = cfg.get("model_type")
    name = name or cfg.get("_name_or_path") or str(mt)
    if not isinstance(name, str):
        name = str(mt)
    rule = RULES.get(mt)
    if rule is not None:
        return rule(cfg, name)
    return spec_from_meta(cfg, name)


def check_config(cfg: Any, where: str) -> None:
    """The one gate for config.json values, before anything is built from them: the value checks
    of :func:`loraplan.inputs.check_model_config`, then what transformers refuses for a family
    with a shape rule. One-line ConfigError each."""
    from .inputs import check_model_config

    check_model_config(cfg, where)
    if cfg.get("model_type") in RULES:
        _check_family(cfg, cfg["model_type"], where)


#: families whose transformers config or attention refuses hidden_size % num_attention_heads != 0
#: (transformers 5.x: LlamaConfig / Gemma2Config / GPTNeoXConfig.validate_architecture, OPTAttention
#: and FalconAttention.__init__), even with head_dim set; mistral, qwen2 and phi3 build with
#: head_dim = hidden_size // num_attention_heads (floor) when head_dim is absent, qwen3 and gemma2
#: default head_dim to 128 / 256, T5 reads d_kv
_HEADS_DIVIDE_HIDDEN = ("llama", "gemma2", "gpt_neox", "opt", "falcon")
#: families whose head_dim defaults to hidden_size // num_attention_heads
_HEAD_DIM_FROM_HIDDEN = ("llama", "mistral", "qwen2", "phi3", "gpt_neox", "opt", "falcon")


def _check_family(cfg: Mapping[str, Any], mt: str, where: str) -> None:
    """What transformers itself refuses for a family with a shape rule, as one-line ConfigErrors
    (the values alone were checked by inputs.check_model_config)."""
    h = cfg.get("hidden_size") if mt != "falcon" else (cfg.get("hidden_size") or cfg.get("n_embed"))
    n_h = cfg.get("num_attention_heads")
    if isinstance(h, int) and isinstance(n_h, int) and n_h > 0:
        if mt in _HEADS_DIVIDE_HIDDEN and h % n_h:
            raise ConfigError(f"'{where}': hidden_size {h} is not a multiple of num_attention_heads {n_h}; "
                              f"transformers refuses this {mt} config: fix one of them in config.json")
        if mt in _HEAD_DIM_FROM_HIDDEN and cfg.get("head_dim") is None and h < n_h:
            raise ConfigError(f"'{where}': hidden_size {h} is smaller than num_attention_heads {n_h}, so "
                              f"head_dim = {h} // {n_h} = 0; fix them in config.json or set head_dim")
    if mt in ("t5", "mt5") and "feed_forward_proj" in cfg:
        ffp = cfg["feed_forward_proj"]
        parts = ffp.split("-") if isinstance(ffp, str) else []
        if not parts or not all(parts) or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"'{where}': feed_forward_proj {ffp!r} is not an activation such as \"relu\" "
                              f"or \"gated-gelu\"; fix config.json")


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
