"""The step structure a trainer runs around the model, on meta: checkpointing variant, gradient
accumulation, gradient clipping, and what outlives a micro-step (issue 11).

Two step loops, chosen by the resolved recipe's ``trainer`` (``loraplan.trainers.resolve_recipe``):

- ``loop`` (the H100 protocol): ``loss = model(ids, labels=ids).loss`` (divided by the
  accumulation count when > 1), ``loss.backward()`` per micro-step; then clipping when
  ``max_grad_norm > 0``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``. ``loss`` stays bound
  to the last micro-step's graph until the next forward returns, as in the protocol.
- ``hf`` / ``trl``: transformers trainer.py::Trainer._inner_training_loop and ::training_step
  as they run for one device: per micro-step ``training_step`` computes the loss
  (``compute_loss``: ``model(**inputs, num_items_in_batch=...)``; PEFT causal-LM models accept
  loss kwargs, so the model's ForCausalLMLoss sums and divides by ``num_items_in_batch`` and
  Trainer does not divide again), ``accelerator.backward(loss)`` and returns ``loss.detach()``:
  the graph dies when ``training_step`` returns, so nothing of a micro-step's graph survives into
  the next forward (unlike the loop). At the sync step: ``accelerator.clip_grad_norm_`` when
  ``max_grad_norm > 0`` (else ``_get_grad_norm`` computes the norm anyway with max_norm=inf),
  ``optimizer.step()``, ``model.zero_grad()`` (set_to_none=True).
  This is an emulation of those two functions, not the Trainer object: Trainer.__init__ moves the
  model to the device (``_move_model_to_device``: meta tensors cannot be copied) and builds an
  Accelerator and data loaders the step does not need. What it runs is exactly their tensor
  operations; the scalar bookkeeping (``tr_loss`` sums, ``.item()``) allocates 512 B blocks that
  are kept as Trainer keeps them (``num_items_in_batch``, ``tr_loss``).

Clipping runs ``clip_grad_norm_cuda`` (this module): torch/nn/utils/clip_grad.py::clip_grad_norm_
with CUDA's ``_foreach_norm`` allocation (one fp32 [N] result whose per-tensor norms are views,
aten/src/ATen/native/cuda/ForeachReduceOp.cu), since meta has no foreach kernels and would run
the per-tensor fallback (N separate scalars).
"""

from __future__ import annotations

from typing import Any

from ..trainers import resolve_recipe


def checkpoint_kwargs(train) -> dict[str, Any]:
    """``gradient_checkpointing_kwargs`` of the resolved recipe: {'use_reentrant': bool}."""
    return {"use_reentrant": bool(resolve_recipe(train).reentrant)}


def apply_checkpoint_layout(model, train) -> None:
    """Checkpoint only every n-th decoder layer (transformers 5.24 modeling_utils.py::
    _activation_checkpointing_enable(every_n_layers=n): GradientCheckpointingLayer number i is
    checkpointed when i % n == 0, counted over all such layers in module order). A no-op for
    n = 1 (what prepare_model_for_kbit_training / gradient_checkpointing_enable already set)."""
    r = resolve_recipe(train)
    if not train.gradient_checkpointing or r.checkpoint_every_n_layers == 1:
        return
    model._activation_checkpointing_enable(checkpoint_kwargs(train), every_n_layers=r.checkpoint_every_n_layers)


def clip_grad_norm_cuda(parameters, max_norm: float, torch):
    """torch.nn.utils.clip_grad_norm_(parameters, max_norm) (norm_type 2, foreach) with the
    allocations of its CUDA path, for meta tensors; returns the total norm (fp32 scalar).

    _get_total_norm: ``torch._foreach_norm(grads)`` (CUDA: one fp32 [N] output, the N norms are
    its views), ``torch.stack`` of them (fp32 [N]), ``linalg.vector_norm`` (scalar);
    _clip_grads_with_norm_: ``max_norm / (total + 1e-6)`` (two scalars), ``clamp(max=1)``
    (a scalar), ``_foreach_mul_(grads, coef)`` in place. Grads are grouped per (device, dtype):
    one foreach call per group."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0, device="meta")
    groups: dict[tuple, list] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for gs in groups.values():
        buf = torch.empty(len(gs), dtype=torch.float32, device=gs[0].device)  # _foreach_norm's output
        norms.extend(buf.unbind(0))
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    del norms, buf
    coef = max_norm / (total + 1e-6)
    coef = torch.clamp(coef, max=1.0)
    for gs in groups.values():
        torch._foreach_mul_(gs, coef)
    return total


def run_steps(model, opt, trainable, ids, labels, train, tracker, stack: list, steps: int, torch) -> None:
    """Run ``steps`` optimizer steps of the recipe's trainer under ``tracker`` (phases
    step<i>/forward|backward|optimizer; micro-steps repeat forward and backward)."""
    r = resolve_recipe(train)
    ga = r.gradient_accumulation
    clip = float(r.max_grad_norm or 0.0)

    def label_state():
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    tracker.label(v, "optimizer_state")

    if r.trainer == "loop":
        loss = None
        for i in range(steps):
            with tracker.phase(f"step{i + 1}"):
                for _ in range(ga):
                    with tracker.phase("forward"):
                        stack.clear()  # checkpoint recompute stops early, leaving stale hook entries
                        loss = model(input_ids=ids, labels=labels).loss
                        if ga > 1:
                            loss = loss / ga
                    with tracker.phase("backward"):
                        stack.clear()
                        loss.backward()
                with tracker.phase("optimizer"):
                    if clip > 0:
                        clip_grad_norm_cuda(trainable, clip, torch)
                    opt.step()
                    label_state()
                    opt.zero_grad(set_to_none=True)
        del loss
        return

    # transformers Trainer: get_batch_samples counts the label tokens of the accumulated batch
    # once per optimizer step (a device scalar, alive through the micro-steps)
    tr_loss = torch.zeros((), device="meta")  # Trainer._tr_loss
    loss_kwargs = _accepts_loss_kwargs(model)
    for i in range(steps):
        with tracker.phase(f"step{i + 1}"):
            num_items = labels.ne(-100).sum() * ga if loss_kwargs else None  # over the ga micro-batches
            for _ in range(ga):
                tr_loss += _training_step(model, ids, labels, num_items, ga, tracker, stack)
            with tracker.phase("optimizer"):
                grad_norm = clip_grad_norm_cuda(model.parameters(), clip if clip > 0 else float("inf"), torch)
                del grad_norm  # _get_grad_norm returns grad_norm.item()
                opt.step()
                label_state()
                model.zero_grad()
            del num_items


def _accepts_loss_kwargs(model) -> bool:
    """Trainer.__init__'s ``model_accepts_loss_kwargs``: the unwrapped (PEFT-free) model's
    ``accepts_loss_kwargs``, else whether its forward takes ``**kwargs``."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "accepts_loss_kwargs"):
        return bool(inner.accepts_loss_kwargs)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(inner.forward).parameters.values())


def _training_step(model, ids, labels, num_items, ga, tracker, stack):
    """Trainer.training_step: compute_loss, (loss / ga unless the model scaled it by
    num_items_in_batch), accelerator.backward, return loss.detach(); the graph (``loss``,
    ``outputs``) dies on return."""
    with tracker.phase("forward"):
        stack.clear()
        if num_items is not None:
            loss = model(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
        else:
            loss = model(input_ids=ids, labels=labels).loss
            if ga > 1:
                loss = loss / ga
    with tracker.phase("backward"):
        stack.clear()
        loss.backward()
    return loss.detach()
