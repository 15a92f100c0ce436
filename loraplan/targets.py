"""PEFT target-module semantics (peft/tuners/tuners_utils.py::check_target_module_exists).

- a list of names: a module matches when its full name equals a name or ends with "." + name;
- a single string that is not a plain name: a regular expression that must fullmatch the name;
- "all-linear": every Linear except the output layer (peft's INCLUDE_LINEAR_LAYERS_SHORTHAND);
  extra names given beside it (e.g. "all-linear,lm_head") are added.

``peft_target_modules`` turns loraplan's targets into ``LoraConfig.target_modules`` for the trace
and the profile, so PEFT adapts exactly the modules ``select_targets`` counts.
"""

from __future__ import annotations

import re

from typing import Sequence

from .errors import TargetError
from .spec import LinearSpec, ModelSpec

ALL_LINEAR = "all-linear"

#: What PEFT targets when LoraConfig.target_modules is None
#: (peft/utils/constants.py::TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21).
#: phi3 has no entry there (PEFT asks for target_modules); loraplan uses its fused qkv_proj.
PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "phi3": ("qkv_proj",),
}


def default_targets(model: ModelSpec) -> tuple[str, ...]:
    """PEFT's default target modules for the model's family; TargetError when it has none."""
    try:
        return PEFT_DEFAULT_TARGETS[model.model_type]
    except KeyError:
        raise TargetError(
            f"PEFT has no default LoRA targets for model_type '{model.model_type}'; pass --targets "
            f"(its Linear modules are: {', '.join(linear_leaf_names(model))}, or 'all-linear')") from None


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
    names = [t for t in targets if t != ALL_LINEAR]
    chosen: set[str] = set()
    if ALL_LINEAR in targets:
        chosen.update(l.name for l in model.linears if l.role != "lm_head")
    for t in names:
        hit = [l.name for l in model.linears if _matches(l.name, t)]
        if not hit:
            raise TargetError(
                f"LoRA target '{t}' matches no Linear module of {model.name}; "
                f"its Linear modules are: {', '.join(linear_leaf_names(model))} (or use 'all-linear')")
        chosen.update(hit)
    return tuple(l for l in model.linears if l.name in chosen)


def linear_leaf_names(model: ModelSpec) -> list[str]:
    """Distinct last components of Linear module names, in model order (what users type)."""
    seen: list[str] = []
    for l in model.linears:
        if l.leaf not in seen:
            seen.append(l.leaf)
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
    targets = list(targets)
    if targets == [ALL_LINEAR] or (ALL_LINEAR not in targets and all(_PLAIN.match(t) for t in targets)):
        return ALL_LINEAR if targets == [ALL_LINEAR] else targets
    names = [t for t in targets if t != ALL_LINEAR]
    return [n for n in linears if (ALL_LINEAR in targets and n != head) or any(_matches(n, t) for t in names)]
