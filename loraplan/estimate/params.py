"""Parameter counts, exactly as PEFT's ``get_nb_trainable_parameters()`` reports them.

LoRA on a Linear [out, in] adds lora_A [r, in] and lora_B [out, r]: r·(in + out) trainable
parameters, no bias (bias="none") [peft/tuners/lora/layer.py::LoraLayer.update_layer].
Total = unique base parameters (tied lm_head counted once) + LoRA parameters, for an
unquantized base. For a 4-bit base PEFT counts a packed Params4bit as numel·2
(peft/peft_model.py::get_nb_trainable_parameters), which recovers the unquantized count.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import ExpertSpec, LinearSpec, LoraSpec, ModelSpec
from ..targets import select_expert_targets, select_targets


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    total: int
    base: int
    adapted_modules: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def lora_params(linear: LinearSpec | ExpertSpec, rank: int) -> int:
    """r·(in + out): lora_A [r, in] + lora_B [out, r]. A fused expert parameter [E, out, in]
    (PEFT lora.ParamWrapper): lora_A = Linear(in, r·E), lora_B = Linear(r·E, out), so r·E·(in + out)
    (peft/tuners/lora/layer.py::ParamWrapper.update_layer)."""
    return rank * getattr(linear, "num_experts", 1) * (linear.in_features + linear.out_features)


def count_params(model: ModelSpec, lora: LoraSpec, adapted: tuple[LinearSpec, ...] | None = None) -> ParamCounts:
    if adapted is None:
        adapted = select_targets(model, lora.targets) + select_expert_targets(model, lora.targets)
    trainable = sum(lora_params(l, lora.rank) for l in adapted)
    base = model.total_params
    return ParamCounts(trainable=trainable, total=base + trainable, base=base, adapted_modules=len(adapted))
