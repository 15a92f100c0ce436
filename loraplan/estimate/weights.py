"""Weights: the cached Structure of a (model, adapted Linears, quantization) combination, the
frozen and unquantized weights, and the LoRA weights, gradients and optimizer state.

Every ledger line is a function whose docstring gives its formula (bytes per element × shape)
and where it comes from. The storage rules (which Linear is quantized, what is upcast to fp32,
the adapters' dtype) come from ``loraplan.storage``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..spec import ExpertSpec, LinearSpec, ModelSpec
from ..storage import FOUR_BIT, Dtypes, as_dtypes, dtype_bytes, effective_linear_quant, expert_storage, \
    linear_storage, unquantized_param_bytes
from .arrays import blocks as _blocks, ceil as _ceil, where as _where

#: roles whose input is the MLP product (where random-init int8 outliers sit)
INT8_OUTLIER_ROLES = ("down", "fc_out")



@dataclass(frozen=True)
class Structure:
    """Sizes of one (model, adapted Linears, quantization) combination, computed once."""

    model: ModelSpec
    quant: str
    double_quant: bool
    adapted: tuple[LinearSpec, ...]
    frozen_linear_weights: int
    unquantized_weights: int
    #: element counts per LoRA tensor per unit rank (lora_A: in, lora_B: out) -> how many tensors
    lora_sizes: Counter
    #: per stack: Σ over adapted Linears of one layer of in_features, and their number (layer average);
    #: key "cross": the decoder's cross-attention k/v, which read the encoder output (T_enc tokens)
    lora_in_per_layer: dict[str, float]
    lora_count_per_layer: dict[str, float]
    head_adapted: bool
    biggest_linear_numel: int
    #: int8: per stack, Σ in_features over distinct inputs of one layer, and over outlier-prone inputs;
    #: the decoder's cross-attention k/v are not in these (their input is the encoder output, see
    #: ``int8_encoder_out_in``); ``int8_all_in_per_layer["cross"]``: their Σ in_features per layer
    int8_inputs_per_layer: dict[str, float]
    int8_outlier_in_per_layer: dict[str, float]
    int8_all_in_per_layer: dict[str, float]
    outlier_p: float  # per-element probability that an MLP-out input exceeds 6.0 (random init)
    #: the first layer the input meets: Σ in_features of its adapted attention-input Linears
    first_layer_attn_in_adapted: int = 0
    #: encoder-decoder models: the same for the decoder's first layer (its input, the decoder
    #: embedding's output, needs no gradient either without checkpointing)
    first_decoder_layer_attn_in_adapted: int = 0
    first_layer_mlp_adapted: bool = False
    #: roles (q, k, v, qkv) of the adapted attention-input Linears of the first layer
    first_layer_attn_roles: frozenset = frozenset()
    #: per stack: Σ over adapted MLP-out Linears (down, fc_out) of one layer of in_features
    mlp_out_adapted_in: dict = field(default_factory=dict)
    #: per stack: Σ over all adapted MLP Linears (gate, up, down, fc_in, fc_out) of in_features
    mlp_adapted_in: dict = field(default_factory=dict)
    #: per stack: out_features of the widest adapted MLP-in Linear (gate, up, fused gate_up, fc_in)
    mlp_in_adapted_out: dict = field(default_factory=dict)
    #: distinct (stack, MLP-out role?, in, out) of the frozen layer Linears stored as ``quant``
    linear_shapes: tuple = ()
    #: the MLP-out Linear (down, fc_out) is stored quantized (T5's wo is not)
    mlp_out_quantized: bool = True
    device: str = "cuda"
    #: fused 3-D MoE expert parameters, as stored (``expert_weights``); 0 for dense models
    expert_weights: int = 0
    #: the adapted fused expert parameters (PEFT target_parameters -> lora.ParamWrapper)
    adapted_experts: tuple = ()
    #: the recipe's dtypes (``storage.Dtypes``; the protocol's for ``quant`` when not given)
    dtypes: Dtypes | None = None
    #: int8 encoder-decoder: the width of the encoder output the decoder's int8 cross-attention k/v
    #: read (one storage for all decoder layers); 0 when they are not int8
    int8_encoder_out_in: int = 0

    @property
    def dt(self) -> Dtypes:
        return self.dtypes if self.dtypes is not None else Dtypes.protocol(self.quant)

    @property
    def _layer_norm_fp32_blocks(self) -> bool:
        """Under autocast layer_norm is an fp32 op, so a LayerNorm family's norm outputs are
        fp32; bitsandbytes Linears return their input's dtype, so with a quantized base the block
        tensors and (through ``residual + out``) the stream become fp32 too."""
        return bool(self.dt.autocast) and self.model.arch.norm == "layer" and self.linear_quant in ("nf4", "fp4",
                                                                                                      "int8")

    @property
    def stream_bytes(self) -> int:
        if self._layer_norm_fp32_blocks:
            return 4
        return dtype_bytes(self.dt.stream)

    @property
    def block_bytes(self) -> int:
        """Bytes/element of what a block's frozen Linears output (the MLP's tensors): under
        autocast an nn.Linear outputs the autocast dtype (``Dtypes.block``), but bitsandbytes'
        Linear4bit/Linear8bitLt return ``out.to(inp_dtype)`` (nn/modules.py), the stream's dtype;
        without autocast the stream's."""
        if self.dt.autocast and self.linear_quant in ("nf4", "fp4", "int8"):
            return self.stream_bytes
        return dtype_bytes(self.dt.block)

    @property
    def attention_bytes(self) -> int:
        """Bytes/element of sdpa's inputs and outputs: the autocast dtype under mixed precision
        (scaled_dot_product_attention is a lower-precision op), else the block's."""
        return dtype_bytes(self.dt.autocast) if self.dt.autocast else self.block_bytes

    @property
    def autocast_bytes(self) -> int:
        """Bytes/element of the autocast dtype (0 without mixed precision)."""
        return dtype_bytes(self.dt.autocast) if self.dt.autocast else 0

    @property
    def adapter_bytes(self) -> int:
        """Bytes per LoRA parameter and gradient (``Dtypes.adapter``)."""
        return dtype_bytes(self.dt.adapter)

    @property
    def expert_bytes(self) -> int:
        """Bytes/element of the stored fused experts (``storage.expert_storage``)."""
        return dtype_bytes(expert_storage(self.dt))

    @property
    def linear_quant(self) -> str:
        """How the frozen Linears are stored: the quantization asked for, unless the bnb quantizer
        does not convert this family's Linears (then the unquantized dtype: fp32 after
        prepare_model_for_kbit_training)."""
        return effective_linear_quant(self.model, self.dt)


_STRUCTURE_CACHE: dict[tuple, tuple[ModelSpec, Structure]] = {}


def structure(model: ModelSpec, adapted: tuple[LinearSpec, ...], quant, double_quant: bool,
              device: str = "cuda") -> Structure:
    """The cached Structure of a model with these adapted Linears, this quantization (a name: the
    protocol's dtypes; or a ``storage.Dtypes`` of the resolved recipe) and device."""
    quant = as_dtypes(quant)
    key = (id(model), tuple(l.name for l in adapted), quant.key, bool(double_quant), device)
    hit = _STRUCTURE_CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    st = _build_structure(model, adapted, quant, bool(double_quant), device)
    if len(_STRUCTURE_CACHE) > 4096:
        _STRUCTURE_CACHE.clear()
    _STRUCTURE_CACHE[key] = (model, st)
    return st


def _build_structure(model: ModelSpec, adapted, dt: Dtypes, dq: bool, device: str = "cuda") -> Structure:
    quant = dt.quant
    experts = tuple(a for a in adapted if isinstance(a, ExpertSpec))
    adapted = tuple(a for a in adapted if not isinstance(a, ExpertSpec))
    sizes: Counter = Counter()
    for e in experts:  # ParamWrapper: lora_A [r·E, in], lora_B [out, r·E]
        sizes[e.num_experts * e.in_features] += 1
        sizes[e.num_experts * e.out_features] += 1
    lin_in: dict[str, float] = {}
    lin_n: dict[str, float] = {}
    mlp_out: dict[str, float] = {}
    mlp_all: dict[str, float] = {}
    mlp_in_out: dict[str, int] = {}
    for l in adapted:
        sizes[l.in_features] += 1
        sizes[l.out_features] += 1
        if l.role == "lm_head":
            continue
        layers = max(_stack_layers(model, l.stack), 1)
        # cross-attention k/v read the encoder output: their LoRA branch sees T_enc tokens
        key = "cross" if _input_group(l.role) == "encoder_out" else l.stack
        lin_in[key] = lin_in.get(key, 0.0) + l.in_features / layers
        lin_n[key] = lin_n.get(key, 0.0) + 1.0 / layers
        if l.role in INT8_OUTLIER_ROLES:
            mlp_out[l.stack] = mlp_out.get(l.stack, 0.0) + l.in_features / layers
        if _input_group(l.role) in ("mlp_in", "down", "fc_out"):
            mlp_all[l.stack] = mlp_all.get(l.stack, 0.0) + l.in_features / layers
        if _input_group(l.role) == "mlp_in":
            mlp_in_out[l.stack] = max(mlp_in_out.get(l.stack, 0), l.out_features)
    groups: dict[str, dict[tuple, int]] = {}
    cross_in = 0
    outl: dict[str, float] = {}
    all_in: dict[str, float] = {}
    for l in model.linears:
        if l.role == "lm_head" or l.layer is None or linear_storage(model, dt, l) != quant:
            continue  # int8 bookkeeping covers the Linears that really are int8
        layers = max(_stack_layers(model, l.stack), 1)
        if _input_group(l.role) == "encoder_out":
            # the decoder's cross-attention k/v read the encoder output: one storage of T_enc
            # tokens shared by every decoder layer (modeling_t5.py T5Stack.forward passes
            # encoder_hidden_states to each block); each call's subA is its own (key "cross")
            cross_in = l.in_features
            all_in["cross"] = all_in.get("cross", 0.0) + l.in_features / layers
            continue
        groups.setdefault(l.stack, {})[(l.layer, _input_group(l.role))] = l.in_features
        all_in[l.stack] = all_in.get(l.stack, 0.0) + l.in_features / layers
        if l.role in INT8_OUTLIER_ROLES:
            outl[l.stack] = outl.get(l.stack, 0.0) + l.in_features / layers
    int8_inputs = {st: sum(g.values()) / max(_stack_layers(model, st), 1) for st, g in groups.items()}
    first_stack = "encoder" if model.is_encoder_decoder else "decoder"
    first_attn_in = sum(l.in_features for l in adapted
                        if l.stack == first_stack and l.layer == 0 and _input_group(l.role) == "attn_in")
    dec_first_attn_in = sum(l.in_features for l in adapted if model.is_encoder_decoder and l.stack == "decoder"
                            and l.layer == 0 and _input_group(l.role) == "attn_in")
    sigma = float(model.config.get("initializer_range", 0.02)) * math.sqrt(model.hidden_size)
    return Structure(
        expert_weights=expert_weights(model, dt), adapted_experts=experts, dtypes=dt,
        model=model, quant=quant, double_quant=dq, adapted=tuple(adapted),
        frozen_linear_weights=frozen_linear_weights(model, dt, dq),
        unquantized_weights=unquantized_weights(model, dt),
        lora_sizes=sizes, lora_in_per_layer=lin_in, lora_count_per_layer=lin_n,
        head_adapted=any(l.role == "lm_head" for l in adapted),
        biggest_linear_numel=max((l.in_features * l.out_features for l in model.linears
                                  if l.role != "lm_head" and linear_storage(model, dt, l) == quant), default=0),
        mlp_out_quantized=any(l.role in INT8_OUTLIER_ROLES and linear_storage(model, dt, l) == quant
                              for l in model.linears),
        int8_inputs_per_layer=int8_inputs, int8_outlier_in_per_layer=outl, int8_all_in_per_layer=all_in,
        int8_encoder_out_in=cross_in,
        outlier_p=_p_silu_product_exceeds(sigma, 6.0) if effective_linear_quant(model, dt) == "int8" else 0.0,
        first_layer_attn_in_adapted=first_attn_in, first_decoder_layer_attn_in_adapted=dec_first_attn_in,
        mlp_out_adapted_in=mlp_out, mlp_adapted_in=mlp_all, mlp_in_adapted_out=mlp_in_out,
        first_layer_attn_roles=frozenset(l.role for l in adapted if l.stack == first_stack and l.layer == 0
                                         and _input_group(l.role) == "attn_in"),
        first_layer_mlp_adapted=any(l.stack == first_stack and l.layer == 0 and _input_group(l.role) in ("mlp_in", "down", "fc_out")
                                    for l in adapted),
        linear_shapes=tuple(sorted({(l.stack, l.role in INT8_OUTLIER_ROLES, l.in_features, l.out_features)
                                    for l in model.linears if l.role != "lm_head" and l.layer is not None
                                    and linear_storage(model, dt, l) == quant})),
        device=device,
    )



def _stack_layers(model: ModelSpec, stack: str) -> int:
    return model.num_encoder_layers if stack == "encoder" else model.num_layers


def _input_group(role: str) -> str:
    """Linears that read the same tensor (their inputs are one storage)."""
    if role in ("q", "k", "v", "qkv"):
        return "attn_in"
    if role in ("gate", "up", "gate_up", "fc_in"):
        return "mlp_in"
    if role in ("cross_k", "cross_v"):
        return "encoder_out"
    return role



def _p_silu_product_exceeds(sigma: float, thr: float, n: int = 800) -> float:
    """P(|silu(g)·u| > thr) for independent g, u ~ N(0, σ²) (midpoint rule over g)."""
    lo, hi = -10 * sigma, 10 * sigma
    dx = (hi - lo) / n
    tot = 0.0
    for i in range(n):
        g = lo + (i + 0.5) * dx
        act = abs(g / (1.0 + math.exp(-g)))
        if act == 0:
            continue
        pdf = math.exp(-0.5 * (g / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        tot += pdf * math.erfc(thr / (act * sigma * math.sqrt(2))) * dx
    return tot



# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def quantized_linear_bytes(linear: LinearSpec, quant: str, double_quant: bool) -> int:
    """Bytes of one frozen Linear weight (+ quantization state), as allocated.

    - nf4/fp4 (bitsandbytes Params4bit, blocksize 64): packed uint8 n/2 B; absmax fp32 per
      64-block, or with double quant uint8 absmax per block + fp32 nested absmax per 256 blocks
      + 256-entry fp32 code + fp32 offset (functional.py::quantize_4bit, quantize_blockwise);
      plus the 16-entry fp32 code table. n = in·out. Each tensor is its own 512-B-rounded block.
    - int8 (Int8Params, LLM.int8): CB int8 [out, in] + SCB fp32 [out] (nn/modules.py::Int8Params).
    - bf16/fp16/fp32: n × 2/2/4.
    The bias, if any, is not quantized: see ``unquantized_weights``.
    """
    n = linear.in_features * linear.out_features
    if quant in FOUR_BIT:
        blocks = -(-n // 64)
        b = _blocks(n / 2) + _blocks(16 * 4)
        if double_quant:
            b += _blocks(blocks) + _blocks(-(-blocks // 256) * 4) + _blocks(256 * 4) + _blocks(4)
        else:
            b += _blocks(blocks * 4)
        return int(b)
    if quant == "int8":
        return int(_blocks(n) + _blocks(linear.out_features * 4))
    return int(_blocks(n * (4 if quant == "fp32" else 2)))


def frozen_linear_weights(model: ModelSpec, quant: str, double_quant: bool) -> int:
    """Σ over every Linear except an unquantized lm_head of quantized_linear_bytes().

    transformers' bnb quantizer converts nn.Linear modules only and keeps the output embedding
    (lm_head) in the load dtype (quantizers/quantizer_bnb_*: modules_to_not_convert).
    """
    return sum(quantized_linear_bytes(l, linear_storage(model, quant, l), double_quant)
               for l in model.linears if l.role != "lm_head")


def expert_weights(model: ModelSpec, quant: str) -> int:
    """Fused MoE expert parameters (gate_up_proj [E, 2·I, h], down_proj [E, h, I] per MoE layer):
    E·in·out × bytes of ``storage.expert_storage`` — the load dtype (bf16 2 B) for an unquantized
    base, and **fp32 (4 B) for an nf4/fp4/int8 base**: bitsandbytes converts only nn.Linear, so the
    experts stay bf16 and prepare_model_for_kbit_training upcasts them (peft utils/other.py).
    Mixtral-8x7B: 45.1 B expert params -> 84 GiB bf16, 168 GiB under a "QLoRA"."""
    return int(sum(_blocks(e.numel * dtype_bytes(expert_storage(quant))) for e in model.experts))


def unquantized_weights(model: ModelSpec, quant: str) -> int:
    """Embeddings, norms, position tables, biases, MoE routers (``mlp.gate.weight``) and lm_head,
    in their final dtype.

    bf16/fp16 base: 2 B/param; fp32 base: 4 B. Quantized base: prepare_model_for_kbit_training
    casts every fp16/bf16 parameter that is not Params4bit/Int8Params to fp32
    (peft/utils/other.py): 4 B/param (Llama-2-7B: embed + lm_head 262M params -> 1.05 GB).
    A tied lm_head is the embedding and is counted once.
    """
    b = unquantized_param_bytes(quant)
    total = sum(_blocks(p.numel * b) for p in model.others)
    for l in model.linears:
        if l.role == "lm_head":
            if not model.tie_word_embeddings:
                total += _blocks(l.numel * b)
        elif l.bias:
            total += _blocks(l.out_features * b)
    return int(total)



# ---------------------------------------------------------------------------------------------
# LoRA weights, gradients, optimizer
# ---------------------------------------------------------------------------------------------


def lora_weights(st: Structure, r):
    """r·(in+out) params per adapted Linear (lora_A [r, in], lora_B [out, r]) in the adapter
    dtype (``Dtypes.adapter``): fp32, 4 B each, in the protocol: adapters are created in the base
    dtype, then get_peft_model(autocast_adapter_dtype=True) upcasts bf16/fp16 adapters to fp32
    (peft/tuners/tuners_utils.py::cast_adapter_dtype); trl casts a quantized model's to bf16.
    """
    return sum(count * _blocks(r * size * st.adapter_bytes) for size, count in st.lora_sizes.items())


def lora_gradients(st: Structure, r):
    """One fp32 gradient per LoRA parameter (same shapes as the weights), alive from backward
    until ``zero_grad(set_to_none=True)``."""
    return lora_weights(st, r)


def optimizer_state(st: Structure, r, optimizer: str, paged_threshold: int = 100_000):
    """Optimizer state inside torch's allocator, created at the first ``step()``.

    - adamw (torch.optim.AdamW): exp_avg + exp_avg_sq in the parameter's dtype
      (torch/optim/adam.py::_init_group ``torch.zeros_like(p)``): 8 B/param for fp32 adapters,
      4 B for bf16/fp16 ones (+ a CPU step counter). bitsandbytes' states are fp32 or uint8
      whatever the parameter's dtype (optim/optimizer.py::Optimizer8bit.init_state).
    - sgd (momentum=0): no state.
    - adamw_8bit (bnb AdamW8bit): uint8 state1/state2 + fp32 absmax per 256-block: 2·(1 + 4/256)
      B/param; tensors with numel < 4096 get fp32 states, 8 B/param
      (bitsandbytes/optim/optimizer.py::Optimizer8bit.init_state, min_8bit_size=4096).
    - paged_adamw_8bit / paged_adamw_32bit: buffers of tensors with numel >= 1e5 come from
      cudaMallocManaged (functional.py::get_paged), outside torch's allocator: 0 here, reported
      by ``paged_optimizer_state``; smaller tensors as adamw_8bit / 32-bit states.
    """
    if optimizer == "sgd":
        return 0
    total = 0
    for size, count in st.lora_sizes.items():
        n = r * size
        fp32 = 2 * _blocks(4 * n)
        if optimizer == "adamw":
            per = 2 * _blocks(st.adapter_bytes * n)
        elif optimizer == "paged_adamw_32bit":
            per = fp32
        else:
            per = _where(n < 4096, fp32, 2 * (_blocks(n) + _blocks(_ceil(n / 256) * 4)))
        if optimizer.startswith("paged"):
            per = _where(n >= paged_threshold, 0, per)
        total = total + count * per
    return total


def paged_optimizer_state(st: Structure, r, optimizer: str, paged_threshold: int = 100_000):
    """Paged optimizer buffers (cudaMallocManaged): counted in NVML 'used' while resident, never
    in torch.cuda.max_memory_allocated (bitsandbytes/functional.py::get_paged)."""
    if not optimizer.startswith("paged"):
        return 0
    per = 8 if optimizer == "paged_adamw_32bit" else 2 * (1 + 4 / 256)
    total = 0
    for size, count in st.lora_sizes.items():
        n = r * size
        total = total + count * _where(n >= paged_threshold, n * per, 0)
    return total


def optimizer_step_temporaries(st: Structure, r, optimizer: str):
    """Transient bytes inside ``opt.step()``.

    torch AdamW on CUDA takes the foreach path, which makes ``exp_avg_sq_sqrt =
    torch._foreach_sqrt(exp_avg_sqs)``: one copy of every trainable tensor in its dtype
    (4 B/param for fp32 adapters)
    (torch/optim/adam.py::_multi_tensor_adam). SGD (momentum 0) and the bitsandbytes optimizers
    (fused kernels, in place) allocate nothing per parameter.
    """
    if optimizer != "adamw":
        return 0
    return lora_weights(st, r)
