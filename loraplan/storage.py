"""Storage rules: how transformers + bitsandbytes + peft store every tensor of a LoRA/QLoRA run.

One home for the facts that the memory ledger, the step-time model, the meta-device trace and
the profile runner all depend on: which Linear is quantized, what
``prepare_model_for_kbit_training`` upcasts, what stays fp32, the dtype of the residual
stream and of the LoRA adapters, and bytes per dtype. Pure Python (no torch): the trace and the
profile map the dtype names given here to torch dtypes themselves.

The rules read the training recipe's dtypes (issue 11) through ``Dtypes``: ``Dtypes.of(train)``
resolves the recipe (``trainers.resolve_recipe``: mixed precision, load / compute / adapter
dtype, prepare_model_for_kbit_training) and gives the dtype of every tensor family (unquantized
parameters, residual stream, block outputs, sdpa, lm_head and logits, adapters, matmuls). Every
function below takes a ``Dtypes`` or a quantization name, which means the loop protocol's
(``Dtypes.protocol``: bf16 load, prepare on for a quantized base, compute bf16, fp32 adapters,
no autocast).

Versions read: transformers 5.x, peft 0.21, bitsandbytes 0.50 (shared/design/memory-physics.md
§1-§4). Quantizations are named as in ``loraplan.spec.QUANTS``; dtypes as "bf16", "fp16",
"fp32", "int8", "nf4", "fp4".
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import LinearSpec, ModelSpec

#: bitsandbytes 4-bit quantizations (Params4bit, blocksize 64)
FOUR_BIT = ("nf4", "fp4")
#: every quantization that loads through transformers' bitsandbytes quantizer
QUANTIZED = FOUR_BIT + ("int8",)

#: bytes per element of an unquantized dtype (int8: Int8Params CB)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (bf16/fp16 2, fp32 4, int8 1)."""
    return DTYPE_BYTES[dtype]


def is_quantized(quant: str) -> bool:
    """True when the base model is loaded through bitsandbytes (nf4, fp4, int8)."""
    return quant in QUANTIZED


def load_dtype(quant) -> str:
    """The ``dtype`` given to ``from_pretrained`` / ``from_config`` (``Dtypes.load``): fp16 and
    fp32 load as themselves; bf16 and, in the protocol, the quantized loads in bf16."""
    return as_dtypes(quant).load


#: torch's names of the dtypes above, for the torch zone (trace, profile): getattr(torch, name)
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "int8": "int8"}


def matmul_dtype(quant) -> str:
    """The dtype the frozen Linears' matmuls run in (``Dtypes.frozen_matmul``)."""
    return as_dtypes(quant).frozen_matmul


def effective_linear_quant(model: ModelSpec, quant) -> str:
    """How the frozen layer Linears of ``model`` are stored (not the _keep_in_fp32 ones, see
    ``linear_storage``). transformers' bitsandbytes integration replaces only modules whose type
    *is* nn.Linear (or Conv1D) (integrations/bitsandbytes.py::replace_with_bnb_linear:
    ``type(module) is nn.Linear``); subclasses such as FalconLinear stay in the load dtype
    (``Dtypes.unquantized``: fp32 after prepare_model_for_kbit_training)."""
    d = as_dtypes(quant)
    if d.quant in QUANTIZED and not model.arch.bnb_converts_linears:
        return d.unquantized
    if d.quant in QUANTIZED:
        return d.quant
    return d.unquantized


def linear_storage(model: ModelSpec, quant, linear: LinearSpec) -> str:
    """How one frozen Linear is stored. Modules in the model's ``_keep_in_fp32_modules`` (T5's
    wo) are in the bnb quantizer's modules_to_not_convert, so a quantized base keeps them in the
    load dtype, then fp32 after prepare_model_for_kbit_training; an fp16 load upcasts them to
    fp32 (transformers modeling_utils: only for fp16, not bf16)."""
    d = as_dtypes(quant)
    if linear.leaf in model.arch.keep_fp32_leaves and (d.load == "fp16" or (d.quant in QUANTIZED and
                                                                             d.unquantized == "fp32")):
        return "fp32"
    if linear.leaf in model.arch.keep_fp32_leaves and d.quant in QUANTIZED:
        return d.unquantized
    return effective_linear_quant(model, d)


def expert_storage(quant) -> str:
    """How the fused 3-D expert parameters of a sparse-MoE block are stored (transformers 5:
    ``MixtralExperts.gate_up_proj`` [E, 2·I, h], ``down_proj`` [E, h, I], plain nn.Parameter).

    bitsandbytes never quantizes them: transformers' bnb quantizer converts modules in
    ``replace_with_bnb_linear`` only when ``isinstance(module, Conv1D) or type(module) is
    nn.Linear`` (transformers 5.24 integrations/bitsandbytes.py L189), and quantizes only the
    weights of the Linear4bit/Linear8bitLt it made (quantizer_bnb_4bit.py::param_needs_quantization
    L83-87: ``isinstance(module, bnb.nn.Linear4bit)``). So an nf4/fp4/int8 "QLoRA" loads the
    experts in the load dtype (bf16), and ``prepare_model_for_kbit_training`` then casts every
    bf16/fp16 parameter that is not Params4bit to fp32 (peft 0.21 utils/other.py L204-209):
    fp32, 4 B/param. An unquantized base keeps its load dtype. (``Dtypes.unquantized``.)
    """
    return as_dtypes(quant).unquantized


def experts_unquantized(model: ModelSpec, quant: str) -> bool:
    """True when the user asked for a bitsandbytes quantization and the model has fused experts
    that bitsandbytes leaves unquantized (and prepare_model_for_kbit_training upcasts to fp32)."""
    return as_dtypes(quant).quant in QUANTIZED and bool(model.experts)


#: the transformers 5.24 quantization paths that do convert fused experts (what to use instead of
#: bitsandbytes for a MoE): FineGrainedFP8Config replaces every ``*.experts`` module by FP8Experts
#: (integrations/finegrained_fp8.py::replace_with_fp8_linear, ``module_name.endswith(".experts")``)
#: and its quantizer reports ``is_trainable`` True (quantizer_finegrained_fp8.py L163)
EXPERT_QUANTIZATION_PATHS = ("FineGrainedFP8Config (fp8 experts, trainable)",)


def stream_dtype_bytes(quant) -> int:
    """a: bytes/element of the residual stream (``Dtypes.stream``).

    bf16/fp16 base: 2. fp32 base: 4. Quantized base after prepare_model_for_kbit_training: 4,
    because it casts embeddings and norm weights to fp32 (peft/utils/other.py), the embedding
    output is fp32, and bnb Linear4bit/Linear8bitLt return their output in the input's dtype
    (bitsandbytes/nn/modules.py: ``out.to(inp_dtype)``), so the whole stream stays fp32.
    """
    return DTYPE_BYTES[as_dtypes(quant).stream]


def unquantized_param_bytes(quant) -> int:
    """Bytes/param of what bitsandbytes does not quantize (embeddings, norms, position tables,
    biases, lm_head): ``Dtypes.unquantized`` (the load dtype; fp32 after
    prepare_model_for_kbit_training, which casts every fp16/bf16 parameter that is not
    Params4bit/Int8Params to fp32: peft/utils/other.py::prepare_model_for_kbit_training)."""
    return DTYPE_BYTES[as_dtypes(quant).unquantized]


def lm_head_fp32(quant) -> bool:
    """lm_head's weight is fp32: an fp32 load, or prepare_model_for_kbit_training (the bnb
    quantizer keeps the output embedding in the load dtype, quantizers/quantizer_bnb_*:
    modules_to_not_convert; prepare then upcasts it)."""
    return as_dtypes(quant).unquantized == "fp32"


#: LoRA adapters (lora_A, lora_B) of the protocol are fp32: created in the base dtype, then
#: get_peft_model(autocast_adapter_dtype=True) upcasts bf16/fp16 adapters
#: (peft/tuners/tuners_utils.py::cast_adapter_dtype)
LORA_ADAPTER_DTYPE = "fp32"


def lora_adapter_bytes(quant=None) -> int:
    """Bytes per LoRA parameter (and per gradient): ``Dtypes.adapter`` (4 in the protocol)."""
    return DTYPE_BYTES[as_dtypes(quant).adapter if quant is not None else LORA_ADAPTER_DTYPE]


# ---------------------------------------------------------------------------------------------
# The recipe's dtypes (issue 11): one object every view reads
# ---------------------------------------------------------------------------------------------

#: torch's type promotion of two floating dtypes (torch.promote_types): bf16 with fp16 -> fp32
def promote(a: str, b: str) -> str:
    """torch.promote_types for the float dtypes here: the wider; bf16 + fp16 -> fp32."""
    if a == b:
        return a
    return "fp32"


@dataclass(frozen=True)
class Dtypes:
    """The dtypes of every tensor family of a run, from the resolved recipe
    (``trainers.resolve_recipe``): ``quant`` (how the frozen Linears are stored), ``load``
    (``from_pretrained(dtype=...)``), ``prepare_kbit`` (peft prepare_model_for_kbit_training),
    ``compute`` (``bnb_4bit_compute_dtype``), ``adapter`` (LoRA A/B) and ``autocast`` (None, or
    the ``torch.autocast`` dtype of mixed precision; fp16 adds a GradScaler).

    ``Dtypes.protocol(quant)`` is the H100 protocol (``--trainer loop``): bf16 load, prepare on
    for a quantized base, compute bf16, fp32 adapters, no autocast.
    """

    quant: str
    load: str = "bf16"
    prepare_kbit: bool = False
    compute: str = "bf16"
    adapter: str = "fp32"
    autocast: str | None = None

    @classmethod
    def protocol(cls, quant: str) -> "Dtypes":
        if quant in QUANTIZED:
            return cls(quant, "bf16", True, "bf16", LORA_ADAPTER_DTYPE, None)
        return cls(quant, quant if quant in ("fp16", "fp32") else "bf16", False, "bf16", LORA_ADAPTER_DTYPE, None)

    @classmethod
    def of(cls, train) -> "Dtypes":
        """From a TrainSpec (resolved through ``trainers.resolve_recipe`` first)."""
        from .trainers import resolve_recipe

        r = resolve_recipe(train)
        mp = r.mixed_precision
        return cls(r.quant, r.load_dtype, bool(r.prepare_kbit), r.compute_dtype, r.adapter_dtype,
                   None if mp in (None, "no") else mp)

    @property
    def unquantized(self) -> str:
        """Embeddings, norms, lm_head, biases (and every Linear of an unquantized base):
        prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not Params4bit to
        fp32 (peft 0.21 utils/other.py::prepare_model_for_kbit_training, the cast is not gated on
        the model being quantized); else the load dtype."""
        return "fp32" if self.prepare_kbit else self.load

    @property
    def stream(self) -> str:
        """The residual stream: the embedding output is in the embedding's dtype; every block
        output is added into it (``residual + out``: torch type promotion), so under autocast a
        bf16/fp16 block output added to a stream of the other half dtype gives fp32."""
        u = self.unquantized
        return promote(u, self.autocast) if self.autocast else u

    @property
    def frozen_matmul(self) -> str:
        """The dtype the frozen Linears' matmuls run in: the autocast dtype under mixed
        precision (linear is on CUDA autocast's lower-precision list); else the 4-bit compute
        dtype (bitsandbytes nn/modules.py::Linear4bit.forward casts x to it, dequantizes to it;
        int8 bills its matmuls as the protocol's fitted time model does, at the compute dtype's
        rate), or the storage dtype."""
        if self.autocast:
            return self.autocast
        if self.quant in QUANTIZED:
            return self.compute
        return self.unquantized

    @property
    def block(self) -> str:
        """The dtype of what a block's Linears output (attention and MLP internals): autocast's
        under mixed precision (linear is a lower-precision op); else the input's (bitsandbytes
        Linear4bit/Linear8bitLt return ``out.to(inp_dtype)``) or the weight's, i.e. the stream's."""
        return self.autocast or self.stream

    @property
    def attention(self) -> str:
        """The dtype sdpa runs in: autocast's (scaled_dot_product_attention is a lower-precision
        op), else its inputs' (the block dtype)."""
        return self.block

    @property
    def lm_head(self) -> str:
        """The dtype lm_head runs in (so the logits' dtype): autocast's, else its weight's."""
        return self.autocast or self.unquantized

    @property
    def lora_matmul(self) -> str:
        """The dtype LoRA's matmuls run in: peft casts x to lora_A's dtype
        (peft tuners/lora/layer.py::Linear.forward ``_cast_input_dtype``); autocast then casts
        both operands of the Linear to its dtype."""
        return self.autocast or self.adapter

    @property
    def key(self) -> tuple:
        return (self.quant, self.load, self.prepare_kbit, self.compute, self.adapter, self.autocast)


def as_dtypes(quant) -> Dtypes:
    """A ``Dtypes`` as is; a quantization name means the protocol's (``Dtypes.protocol``)."""
    return quant if isinstance(quant, Dtypes) else Dtypes.protocol(quant)
