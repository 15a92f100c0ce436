"""Loss paths other than the model's own ``ForCausalLMLoss``, for the meta trace (issue 11).

``liger``: Liger-Kernel's fused linear cross-entropy (liger_kernel transformers/model/*.py
``lce_forward`` -> loss_utils.py::LigerForCausalLMLoss -> ops/fused_linear_cross_entropy.py::
LigerFusedLinearCrossEntropyFunction; read at linkedin/Liger-Kernel main 00eba634). Its kernel
is Triton (CUDA only) and it calls ``.item()`` on the count of valid labels, so on meta it is
*emulated*: ``LigerFLCEEmulation`` is an autograd.Function that makes exactly the tensors
Liger's forward and backward make (shapes, dtypes, lifetimes), runs the same chunk loop with
the same ``torch.mm(out=)`` calls, and leaves out only what the Triton kernels do in place
(the cross-entropy kernel that turns a logits chunk into its gradient, the in-place scaling of
``grad_input``) and the ``.item()`` value (every label is valid in the protocol's batch).

``chunked``: trl 1.16's fused chunked LM head, the *real* code: ``apply_loss_path`` calls
trl/trainer/utils.py::add_fused_lm_head on the model before PEFT (SFTTrainer.__init__ patches the
PEFT model's base model the same way), and the step calls ``model(..., fused_lm_head=True)``
(``loraplan.train_step``). On CUDA the head runs trl/kernels/chunked_logprob.py's Triton path;
meta would take its torch fallback (``_forward_tile``/``_backward_tile``: fp32 copies of every
[4096, 32768] tile) and the non-compact scoring of every position, so ``fused_head_cuda`` makes
meta take the CUDA path: ``_use_triton`` is true for meta (compact scoring: ``hidden[mask]``,
``labels[mask]``, ``masked_scatter`` back; the boolean index runs through torch's meta nonzero
with every label valid, ``meta_nonzero_assume_all_nonzero``), the Triton kernels
``_forward_kernel``/``_backward_kernel`` are no-ops (they only read the tile and write in place
into the buffers the Python code allocated), ``_addmm_fp32`` is CUDA's ``torch.addmm(...,
out_dtype=float32, out=acc)`` (no fp32 copies of the tile), and ``torch.is_autocast_enabled`` /
``get_autocast_dtype`` for meta report the emulated autocast (``trace/autocast.py``), which
``ChunkedLogProbFunction.forward`` reads for its compute dtype.

``standard`` under an older ``--stack`` (``apply_loss_form``): the installed transformers computes
the loss the newest way (``loss_pad``); the version rule ``causal_lm_loss_logits`` names how older
releases held the logits, and the trace reproduces their tensors: "model_upcast" (<= 4.45
``LlamaForCausalLM.forward``: ``logits = logits.float()`` right after lm_head, so the model's output
holds fp32 logits, then the shifted ``.contiguous()`` copy and ``CrossEntropyLoss``) and
"loss_shift" (4.46-4.48 ``loss/loss_utils.py::ForCausalLMLoss``: ``logits.float()`` and the shifted
copy inside the loss, the lm_head logits in the output).
"""

from __future__ import annotations

import contextlib
import types


def apply_loss_path(model, train, torch) -> None:
    """Patch ``model`` (the transformers *ForCausalLM, before PEFT wraps it) for the recipe's
    loss: a no-op for the standard loss."""
    from ..errors import InputError
    from ..trainers import fused_lm_head_outputs, resolve_recipe

    r = resolve_recipe(train)
    if r.loss == "chunked":
        from trl.trainer.utils import add_fused_lm_head

        if getattr(model.config, "is_encoder_decoder", False):
            raise InputError(f"--loss chunked: trl's fused LM head patches decoder-only causal LMs, not "
                             f"{model.config.model_type}; use --loss standard (--trainer loop or hf)")
        # SFTTrainer.__init__: add_fused_lm_head(outputs=('log_probs', 'entropy', 'is_top1'))
        add_fused_lm_head(model, outputs=fused_lm_head_outputs(r.trainer))
        return
    if r.loss != "liger":
        return
    model.forward = types.MethodType(_liger_forward(torch), model)


def _liger_forward(torch):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    flce = _liger_function(torch)

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        """liger lce_forward in training: the backbone, then LigerForCausalLMLoss on the final
        hidden states with lm_head's weight (the logits are never made)."""
        kwargs.pop("return_dict", None)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        backbone = getattr(self, self.base_model_prefix)
        hidden = backbone(input_ids=input_ids, **kwargs)[0]
        weight = self.get_output_embeddings().weight
        # LigerForCausalLMLoss: pad the labels, shift, flatten
        padded = torch.nn.functional.pad(labels, (0, 1), value=-100)
        shift_labels = padded[..., 1:].contiguous()
        h = hidden.view(-1, hidden.shape[-1])
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = flce.apply(h, weight, shift_labels.view(-1))
        if reduction == "sum":
            loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss)

    return forward


def _liger_function(torch):
    class LigerFLCEEmulation(torch.autograd.Function):
        """LigerFusedLinearCrossEntropyFunction (reduction mean/sum, no bias, frozen weight)."""

        @staticmethod
        def forward(ctx, x, weight, target):
            BT, H = x.shape
            V = weight.shape[0]
            inc = -(-V // H)
            rows = -(-BT // inc)
            chunk = min(1 << max(rows - 1, 0).bit_length(), BT)
            grad_input = torch.zeros_like(x)
            loss_1d = torch.zeros(BT, dtype=torch.float32, device=x.device)
            target_mask = target != -100  # .sum().item(): the count (all valid here)
            logits_storage = torch.empty((chunk, V), dtype=x.dtype, device=x.device)  # _can_use_mm_out on CUDA
            for start in range(0, BT, chunk):
                end = min(start + chunk, BT)
                logits = logits_storage[: end - start]
                torch.mm(x[start:end], weight.t(), out=logits)
                # liger_cross_entropy_kernel: loss_1d[chunk] and the logits' gradient, in place
                torch.mm(logits, weight, out=grad_input[start:end])
            del logits_storage, target_mask
            loss = torch.sum(loss_1d)
            ctx.save_for_backward(grad_input.detach())
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            (grad_input,) = ctx.saved_tensors
            one = torch.tensor(1.0, device=grad_output.device)  # torch.equal(grad_output, tensor(1.0))
            del one  # then element_mul_kernel scales grad_input in place
            return grad_input, None, None

    return LigerFLCEEmulation


class _NoopKernel:
    """A Triton kernel object: ``kernel[grid](*args)`` runs nothing (the real kernel writes only
    into tensors its caller allocated)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


#: what the fused head's emulation cannot know (added to the trace's ``uncertain`` for --loss chunked)
FUSED_HEAD_UNCERTAIN = (
    "trl fused LM head (--loss chunked): run on its CUDA path with the Triton kernels as no-ops (they "
    "only write into buffers the Python code allocated); compact scoring assumes every label is valid "
    "(a batch with -100 labels scores fewer tokens: less memory); CUDA kernel-internal temporaries of "
    "boolean indexing and masked_scatter (a few bytes per token) are meta's",
)


@contextlib.contextmanager
def fused_head_cuda(train, torch):
    """While the step runs: trl's fused chunked LM head on meta takes its CUDA (Triton) path,
    allocating what CUDA allocates (see the module docstring). A no-op for other losses."""
    from ..trainers import resolve_recipe

    if resolve_recipe(train).loss != "chunked":
        yield
        return
    import torch.fx.experimental._config as fx_config
    import trl.kernels.chunked_logprob as ck
    import trl.trainer.utils as tu

    from .autocast import active

    def use_triton(device):
        return device.type in ("cuda", "xpu", "meta")

    def addmm_fp32(acc, a, b):  # chunked_logprob.py::_addmm_fp32 as it runs on CUDA, torch >= 2.8
        if a.dtype in (torch.float16, torch.bfloat16):
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.addmm_(a.float(), b.float())

    real_enabled, real_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

    def is_autocast_enabled(*args):
        if args and args[0] == "meta":
            return active() is not None
        return real_enabled(*args)

    def get_autocast_dtype(device_type):
        if device_type == "meta":
            mode = active()
            return mode.dtype if mode is not None else torch.float32
        return real_dtype(device_type)

    saved = [(torch, "is_autocast_enabled", is_autocast_enabled), (torch, "get_autocast_dtype", get_autocast_dtype),
             (fx_config, "meta_nonzero_assume_all_nonzero", True)]
    if getattr(train, "device", "cuda") != "cpu":
        # CUDA: the Triton path; on CPU (``profile --device cpu``) trl runs its torch tile fallback
        # (_forward_tile / _backward_tile, _addmm_fp32's fp32 copies), which runs on meta as it is
        saved += [(ck, "_use_triton", use_triton), (tu, "_use_triton", use_triton),
                  (ck, "_forward_kernel", _NoopKernel()), (ck, "_backward_kernel", _NoopKernel()),
                  (ck, "triton", types.SimpleNamespace(cdiv=lambda a, b: -(-a // b))),
                  (ck, "_addmm_fp32", addmm_fp32)]
    missing = object()
    prev = [(mod, name, getattr(mod, name, missing)) for mod, name, _ in saved]
    for mod, name, value in saved:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in prev:
            if value is missing:
                delattr(mod, name)
            else:
                setattr(mod, name, value)


def apply_loss_form(model, train, torch) -> None:
    """Give the PEFT-wrapped causal LM ``model`` the stack's older loss head (module docstring;
    ``loraplan.estimate.steps.lm_loss_form``); a no-op for the newest form, encoder-decoder models
    and the fused losses. The upcast is a forward hook on the (LoRA-wrapped) output embedding, as
    4.38 upcast what ``self.lm_head(hidden_states)`` returned; the shifted cross-entropy replaces
    ``loss_function`` (``PreTrainedModel.loss_function``'s setter)."""
    from ..estimate.steps import lm_loss_form, lm_loss_forms
    from ..trainers import resolve_recipe

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if resolve_recipe(train).loss != "standard" or getattr(base.config, "is_encoder_decoder", False):
        return
    form = lm_loss_form(base.config.model_type, lm_loss_forms(train.stack))
    if form == "loss_pad":
        return
    if form == "model_upcast":
        base.get_output_embeddings().register_forward_hook(lambda module, args, out: out.float())

    def shifted_cross_entropy(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
        # transformers 4.46 loss/loss_utils.py::ForCausalLMLoss and fixed_cross_entropy (4.38: the
        # same tensors inline, CrossEntropyLoss with reduction 'mean')
        logits = logits.float()
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels.to(logits.device)[..., 1:].contiguous()
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = torch.nn.functional.cross_entropy(shift_logits.view(-1, vocab_size), shift_labels.view(-1),
                                                 ignore_index=ignore_index, reduction=reduction)
        return loss / num_items_in_batch if reduction == "sum" else loss

    base.loss_function = shifted_cross_entropy
