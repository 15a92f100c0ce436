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
    loss: a no-op for the standard loss."""
    from ..trainers import resolve_recipe

    if resolve_recipe(train).loss != "liger":
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
