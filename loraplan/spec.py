"""Frozen dataclasses that describe one training step: model, LoRA, training setup, GPU, calibration.

Data flows one way: catalog / config.json -> ModelSpec; CLI options -> LoraSpec + TrainSpec;
(ModelSpec, LoraSpec, TrainSpec, GpuSpec, Calibration) -> estimate -> Estimate.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from numbers import Real
from typing import Any, Callable, Literal, Mapping, get_args

from .errors import InputError, suggest
from .inputs import MAX_LAYERS, is_finite, is_int

Quant = Literal["bf16", "fp16", "fp32", "nf4", "fp4", "int8"]
Optimizer = Literal["adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
# sdpa backends CUDA can pick, plus "eager" (explicit softmax(QK^T)V) and "auto" (choose like CUDA would).
Attention = Literal["auto", "flash", "efficient", "math", "eager"]
Device = Literal["cuda", "cpu"]
# The training stack (issue 11): which trainer runs the step and the settings it exposes.
Trainer = Literal["loop", "hf", "trl"]
MixedPrecision = Literal["no", "bf16", "fp16"]
FloatDtype = Literal["bf16", "fp16", "fp32"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
Padding = Literal["max-length", "longest", "packing", "padding-free"]
Loss = Literal["standard", "chunked", "liger"]
#: how long a plain loop keeps the model's output object (its logits): "dropped" (``loss =
#: model(...).loss``), "micro-step" (``outputs = model(...)`` ... ``outputs = None`` at the end of
#: the micro-step), "next-forward" (``outputs`` rebound only when the next forward returns)
LoopOutputs = Literal["dropped", "micro-step", "next-forward"]
# Several GPUs (issue 13): the engine that spreads the step over them, as the engines name it.
Strategy = Literal["single", "ddp", "fsdp", "fsdp-offload", "zero1", "zero2", "zero3", "zero3-offload", "device-map"]
#: FSDP ShardingStrategy (torch.distributed.fsdp.ShardingStrategy FULL_SHARD / SHARD_GRAD_OP /
#: HYBRID_SHARD; FSDP2 fully_shard: reshard_after_forward True / False, and a 2-D mesh for hybrid)
FsdpSharding = Literal["full", "shard-grad-op", "hybrid"]
#: FSDP1 ``backward_prefetch`` (torch.distributed.fsdp.BackwardPrefetch): none (None), BACKWARD_PRE,
#: BACKWARD_POST
FsdpBackwardPrefetch = Literal["none", "backward-pre", "backward-post"]
#: where DeepSpeed's bucket sizes come from: "auto" (a config with 'auto' sizes, filled from
#: hidden_size by transformers / accelerate) or "deepspeed" (none given: DeepSpeed's defaults)
DeepspeedBuckets = Literal["auto", "deepspeed"]
#: bitsandbytes ``bnb_4bit_quant_storage``: the dtype the packed 4-bit data is stored in
QuantStorage = Literal["uint8", "bf16", "fp16", "fp32"]

QUANTS: tuple[str, ...] = get_args(Quant)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ATTENTION: tuple[str, ...] = get_args(Attention)
DEVICES: tuple[str, ...] = get_args(Device)
TRAINERS: tuple[str, ...] = get_args(Trainer)
MIXED_PRECISION: tuple[str, ...] = get_args(MixedPrecision)
FLOAT_DTYPES: tuple[str, ...] = get_args(FloatDtype)
ATTN_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttnImplementation)
PADDINGS: tuple[str, ...] = get_args(Padding)
LOSSES: tuple[str, ...] = get_args(Loss)
LOOP_OUTPUTS: tuple[str, ...] = get_args(LoopOutputs)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
FSDP_SHARDINGS: tuple[str, ...] = get_args(FsdpSharding)
QUANT_STORAGES: tuple[str, ...] = get_args(QuantStorage)
FSDP_BACKWARD_PREFETCHES: tuple[str, ...] = get_args(FsdpBackwardPrefetch)
DEEPSPEED_BUCKETS: tuple[str, ...] = get_args(DeepspeedBuckets)

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
class ExpertSpec:
    """One fused 3-D expert parameter of a transformers 5 MoE block (``MixtralExperts.gate_up_proj``
    [E, 2·I, h], ``down_proj`` [E, h, I]): E experts' weights in one ``nn.Parameter``, not an
    nn.Linear. ``in_features``/``out_features`` are one expert's; the parameter is
    [num_experts, out_features, in_features] (transformers' ``is_transposed=False`` layout)."""

    name: str  # full parameter name, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    num_experts: int
    in_features: int
    out_features: int
    role: str  # gate_up | down
    layer: int | None = None

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return self.num_experts * self.in_features * self.out_features


@dataclass(frozen=True)
class MoeSpec:
    """Routing facts of a sparse-MoE family (config.json; transformers 5 ``*SparseMoeBlock``)."""

    num_experts: int  # E: routed experts per MoE layer
    top_k: int  # k: experts per token (num_experts_per_tok)
    expert_intermediate_size: int  # I_e of one routed expert
    layers: tuple[int, ...]  # decoder layers whose MLP is the MoE block (the others: dense MLP)
    shared_expert_intermediate_size: int = 0  # qwen2_moe: an always-on gated MLP + sigmoid gate
    norm_topk_prob: bool = True  # top-k weights renormalised to sum to 1 (mixtral: always)
    #: the router's top-k weights are cast to the logits' dtype (qwen/olmoe ``.to(router_logits.dtype)``);
    #: mixtral keeps them fp32, so its weighted expert outputs are fp32
    router_weights_in_stream_dtype: bool = True
    output_router_logits: bool = False  # training adds the auxiliary load-balancing loss


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
    #: of those, how many run after the (self-)attention core, so that their saved tensors are
    #: released before its backward; None: all but the input norm (pre-norm layers). olmo2 (norms
    #: on the sublayer outputs): all; falcon's parallel layers (ln_attn, ln_mlp before both): 0
    norms_after_attention: int | None = None
    #: the first layer's input is a new tensor made from the embedding output (granite
    #: ``inputs_embeds * embedding_multiplier``, OPT ``inputs_embeds + pos_embeds``), so with
    #: checkpointing the embedding output -- the leaf enable_input_require_grads made -- is kept
    #: apart from the layer inputs
    embedding_leaf_apart: bool = False
    extra_norms: tuple = ()  # e.g. ("q_norm","k_norm") for qwen3, post-norms for gemma2
    #: what q_norm/k_norm normalise: "head" (each head's d values: qwen3, gemma3) or
    #: "projection" (the whole n·d output of q_proj/k_proj before the head split: olmo2)
    qk_norm_scope: str = "head"
    #: how many decoder layers use ``sliding_window`` (gemma3 ``layer_types``); None: all of them
    sliding_layers: int | None = None
    #: the last decoder layer is a global (full-attention) one of a partly sliding model (gemma3
    #: ``layer_types[-1] == "full_attention"``): its backward, the "layer backward" moment, runs
    #: the global layers' kernel (``Shape.global_attention``)
    global_top_layer: bool = False
    #: the spec was read from a meta-device build (``loraplan._meta``), not a shape rule: shapes and
    #: parameter counts are exact, the activation terms are the generic (llama-like) ones
    from_meta_build: bool = False
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
    #: fused 3-D expert parameters (sparse-MoE families), in model order; () for dense models
    experts: tuple[ExpertSpec, ...] = ()
    moe: MoeSpec | None = None

    @property
    def lm_head(self) -> LinearSpec | None:
        return next((l for l in self.linears if l.role == "lm_head"), None)

    @property
    def total_params(self) -> int:
        """Unique parameters (a tied lm_head shares the embedding and is not counted twice)."""
        lin = sum(l.numel for l in self.linears if not (l.role == "lm_head" and self.tie_word_embeddings))
        return lin + sum(p.numel for p in self.others) + sum(e.numel for e in self.experts)


# ---- validation of case values (one home for the rules: the specs and loraplan.case use it) ----
#
# Each check takes the option key (``rank``, ``target_seq``) and a value and raises InputError
# with one line naming the value (as its command-line option) and the fix. Python and numpy
# scalars are checked. A numpy array (``ndim > 0``) passes unchecked: the vectorized sweep and
# the time model build specs whose batch/seq/rank/dropout/... are arrays of values that were
# checked one by one before (``loraplan.case.resolve_case``), and re-checking every element
# would cost the sweep its speed.


def _is_array(v: Any) -> bool:
    """True for a numpy array of values (the vectorized path); numpy scalars are not arrays."""
    return getattr(v, "ndim", 0) > 0


def _opt(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown(v: Any) -> Any:
    return v if isinstance(v, Real) else repr(v)


def check_choice(key: str, v: Any, choices: tuple[str, ...]) -> None:
    """InputError unless ``v`` is one of ``choices`` (with the closest names as suggestions)."""
    if isinstance(v, str) and v in choices:
        return
    if isinstance(v, str) and "," in v and all(p.strip() in choices for p in v.split(",")):
        raise InputError(f"{_opt(key)} '{v}' is a list: this command takes one value; give one of them, or "
                         f"compare them with 'loraplan sweep' or 'loraplan report compare'")
    raise InputError(f"{_opt(key)} '{v}' is not one of {', '.join(choices)}{suggest(str(v), choices)}")


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], None]:
    return lambda key, v: check_choice(key, v, choices)


#: upper bounds of the count options: beyond them a value is a typo, never a run. They keep every
#: command fast and its integers exact (the sweep computes in int64, where 10^20 raises
#: OverflowError; time.step_time queues one phase pair per micro-step, so accumulation 10^8 took
#: a minute and 11 GB). Each is far above what training runs use:
#: - rank: 2^16, above every public model's hidden size (Llama-3.1-405B: 16,384); the update B·A
#:   has rank at most min(d_in, d_out, r), so a larger r adds parameters, not rank;
#: - batch (per micro-step, per GPU): 2^16, 16 x plan's search bound (plan.MAX_SEARCH_BATCH 4,096);
#: - seq, target_seq, row lengths: 2^24 tokens, 16 x plan's (plan.MAX_SEARCH_SEQ 2^20) and above
#:   the longest published context (10M tokens);
#: - gradient accumulation: 2^16 micro-steps, 32 x the largest published global batches taken at
#:   micro-batch 1 on one GPU (Llama 3: 16M tokens = 2,048 x 8,192);
#: - num_gpus, nodes: 2^20, above the largest clusters (~10^5 GPUs);
#: - checkpoint_every_n_layers: inputs.MAX_LAYERS (no model has more layers).
MAX_OPTION = {"rank": 1 << 16, "batch": 1 << 16, "seq": 1 << 24, "target_seq": 1 << 24, "lengths": 1 << 24,
              "gradient_accumulation": 1 << 16, "num_gpus": 1 << 20, "nodes": 1 << 20,
              "checkpoint_every_n_layers": MAX_LAYERS}


def _positive_int(hint: str = "", optional: bool = False) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if (optional and v is None) or _is_array(v):
            return
        upper = MAX_OPTION.get(key)
        if is_int(v) and v > 0 and (upper is None or v <= upper):
            return
        if is_int(v) and upper is not None and v > upper:
            raise InputError(f"{_opt(key)} {v:,} is more than {upper:,}, beyond any training run; "
                             f"give a value up to {upper:,}{hint}")
        raise InputError(f"{_opt(key)} {_shown(v)} must be a positive integer{hint}")
    return check


def _check_alpha(key: str, v: Any) -> None:
    """peft takes any number as lora_alpha (LoraConfig has no check) and multiplies the adapter's
    output by scaling = alpha / r (peft tuners/lora/layer.py::LoraLayer.update_layer; alpha /
    sqrt(r) with rslora), so alpha 0 makes the adapter output and its gradients zero: nothing
    trains. A negative alpha is kept: lora_B starts at zero (``reset_lora_parameters``), so the
    run is that of -alpha with B mirrored."""
    if v is None or _is_array(v) or (is_finite(v) and v != 0):
        return
    if is_finite(v):
        raise InputError(f"{_opt(key)} {_shown(v)} makes peft's scaling alpha / r zero, so the adapters output and "
                         f"learn nothing; give a nonzero alpha, e.g. 16 (default: 2 x rank)")
    raise InputError(f"{_opt(key)} {_shown(v)} must be a finite number (default: 2 x rank)")


def _check_dropout(key: str, v: Any) -> None:
    if _is_array(v) or (is_finite(v) and 0.0 <= v < 1.0):
        return
    raise InputError(f"{_opt(key)} {_shown(v)} must be in [0, 1)")


def _check_fraction(key: str, v: Any) -> None:
    if v is None or _is_array(v) or (is_finite(v) and 0.0 <= v <= 1.0):
        return
    raise InputError(f"{_opt(key)} {_shown(v)} must be between 0 and 1")


def _check_bool(key: str, v: Any) -> None:
    if isinstance(v, bool) or getattr(getattr(v, "dtype", None), "kind", None) == "b":
        return
    raise InputError(f"{_opt(key)} {_shown(v)} must be True or False")


def _optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """``check`` that also accepts None (the trainer's default, loraplan.trainers)."""
    return lambda key, v: None if v is None else check(key, v)


def _check_grad_norm(key: str, v: Any) -> None:
    if v is None or _is_array(v) or (is_finite(v) and v >= 0):
        return
    raise InputError(f"{_opt(key)} {_shown(v)} must be a finite number >= 0 (0 turns clipping off)")


def _check_lengths(key: str, v: Any) -> None:
    upper = MAX_OPTION["lengths"]
    if v is None or (isinstance(v, tuple) and v and all(is_int(x) and 0 < x <= upper for x in v)):
        return
    if isinstance(v, tuple) and all(is_int(x) and x > 0 for x in v):
        raise InputError(f"{_opt(key)}: a row of {max(v):,} tokens is more than {upper:,}, beyond any training "
                         f"run; give token counts up to {upper:,}")
    raise InputError(f"{_opt(key)} {v!r} must be positive token counts, e.g. (412, 1830, 4096) "
                     f"(p50, p99, max or every row's count)")


def _check_targets(key: str, v: Any) -> None:
    if v is None or (isinstance(v, tuple) and v and all(isinstance(t, str) and t.strip() for t in v)):
        return
    raise InputError(f"{_opt(key)} {v!r} must be module names like ('q_proj', 'v_proj'), ('all-linear',) "
                     f"or None (PEFT's default for the model family)")


def _check_fsdp_version(key: str, v: Any) -> None:
    if v is None or (is_int(v) and v in (1, 2)):
        return
    raise InputError(f"{_opt(key)} {v!r} is not 1 (FullyShardedDataParallel) or 2 (fully_shard)")


#: case key -> check(key, value): raises InputError with one line naming the value and the fix
CHECKS: dict[str, Callable[[str, Any], None]] = {
    "quant": _choice(QUANTS),
    "double_quant": _check_bool,
    "rank": _positive_int(" (typical: 8, 16, 64)"),
    "alpha": _check_alpha,
    "dropout": _check_dropout,
    "targets": _check_targets,
    "optimizer": _choice(OPTIMIZERS),
    "batch": _positive_int(),
    "seq": _positive_int(),
    "target_seq": _positive_int(optional=True),
    "gradient_checkpointing": _check_bool,
    "attention": _choice(ATTENTION),
    "int8_outlier_fraction": _check_fraction,
    "device": _choice(DEVICES),
    "stack": lambda key, v: _check_stack(v),
    "trainer": _choice(TRAINERS),
    "mixed_precision": _optional(_choice(MIXED_PRECISION)),
    "load_dtype": _optional(_choice(FLOAT_DTYPES)),
    "prepare_kbit": _optional(_check_bool),
    "compute_dtype": _optional(_choice(FLOAT_DTYPES)),
    "adapter_dtype": _optional(_choice(FLOAT_DTYPES)),
    "gradient_accumulation": _positive_int(" (micro-steps per optimizer step; 1: none)"),
    "max_grad_norm": _check_grad_norm,
    "reentrant": _optional(_check_bool),
    "attn_implementation": _optional(_choice(ATTN_IMPLEMENTATIONS)),
    "padding": _choice(PADDINGS),
    "lengths": _check_lengths,
    "loss": _optional(_choice(LOSSES)),
    "loop_outputs": _optional(_choice(LOOP_OUTPUTS)),
    "checkpoint_every_n_layers": _positive_int(" (1: every decoder layer)"),
    "checkpoint_offload": _check_bool,
    "strategy": _choice(STRATEGIES),
    "num_gpus": _positive_int(" (GPUs in the job; 1: one GPU)"),
    "nodes": _positive_int(" (machines in the job; 1: one node)"),
    "fsdp_sharding": _choice(FSDP_SHARDINGS),
    "fsdp_version": _check_fsdp_version,
    "use_orig_params": _optional(_check_bool),
    "fsdp_backward_prefetch": _optional(_choice(FSDP_BACKWARD_PREFETCHES)),
    "deepspeed_buckets": _optional(_choice(DEEPSPEED_BUCKETS)),
    "quant_storage": _optional(_choice(QUANT_STORAGES)),
    "ram_efficient_loading": _optional(_check_bool),
}


def _check_stack(v: Any) -> None:
    """A stack must name known libraries with numeric versions (loraplan.versions.parse_stack)."""
    from .versions import parse_stack

    parse_stack(v)


def check_value(key: str, value: Any) -> None:
    """Raise InputError (one line: the value and the fix) when ``value`` is not valid for ``key``."""
    CHECKS[key](key, value)


def _checks(names: tuple[str, ...]) -> tuple[tuple[str, Callable[[str, Any], None]], ...]:
    return tuple((n, CHECKS[n]) for n in names)


#: the training-stack fields of TrainSpec (issue 11); None values are the trainer's defaults
RECIPE_FIELDS = ("trainer", "mixed_precision", "load_dtype", "prepare_kbit", "compute_dtype", "adapter_dtype", "gradient_accumulation",
                 "max_grad_norm", "reentrant", "attn_implementation", "padding", "lengths", "loss",
                 "checkpoint_every_n_layers", "checkpoint_offload", "loop_outputs")
#: the multi-GPU fields of TrainSpec (issue 13); "single" on one GPU is the one-GPU step
PARALLEL_FIELDS = ("strategy", "num_gpus", "nodes", "fsdp_sharding", "fsdp_version", "use_orig_params", "quant_storage",
                   "ram_efficient_loading", "fsdp_backward_prefetch", "deepspeed_buckets")
_LORA_CHECKS = _checks(("rank", "alpha", "dropout", "targets"))
_TRAIN_CHECKS = _checks(("quant", "double_quant", "optimizer", "batch", "seq", "target_seq", "gradient_checkpointing",
                         "attention", "int8_outlier_fraction", "device", "stack", *RECIPE_FIELDS,
                         *PARALLEL_FIELDS))


@dataclass(frozen=True)
class LoraSpec:
    """PEFT LoraConfig fields that change memory and time; the defaults are the CLI's.

    ``alpha=None`` means 2 x rank (set on construction, so ``alpha`` is always a number after
    it). ``targets=None`` means PEFT's default target modules for the model family
    (``loraplan.targets.default_targets``), resolved where a model is known (``select_targets``,
    ``estimate``); a comma string is split like ``--targets``, a list becomes a tuple.
    Invalid values raise ``loraplan.errors.InputError``; numpy arrays of already-checked
    values pass unchecked (the vectorized sweep, see ``CHECKS``).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        t = self.targets
        if isinstance(t, str):
            from .targets import parse_targets

            object.__setattr__(self, "targets", parse_targets(t))
        elif isinstance(t, list):
            object.__setattr__(self, "targets", tuple(t))
        for name, check in _LORA_CHECKS:
            check(name, getattr(self, name))
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2.0 * self.rank)


@dataclass(frozen=True)
class TrainSpec:
    """The training setup of the protocol (shared/reference/protocol.md); the defaults are the CLI's.

    Invalid values raise ``loraplan.errors.InputError`` (one line); batch, seq, target_seq and
    int8_outlier_fraction may be numpy arrays of already-checked values (the vectorized sweep).
    """

    quant: Quant = "nf4"
    double_quant: bool = True
    optimizer: Optimizer = "adamw"
    batch: int = 1
    seq: int = 512  # tokens
    target_seq: int | None = None  # decoder length for encoder-decoder models
    gradient_checkpointing: bool = True
    attention: Attention = "auto"
    #: int8 only: fraction of Linear input columns above the 6.0 outlier threshold (None: default)
    int8_outlier_fraction: float | None = None
    #: where the step runs: "cuda" (what loraplan predicts for users) or "cpu" (the CI-checkable
    #: profile path: math attention, unfused dropout, no cuBLAS workspaces, int8 via MatMul8bitFp)
    device: Device = "cuda"
    #: library versions the step runs with, ((library, version), ...) sorted; None: the installed
    #: ones (or the newest known without torch). Kernel choice and storage rules depend on them
    #: (loraplan/data/version-rules.json, loraplan.versions)
    stack: tuple[tuple[str, str], ...] | None = None
    # --- the training stack (issue 11). None: the trainer's default, filled in by
    # loraplan.trainers.resolve_recipe from loraplan/data/trainers.json (sources there).
    #: who runs the step: "loop" (the H100 protocol: a plain loop), "hf" (transformers.Trainer),
    #: "trl" (trl.SFTTrainer)
    trainer: Trainer = "loop"
    #: autocast dtype of the step ("no": none); fp16 adds a GradScaler
    mixed_precision: MixedPrecision | None = None
    #: dtype ``from_pretrained`` gives the parameters that are not quantized
    load_dtype: FloatDtype | None = None
    #: ``peft.prepare_model_for_kbit_training`` applied (quantized bases only)
    prepare_kbit: bool | None = None
    #: bitsandbytes ``bnb_4bit_compute_dtype`` (4-bit only): the dtype Linear4bit dequantizes to
    compute_dtype: FloatDtype | None = None
    #: dtype of the LoRA A/B weights (PEFT's ``autocast_adapter_dtype=True``: fp32)
    adapter_dtype: FloatDtype | None = None
    #: micro-steps per optimizer step; ``batch`` is the micro-batch
    gradient_accumulation: int = 1
    #: ``clip_grad_norm_`` before each optimizer step; 0: off
    max_grad_norm: float | None = None
    #: ``torch.utils.checkpoint(use_reentrant=...)`` when ``gradient_checkpointing``
    reentrant: bool | None = None
    #: transformers ``attn_implementation``; ``attention`` picks sdpa's backend
    attn_implementation: AttnImplementation | None = None
    #: how rows are filled: padded to ``seq`` ("max-length"), to the longest row of the batch
    #: ("longest", with ``lengths``), packed to ``seq`` ("packing"), or one flattened row ("padding-free")
    padding: Padding = "max-length"
    #: token counts of the dataset's rows (or p50, p99, max); the peak follows the worst batch
    lengths: tuple[int, ...] | None = None
    #: "standard" cross-entropy over B·T·V logits; "chunked" (trl 1.16's fused chunked LM head,
    #: trl/trainer/utils.py::add_fused_lm_head: SFTTrainer's only loss, and a loop may call it) or
    #: "liger" (fused linear-CE) never hold them
    loss: Loss | None = None
    #: checkpoint every n-th decoder layer (transformers >= 5 ``every_n_layers``)
    checkpoint_every_n_layers: int = 1
    #: hold checkpointed inputs in host memory (transformers >= 5 ``offload``)
    checkpoint_offload: bool = False
    #: a plain loop's lifetime of the model output (``LoopOutputs``): "dropped" (the protocol),
    #: "micro-step" or "next-forward"; Trainer drops it in compute_loss. None: the trainer's default
    loop_outputs: LoopOutputs | None = None
    # --- several GPUs (issue 13; ``PARALLEL_FIELDS``). "single" with one GPU is the one-GPU step.
    #: the engine: DDP, FSDP (incl. CPU offload), DeepSpeed ZeRO 1-3 (3 with offload), or
    #: accelerate's device_map layer split
    strategy: Strategy = "single"
    #: GPUs in the job (world size), over ``nodes`` machines
    num_gpus: int = 1
    nodes: int = 1
    #: FSDP's sharding strategy (FSDP strategies only)
    fsdp_sharding: FsdpSharding = "full"
    #: 1: FullyShardedDataParallel (flat parameters; accelerate's default), 2: fully_shard (per-parameter
    #: DTensor shards); None: the trainer's default
    fsdp_version: int | None = None
    #: FSDP1 ``use_orig_params``; None: the trainer's default
    use_orig_params: bool | None = None
    #: ``bnb_4bit_quant_storage`` (4-bit only); FSDP-QLoRA needs a float storage equal to the
    #: param dtype it flattens with. None: uint8, bitsandbytes' default
    quant_storage: QuantStorage | None = None
    #: only rank 0 loads the weights and broadcasts them (accelerate ``fsdp_cpu_ram_efficient_loading``
    #: + ``sync_module_states``); False: every rank loads a full copy into host RAM. None: the default
    ram_efficient_loading: bool | None = None
    #: FSDP1 ``backward_prefetch``: "backward-pre" all-gathers the next unit when a unit's backward
    #: starts (one more unit in flight), "backward-post" after the unit is resharded, "none" not
    #: at all. FSDP2 has no such option (it always prefetches one unit). None: the trainer's default
    fsdp_backward_prefetch: FsdpBackwardPrefetch | None = None
    #: DeepSpeed's reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold:
    #: "auto" (filled from hidden_size) or "deepspeed" (its defaults); None: the trainer's default
    deepspeed_buckets: DeepspeedBuckets | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lengths, list):
            object.__setattr__(self, "lengths", tuple(self.lengths))
        for name, check in _TRAIN_CHECKS:
            check(name, getattr(self, name))
        if self.stack is not None and not isinstance(self.stack, tuple):
            from .versions import parse_stack

            object.__setattr__(self, "stack", parse_stack(self.stack))


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
    #: the GPU's link to host memory, a key of loraplan/data/host-links.json (paging cost)
    host_link: str | None = None
    #: the platform the GPU is sold in (GPU-to-GPU link, GPUs per node, network between nodes), a key
    #: of ``platforms`` in loraplan/data/interconnects.json (communication time of multi-GPU steps)
    interconnect: str | None = None


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
    from .trainers import resolve_recipe

    d = {"model": model.name, "model_type": model.model_type}
    d.update(asdict(resolve_recipe(train)))  # the trainer's defaults filled in: what the estimate assumed
    if d["lengths"] is not None:
        d["lengths"] = list(d["lengths"])
    if lora.targets is None:
        from .targets import default_targets

        targets = default_targets(model, train.stack)
    else:
        targets = lora.targets
    d.update(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=list(targets))
    if train.quant not in ("nf4", "fp4"):
        d["double_quant"] = None
    from .versions import resolve

    d["stack"] = resolve(train.stack)  # the versions the estimate assumes, given or detected
    return d
