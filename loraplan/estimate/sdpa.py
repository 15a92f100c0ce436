"""Which kernels torch's CUDA ``scaled_dot_product_attention`` can run for given inputs: the one
rule set behind the analytic kernel choice (``activations.choose_attention``), the refusal of an
explicit ``--attention`` (``activations.check_attention_kernel``), explain's "not offered" list and
the trace's sdpa emulation (``trace.emulation.choose_sdpa_backend``). Pure Python (no torch).

Source: torch aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, ``can_use_flash_attention``
and ``can_use_mem_efficient_attention`` (priority flash > mem-efficient > math in
``select_sdp_backend``); a backend forced with ``torch.nn.attention.sdpa_kernel`` that cannot run
raises "No available kernel. Aborting execution." (``_fused_sdp_choice_cpp`` / sdp_utils.cpp).
"""

from __future__ import annotations

from .. import versions

#: sdpa's CUDA kernels in torch's priority order
KERNELS = ("flash", "efficient", "math")

_TORCH_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


def _name(dtype: str) -> str:
    """'bf16' or 'bfloat16' -> 'bfloat16' (torch's name, as version-rules.json spells dtypes)."""
    return _TORCH_NAMES.get(str(dtype), str(dtype))


def sdpa_refusals(dtype: str, head_dim_qk: int, head_dim_v: int, masked: bool, compute_capability: str | None,
                  gqa: bool, stack=None) -> dict[str, str]:
    """kernel -> "" when CUDA sdpa can run it on these inputs, else why not (a phrase that follows
    the kernel's name: "flash needs sm80+").

    ``dtype``: the dtype of q/k/v ("bf16" or "bfloat16", ...); ``masked``: an explicit attn_mask is
    passed; ``compute_capability``: "8.0", or None (no NVIDIA GPU: math only); ``gqa``: fewer
    key/value heads reach sdpa with ``enable_gqa=True``. Rules (sdp_utils.cpp):

    - flash: no mask (``check_for_attn_mask``), fp16/bf16 (``check_dtypes_low_precision``; rule
      ``sdpa_flash_dtypes``), sm80+ (``check_flash_attention_hardware_support``), equal q/v head
      dims <= 256 (``check_head_dim_size_flash``; the caller pads to a multiple of 8); GQA taken
      (``check_batch_size_and_num_heads_dense<true>``; rule ``sdpa_flash_gqa``);
    - mem-efficient: sm50+ (``check_mem_efficient_hardware_support``); fp16/fp32, and bf16 on sm80+
      only (``less_than_sm80_mem_efficient_dtypes`` = {Half, Float}); head dim <= 512, a multiple of
      8 in fp16/bf16 (``check_head_dim_size_mem_efficient``); no GQA
      (``check_batch_size_and_num_heads_dense<false>``; rule ``sdpa_efficient_gqa``);
    - math: always.
    """
    dt = _name(dtype)
    out = {"flash": "", "efficient": "", "math": ""}
    if compute_capability is None:
        out["flash"] = out["efficient"] = "needs an NVIDIA GPU"
        return out
    cc = float(compute_capability)
    half = dt in ("float16", "bfloat16")
    why = []
    if dt not in versions.rule("sdpa_flash_dtypes", stack):
        why.append("needs an fp16/bf16 stream")
    if head_dim_qk != head_dim_v or head_dim_qk > 256:
        why.append("needs head dim <= 256")
    if cc < 8.0:
        why.append("needs sm80+")
    if masked:
        why.append("takes no mask")
    out["flash"] = ", ".join(why)
    why = []
    if gqa and not versions.rule("sdpa_efficient_gqa", stack):
        why.append("rejects grouped-query attention")
    if cc < 5.0:
        why.append("needs sm50+")
    if dt == "bfloat16" and cc < 8.0:
        why.append("takes bf16 on sm80+ only")
    elif dt not in ("float16", "bfloat16", "float32"):
        why.append("takes fp16/bf16/fp32 only")
    if max(head_dim_qk, head_dim_v) > 512:
        why.append("needs head dim <= 512")
    elif half and (head_dim_qk % 8 or head_dim_v % 8):
        why.append("needs a head dim that is a multiple of 8 in fp16/bf16")
    out["efficient"] = ", ".join(why)
    return out


def first_kernel(refusals: dict[str, str]) -> str:
    """The kernel sdpa picks: the first of flash, efficient, math that can run."""
    return next(k for k in KERNELS if not refusals.get(k, ""))


def explicit_kernel_refusal(kind: str, refusals: dict[str, str]) -> str | None:
    """The one-line refusal of an explicit ``--attention kind`` that ``refusals``
    (``sdpa_refusals``) rule out (torch's ``sdpa_kernel([backend])`` raises "No available
    kernel" there), naming the kernel torch would pick instead; None when it can run."""
    if not refusals.get(kind, ""):
        return None
    return (f"--attention {kind}: {kind} {refusals[kind]} here, so torch's sdpa has no kernel to run; "
            f"use --attention auto (torch picks {first_kernel(refusals)} here)")
