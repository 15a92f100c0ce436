"""Storage rules: how transformers + bitsandbytes + peft store every tensor of a LoRA/QLoRA run.

One home for the facts that the memory ledger, the step-time model, the meta-device trace and
the profile runner all depend on: which Linear is quantized, what
``prepare_model_for_kbit_training`` upcasts, what stays fp32, the dtype of the residual
stream and of the LoRA adapters, and bytes per dtype. Pure Python (no torch): the trace and the
profile map the dtype names given here to torch dtypes themselves.

Versions read: transformers 5.x, peft 0.21, bitsandbytes 0.50 (shared/design/memory-physics.md
§1-§4). Quantizations are named as in ``loraplan.spec.QUANTS``; dtypes as "bf16", "fp16",
"fp32", "int8", "nf4", "fp4".
"""

from __future__ import annotations

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


def load_dtype(quant: str) -> str:
    """The ``dtype`` given to ``from_pretrained`` / ``from_config``: fp16 and fp32 load as
    themselves; bf16 and the quantized loads in bf16 (the protocol's
    ``bnb_4bit_compute_dtype=torch.bfloat16``; what bnb does not quantize stays in it)."""
    return quant if quant in ("fp16", "fp32") else "bf16"


#: torch's names of the dtypes above, for the torch zone (trace, profile): getattr(torch, name)
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "int8": "int8"}


def matmul_dtype(quant: str) -> str:
    """The dtype the frozen Linears' matmuls run in: the load dtype of a bf16/fp16/fp32 base;
    bf16 for a quantized base (bitsandbytes dequantizes to ``bnb_4bit_compute_dtype``;
    bitsandbytes nn/modules.py::Linear4bit.forward)."""
    return quant if quant in ("bf16", "fp16", "fp32") else "bf16"


def effective_linear_quant(model: ModelSpec, quant: str) -> str:
    """transformers' bitsandbytes integration replaces only modules whose type *is* nn.Linear
    (or Conv1D) (integrations/bitsandbytes.py::replace_with_bnb_linear: ``type(module) is
    nn.Linear``); subclasses such as FalconLinear stay in the load dtype, and
    prepare_model_for_kbit_training then casts them to fp32 like any other bf16 parameter."""
    if quant in QUANTIZED and not model.arch.bnb_converts_linears:
        return "fp32"
    return quant


def linear_storage(model: ModelSpec, quant: str, linear: LinearSpec) -> str:
    """How one frozen Linear is stored. Modules in the model's ``_keep_in_fp32_modules`` (T5's
    wo) are in the bnb quantizer's modules_to_not_convert, so a quantized base keeps them in the
    load dtype, then fp32 after prepare_model_for_kbit_training; an fp16 load upcasts them to
    fp32 (transformers modeling_utils: only for fp16, not bf16)."""
    if linear.leaf in model.arch.keep_fp32_leaves and quant in QUANTIZED + ("fp16",):
        return "fp32"
    return effective_linear_quant(model, quant)


def expert_storage(quant: str) -> str:
    """How the fused 3-D expert parameters of a sparse-MoE block are stored (transformers 5:
    ``MixtralExperts.gate_up_proj`` [E, 2·I, h], ``down_proj`` [E, h, I], plain nn.Parameter).

    bitsandbytes never quantizes them: transformers' bnb quantizer converts modules in
    ``replace_with_bnb_linear`` only when ``isinstance(module, Conv1D) or type(module) is
    nn.Linear`` (transformers 5.24 integrations/bitsandbytes.py L189), and quantizes only the
    weights of the Linear4bit/Linear8bitLt it made (quantizer_bnb_4bit.py::param_needs_quantization
    L83-87: ``isinstance(module, bnb.nn.Linear4bit)``). So an nf4/fp4/int8 "QLoRA" loads the
    experts in the load dtype (bf16), and ``prepare_model_for_kbit_training`` then casts every
    bf16/fp16 parameter that is not Params4bit to fp32 (peft 0.21 utils/other.py L204-209):
    fp32, 4 B/param. An unquantized base keeps its load dtype.
    """
    return "fp32" if quant in QUANTIZED else load_dtype(quant)


def experts_unquantized(model: ModelSpec, quant: str) -> bool:
    """True when the user asked for a bitsandbytes quantization and the model has fused experts
    that bitsandbytes leaves unquantized (and prepare_model_for_kbit_training upcasts to fp32)."""
    return quant in QUANTIZED and bool(model.experts)


#: the transformers 5.24 quantization paths that do convert fused experts (what to use instead of
#: bitsandbytes for a MoE): FineGrainedFP8Config replaces every ``*.experts`` module by FP8Experts
#: (integrations/finegrained_fp8.py::replace_with_fp8_linear, ``module_name.endswith(".experts")``)
#: and its quantizer reports ``is_trainable`` True (quantizer_finegrained_fp8.py L163)
EXPERT_QUANTIZATION_PATHS = ("FineGrainedFP8Config (fp8 experts, trainable)",)


def stream_dtype_bytes(quant: str) -> int:
    """a: bytes/element of the residual stream.

    bf16/fp16 base: 2. fp32 base: 4. Quantized base: 4, because prepare_model_for_kbit_training
    casts embeddings and norm weights to fp32 (peft/utils/other.py), the embedding output is
    fp32, and bnb Linear4bit/Linear8bitLt return their output in the input's dtype
    (bitsandbytes/nn/modules.py: ``out.to(inp_dtype)``), so the whole stream stays fp32.
    """
    return 4 if quant in QUANTIZED or quant == "fp32" else 2


def unquantized_param_bytes(quant: str) -> int:
    """Bytes/param of what bitsandbytes does not quantize (embeddings, norms, position tables,
    biases, lm_head): the load dtype (2 B bf16/fp16, 4 B fp32); with a quantized base
    prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not
    Params4bit/Int8Params to fp32 (peft/utils/other.py::prepare_model_for_kbit_training): 4 B.
    The same rule as the residual stream's dtype (``stream_dtype_bytes``)."""
    return stream_dtype_bytes(quant)


def lm_head_fp32(quant: str) -> bool:
    """lm_head's weight (and so the logits) is fp32: an fp32 base, or a quantized one (the bnb
    quantizer keeps the output embedding in the load dtype, quantizers/quantizer_bnb_*:
    modules_to_not_convert; prepare_model_for_kbit_training then upcasts it)."""
    return unquantized_param_bytes(quant) == 4


#: LoRA adapters (lora_A, lora_B) are fp32: created in the base dtype, then
#: get_peft_model(autocast_adapter_dtype=True) upcasts bf16/fp16 adapters
#: (peft/tuners/tuners_utils.py::cast_adapter_dtype)
LORA_ADAPTER_DTYPE = "fp32"


def lora_adapter_bytes() -> int:
    """Bytes per LoRA parameter (and per gradient): 4, see ``LORA_ADAPTER_DTYPE``."""
    return DTYPE_BYTES[LORA_ADAPTER_DTYPE]
