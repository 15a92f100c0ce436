"""PEFT target-module semantics (peft/tuners/tuners_utils.py::check_target_module_exists).

- a list of names: a module matches when its full name equals a name or ends with "." + name;
- a single string that is not a plain name: a regular expression that must fullmatch the name;
- "all-linear": every Linear except the output layer (peft's INCLUDE_LINEAR_LAYERS_SHORTHAND);
  extra names given beside it (e.g. "all-linear,lm_head") are added.

Sparse-MoE families (transformers 5) keep their routed experts as fused 3-D parameters
(``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``), not Linears; PEFT adapts them through
``LoraConfig(target_parameters=...)`` (lora.ParamWrapper), matched by full parameter name or "." suffix
(tuners_utils.py::_inject_parameters). loraplan takes them in the same ``--targets`` list:

- a name that matches no Linear but matches fused expert parameters by that suffix rule
  (``experts.gate_up_proj``, ``experts.down_proj``; in Mixtral also ``gate_up_proj``) adapts them;
- ``experts``: every fused expert parameter (both per MoE layer);
- "all-linear" never includes them (PEFT's shorthand covers Linear/Conv1D only). PEFT's ParamWrapper
  rejects ``lora_dropout != 0``, so adapting experts needs ``--dropout 0``.

``peft_target_modules`` turns loraplan's targets into ``LoraConfig.target_modules`` for the trace
and the profile, so PEFT adapts exactly the modules ``select_targets`` counts.
"""

from __future__ import annotations

import re

from typing import Sequence

from .errors import TargetError
from .spec import ExpertSpec, LinearSpec, ModelSpec

ALL_LINEAR = "all-linear"
#: shorthand for every fused MoE expert parameter (PEFT target_parameters)
EXPERTS = "experts"
#: families whose "all-linear" PEFT 0.21 rewrites with its transformers-v4 compatibility conversion
#: (peft/utils/transformers_weight_conversion.py::_convert_peft_config_moe: model types in its
#: _MODEL_TO_CONVERSION_PATTERN whose base is in _MOE_FUSED_TARGETS): "all-linear" then also
#: adapts every router (``gate.weight``) and every fused expert parameter, gate_up_proj at rank 2r
PEFT_MOE_ALL_LINEAR_REWRITE = ("mixtral", "qwen3_moe", "olmoe")

#: What PEFT targets when LoraConfig.target_modules is None is data keyed by peft's version: the rule
#: ``peft_lora_default_targets`` (data/version-rules.json, written from the installed peft's
#: peft/utils/constants.py::TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING by
#: benchmarks/peft_targets.py; a list of names, or one regular expression). For a family PEFT has
#: no entry for, peft raises (lora/model.py::_prepare_adapter_config asks for target_modules); for
#: the catalog's, loraplan picks these (``LORAPLAN_TARGETS``): phi3's fused qkv_proj; q_proj,
#: v_proj, the attention pair PEFT picks for every llama-shaped family it lists, for olmo2, granite,
#: smollm3 and the MoE families qwen2_moe, qwen3_moe, olmoe (their modules carry those names).
LORAPLAN_TARGETS: dict[str, tuple[str, ...]] = {
    "phi3": ("qkv_proj",),
    "olmo2": ("q_proj", "v_proj"),
    "granite": ("q_proj", "v_proj"),
    "smollm3": ("q_proj", "v_proj"),
    "qwen2_moe": ("q_proj", "v_proj"),
    "qwen3_moe": ("q_proj", "v_proj"),
    "olmoe": ("q_proj", "v_proj"),
}


def peft_default_targets(stack=None) -> dict[str, tuple[str, ...]]:
    """{model_type: targets} PEFT picks for ``LoraConfig(target_modules=None)`` at the stack's peft
    version (``versions.rule``); a regex entry is a one-element tuple (``_matches`` fullmatches it)."""
    from .versions import rule

    return {k: (v,) if isinstance(v, str) else tuple(v)
            for k, v in (rule("peft_lora_default_targets", stack) or {}).items()}


def default_targets(model: ModelSpec, stack=None) -> tuple[str, ...]:
    """PEFT's default target modules for the model's family (``peft_default_targets``), else
    loraplan's pick for a catalog family PEFT does not list (``LORAPLAN_TARGETS``); TargetError
    when neither has it."""
    found = peft_default_targets(stack).get(model.model_type) or LORAPLAN_TARGETS.get(model.model_type)
    if found:
        return found
    raise TargetError(
        f"PEFT has no default LoRA targets for model_type '{model.model_type}'; pass --targets "
        f"(its Linear modules are: {', '.join(linear_leaf_names(model))}, or 'all-linear')")


_PLAIN = re.compile(r"^[A-Za-z0-9_.]+$")


def parse_targets(text: str | list | tuple) -> tuple[str, ...]:
    """'q_proj,v_proj' -> ('q_proj', 'v_proj'); keeps order, drops blanks and duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    shown = text if isinstance(text, str) else ",".join(map(str, items))
    for t in (str(i).strip() for i in items):
        if not t:
            if any(str(i).strip() for i in items):
                raise TargetError(f"--targets '{shown}' has an empty name between commas; "
                                  f"remove the extra comma (e.g. 'q_proj,v_proj')")
            continue
        if not _PLAIN.match(t) and t != ALL_LINEAR:
            try:
                re.compile(t)
            except re.error as e:
                raise TargetError(f"LoRA target '{t}' is neither a module name nor a valid regular expression "
                                  f"({e}); give names like 'q_proj,v_proj' or 'all-linear'") from None
        if t not in out:
            out.append(t)
    if not out:
        raise TargetError("--targets is empty; give module names like 'q_proj,v_proj' or 'all-linear'")
    return tuple(out)


def _matches(name: str, target: str) -> bool:
    if _PLAIN.match(target):
        return name == target or name.endswith("." + target)
    return re.fullmatch(target, name) is not None


def resolve_targets(model: ModelSpec, targets: tuple[str, ...] | None) -> tuple[str, ...]:
    """``targets``, or PEFT's default for the model's family when None (``LoraSpec``'s default)."""
    return default_targets(model) if targets is None else targets


def select_targets(model: ModelSpec, targets: tuple[str, ...] | None) -> tuple[LinearSpec, ...]:
    """The Linear modules LoRA adapts, in model order (``None``: PEFT's default for the family).

    Raises TargetError for a name matching nothing, or for None when the family has no default."""
    targets = resolve_targets(model, targets)
    names = [t for t in targets if t not in (ALL_LINEAR, EXPERTS)]
    chosen: set[str] = set()
    if ALL_LINEAR in targets:
        chosen.update(l.name for l in model.linears if l.role != "lm_head")
    if EXPERTS in targets and not model.experts:
        raise TargetError(f"LoRA target '{EXPERTS}' needs a sparse-MoE model; {model.name} has no fused experts")
    for t in names:
        hit = [l.name for l in model.linears if _matches(l.name, t)]
        if not hit and any(_matches(e.name, t) for e in model.experts):
            continue  # a fused expert parameter: select_expert_targets
        if not hit:
            raise TargetError(
                f"LoRA target '{t}' matches no Linear module of {model.name}; "
                f"its Linear modules are: {', '.join(linear_leaf_names(model))} (or use 'all-linear')")
        chosen.update(hit)
    return tuple(l for l in model.linears if l.name in chosen)


def select_expert_targets(model: ModelSpec, targets: tuple[str, ...] | None,
                          dropout: float | None = None) -> tuple[ExpertSpec, ...]:
    """The fused expert parameters LoRA adapts (PEFT ``target_parameters``), in model order: those
    matched by ``experts`` or by a target that matches no Linear (see the module docstring).

    PEFT's ParamWrapper raises for ``lora_dropout != 0`` (peft/tuners/lora/layer.py
    ParamWrapper.__init__: "does not work with lora_dropout != 0"): TargetError when experts are
    chosen and ``dropout`` > 0."""
    if not model.experts:
        return ()
    targets = resolve_targets(model, targets)
    if ALL_LINEAR in targets and model.model_type in PEFT_MOE_ALL_LINEAR_REWRITE:
        raise TargetError(
            f"'{ALL_LINEAR}' on {model.model_type}: PEFT 0.21 rewrites it (transformers-v4 compatibility, "
            f"peft/utils/transformers_weight_conversion.py::_convert_peft_config_moe) into LoRA on every router "
            f"and every fused expert (gate_up_proj at rank 2r), which needs --dropout 0 and which loraplan does "
            f"not count; list the targets instead, e.g. 'q_proj,k_proj,v_proj,o_proj,experts'")
    names = [t for t in expert_parameter_targets(model, targets)]
    chosen = tuple(e for e in model.experts if EXPERTS in targets or any(_matches(e.name, t) for t in names))
    if chosen and dropout is not None and not _is_array_like(dropout) and dropout > 0:
        raise TargetError(f"LoRA on fused MoE experts ({', '.join(sorted({e.leaf for e in chosen}))}) goes through "
                          f"PEFT's ParamWrapper, which rejects lora_dropout={dropout}; pass --dropout 0")
    return chosen


def expert_parameter_targets(model: ModelSpec, targets: tuple[str, ...]) -> list[str]:
    """The targets that name fused expert parameters: ``experts``, or a name that matches no
    Linear but matches an expert parameter (suffix rule) — what goes to ``target_parameters``."""
    out = []
    for t in targets:
        if t == EXPERTS or (t != ALL_LINEAR and not any(_matches(l.name, t) for l in model.linears)
                            and any(_matches(e.name, t) for e in model.experts)):
            out.append(t)
    return out


def peft_target_parameters(model: ModelSpec, targets: tuple[str, ...]) -> list[str]:
    """``LoraConfig.target_parameters`` for the experts ``select_expert_targets`` counts: their full
    parameter names (PEFT matches a full name exactly)."""
    return [e.name for e in select_expert_targets(model, targets)]


def _is_array_like(v) -> bool:
    return getattr(v, "ndim", 0) > 0


def linear_leaf_names(model: ModelSpec) -> list[str]:
    """Distinct last components of Linear module names, in model order (what users type); for a
    sparse-MoE model also ``experts.gate_up_proj``-style names of its fused expert parameters."""
    seen: list[str] = []
    for l in model.linears:
        if l.leaf not in seen:
            seen.append(l.leaf)
    for e in model.experts:
        n = f"experts.{e.leaf}"
        if n not in seen:
            seen.append(n)
    return seen


def peft_target_modules(targets: Sequence[str], linears: Sequence[str], head: str | None) -> str | list[str]:
    """``LoraConfig.target_modules`` that makes peft 0.21 adapt what ``select_targets`` counts.

    ``linears``: full names of the model's ``nn.Linear`` / ``Conv1D`` modules, ``head``: the output
    embedding's name (``_meta.linear_modules``). PEFT expands "all-linear" only when it is the
    whole string (tuners_utils.py::_maybe_include_all_linear_layers: Linear and Conv1D minus the
    output embedding), and matches a list item by exact name or "." suffix over *all* modules
    (check_target_module_exists), as ``select_targets`` does over Linears: those two forms pass as
    they are. A regular expression (PEFT: ``re.fullmatch`` of a single string against every
    module, so ``.*\\.mlp\\..*`` also hits the activation and fails) and any mix become the full
    names of the Linears ``select_targets`` picks.
    """
    # the caller leaves out the fused-expert targets (expert_parameter_targets): they go to
    # target_parameters (peft_target_parameters), not target_modules
    targets = [t for t in targets if t != EXPERTS]
    if targets == [ALL_LINEAR] or (ALL_LINEAR not in targets and all(_PLAIN.match(t) for t in targets)):
        return ALL_LINEAR if targets == [ALL_LINEAR] else targets
    names = [t for t in targets if t != ALL_LINEAR]
    return [n for n in linears if (ALL_LINEAR in targets and n != head) or any(_matches(n, t) for t in names)]
