"""``torch.autocast`` emulated above autograd, for tensors autocast does not run on (meta).

Autocast is a dispatch key (``Autocast`` for CUDA, ``AutocastCPU``) that sits *above*
``Autograd``: it casts an op's floating inputs, then redispatches, so autograd records each cast
(``ToCopyBackward``) and the op saves the *cast copies* it needs for backward. On meta tensors
it never runs: ``torch.autocast('cuda')`` is a no-op without CUDA and ``'meta'`` is refused
(``torch.amp.is_autocast_available('meta')`` is False), so a meta trace of a mixed-precision
step would miss every cast copy. ``EmulatedAutocast`` is a ``torch.overrides.TorchFunctionMode``,
which also runs above autograd, and applies autocast's cast policies:

- ``lower_precision_fp`` ops (linear, matmul, mm, bmm, baddbmm, addmm, einsum, sdpa, ...):
  every floating input not already in the autocast dtype is cast to it;
- ``fp32`` ops (pow, rsqrt, exp, log, layer_norm, nll_loss, ...): cast to fp32;
- ``fp32_set_opt_dtype`` ops (softmax, log_softmax, sum, cumsum, prod, ...): called with
  ``dtype=torch.float32`` when no dtype is given and the input is not fp32;
- ``promote`` ops (addcmul, addcdiv, index_put, scatter_add, ... ; CPU: cat, stack): every input
  cast to the widest input dtype.
- Eligible inputs are floating tensors other than fp64 (``is_eligible``).
- The weight-cast cache (``cached_cast``): a cast to the autocast dtype of an fp32 leaf that
  requires grad and is not a view (trainable adapter weights) is made once and reused until the
  outermost autocast region exits (``clear_cache`` at nesting 0), so those low-precision copies
  stay alive over the whole forward.
- Regions that disable autocast: transformers' ``maybe_autocast(enabled=False)`` (rotary
  embeddings) returns a null context on meta (utils/generic.py), so the loaded modeling
  modules' ``maybe_autocast`` is replaced for the duration by one that disables the emulation.
- Gradient-checkpoint recompute re-enters autocast with the state captured at the forward
  (torch/utils/checkpoint.py ``_get_autocast_kwargs`` / ``recompute_fn``); that path only
  covers real autocast devices, so ``checkpoint_context_fn`` gives torch.utils.checkpoint's
  ``context_fn`` a recompute context that re-enters this emulation as it was at the forward.

The policies are data: ``POLICIES`` holds CUDA's and CPU's op lists as read from
aten/src/ATen/autocast_mode.h (``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``,
``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_PROMOTE``, used by ``TORCH_LIBRARY_IMPL(aten,
Autocast, m)``) and autocast_mode.cpp (``TORCH_LIBRARY_IMPL(aten, AutocastCPU, m)``), torch
2.5-2.13. A TorchFunctionMode sees the Python-level call, not the aten op it becomes, so
``PY_NAMES`` maps the Python entry points transformers and peft call (``F.linear``,
``Tensor.__matmul__``, ``F.cross_entropy``, ...) to the aten op whose policy applies; a
CompositeImplicit function that is not listed but decomposes into listed ops (CUDA
``cross_entropy``: ``log_softmax`` set-opt-dtype fp32 + ``nll_loss`` fp32) is given the policy of
its first listed op. Not emulated: ops called from inside a custom kernel (bitsandbytes'
``gemm_4bit`` runs ``F.linear`` inside; its memory is ``emulation.kernel_transients``).
"""

from __future__ import annotations

import contextlib
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

_CUDA_LOWER = ("_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
               "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
               "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
               "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell",
               "rnn_relu_cell", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention")
_CUDA_FP32 = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
              "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm",
              "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
              "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
              "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
              "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
              "logsumexp", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
              "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d")
_CUDA_SET_OPT = ("prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm",
                 "sum")
_CUDA_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
                 "tensordot", "scatter_add")

_CPU_LOWER = ("conv1d", "conv2d", "conv3d", "bmm", "mm", "linalg_vecdot", "baddbmm", "addmm", "_addmm_activation",
              "addbmm", "linear", "_convolution", "matmul", "conv_tbc", "mkldnn_rnn_layer", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention",
              "_native_multi_head_attention")
_CPU_FP32 = ("avg_pool3d", "binary_cross_entropy", "grid_sampler", "polar", "prod", "quantile", "nanquantile", "stft",
             "cdist", "grid_sampler_2d", "grid_sampler_3d", "trace", "view_as_complex", "cholesky",
             "cholesky_inverse", "cholesky_solve", "inverse", "lu_solve", "orgqr", "ormqr", "pinverse", "max_pool3d",
             "max_unpool2d", "max_unpool3d", "adaptive_avg_pool3d", "reflection_pad1d", "reflection_pad2d",
             "replication_pad1d", "replication_pad2d", "replication_pad3d", "mse_loss", "cosine_embedding_loss",
             "nll_loss", "nll_loss2d", "hinge_embedding_loss", "poisson_nll_loss", "smooth_l1_loss",
             "cross_entropy_loss", "l1_loss", "huber_loss", "margin_ranking_loss", "soft_margin_loss",
             "triplet_margin_loss", "multi_margin_loss", "ctc_loss", "kl_div", "multilabel_margin_loss",
             "binary_cross_entropy_with_logits", "fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2", "fft_fftn",
             "fft_ifftn", "fft_rfft", "fft_irfft", "fft_rfft2", "fft_irfft2", "fft_rfftn", "fft_irfftn", "fft_hfft",
             "fft_ihfft", "linalg_cond", "linalg_matrix_rank", "linalg_solve", "linalg_cholesky", "linalg_svdvals",
             "linalg_eigvals", "linalg_eigvalsh", "linalg_inv", "linalg_householder_product", "linalg_tensorinv",
             "linalg_tensorsolve", "fake_quantize_per_tensor_affine", "geqrf", "_lu_with_info", "qr", "svd",
             "triangular_solve", "fractional_max_pool2d", "fractional_max_pool3d", "adaptive_max_pool3d",
             "multilabel_margin_loss_forward", "linalg_qr", "linalg_cholesky_ex", "linalg_svd", "linalg_eig",
             "linalg_eigh", "linalg_lstsq", "linalg_inv_ex")
_CPU_PROMOTE = ("stack", "cat", "index_copy")

#: device -> policy -> aten op names (aten/src/ATen/autocast_mode.h and autocast_mode.cpp, torch 2.13)
POLICIES: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {"lower_precision_fp": _CUDA_LOWER, "fp32": _CUDA_FP32, "fp32_set_opt_dtype": _CUDA_SET_OPT,
             "promote": _CUDA_PROMOTE},
    "cpu": {"lower_precision_fp": _CPU_LOWER, "fp32": _CPU_FP32, "fp32_set_opt_dtype": (), "promote": _CPU_PROMOTE},
}

#: Python entry points -> the aten op autocast sees (operators and CompositeImplicit functions)
PY_NAMES = {
    "__matmul__": "matmul", "__rmatmul__": "matmul", "__pow__": "pow", "__rpow__": "pow", "__ipow__": "pow",
    "_scaled_dot_product_efficient_attention": "scaled_dot_product_attention",
    # cross_entropy_loss (CompositeImplicit) is listed for CPU; on CUDA it decomposes into
    # log_softmax (fp32_set_opt_dtype: log_softmax(x, dtype=float) converts x to fp32 first) and
    # nll_loss (fp32): its input is used in fp32, as the fp32 policy casts it (F.cross_entropy
    # itself takes no dtype argument)
    "cross_entropy": {"cuda": "nll_loss", "cpu": "cross_entropy_loss"},
}

#: modeling modules' attribute transformers uses for autocast-disabled regions (utils/generic.py)
_MAYBE_AUTOCAST = "maybe_autocast"


def _aten_name(func, device: str) -> str:
    name = getattr(func, "__name__", "")
    if "." in name:  # torch.ops OpOverload: "mm.default"
        name = name.split(".", 1)[0]
    alias = PY_NAMES.get(name)
    if isinstance(alias, dict):
        return alias.get(device, name)
    return alias or name


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


class EmulatedAutocast(TorchFunctionMode):
    """Autocast's cast policies for ``device``'s op lists (``POLICIES``) at dtype ``dtype``,
    applied above autograd. Enter it around the forward (as ``torch.autocast`` would be);
    ``disabled()`` is a region with autocast off; ``checkpoint_context_fn`` re-enters it in a
    checkpoint's recompute. ``casts`` counts the casts made (for tests and reports)."""

    def __init__(self, dtype: torch.dtype, device: str = "cuda", cache_enabled: bool = True):
        super().__init__()
        if device not in POLICIES:
            raise ValueError(f"no autocast op lists for device {device!r}")
        self.dtype, self.device, self.cache_enabled = dtype, device, cache_enabled
        self.policy = {op: pol for pol, ops in POLICIES[device].items() for op in ops}
        self.enabled = True
        self._nesting = 0
        self._cache: dict[int, tuple] = {}
        self.casts = 0

    # -- the policies
    def _cast(self, t, dtype):
        if not _eligible(t) or t.dtype == dtype:
            return t
        can_cache = (self.cache_enabled and dtype == self.dtype and t.dtype == torch.float32 and t.requires_grad
                     and t.is_leaf and t._base is None)
        if can_cache:
            hit = self._cache.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
        self.casts += 1
        out = t.to(dtype)
        if can_cache:
            self._cache[id(t)] = (weakref.ref(t), out)
        return out

    def _map(self, x, dtype):
        if isinstance(x, torch.Tensor):
            return self._cast(x, dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(self._map(v, dtype) for v in x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        pol = self.policy.get(_aten_name(func, self.device))
        if pol == "lower_precision_fp":
            args, kwargs = self._map(args, self.dtype), {k: self._map(v, self.dtype) for k, v in kwargs.items()}
        elif pol == "fp32":
            args = self._map(args, torch.float32)
            kwargs = {k: self._map(v, torch.float32) for k, v in kwargs.items()}
        elif pol == "fp32_set_opt_dtype":
            first = args[0] if args else None
            if _eligible(first) and first.dtype != torch.float32 and kwargs.get("dtype") is None:
                kwargs = dict(kwargs, dtype=torch.float32)
        elif pol == "promote":
            ts = [t for t in _flat(args) + _flat(list(kwargs.values())) if _eligible(t)]
            if ts:
                wide = ts[0].dtype
                for t in ts[1:]:
                    wide = torch.promote_types(wide, t.dtype)
                args, kwargs = self._map(args, wide), {k: self._map(v, wide) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    # -- regions
    def __enter__(self):
        self._nesting += 1
        if self._nesting == 1:
            self._patches = _patch_maybe_autocast(self)
            return super().__enter__()
        return self

    def __exit__(self, *exc):
        self._nesting -= 1
        if self._nesting == 0:
            self._cache.clear()  # autocast_mode.cpp clear_cache() when the outermost region exits
            _unpatch(self._patches)
            return super().__exit__(*exc)
        return False

    @contextlib.contextmanager
    def disabled(self):
        """A region with autocast off (``torch.autocast(enabled=False)``)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    @contextlib.contextmanager
    def _reentered(self, enabled: bool):
        """The recompute of a checkpointed region: autocast as it was at the forward."""
        if not enabled:
            yield
            return
        with self:
            prev, self.enabled = self.enabled, True
            try:
                yield
            finally:
                self.enabled = prev

    def checkpoint_context_fn(self):
        """``torch.utils.checkpoint(context_fn=...)``: (forward context, recompute context) with
        the recompute re-entering this emulation in the state of the forward
        (torch/utils/checkpoint.py re-enters real autocast the same way)."""
        mode = self

        def context_fn():
            on = mode._nesting > 0 and mode.enabled
            return contextlib.nullcontext(), mode._reentered(on)

        return context_fn


def _flat(xs) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flat(x))
        else:
            out.append(x)
    return out


def _patch_maybe_autocast(mode: EmulatedAutocast) -> list:
    """Give every loaded transformers modeling module a ``maybe_autocast`` whose
    ``enabled=False`` regions disable the emulation (the real one returns a null context on meta
    and, with real autocast off, on CPU: transformers utils/generic.py::maybe_autocast)."""
    patched = []

    def maybe_autocast(device_type=None, dtype=None, enabled=True, cache_enabled=None):  # noqa: ARG001
        return mode.disabled() if not enabled else contextlib.nullcontext()

    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("transformers."):
            continue
        orig = getattr(mod, _MAYBE_AUTOCAST, None)
        if orig is not None and callable(orig):
            patched.append((mod, orig))
            setattr(mod, _MAYBE_AUTOCAST, maybe_autocast)
    return patched


def _unpatch(patched: list) -> None:
    for mod, orig in patched:
        setattr(mod, _MAYBE_AUTOCAST, orig)


def emulated_grad_scaler(torch_mod=torch):
    """``torch.amp.GradScaler('cuda')`` for a meta step (fp16 mixed precision): the real class, so
    its tensors are the real ones (the fp32 scale and growth tracker, per step the fp64->fp32
    inverse scale and found_inf scalars, and the in-place ``_amp_foreach_non_finite_check_and_unscale_``
    over the gradients: torch/amp/grad_scaler.py::GradScaler.unscale_, _unscale_grads_); only the
    decision to step, which reads found_inf's value (``_maybe_opt_step``: ``v.item()``), is taken
    as "no inf" since meta tensors have no values."""

    class MetaGradScaler(torch_mod.amp.GradScaler):
        def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
            return optimizer.step(*args, **kwargs)

        def update(self, new_scale=None):  # _amp_update_scale_ is in place on the two scalars
            return None

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MetaGradScaler("cuda", enabled=True)


def active() -> EmulatedAutocast | None:
    """The enabled EmulatedAutocast on the current torch-function mode stack, if any."""
    from torch.overrides import _get_current_function_mode_stack

    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, EmulatedAutocast):
            return mode if mode.enabled else None
    return None


def cast_args(op: str, *tensors):
    """``tensors`` as the active emulated autocast would hand them to aten op ``op`` (unchanged
    when none is active). For Python replacements of listed ops that dispatch never sees under
    their own name (the trace's CUDA-like sdpa, emulation.cuda_like_sdpa): CUDA autocast casts
    sdpa's inputs before the kernel is chosen, so the choice sees the autocast dtype."""
    mode = active()
    if mode is None:
        return tensors
    pol = mode.policy.get(op)
    if pol == "lower_precision_fp":
        return tuple(mode._cast(t, mode.dtype) if t is not None else None for t in tensors)
    if pol == "fp32":
        return tuple(mode._cast(t, torch.float32) if t is not None else None for t in tensors)
    return tensors
