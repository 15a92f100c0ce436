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
"""

from __future__ import annotations

import types


def apply_loss_path(model, train, torch) -> None:
    """Patch ``model`` (the transformers *ForCausalLM, before PEFT wraps it) for the recipe's
    loss: trl's fused head for ``loss == "chunked"`` (trl's only loss; a loop may apply it too),
    Liger's for ``loss == "liger"``; a no-op for the standard loss."""
    from ..trainers import resolve_recipe

    r = resolve_recipe(train)
    if r.loss == "chunked":
        apply_trl_fused_head(model, torch)
    elif r.loss == "liger":
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


# ---------------------------------------------------------------------------------------------
# trl 1.16 SFTTrainer: the fused chunked log-prob LM head
# ---------------------------------------------------------------------------------------------


def apply_trl_fused_head(model, torch) -> None:
    """Patch ``model`` (the *ForCausalLM, before PEFT) as SFTTrainer.__init__ does
    (trl/trainer/utils.py::add_fused_lm_head(outputs=("log_probs", "entropy", "is_top1"))) so
    that ``model(..., fused_lm_head=True)`` runs the fused head.

    The head's own autograd.Function is trl's real ``ChunkedLogProbFunction``
    (trl/kernels/chunked_logprob.py) with its Triton tile kernels replaced by no-ops (the CUDA
    kernels fold each [4096, 32768] logits tile in place and allocate nothing; the torch
    fallback that meta would run allocates temporaries per tile). Around it, the CUDA ("compact")
    path of ``_fused_forward`` is emulated, because it indexes by a boolean mask, which meta
    cannot (data-dependent shape): ``hidden_states[mask]`` / ``labels[mask]`` and
    ``new_zeros(mask.shape).masked_scatter(mask, x)`` become autograd Functions that make the
    same tensors, with every label valid (N = b·(s−1) rows), as in the protocol's batch."""
    from trl.kernels import chunked_logprob as ck
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput

    class FusedHeadOnMeta(ck.ChunkedLogProbFunction):
        """trl's ChunkedLogProbFunction, forward and backward run as they are, inside
        ``_no_tile_kernels`` (backward runs later, during loss.backward())."""

        @staticmethod
        def forward(ctx, *args):
            with _no_tile_kernels(ck):
                return ck.ChunkedLogProbFunction.forward(ctx, *args)

        @staticmethod
        def backward(ctx, *grads):
            with _no_tile_kernels(ck):
                return ck.ChunkedLogProbFunction.backward(ctx, *grads)

    flce = FusedHeadOnMeta
    gather, scatter = _all_valid_index(torch), _all_valid_scatter(torch)
    original_forward = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "return_dict"}
        out = getattr(self, "base_model")(*args, **kwargs)
        hidden_states = out.last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        lm_head = self.get_output_embeddings()
        mask = labels != -100
        per_token = flce.apply(gather.apply(hidden_states, mask), lm_head.weight, None, gather.apply(labels, mask),
                               1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy", "is_top1"))
        per_token = (None if x is None else scatter.apply(x, mask) for x in per_token)
        log_probs, entropy, _, _, is_top1 = per_token
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


class _no_tile_kernels:
    """For the duration: trl's torch tile folds become no-ops (the Triton kernels they stand in
    for work in place), and the autocast queries trl makes for the tensors' device ask about
    "cuda" when the device is meta (autocast has no meta state; the CUDA one is the GPU's)."""

    def __init__(self, ck):
        self.ck = ck

    def __enter__(self):
        torch = self.ck.torch
        self.saved = (self.ck._forward_tile, self.ck._backward_tile, self.ck._addmm_fp32, torch.is_autocast_enabled,
                      torch.get_autocast_dtype)
        self.ck._forward_tile = self.ck._backward_tile = lambda *a, **k: None
        # CUDA (torch >= 2.8, half inputs): addmm(out_dtype=float32, out=acc) in place; meta would
        # run the fallback acc.addmm_(a.float(), b.float()) with two fp32 tile copies
        self.ck._addmm_fp32 = lambda acc, a, b: None
        enabled, dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
        torch.is_autocast_enabled = lambda *a: enabled(*["cuda" if x == "meta" else x for x in a])
        torch.get_autocast_dtype = lambda d: dtype("cuda" if d == "meta" else d)

    def __exit__(self, *exc):
        torch = self.ck.torch
        (self.ck._forward_tile, self.ck._backward_tile, self.ck._addmm_fp32, torch.is_autocast_enabled,
         torch.get_autocast_dtype) = self.saved
        return False


def _all_valid_index(torch):
    class AllValidIndex(torch.autograd.Function):
        """``x[mask]`` with every mask element True: a new [N, ...] tensor; backward
        (IndexBackward: index_put into zeros of x's shape) a new tensor of x's shape."""

        @staticmethod
        def forward(ctx, x, mask):
            ctx.shape = x.shape
            ctx.save_for_backward(mask)  # IndexBackward keeps the indices
            return x.reshape((-1,) + tuple(x.shape[mask.dim():])).clone()

        @staticmethod
        def backward(ctx, g):
            return g.new_zeros(ctx.shape), None

    return AllValidIndex


def _all_valid_scatter(torch):
    class AllValidScatter(torch.autograd.Function):
        """``x.new_zeros(mask.shape).masked_scatter(mask, x)``: the zeros, then a new tensor of
        mask's shape; backward (masked_scatter's source gradient) ``grad.masked_select(mask)``:
        a new [N] tensor."""

        @staticmethod
        def forward(ctx, x, mask):
            ctx.save_for_backward(mask)  # masked_scatter's backward keeps the mask
            zeros = x.new_zeros(mask.shape)
            out = torch.empty_like(zeros)
            del zeros
            return out

        @staticmethod
        def backward(ctx, g):
            return g.new_empty(g.numel()), None

    return AllValidScatter
