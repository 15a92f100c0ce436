"""One optimizer step as each trainer runs it (issue 11), shared by the meta trace
(``loraplan.trace.steps``) and the real bursts (``loraplan.profile.burst``), so the two run
the same step structure. Imports torch lazily.

- ``loop`` (the H100 protocol): per micro-step ``loss = model(ids, labels=ids).loss`` (divided by
  the accumulation count k when k > 1) and ``loss.backward()``; then ``clip_grad_norm_`` when
  ``max_grad_norm > 0``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``. ``loss`` stays
  bound to the last micro-step's graph until the next forward returns, as in the protocol.
- ``hf`` / ``trl``: transformers trainer.py::Trainer._inner_training_loop and ::training_step
  for one device. ``get_batch_samples`` counts the label tokens of the k micro-batches once per
  optimizer step (``num_items_in_batch``, a device scalar); each ``training_step`` runs
  ``compute_loss`` (``model(**inputs, num_items_in_batch=...)`` when the model accepts loss
  kwargs: its ForCausalLMLoss sums and divides, and Trainer does not divide again; otherwise
  ``loss / k``), ``accelerator.backward(loss)`` and returns ``loss.detach()``: the graph dies at
  the end of the micro-step. At the sync step ``accelerator.clip_grad_norm_`` (torch's
  ``clip_grad_norm_``) with ``max_grad_norm``, or with inf when it is 0 (``_get_grad_norm``
  logs the norm anyway), ``optimizer.step()``, ``model.zero_grad()`` (set_to_none=True).
  An emulation of those two functions, not the Trainer object: Trainer.__init__ moves the model
  to its device (meta tensors cannot be copied) and builds an Accelerator and data loaders the
  step does not use.
- ``trl``: the same Trainer step with trl 1.16's SFTTrainer.compute_loss (sft_trainer.py, loss_type
  nll, no compute_loss_func / label smoothing): ``outputs = model(**inputs, use_cache=False,
  fused_lm_head=True)`` (the fused chunked LM head add_fused_lm_head installed, trl/trainer/
  utils.py), ``loss = (-outputs.log_probs).sum() / as_tensor(num_items_in_batch).clamp(min=1)``,
  then its metrics: ``label_mask.sum()``, ``entropy.detach().sum()``, ``is_top1.sum()`` through
  ``accelerator.gather_for_metrics`` (one process: the tensor itself) and ``.sum()``, the two
  quotients and their ``.item()`` (a value, not memory: left out on meta), and the token count
  ``attention_mask.sum()`` (the batch has no padding: the count of ``input_ids``' elements).
  Emulated, not run: SFTTrainer cannot be built on meta (Trainer.__init__ moves the model to
  its device). SFTTrainer.training_step only adds ``maybe_activation_offload_context`` (a null
  context unless activation_offloading).
- ``loss == "chunked"`` under the loop: the loop calls add_fused_lm_head itself and takes
  ``model(input_ids=ids, labels=ids, fused_lm_head=True).loss`` (the fused head's own
  ``-log_probs.sum() / mask.sum().clamp(min=1)``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

from .errors import InputError
from .trainers import resolve_recipe


def check_supported(train, runner: str = "trace") -> None:
    """Refuse what the step runner cannot run faithfully (one line, with the fix): trl with Liger
    (SFTTrainer 1.16 refuses it: it patches the LM head itself); ``runner="burst"`` (real steps):
    Liger's loss needs liger_kernel's Triton kernels, which the burst does not apply; checkpoint
    offload on a CPU burst has nothing to offload."""
    r = resolve_recipe(train)
    if r.trainer == "trl" and r.loss == "liger":
        raise InputError("--trainer trl with --loss liger: SFTTrainer 1.16 refuses Liger's fused linear "
                         "cross-entropy (it patches the LM head itself); use --loss standard")
    if r.loss == "liger" and runner == "burst":
        raise InputError("--loss liger: the profile burst runs the model's own loss (Liger's Triton kernels are "
                         "not applied); use --trace or --method analytic for Liger")
    if r.checkpoint_offload and runner == "burst" and getattr(train, "device", "cuda") == "cpu":
        raise InputError("--checkpoint-offload on --device cpu: there is no device memory to offload from "
                         "(save_on_cpu would copy host to host); drop it or run on a GPU")


def torch_dtype(name: str):
    """bf16 | fp16 | fp32 | int8 -> the torch dtype (``storage.TORCH_DTYPE_NAMES``); shared by the
    trace and the bursts."""
    import torch

    from .storage import TORCH_DTYPE_NAMES

    return getattr(torch, TORCH_DTYPE_NAMES[name])


def fsdp_mixed_precision(train, version: int):
    """The FSDP mixed-precision policy accelerate builds from the resolved ``mixed_precision``
    bf16 / fp16 (accelerate 1.15 state.py: ``fsdp_plugin.set_mixed_precision(mixed_precision)``
    unless it is "no"; utils/dataclasses.py::FullyShardedDataParallelPlugin.set_mixed_precision):
    FSDP1 ``MixedPrecision(param_dtype=d, reduce_dtype=d, buffer_dtype=d)``, FSDP2
    ``MixedPrecisionPolicy(param_dtype=d, reduce_dtype=d, output_dtype=d)``; None without mixed
    precision and under ``--trainer loop``, a plain PyTorch loop that wraps with torch's defaults
    (``mixed_precision=None``) and runs its forward under ``torch.autocast`` (as the bursts do,
    profile/distributed.py::wrap_model). FSDP then all-gathers every unit in ``d`` whatever dtype its
    shards are stored in (an fp32-loaded base keeps fp32 shards: _flat_param.py::FlatParamHandle.
    _init_param_reduce_dtypes, ``_use_low_precision_shard``; FSDP2 _fsdp_param.py::FSDPParam.
    all_gather_inputs). The analytic side of the same rule: ``estimate.parallel.compute_train``."""
    from .trainers import resolve_recipe

    r = resolve_recipe(train)
    mp = r.mixed_precision
    if r.trainer == "loop" or mp not in ("bf16", "fp16"):
        return None
    d = torch_dtype(mp)
    if int(version) == 1:
        from torch.distributed.fsdp import MixedPrecision

        return MixedPrecision(param_dtype=d, reduce_dtype=d, buffer_dtype=d)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=d, reduce_dtype=d, output_dtype=d)


def checkpoint_kwargs(train) -> dict[str, Any]:
    """``gradient_checkpointing_kwargs`` of the resolved recipe: {'use_reentrant': bool}."""
    return {"use_reentrant": bool(resolve_recipe(train).reentrant)}


def apply_checkpoint_layout(model, train, kwargs: dict | None = None, offload_hooks=None) -> None:
    """Checkpoint only every n-th layer and/or offload the checkpoints' inputs (transformers 5.24
    modeling_utils.py::_activation_checkpointing_enable(every_n_layers=n, offload=...):
    GradientCheckpointingLayer number i is checkpointed when i % n == 0, counted over all such
    layers in module order; offload runs each checkpoint under
    ``torch.autograd.graph.save_on_cpu(pin_memory=True)``). A no-op for n = 1 without offload
    (what prepare_model_for_kbit_training / gradient_checkpointing_enable already set).
    ``offload_hooks``: a factory of the saved-tensors-hooks context to use instead of
    save_on_cpu (the meta trace's emulation, which cannot copy meta tensors to the host);
    ``kwargs``: the checkpoint kwargs (default ``checkpoint_kwargs(train)``; the trace adds its
    autocast emulation's ``context_fn``)."""
    r = resolve_recipe(train)
    n, offload = r.checkpoint_every_n_layers, bool(r.checkpoint_offload)
    if not r.gradient_checkpointing or (n == 1 and not offload):
        return
    ckw = kwargs or checkpoint_kwargs(train)
    if offload and offload_hooks is not None:
        import functools

        from torch.utils.checkpoint import checkpoint

        def checkpoint_func(function, *args, **kwargs):
            with offload_hooks():
                return checkpoint(function, *args, **kwargs)

        model._set_gradient_checkpointing(enable=True, every_n_layers=n,
                                          gradient_checkpointing_func=functools.partial(checkpoint_func,
                                                                                        **ckw))
        return
    model._activation_checkpointing_enable(ckw, every_n_layers=n, offload=offload)


def accepts_loss_kwargs(model) -> bool:
    """Trainer.__init__'s ``model_accepts_loss_kwargs``: the unwrapped (PEFT-free) model's
    ``accepts_loss_kwargs``, else whether its forward takes ``**kwargs``; a DDP / FSDP1 wrapper is looked
    through (``.module``): Trainer asks before accelerate wraps the model."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)):
        model = model.module
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "accepts_loss_kwargs"):
        return bool(inner.accepts_loss_kwargs)
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(inner.forward).parameters.values())


class StepRunner:
    """Runs optimizer steps of the recipe's trainer: ``runner.step()`` one at a time.

    ``phase(name)``: a context manager around each "forward", "backward" and "optimizer" part
    (the trace's tracker phases, the burst's probes); ``clip(params, max_norm)``: the
    clip_grad_norm_ to call (the real one, or the trace's CUDA emulation); ``after_update()``:
    called after ``opt.step()`` (the trace labels the optimizer state). ``autocast``: the
    context the forward runs under for mixed precision (``torch.autocast``, or the trace's
    ``EmulatedAutocast``); ``scaler``: fp16's ``GradScaler`` (loss scaled before backward,
    gradients unscaled before clipping, ``scaler.step``/``update``: accelerate's order,
    accelerate/accelerator.py::Accelerator.backward / clip_grad_norm_). ``model_inputs``: what
    goes into every forward beside ``input_ids`` and ``labels`` (a padded batch's
    ``attention_mask``, packed rows' ``position_ids``).
    """

    def __init__(self, model, opt, trainable, ids, labels, train, torch,
                 phase: Callable[[str], Any] | None = None, clip: Callable | None = None,
                 after_update: Callable[[], None] | None = None, autocast=None, scaler=None,
                 model_inputs: dict | None = None):
        r = resolve_recipe(train)
        self.model, self.opt, self.trainable, self.ids, self.labels, self.torch = (
            model, opt, trainable, ids, labels, torch)
        self.trainer, self.ga, self.max_norm = r.trainer, int(r.gradient_accumulation), float(r.max_grad_norm or 0.0)
        self.phase = phase or (lambda name: contextlib.nullcontext())
        self.clip = clip or torch.nn.utils.clip_grad_norm_
        self.after_update = after_update or (lambda: None)
        self.loss = None  # the loop's `loss`: the last graph, alive until the next forward returns
        #: the loop's `outputs` (``--loop-outputs``): "dropped" never binds it
        self.outputs_kept = r.loop_outputs or "dropped"
        self.outputs = None
        self.loss_kwargs = self.trainer != "loop" and accepts_loss_kwargs(model)
        self.tr_loss = None  # Trainer._tr_loss
        #: trl's fused chunked LM head in the loop (``--loss chunked``: add_fused_lm_head applied)
        self.fused = {"fused_lm_head": True} if r.loss == "chunked" else {}
        self.autocast = autocast
        self.scaler = scaler
        self.inputs = dict(model_inputs or {})

    def _forward_context(self):
        return self.autocast if self.autocast is not None else contextlib.nullcontext()

    def _backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _update(self, clip_params, max_norm: float) -> None:
        """Clip (after unscaling fp16 grads), step and update the scale."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if max_norm is not None:
            grad_norm = self.clip(clip_params, max_norm)
            del grad_norm  # Trainer: _get_grad_norm returns grad_norm.item()
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()

    def step(self) -> None:
        if self.trainer == "loop":
            self._loop_step()
        else:
            self._trainer_step()

    def last_loss(self) -> float | None:
        t = self.loss if self.trainer == "loop" else self.tr_loss
        return None if t is None or t.is_meta else float(t.detach().float().item())

    def _loop_step(self) -> None:
        """``--loop-outputs``: "dropped" ``loss = model(...).loss``; otherwise ``outputs =
        model(...)`` (rebound when the next forward returns), and "micro-step" sets ``outputs =
        None`` at the end of each micro-step, after the optimizer step on the last (AnswerDotAI
        fsdp_qlora train.py's order)."""
        for i in range(self.ga):
            with self.phase("forward"):
                with self._forward_context():
                    out = self.model(input_ids=self.ids, labels=self.labels, **self.inputs, **self.fused)
                    if self.outputs_kept != "dropped":
                        self.outputs = out
                    self.loss = out.loss
                    del out
                if self.ga > 1:
                    self.loss = self.loss / self.ga
            with self.phase("backward"):
                self._backward(self.loss)
            if i == self.ga - 1:
                with self.phase("optimizer"):
                    self._update(self.trainable, self.max_norm if self.max_norm > 0 else None)
                    self.after_update()
                    self.opt.zero_grad(set_to_none=True)
            if self.outputs_kept == "micro-step":
                self.outputs = None

    def _trainer_step(self) -> None:
        torch = self.torch
        if self.tr_loss is None:
            self.tr_loss = torch.zeros((), device=self.ids.device)
        num_items = self.labels.ne(-100).sum() * self.ga if self.loss_kwargs else None
        for _ in range(self.ga):
            self.tr_loss += self._training_step(num_items)
        with self.phase("optimizer"):
            self._update(list(self.model.parameters()), self.max_norm if self.max_norm > 0 else float("inf"))
            self.after_update()
            self.model.zero_grad()
        del num_items

    def _training_step(self, num_items):
        """Trainer.training_step: the graph (``loss``, ``outputs``) dies on return."""
        with self.phase("forward"):
            with self._forward_context():  # Trainer.compute_loss under accelerate's autocast
                if self.trainer == "trl":
                    loss = self._sft_compute_loss(num_items)
                elif num_items is not None:
                    loss = self.model(input_ids=self.ids, labels=self.labels, num_items_in_batch=num_items,
                                      **self.inputs).loss
                else:
                    loss = self.model(input_ids=self.ids, labels=self.labels, **self.inputs).loss
            if self.trainer != "trl" and num_items is None and self.ga > 1:
                loss = loss / self.ga
        with self.phase("backward"):
            self._backward(loss)
        return loss.detach()

    def _sft_compute_loss(self, num_items):
        """trl 1.16 SFTTrainer.compute_loss (see the module docstring); returns the loss."""
        torch = self.torch
        kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
        outputs = self.model(input_ids=self.ids, labels=self.labels, use_cache=False, fused_lm_head=True,
                             **kwargs, **self.inputs)
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        num_tokens = outputs.label_mask.sum() if num_items is None else num_items
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        del per_token_loss, num_tokens
        # metrics: gather_for_metrics(x) is x on one process; .item() of the quotients
        num_valid = outputs.label_mask.sum().sum()
        entropy_sum = outputs.entropy.detach().sum().sum()
        num_correct = outputs.is_top1.sum().sum()
        metrics = (entropy_sum / num_valid, num_correct / num_valid)
        del metrics, num_valid, entropy_sum, num_correct
        tokens = torch.tensor(self.ids.numel(), device=self.ids.device).sum()  # attention_mask.sum(): no padding
        del tokens, outputs
        return loss
