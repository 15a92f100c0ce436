"""Make a meta-device training step allocate what the same step allocates on a CUDA GPU.

Each difference between meta (or CPU) and CUDA that changes which tensors exist is one small
function here, with where the CUDA behaviour comes from:

- ``choose_sdpa_backend`` / ``cuda_like_sdpa``: torch's CUDA sdpa picks flash, mem-efficient or
  math (``sdp_utils.cpp``); on meta it always takes math (B·H·S·S fp32 scores). We mirror the
  choice and call ``aten._scaled_dot_product_flash_attention`` / ``_efficient_attention``
  directly (both have meta kernels and autograd formulas). Flash pads head dims to a multiple
  of 8 like ``attention.cpp`` does; GQA goes to flash natively, otherwise k/v are repeated.
- ``fused_dropout``: on CUDA ``F.dropout`` is ``native_dropout`` (saves a 1-byte mask); on CPU
  and meta it saves a full-size noise tensor. ``math_sdpa_fused_dropout``: the same for the
  attention-probability dropout inside torch's math sdpa kernel (C++ ``at::dropout``).
- ``lora_factors_fold``: peft's LoRA on fused experts (``_LoraFactorsProxy``) disables autocast
  with ``torch.autocast(device_type="meta")``, which torch rejects; on CUDA it is a no-op region.
- ``no_packed_sequences``: ``transformers.masking_utils.find_packed_sequence_indices`` reads
  tensor values (``.all()``); an unpacked batch gives None.
- ``register_int8_fakes``: bitsandbytes' int8 fake kernels ask for data-dependent outlier
  counts; ours take the outlier column count from an explicit policy, and give ``subA`` the
  shape CUDA's ``int8_mixed_scaled_mm`` returns (rows × outlier columns, input dtype; the
  stock fake says int64 of length n).
- ``kernel_transients``: memory allocated inside a custom op's kernel, which dispatch never
  sees (4-bit dequantize + linear fallback, int8 matmul int32 result); reported to the tracker
  as transients at the moment of the op.
- ``constant_terms``: memory outside any op: cuBLAS workspaces.
- AdamW uses ``foreach=True`` as torch picks it for CUDA params (see run.py).

int8 on CUDA (bitsandbytes 0.50.2 ``autograd/_functions.py``): ``bnb.matmul`` takes
``MatMul8bitLt`` on CUDA and meta (``MatMul8bitFp`` only on CPU/XPU, so a CPU run does not show
CUDA's int8 memory). With frozen int8 weights the forward takes the fast path
(``int8_vectorwise_quant`` of ``A.to(fp16)``, so CAt = None) and keeps
``ctx.tensors = (None, subA, A)`` as plain ctx attributes, not ``save_for_backward``: the layer
input A (fp32 after prepare_model_for_kbit_training) and subA (A's outlier columns, A's dtype)
live as long as the autograd node, i.e. through non-reentrant checkpointing and, because the
protocol's ``loss`` holds the previous graph, through the next step's forward. ``state.idx``
(int64 outlier column ids) stays on the module's MatmulLtState. The backward dequantizes the
whole weight in A's dtype (visible to dispatch). The trace runs this real code; only the
outlier count is an assumption (the estimator's random-init default for MLP-out inputs, or the user's fraction).

What stays uncertain is said where it is modelled (see ``UNCERTAIN``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

MiB = 1 << 20

#: what this emulation cannot know for sure; reported with every trace
UNCERTAIN = (
    "int8: the share of input columns above the 6.0 outlier threshold depends on the weights and "
    "activations (random-init weights give many on down_proj); it sets the size of subA, which "
    "MatMul8bitLt keeps as a ctx attribute for the life of the graph",
    "4-bit: whether bitsandbytes' gemm_4bit takes its custom kernel or dequantize + linear for "
    "M <= 1536 rows depends on a per-GPU heuristic; the trace assumes dequantize + linear "
    "(an upper bound: out x in x 2 B transient per call)",
    "cuBLAS workspace: 32 MiB per handle on sm90+ (8 MiB before), two handles assumed (forward "
    "thread and autograd's device thread); cuBLASLt may add its own workspace in some builds",
    "allocator: reserved memory comes from replaying the traced allocation stream through a model "
    "of the caching allocator (one stream, weights allocated in build order, kernel-internal "
    "allocations only where emulation.kernel_transients / the cuBLAS workspaces name them)",
)


# ----------------------------------------------------------------------------- sdpa
def parse_cc(cc: str | None) -> tuple[int, int] | None:
    """'9.0' -> (9, 0); None stays None (no NVIDIA GPU: math backend only)."""
    if cc is None:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def choose_sdpa_backend(dtype: torch.dtype, head_dim_qk: int, head_dim_v: int, has_mask: bool,
                        gpu_cc: str | None = "9.0", requested: str = "auto", gqa: bool = False,
                        stack=None) -> str:
    """The kernel torch's CUDA sdpa picks: "flash", "efficient" or "math".

    Rules (torch ``sdp_utils.cpp``, priority flash > efficient > math):
    flash needs no explicit mask, fp16/bf16, sm80+, equal q/k/v head dims <= 256 (padded to a
    multiple of 8 by the caller); mem-efficient takes a mask and fp32 too, sm50+ (bf16: sm80+), head dim <= 512
    (the fp16/bf16 kernel wants a multiple of 8, torch pads the mask but not the head dim, so an
    odd head dim in half precision falls to math); everything else is math: the one rule set,
    ``loraplan.estimate.sdpa.sdpa_refusals``. ``requested`` forces a backend (as
    ``torch.nn.attention.sdpa_kernel`` would, without its fallback): InputError where it cannot run. Grouped-query
    attention (``enable_gqa`` with fewer kv heads) runs on flash or math only (torch's
    scaled_dot_product_attention docstring; mem-efficient checks
    ``check_batch_size_and_num_heads_dense<false>``). The dtypes flash takes and whether
    mem-efficient takes GQA are version rules (loraplan/data/version-rules.json, ``stack``).
    """
    from ..errors import InputError
    from ..estimate.sdpa import explicit_kernel_refusal, first_kernel, sdpa_refusals

    cc = parse_cc(gpu_cc)
    if cc is None:
        return requested if requested in ("flash", "efficient", "math") else "math"
    why = sdpa_refusals(str(dtype).removeprefix("torch."), head_dim_qk, head_dim_v, has_mask, gpu_cc, gqa, stack)
    if requested in ("flash", "efficient", "math"):
        refusal = explicit_kernel_refusal(requested, why)  # sdpa_kernel([backend]): "No available kernel"
        if refusal:
            raise InputError(refusal)
        return requested
    return first_kernel(why)


def _pad8(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return x if d % 8 == 0 else torch.nn.functional.pad(x, (0, 8 - d % 8))


def cuda_like_sdpa(gpu_cc: str | None = "9.0", requested: str = "auto",
                   log: Callable[[str], None] | None = None, original=None, stack=None):
    """A drop-in ``F.scaled_dot_product_attention`` that runs the kernel CUDA would choose."""
    original = original or torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        from .autocast import cast_args  # mixed precision: autocast casts the inputs first

        query, key, value, attn_mask = cast_args("scaled_dot_product_attention", query, key, value, attn_mask)
        gqa = bool(enable_gqa) and key.shape[-3] != query.shape[-3]
        backend = choose_sdpa_backend(query.dtype, query.shape[-1], value.shape[-1], attn_mask is not None,
                                      gpu_cc, requested, gqa, stack)
        if log is not None:
            log(backend)
        if backend == "flash" and attn_mask is None:
            d = query.shape[-1]
            sc = scale if scale is not None else 1.0 / math.sqrt(d)
            q, k, v = _pad8(query), _pad8(key), _pad8(value)
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, dropout_p, is_causal, False, scale=sc)[0]
            return out[..., :d] if out.shape[-1] != d else out
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(rep, dim=-3)
            value = value.repeat_interleave(rep, dim=-3)
        if backend == "efficient":
            need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            mask = attn_mask
            if mask is not None and mask.dtype == torch.bool:
                # torch converts a bool mask to an additive one of the query dtype (convert_boolean_attn_mask)
                mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
            if mask is not None:
                mask = _mem_eff_mask(mask, query, key)
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, mask, need_lse, dropout_p, is_causal, scale=scale)[0]
        if dropout_p > 0 and parse_cc(gpu_cc) is not None:
            return math_sdpa_fused_dropout(query, key, value, attn_mask, dropout_p, is_causal, scale)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale)

    return sdpa


def math_sdpa_fused_dropout(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """torch's math sdpa kernel as it runs on CUDA, for attention-probability dropout.

    ``_scaled_dot_product_attention_math`` (aten/src/ATen/native/transformers/attention.cpp) is a
    composite of autograd ops: half inputs upcast to fp32, q and k each scaled by √scale, the
    scores plus the (additive) mask, ``_safe_softmax``, then ``at::dropout`` on the fp32
    probabilities and the product with v, cast back. Its ``at::dropout`` is ``native_dropout`` on
    CUDA (a bool mask) but the unfused CPU path on meta (an fp32 noise tensor kept for backward,
    ATen Dropout.cpp ``is_fused_kernel_acceptable``), so the composite is replayed here op by op
    with ``native_dropout``: the same saved tensors as CUDA's. k, v arrive repeated to n_h heads
    (the caller's enable_gqa handling)."""
    origin = query.dtype
    half = origin in (torch.float16, torch.bfloat16)
    q, k, v = (t.to(torch.float32) if half else t for t in (query, key, value))
    sf = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    q = q * sf
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # convert_boolean_attn_mask
        attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(~attn_mask, float("-inf"))
    attn = torch.matmul(q, k.transpose(-2, -1) * sf)
    if attn_mask is not None:
        attn.add_(attn_mask)
    attn = torch._safe_softmax(attn, -1)
    attn = torch.native_dropout(attn, dropout_p, True)[0]
    return torch.matmul(attn, v).to(origin)


def _mem_eff_mask(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """torch ``preprocess_mask``: expand to (B, H, Lq, Lk) and pad the last dim to a multiple of 16."""
    b, h, lq, lk = query.shape[0], query.shape[-3], query.shape[-2], key.shape[-2]
    mask = mask.expand(b, h, lq, lk)
    if lk % 16:
        pad = 16 - lk % 16
        mask = torch.nn.functional.pad(mask, (0, pad))[..., :lk]
    return mask


# ----------------------------------------------------------------------------- dropout
def fused_dropout(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` as on CUDA: ``native_dropout`` (keeps a bool mask) when 0 < p < 1 and training."""
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p >= 1.0:
        return input.mul(0.0) if not inplace else input.zero_()
    out = torch.native_dropout(input, p, True)[0]
    if inplace:
        return input.copy_(out)
    return out


def no_packed_sequences(position_ids):  # noqa: ARG001 - signature of the function it replaces
    """``find_packed_sequence_indices`` for an unpacked batch: always None."""
    return None


# ----------------------------------------------------------------------------- int8
_int8_policy: Callable[[int], int] = lambda cols: 0  # noqa: E731


def set_int8_outlier_policy(fn: Callable[[int], int]) -> None:
    """``fn(input_columns) -> outlier columns`` used by the int8 fake kernels from now on."""
    global _int8_policy
    _int8_policy = fn


def int8_outlier_columns(cols: int) -> int:
    return max(0, min(cols, int(_int8_policy(cols))))


_int8_registered = False


def register_int8_fakes() -> None:
    """Override bitsandbytes' int8 fake kernels so they need no data-dependent sizes."""
    global _int8_registered
    if _int8_registered:
        return
    import bitsandbytes  # noqa: F401 - defines the ops

    lib = torch.library

    def vectorwise_quant(A, threshold=0.0):
        out_row = torch.empty(A.shape, device=A.device, dtype=torch.int8)
        row_stats = torch.empty(A.numel() // A.shape[-1], device=A.device, dtype=torch.float32)
        if threshold == 0.0:
            return out_row, row_stats, None
        n = int8_outlier_columns(A.shape[-1])
        return out_row, row_stats, torch.empty(n, device=A.device, dtype=torch.int64)

    def double_quant(A, threshold=0.0):
        out_row = torch.empty_like(A, dtype=torch.int8)
        out_col = torch.empty_like(A, dtype=torch.int8)
        row_stats = torch.empty(A.numel() // A.shape[-1], device=A.device, dtype=torch.float32)
        col_stats = torch.empty(A.shape[-1], device=A.device, dtype=torch.float32)
        n = int8_outlier_columns(A.shape[-1]) if threshold > 0.0 else 0
        return out_row, out_col, row_stats, col_stats, torch.empty(n, device=A.device, dtype=torch.int64)

    def mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
        out = torch.empty((*CA.shape[:-1], CB.shape[0]), device=A.device, dtype=A.dtype)
        n = 0 if outlier_cols is None else outlier_cols.numel()
        rows = A.numel() // A.shape[-1]
        # CUDA (backends/default/ops.py): subA = A[:, outlier_cols].contiguous(), else empty(0)
        sub = A.new_empty((rows, n)) if n else A.new_empty(0)
        return out, sub

    lib.register_fake("bitsandbytes::int8_vectorwise_quant", vectorwise_quant, allow_override=True)
    lib.register_fake("bitsandbytes::int8_double_quant", double_quant, allow_override=True)
    lib.register_fake("bitsandbytes::int8_mixed_scaled_mm", mixed_scaled_mm, allow_override=True)
    _int8_registered = True


# ----------------------------------------------------------------------------- in-kernel memory
def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def kernel_transients(func, args, kwargs) -> list[tuple[str, int]]:
    """(name, bytes) a bitsandbytes op's CUDA kernel allocates internally, beyond its outputs.

    - ``gemm_4bit`` (backends/cuda/ops.py ``_dequant_linear_fallback``): dequantized weight
      N·K·itemsize(A) plus, with double quant, the fp32 absmax twice (absmax_dq and + offset).
    - ``int8_scaled_mm`` / ``int8_mixed_scaled_mm`` (backends/default/ops.py): the int32 matmul
      result rows·N·4 B; mixed adds the outlier weight columns: ``CB[:, cols].contiguous()``
      (N·n int8), dequantized to fp32 (N·n·4 B) and cast to A's dtype (N·n·itemsize, none for fp32).
    - ``int8_vectorwise_quant`` with a threshold (backends/cuda/ops.py): ``A.abs()`` (2 B) and the
      bool outlier mask (1 B) per element.
    """
    name = getattr(getattr(func, "overloadpacket", None), "_qualified_op_name", "") or str(func)
    if "bitsandbytes" not in name:
        return []
    get = lambda i, k, d=None: args[i] if len(args) > i else kwargs.get(k, d)  # noqa: E731
    if name.endswith("::gemm_4bit"):
        A, shapeB, absmax8 = get(0, "A"), get(2, "shapeB"), get(7, "absmax_8bit")
        n, k = int(shapeB[0]), int(shapeB[1])
        b = n * k * _itemsize(A.dtype)
        if absmax8 is not None:
            b += 2 * absmax8.numel() * 4
        return [("bnb_4bit_dequant", b)]
    if name.endswith("::int8_scaled_mm"):
        A, B = get(0, "A"), get(1, "B")
        return [("bnb_int8_matmul", (A.numel() // A.shape[-1]) * B.shape[0] * 4)]
    if name.endswith("::int8_mixed_scaled_mm"):
        A, CB, cols = get(0, "A"), get(2, "CB"), get(5, "outlier_cols")
        rows = A.numel() // A.shape[-1]
        n = 0 if cols is None else cols.numel()
        # int32 result + outlier weight columns: gathered int8 (1 B), dequantized fp32 (4 B), cast to
        # A's dtype (a copy only when A is not fp32)
        cast = 0 if A.dtype == torch.float32 else _itemsize(A.dtype)
        return [("bnb_int8_matmul", rows * CB.shape[0] * 4 + CB.shape[0] * n * (1 + 4 + cast))]
    if name.endswith("::int8_vectorwise_quant"):
        A, thr = get(0, "A"), get(1, "threshold", 0.0)
        if thr and thr > 0.0:
            return [("bnb_int8_outlier_scan", A.numel() * 3)]
    return []


def cublas_workspace_bytes(gpu_cc: str | None, stack=None) -> int:
    """Per-handle cuBLAS workspace torch allocates through the caching allocator
    (``CublasHandlePool.cpp``): 32 MiB on sm90+, else 4096 KiB x 2 + 16 KiB x 8. The sizes are
    written once, in catalog/calibrations/default.json (``cublas_workspace_bytes_*``), which the
    analytic ledger reads too."""
    from .. import versions
    from ..catalog import load_calibration

    cc = parse_cc(gpu_cc)
    if cc is None or not versions.rule("cublas_workspace_in_allocator", stack):
        return 0
    coef = load_calibration(None).coefficients
    big = cc >= parse_cc(versions.rule("cublas_workspace_32mib_min_cc", stack))
    return int(coef["cublas_workspace_bytes_sm90"] if big else coef["cublas_workspace_bytes_pre_sm90"])


#: aten ops that run through a cuBLAS / cuBLASLt handle on CUDA (aten/src/ATen/native/cuda/Blas.cpp)
CUBLAS_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "vdot",
                        "_addmm_activation", "addr"})


def cublas_thread() -> str:
    """Which CPU thread would issue a cuBLAS call now on CUDA: "backward" inside an autograd
    backward pass (the engine runs CUDA work on its per-device thread, torch/csrc/autograd/
    engine.cpp), else "forward". On meta/CPU both run on the caller's thread, so the thread is
    read from ``torch._C._current_graph_task_id()`` (-1 outside backward). cuBLAS handles and
    their workspaces are per thread (CublasHandlePool.cpp: thread-local handle pool; workspace
    per (handle, stream), allocated through the caching allocator at the first use)."""
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


def constant_terms(gpu_cc: str | None, handles: int | None = None, stack=None) -> dict[str, dict]:
    """Memory that is allocated from the caching allocator without passing through dispatch,
    alive for the whole step, as named terms with their provenance. ``handles``: the
    calibration's ``cublas_handles`` unless given."""
    from ..catalog import load_calibration

    ws = cublas_workspace_bytes(gpu_cc, stack)
    if not ws:
        return {}
    if handles is None:
        handles = int(load_calibration(None).coefficients["cublas_handles"])
    return {"cublas_workspace": {
        "bytes": ws * handles,
        "source": f"torch CublasHandlePool: {ws // MiB if ws % MiB == 0 else ws / MiB:g} MiB per handle "
                  f"x {handles} handles (forward thread + autograd device thread); "
                  "matches the constant 64 MiB gap of bf16 traces vs the H100 reference",
    }}


# ----------------------------------------------------------------------------- all together
def _peft_lora_factors_proxy():
    """peft's ``_LoraFactorsProxy`` (LoRA on fused expert parameters, ``target_parameters``), or
    None for a peft without it."""
    try:
        from peft.tuners.lora import layer
    except ImportError:  # pragma: no cover - peft is required by the trace
        return None
    return getattr(layer, "_LoraFactorsProxy", None)


def lora_factors_fold(self, W):
    """peft ``_LoraFactorsProxy.forward`` (peft/tuners/lora/layer.py) as it runs on CUDA: the
    parametrized expert weight ``baddbmm(W, lhs, rhs, alpha=scaling)`` in W's dtype, inside
    ``torch.autocast(device_type=W.device.type, enabled=False)``, which on CUDA only turns
    autocast off for the fold but raises "unsupported scalarType" for the meta device type. Here
    the fold runs in the emulated autocast's disabled region (``trace.autocast``)."""
    from .autocast import active

    mode = active()
    with mode.disabled() if mode is not None else contextlib.nullcontext():
        return torch.baddbmm(W, self.lhs, self.rhs, alpha=self.scaling)


@contextlib.contextmanager
def cuda_emulation(gpu_cc: str | None = "9.0", attention: str = "auto",
                   sdpa_log: Callable[[str], None] | None = None, stack=None):
    """Patch torch/transformers for the duration: CUDA-like sdpa, fused dropout, no packed
    sequence detection. Restores everything on exit."""
    import torch.nn.functional as F
    import transformers.masking_utils as mu

    saved = [(F, "scaled_dot_product_attention", F.scaled_dot_product_attention),
             (F, "dropout", F.dropout),
             (mu, "find_packed_sequence_indices", mu.find_packed_sequence_indices)]
    proxy = _peft_lora_factors_proxy()
    if proxy is not None:
        saved.append((proxy, "forward", proxy.forward))
    try:
        F.scaled_dot_product_attention = cuda_like_sdpa(gpu_cc, attention, sdpa_log,
                                                        original=saved[0][2], stack=stack)
        F.dropout = fused_dropout
        mu.find_packed_sequence_indices = no_packed_sequences
        if proxy is not None:
            proxy.forward = lora_factors_fold
        yield
    finally:
        for obj, name, val in saved:
            setattr(obj, name, val)


# ----------------------------------------------------------------------------- sequences
#: the attention name the trace loads a model with for ``attn_implementation flash_attention_2``
#: (no "flash" in it: transformers would take such a name for a Hub kernel to download)
FA2_EMULATION_NAME = "loraplan_fa2"


def _round(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _kernel_buffers(buffers, device) -> int:
    """Allocate, together, the buffers a CUDA kernel takes from the caching allocator for its
    duration (the tracker sees them live at once), and free them; returns their bytes."""
    live = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in buffers]
    return sum(t.numel() * t.element_size() for t in live)


class _FlashAttnEmulation(torch.autograd.Function):
    """flash-attn 2's ``FlashAttnFunc`` / ``FlashAttnVarlenFunc`` with the kernel's allocations and
    no arithmetic (flash_attn/flash_attn_interface.py; csrc/flash_attn/flash_api.cpp mha_fwd/mha_bwd,
    mha_varlen_fwd/mha_varlen_bwd).

    Forward: the head dim padded to a multiple of 8 (``F.pad``), ``out_padded`` like q, the fp32
    ``softmax_lse`` [b, n_h, s] (varlen: [n_h, total]) and ``rng_state`` (2 int64); saves
    q, k, v (padded), out_padded, softmax_lse, rng_state. Backward: ``dq, dk, dv = empty_like``
    of the padded q, k, v; inside ``mha_bwd`` the fp32 ``softmax_d`` [b, n_h, round128(s)]
    (varlen [n_h, total + 128·n_seq]), the fp32 ``dq_accum`` [b, round128(s), n_h, round32(d)]
    (varlen [total + 128·n_seq, n_h, round32(d)]) and, for grouped-query attention,
    ``dk_expanded``/``dv_expanded`` at n_h heads, summed into dk/dv."""

    @staticmethod
    def forward(ctx, q, k, v, n_seq):
        d = q.shape[-1]
        varlen = q.dim() == 3
        if d % 8:
            q, k, v = (torch.nn.functional.pad(t, (0, 8 - d % 8)) for t in (q, k, v))
        out = torch.empty_like(q)
        if varlen:
            lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        else:
            lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
        rng = torch.empty((2,), dtype=torch.int64, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, rng)
        ctx.d, ctx.n_seq = d, n_seq
        return out[..., :d] if d % 8 else out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, rng = ctx.saved_tensors
        d = ctx.d
        if d % 8:
            dout = torch.nn.functional.pad(dout, (0, 8 - d % 8))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dp = q.shape[-1]
        d_round = _round(dp, 32) if dp <= 192 else 256
        f32 = torch.float32
        if q.dim() == 3:  # varlen
            total, n_h = q.shape[0], q.shape[1]
            buffers = [((n_h, total + 128 * ctx.n_seq), f32), ((total + 128 * ctx.n_seq, n_h, d_round), f32)]
            expanded = (k.shape[0], n_h, dp)
        else:
            b, s, n_h = q.shape[0], q.shape[1], q.shape[2]
            buffers = [((b, n_h, _round(s, 128)), f32), ((b, _round(s, 128), n_h, d_round), f32)]
            expanded = (b, k.shape[1], n_h, dp)
        if k.shape[-2] != n_h:  # GQA: dk, dv at n_h heads, then summed over the groups
            buffers += [(expanded, q.dtype), (expanded, q.dtype)]
        _kernel_buffers(buffers, q.device)
        if d % 8:
            dq, dk, dv = dq[..., :d], dk[..., :d], dv[..., :d]
        return dq, dk, dv, None


def flash_attention_2_emulation(padded: bool, packed: bool, n_seq: int):
    """``(attention_function, mask_function)`` registered under ``FA2_EMULATION_NAME`` through
    transformers' ``AttentionInterface`` / ``AttentionMaskInterface``: the smallest faithful path
    (making transformers think flash-attn is installed would run its ``_upad_input`` and
    ``_is_packed_sequence``, which read tensor values, impossible on meta).

    The function follows transformers 5.24 integrations/flash_attention.py::flash_attention_forward
    and modeling_flash_attention_utils.py::_flash_attention_forward with the layout known from the
    recipe instead of read from tensors:

    - q, k, v transposed to [b, s, h, d] (views), cast by ``fa_peft_integration_check`` to
      ``get_target_dtype`` when fp32 (a quantized base's fp32 stream: copies in bf16);
    - padded batch (a 2-D mask): ``_upad_input``: ``_index_first_axis`` gathers the real tokens of
      k, v and q (new tensors, the int64 indices kept by the gathers), varlen kernel, then
      ``_pad_input`` scatters the output into a zeros [b·s, h, d] tensor. The worst batch is
      taken to have every row real (indices of b·s tokens): an upper bound for a padded batch;
    - packed rows (one flattened row): ``_prepare_from_posids``: ``contiguous().view(-1, h, d)``
      (copies of the transposed q, k; v's transpose is already contiguous), varlen kernel;
    - otherwise ``flash_attn_func`` on [b, s, h, d] directly.
    """
    from transformers.modeling_flash_attention_utils import fa_peft_integration_check

    def get_target_dtype(query, module):
        """integrations/flash_attention.py::get_target_dtype, asking autocast about "cuda" (the
        device the step emulates; autocast knows no "meta")."""
        if query.dtype != torch.float32:
            return None
        if torch.is_autocast_enabled("cuda"):
            return torch.get_autocast_dtype("cuda")
        if hasattr(module.config, "_is_quantized"):
            return module.config.dtype
        return next(m for m in module.modules() if isinstance(m, torch.nn.Linear)).weight.dtype

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                  softcap=None, is_causal=None, **kwargs):
        b, s = query.shape[0], query.shape[2]
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        q, k, v = fa_peft_integration_check(q, k, v, get_target_dtype(q, module))
        if attention_mask is not None:
            idx = torch.empty((b * s,), dtype=torch.int64, device=q.device)
            k = k.reshape(-1, *k.shape[2:])[idx]
            v = v.reshape(-1, *v.shape[2:])[idx]
            q = q.reshape(-1, *q.shape[2:])[idx]
            out = _FlashAttnEmulation.apply(q, k, v, b)
            full = torch.zeros((b * s, *out.shape[1:]), dtype=out.dtype, device=out.device)
            full[idx] = out
            return full.view(b, s, *out.shape[1:]), None
        if packed and b == 1:
            q, k, v = (t.contiguous().view(-1, t.size(-2), t.size(-1)) for t in (q, k, v))
            out = _FlashAttnEmulation.apply(q, k, v, n_seq)
            return out.view(b, -1, *out.shape[-2:]), None
        return _FlashAttnEmulation.apply(q, k, v, b), None

    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
             **kwargs):
        """masking_utils.py::flash_attention_mask, with ``attention_mask.all()`` known: the 2-D mask
        when the batch is padded, else None."""
        if attention_mask is not None and padded:
            return attention_mask[:, -kv_length:]
        return None

    return attention, mask


@contextlib.contextmanager
def sequence_emulation(padded: bool, packed: bool, n_seq: int = 1):
    """Patch what transformers reads from tensor values when building masks, with what the recipe
    says (meta tensors have no values):

    - ``masking_utils._ignore_causal_mask_sdpa``: a padded batch's mask holds a pad token, so the
      causal-skip test (``fast_all(padding_mask)``) is False: the bool mask is materialised;
    - ``masking_utils.find_packed_sequence_indices``: packed rows give a [rows, len] int64 document
      index (its ``cumsum``); unpacked batches keep ``no_packed_sequences``;
    - the FA2 emulation (``flash_attention_2_emulation``) registered under ``FA2_EMULATION_NAME``.
    Restores everything on exit. Nest inside ``cuda_emulation`` (it overrides its
    ``no_packed_sequences``)."""
    import transformers.masking_utils as mu
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original_ignore = mu._ignore_causal_mask_sdpa

    def ignore(padding_mask, *args, **kwargs):
        if padding_mask is not None:
            return False if padded else original_ignore(None, *args, **kwargs)
        return original_ignore(padding_mask, *args, **kwargs)

    def packed_indices(position_ids):
        return torch.empty(position_ids.shape, dtype=torch.int64, device=position_ids.device)

    saved = [(mu, "_ignore_causal_mask_sdpa", original_ignore),
             (mu, "find_packed_sequence_indices", mu.find_packed_sequence_indices)]
    attention, mask = flash_attention_2_emulation(padded, packed, n_seq)
    try:
        mu._ignore_causal_mask_sdpa = ignore
        if packed:  # unpacked batches keep cuda_emulation's no_packed_sequences
            mu.find_packed_sequence_indices = packed_indices
        ALL_ATTENTION_FUNCTIONS.register(FA2_EMULATION_NAME, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(FA2_EMULATION_NAME, mask)
        yield
    finally:
        for obj, name, val in saved:
            setattr(obj, name, val)
        for registry in (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS):
            registry._global_mapping.pop(FA2_EMULATION_NAME, None)
