"""The trainer's step structure on meta (issue 11): ``loraplan.train_step.StepRunner`` (the
loop's or transformers Trainer's step, with accumulation and clipping) under the tracker's
phases, with clipping run as CUDA allocates it.

Clipping runs ``clip_grad_norm_cuda`` (this module): torch/nn/utils/clip_grad.py::clip_grad_norm_
with CUDA's ``_foreach_norm`` allocation (one fp32 [N] result whose per-tensor norms are views,
aten/src/ATen/native/cuda/ForeachReduceOp.cu), since meta has no foreach kernels and would run
the per-tensor fallback (N separate scalars).
"""

from __future__ import annotations

import contextlib

from ..train_step import StepRunner


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


def meta_offload_hooks(tracker, torch):
    """A factory of the saved-tensors hooks that stand in for save_on_cpu(pin_memory=True) on
    meta (whose pack ``packed.copy_(tensor)`` cannot read a meta tensor): pack makes an
    untracked same-size tensor (the pinned host copy; its bytes are counted in
    ``tracker.offload_host_bytes`` / ``offload_host_peak_bytes``) and drops the device reference;
    unpack makes a tracked device tensor (``tensor.to(device, non_blocking=True)``)."""
    tracker.offload_host_bytes = 0
    tracker.offload_host_peak_bytes = 0

    class _Packed:
        def __init__(self, t):
            with tracker.pause():
                self.t = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, device=t.device)
            tracker.ignore(self.t)
            self.nbytes = t.numel() * t.element_size()
            tracker.offload_host_bytes += self.nbytes
            tracker.offload_host_peak_bytes = max(tracker.offload_host_peak_bytes, tracker.offload_host_bytes)

        def __del__(self):
            tracker.offload_host_bytes -= self.nbytes

    def pack(t):
        return _Packed(t)

    def unpack(p):
        return torch.empty_like(p.t)

    return lambda: torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def run_steps(model, opt, trainable, ids, labels, train, tracker, stack: list, steps: int, torch,
              autocast=None, scaler=None, model_inputs=None) -> None:
    """Run ``steps`` optimizer steps of the recipe's trainer under ``tracker`` (phases
    step<i>/forward|backward|optimizer; micro-steps repeat forward and backward)."""

    @contextlib.contextmanager
    def phase(name):
        stack.clear()  # checkpoint recompute stops early, leaving stale hook entries
        with tracker.phase(name):
            yield

    def label_state():
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    tracker.label(v, "optimizer_state")

    runner = StepRunner(model, opt, trainable, ids, labels, train, torch, phase=phase,
                        clip=lambda params, max_norm: clip_grad_norm_cuda(params, max_norm, torch),
                        after_update=label_state, autocast=autocast, scaler=scaler,
                        model_inputs=model_inputs)
    for i in range(steps):
        with tracker.phase(f"step{i + 1}"):
            runner.step()
    del runner
