"""ModelSpec from a meta-device build: the fallback for model types without a shape rule.

Builds the model with transformers (``AutoConfig.for_model`` + ``AutoModelForCausalLM`` or,
for encoder-decoder configs, ``AutoModelForSeq2SeqLM``) under ``torch.device("meta")``, so no
memory is allocated and nothing is downloaded, then reads every nn.Linear (role ``lm_head`` for
the output embedding, ``linear`` otherwise; GPT-2-style Conv1D counts as a Linear, as in PEFT)
and every other parameter. torch is imported here
only, and only when this module is used (``loraplan.hf.spec_from_meta``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .errors import ConfigError
from .hf import MODEL_TYPE_FACTS
from .spec import ArchSpec, LinearSpec, ModelSpec, ParamSpec

#: config.json keys that are metadata, not constructor arguments
_DROP = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype")
_LAYER = re.compile(r"\.(?:layers|layer|h|block|blocks)\.(\d+)\.")


def _build(cfg: Mapping[str, Any]):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    mt = cfg.get("model_type")
    kwargs = {k: v for k, v in cfg.items() if k not in _DROP}
    try:
        hf_cfg = AutoConfig.for_model(mt, **kwargs)
    except (ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"transformers does not know model_type '{mt}' ({msg[:120]}); "
                          f"check the config.json or upgrade transformers") from None
    auto = AutoModelForSeq2SeqLM if getattr(hf_cfg, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(hf_cfg)
    except ValueError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"transformers cannot build model_type '{mt}' as {auto.__name__}: {first[:160]}") from None
    return hf_cfg, model


def _stack(name: str, enc_dec: bool) -> str:
    if enc_dec and (name.startswith("encoder.") or ".encoder." in name):
        return "encoder"
    return "decoder"


def spec_from_meta_build(cfg: Mapping[str, Any], name: str) -> ModelSpec:
    """ModelSpec of ``cfg`` read from a meta-device transformers build (no weights allocated)."""
    import torch.nn as nn

    hf_cfg, model = _build(cfg)
    mt = cfg.get("model_type")
    enc_dec = bool(getattr(hf_cfg, "is_encoder_decoder", False))
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    out_name = next((n for n, m in model.named_modules() if m is out_emb), None) if out_emb is not None else None
    # transformers 5.x ties some families at config level (T5/mT5) that from_pretrained unties when the
    # checkpoint holds a separate lm_head: an explicit tie_word_embeddings=false in config.json wins.
    tied = (out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
            and cfg.get("tie_word_embeddings", True) is not False)

    try:  # GPT-2-style Conv1D: a Linear with a transposed weight [in, out]; PEFT adapts it too
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()

    linears: list[LinearSpec] = []
    linear_params: set[int] = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            n_in, n_out = mod.in_features, mod.out_features
        elif Conv1D and isinstance(mod, Conv1D):
            n_in, n_out = mod.weight.shape
        else:
            continue
        is_head = mname == out_name
        has_bias = getattr(mod, "bias", None) is not None
        m = _LAYER.search("." + mname + ".")
        layer = int(m.group(1)) if m and not is_head else None
        linears.append(LinearSpec(mname, int(n_in), int(n_out), has_bias,
                                  "lm_head" if is_head else "linear",
                                  "head" if is_head else _stack(mname, enc_dec), layer))
        if not is_head:
            linear_params.add(id(mod.weight))
        if has_bias:
            linear_params.add(id(mod.bias))

    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    others: list[ParamSpec] = []
    for pname, p in model.named_parameters():  # deduplicated: a shared tensor appears once
        if id(p) in linear_params:
            continue
        if out_emb is not None and p is out_emb.weight and (in_emb is None or p is not in_emb.weight):
            continue  # an untied head's weight: counted as the lm_head Linear
        low = pname.lower()
        if id(p) in emb_ids:
            kind = "position" if ("position" in low or "relative_attention_bias" in low) else "embedding"
        elif "norm" in low or re.search(r"(^|\.)ln_", low):
            kind = "norm"
        else:
            kind = "other"
        others.append(ParamSpec(pname, p.numel(), kind))

    text = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    h = int(getattr(text, "hidden_size", 0) or getattr(text, "d_model", 0) or 0)
    n_h = int(getattr(text, "num_attention_heads", 0) or 0)
    n_kv = int(getattr(text, "num_key_value_heads", None) or n_h)
    d = getattr(text, "head_dim", None) or (h // n_h if n_h else 0)
    dec_layers = getattr(text, "num_decoder_layers", None) if enc_dec else None
    L = int(dec_layers or getattr(text, "num_hidden_layers", 0) or 0)
    inter = int(getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None)
                or getattr(text, "ffn_dim", None) or 0)
    return ModelSpec(
        name=name, model_type=str(mt), config=dict(cfg), hidden_size=h, num_layers=L, num_heads=n_h,
        num_kv_heads=n_kv, head_dim=int(d), intermediate_size=inter,
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        max_positions=getattr(text, "max_position_embeddings", None), tie_word_embeddings=tied,
        linears=tuple(linears), others=tuple(others),
        arch=ArchSpec(attention="eager" if getattr(hf_cfg, "_attn_implementation", None) == "eager" else "sdpa",
                      sliding_window=getattr(text, "sliding_window", None), from_meta_build=True,
                      **MODEL_TYPE_FACTS.get(str(mt), {})),
        is_encoder_decoder=enc_dec,
        num_encoder_layers=int(getattr(text, "num_layers", 0) or 0) if enc_dec else 0,
    )


def untie_like_checkpoint(model, cfg) -> None:
    """Give the model its own lm_head when config.json says ``tie_word_embeddings: false``.

    transformers 5.x forces T5Config/MT5Config.tie_word_embeddings=True, so ``from_config``
    ties lm_head to the input embedding; ``from_pretrained`` of flan-t5 / mt0 checkpoints,
    which hold a different lm_head, keeps it separate. Builds from a config (trace, profile's
    random checkpoint) do the same here, so they match the real model (and the shape rules).
    """
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    untied = cfg.get("tie_word_embeddings", cfg.get("model_type") != "mt5") is False
    if untied and out is not None and inp is not None and out.weight is inp.weight:
        out.weight = torch.nn.Parameter(torch.empty_like(out.weight))
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False


def linear_modules(model) -> tuple[list[str], str | None]:
    """(full names of the ``nn.Linear`` / ``Conv1D`` modules, the output embedding's name), as
    peft's all-linear sees them (peft/tuners/tuners_utils.py::_maybe_include_all_linear_layers)."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = torch.nn.Linear
    out_emb = model.get_output_embeddings()
    names, head = [], None
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            names.append(name)
        if out_emb is not None and mod is out_emb:
            head = name
    return names, head
