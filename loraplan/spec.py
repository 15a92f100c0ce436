"""Frozen dataclasses that describe one training step: model, LoRA, training setup, GPU, calibration.

Data flows one way: catalog / config.json -> ModelSpec; CLI options -> LoraSpec + TrainSpec;
(ModelSpec, LoraSpec, TrainSpec, GpuSpec, Calibration) -> estimate -> Estimate.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any, Mapping

QUANTS = ("bf16", "fp16", "fp32", "nf4", "fp4", "int8")
OPTIMIZERS = ("adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
# sdpa backends CUDA can pick, plus "eager" (explicit softmax(QK^T)V) and "auto" (choose like CUDA would).
ATTENTION = ("auto", "flash", "efficient", "math", "eager")

#: bytes per element of the load dtype of a non-quantized tensor
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class LinearSpec:
    """One nn.Linear (or Conv1D-like) weight matrix, named as transformers names the module."""

    name: str  # full module name, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool
    role: str  # what it computes: q, k, v, o, qkv, gate, up, gate_up, down, fc_in, fc_out, lm_head, ...
    stack: str = "decoder"  # decoder | encoder | head
    layer: int | None = None

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ParamSpec:
    """A parameter that is not a Linear weight: embeddings, norms, position tables."""

    name: str
    numel: int
    kind: str  # embedding | norm | position | other


@dataclass(frozen=True)
class ArchSpec:
    """How a layer computes, as far as activation memory and FLOPs care."""

    mlp: str = "gated"  # gated (SiLU/GELU(gate)*up) | plain (act(fc_in) -> fc_out)
    norm: str = "rms"  # rms | layer
    parallel_attn: bool = False  # attention and MLP read the same normed input (gpt-neox, falcon)
    attention: str = "sdpa"  # sdpa | eager (e.g. gemma2 softcapping)
    position: str = "rope"  # rope | learned | relative_bias | alibi
    sliding_window: int | None = None
    norms_per_layer: int = 2
    extra_norms: tuple = ()  # e.g. ("q_norm","k_norm") for qwen3, post-norms for gemma2
    final_logit_softcapping: float | None = None
    #: False when the family's Linears are nn.Linear subclasses (FalconLinear) that transformers'
    #: bitsandbytes integration does not convert (``type(module) is nn.Linear``)
    bnb_converts_linears: bool = True
    #: the family passes an explicit additive causal mask to sdpa (falcon), which rules out flash
    #: and is saved by mem-efficient attention
    sdpa_mask: bool = False
    #: Linear leaf names of the model's ``_keep_in_fp32_modules`` (T5: "wo"): never converted by
    #: the bnb quantizer, and kept in fp32 for an fp16 load
    keep_fp32_leaves: tuple = ()
    #: q, k and v are sliced out of the fused qkv output as views, so the saved v view keeps the
    #: whole output alive (phi3; gpt-neox and falcon reshape and split per head instead)
    fused_qkv_views: bool = False
    #: config key and default of the model's own residual/FFN dropout p in training
    #: (T5 ``dropout_rate`` 0.1, OPT ``dropout`` 0.1, others ``hidden_dropout`` 0)
    hidden_dropout_key: str = "hidden_dropout"
    hidden_dropout_default: float = 0.0
    #: every sub-layer output (self-attention, cross-attention, FFN) passes that dropout (T5, OPT)
    sublayer_dropout: bool = False
    #: the FFN's inner activation passes it too, after the gated product (T5's DenseActDense)
    ffn_inner_dropout: bool = False
    #: the RMS norm multiplies its *original* input by the fp32 rsqrt, so a half-precision input
    #: is kept beside the fp32 copy (T5LayerNorm)
    norm_keeps_input: bool = False
    #: the loss casts the logits to fp32 first (ForCausalLMLoss ``logits.float()``); T5 runs
    #: CrossEntropyLoss on the logits as they are
    loss_upcasts_logits: bool = True
    #: where the config names the MLP activation: "hidden_act" (or hidden_activation /
    #: activation_function) | "feed_forward_proj" (T5: ``dense_act_fn`` or from
    #: ``feed_forward_proj``)
    activation_from: str = "hidden_act"


@dataclass(frozen=True)
class ModelSpec:
    """Every weight of a Hugging Face model with its exact shape, derived from config.json."""

    name: str
    model_type: str
    config: Mapping[str, Any]
    hidden_size: int
    num_layers: int  # decoder layers (for encoder-decoder: decoder layers)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None
    tie_word_embeddings: bool
    linears: tuple[LinearSpec, ...]
    others: tuple[ParamSpec, ...]
    arch: ArchSpec = field(default_factory=ArchSpec)
    is_encoder_decoder: bool = False
    num_encoder_layers: int = 0
    source: str = ""

    @property
    def lm_head(self) -> LinearSpec | None:
        return next((l for l in self.linears if l.role == "lm_head"), None)

    @property
    def total_params(self) -> int:
        """Unique parameters (a tied lm_head shares the embedding and is not counted twice)."""
        lin = sum(l.numel for l in self.linears if not (l.role == "lm_head" and self.tie_word_embeddings))
        return lin + sum(p.numel for p in self.others)


@dataclass(frozen=True)
class LoraSpec:
    """PEFT LoraConfig fields that change memory and time."""

    rank: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ("all-linear",)


@dataclass(frozen=True)
class TrainSpec:
    """The training setup of the protocol (shared/reference/protocol.md)."""

    quant: str = "nf4"
    double_quant: bool = True
    optimizer: str = "adamw"
    batch: int = 1
    seq: int = 512
    target_seq: int | None = None  # decoder length for encoder-decoder models
    gradient_checkpointing: bool = True
    attention: str = "auto"
    #: int8 only: fraction of Linear input columns above the 6.0 outlier threshold (None: default)
    int8_outlier_fraction: float | None = None
    #: where the step runs: "cuda" (what loraplan predicts for users) or "cpu" (the CI-checkable
    #: profile path: math attention, unfused dropout, no cuBLAS workspaces, int8 via MatMul8bitFp)
    device: str = "cuda"


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model, with its data source."""

    id: str
    name: str
    vendor: str
    memory_bytes: int
    bf16_tflops: float  # dense, no sparsity
    fp16_tflops: float
    fp32_tflops: float
    bandwidth_gb_s: float
    compute_capability: str | None  # e.g. "9.0"; None for non-NVIDIA
    price_usd_per_hour: float | None
    price_date: str | None
    source: str


@dataclass(frozen=True)
class Calibration:
    """Named coefficients that physics cannot know, fitted from measurements, with provenance.

    A calibration never changes a formula; it only supplies the values the formulas leave open.
    """

    gpu: str
    coefficients: Mapping[str, float]
    provenance: Mapping[str, Any]

    def get(self, name: str, default: float) -> float:
        return float(self.coefficients.get(name, default))


def run_inputs(model: ModelSpec, lora: LoraSpec, train: TrainSpec) -> dict:
    """Resolved inputs as a flat dict, with the keys of the reference cases and profile records."""
    d = {"model": model.name, "model_type": model.model_type}
    d.update(asdict(train))
    d.update(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=list(lora.targets))
    if train.quant not in ("nf4", "fp4"):
        d["double_quant"] = None
    return d
