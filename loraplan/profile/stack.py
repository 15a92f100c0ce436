"""The training stack of a burst: the recipe (``loraplan.trainers.resolve_recipe``) applied to a
loaded model, and the burst's steps run by a plain loop or by the real ``transformers.Trainer`` /
``trl.SFTTrainer`` (needs the ``[profile]`` extra; imported by the worker only).

Every step is marked with the same phases whoever runs it (:class:`StepMarks`): step 1 is split
into ``first_forward`` (the first micro-batch's forward), ``first_backward`` (from there to the
optimizer step: its backward, the other micro-batches of an accumulation, gradient clipping) and
``first_optimizer_step`` (``optimizer.step()`` and ``zero_grad``); later steps are one phase each.
Under a Trainer the marks come from a ``TrainerCallback`` (``on_step_begin``,
``on_pre_optimizer_step``, ``on_step_end``; transformers ``trainer.py::Trainer._inner_training_loop``
calls them in that order, clipping before ``on_pre_optimizer_step``) and a forward hook on the model.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

from .. import train_step
from ..train_step import torch_dtype

#: loraplan optimizer names -> ``TrainingArguments.optim`` (transformers training_args.py::OptimizerNames)
TRAINER_OPTIM = {"adamw": "adamw_torch", "sgd": "sgd", "adamw_8bit": "adamw_bnb_8bit",
                 "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit"}
#: memory phases of step 1 (burst.MEMORY_PHASES[3:])
STEP1_PHASES = ("first_forward", "first_backward", "first_optimizer_step")


def burst_recipe(train: dict):
    """The resolved ``TrainSpec`` of a worker spec's ``train`` dict (unknown keys ignored; a
    missing recipe field is its trainer's default, ``loraplan.trainers.resolve_recipe``)."""
    from dataclasses import fields

    from ..spec import TrainSpec
    from ..trainers import resolve_recipe

    names = {f.name for f in fields(TrainSpec)}
    kw = {k: v for k, v in train.items() if k in names}
    if isinstance(kw.get("stack"), list):  # JSON turned the ((lib, version), ...) pairs into lists
        kw["stack"] = tuple(tuple(p) for p in kw["stack"])
    return resolve_recipe(TrainSpec(**kw))


def checkpoint_kwargs(r) -> dict[str, Any]:
    """``gradient_checkpointing_kwargs`` of the recipe: ``use_reentrant`` always (given, so no library
    default decides it); ``every_n_layers`` / ``offload`` only when not the default, as
    ``activation_checkpointing_enable`` takes them (transformers 5 modeling_utils.py)."""
    kw = train_step.checkpoint_kwargs(r)
    if int(r.checkpoint_every_n_layers) != 1:
        kw["every_n_layers"] = int(r.checkpoint_every_n_layers)
    if r.checkpoint_offload:
        kw["offload"] = True
    return kw


def enable_checkpointing(model, r) -> None:
    """``model.gradient_checkpointing_enable`` with the recipe's kwargs (``use_reentrant`` to
    torch.utils.checkpoint; ``every_n_layers``/``offload`` as keyword arguments), then
    ``enable_input_require_grads`` (frozen embeddings: the checkpointed input must need grad)."""
    kw = checkpoint_kwargs(r)
    extra = {k: kw.pop(k) for k in ("every_n_layers", "offload") if k in kw}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **extra)
    model.enable_input_require_grads()


def cast_adapters(model, dtype_name: str) -> int:
    """Trainable parameters of ``model`` cast to ``dtype_name`` in place (``param.data = ...``, as
    trl's SFTTrainer casts QLoRA adapters); returns how many changed."""
    dt = torch_dtype(dtype_name)
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != dt:
            p.data = p.data.to(dt)
            n += 1
    return n


def param_dtypes(model) -> dict[str, dict[str, int]]:
    """{"trainable"|"frozen": {dtype: elements}} of ``model``'s parameters (what the recipe's
    load/adapter dtypes and prepare_kbit made of them)."""
    out: dict[str, dict[str, int]] = {"trainable": {}, "frozen": {}}
    for p in model.parameters():
        d = out["trainable" if p.requires_grad else "frozen"]
        k = str(p.dtype).replace("torch.", "")
        d[k] = d.get(k, 0) + int(p.numel())
    return out


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


class StepMarks:
    """Phase marks and step peaks of a burst's steps (the records' ``memory.phases`` and
    ``memory.step_peaks``, ``time.step_s``); the same calls whoever runs the step."""

    def __init__(self, phase: Callable[[str], None], probe, record_mem: Callable[[str, dict], None], mem: dict,
                 emit: Callable[[dict], None]) -> None:
        self.phase, self.probe, self.record_mem, self.mem, self.emit = phase, probe, record_mem, mem, emit
        self.i = 0
        self.open: str | None = None
        self.t0 = 0.0
        self.step_s: list[float] = []
        self.optimizer_steps = 0
        self.micro_steps = 0
        self.loss = None
        #: input_ids shape of the first micro-batch (what padding made of the rows)
        self.input_shape: list[int] | None = None

    def step_begin(self) -> None:
        self.i += 1
        self.probe.synchronize()
        self.t0 = time.perf_counter()
        if self.i == 1:
            self._begin("first_forward")
        else:
            if self.i == 2:
                self.phase("steps")
            self.open = f"step_{self.i}"
            self.probe.begin(self.open)

    def _begin(self, name: str) -> None:
        self.phase(name)
        self.probe.begin(name)
        self.open = name

    def _end_first(self, name: str) -> dict:
        m = self.probe.end(name)
        self.record_mem(name, m)
        return m

    def forward_end(self, loss=None, input_ids=None) -> None:
        self.micro_steps += 1
        if self.input_shape is None and input_ids is not None:
            self.input_shape = list(input_ids.shape)
        if loss is not None:
            self.loss = loss.detach()
        if self.open == "first_forward":
            self._end_first("first_forward")
            self._begin("first_backward")

    def optimizer_begin(self) -> None:
        self.optimizer_steps += 1
        if self.open == "first_backward":
            self._end_first("first_backward")
            self._begin("first_optimizer_step")

    def step_end(self) -> None:
        if self.i == 1:
            m = self._end_first("first_optimizer_step")
            phases = self.mem["phases"]
            peak = {k: max(phases[p].get(k, 0) for p in STEP1_PHASES if p in phases)
                    for k in m if k.startswith("max_") or k.startswith("nvml_")}
        else:
            peak = self.probe.end(self.open)
        self.open = None
        self.probe.synchronize()
        self.step_s.append(time.perf_counter() - self.t0)
        self.mem["step_peaks"].append(peak)
        self.emit({"ev": "step", "step": self.i, "s": self.step_s[-1],
                   "max_allocated_bytes": peak.get("max_allocated_bytes")})


# ---- the plain loop --------------------------------------------------------------------------

def loop_steps(model, opt, r, batch: dict, steps: int, marks: StepMarks, device: str, vocab: int) -> None:
    """``steps`` optimizer steps of the plain loop with the recipe, run by the step runner the
    trace runs (``loraplan.train_step.StepRunner``: ``r.gradient_accumulation`` micro-steps of
    forward under ``torch.autocast`` for bf16/fp16 and backward (GradScaler for fp16), clipping,
    ``opt.step()``, ``opt.zero_grad(set_to_none=True)``; ``loss`` stays alive into the next
    forward, as in the H100 protocol). ``marks`` records the phases."""
    import torch

    from ..train_step import StepRunner

    dev_type = "cuda" if device == "cuda" else "cpu"
    amp = (torch.autocast(dev_type, dtype=torch_dtype(r.mixed_precision))
           if r.mixed_precision in ("bf16", "fp16") else None)
    scaler = torch.amp.GradScaler(dev_type) if r.mixed_precision == "fp16" else None
    ids = batch["input_ids"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    runner = None

    @contextlib.contextmanager
    def phase(name: str):
        if name == "optimizer":
            marks.optimizer_begin()
        yield
        if name == "forward":
            marks.forward_end(runner.loss, ids)

    runner = StepRunner(model, opt, [p for p in model.parameters() if p.requires_grad], ids, batch["labels"], r,
                        torch, phase=phase, autocast=amp, scaler=scaler, model_inputs=extra)
    for _ in range(steps):
        marks.step_begin()
        runner.step()
        marks.step_end()


def _callback(marks: StepMarks):
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        """Step boundaries of Trainer._inner_training_loop -> StepMarks."""

        def on_step_begin(self, args, state, control, **kw):
            marks.step_begin()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            marks.optimizer_begin()

        def on_step_end(self, args, state, control, **kw):
            marks.step_end()

    return Marks()


def _forward_hook(marks: StepMarks):
    def hook(module, args, kwargs, output):
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        marks.forward_end(loss, kwargs.get("input_ids", args[0] if args else None))

    return hook


def tiny_tokenizer():
    """A two-token tokenizer (``<pad>`` = 0, ``<unk>`` = 1) for trl's SFTTrainer, which wants a
    ``processing_class`` for its pad token; the burst's rows are already token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<unk>")


def trainer_args(kind: str, r, *, out_dir: str, steps: int, batch: int, seq: int, optimizer: str, gc: bool,
                 device: str, enc_dec: bool):
    """TrainingArguments (Seq2SeqTrainingArguments for encoder-decoder models) or trl SFTConfig
    built from the recipe: bf16/fp16, gradient_accumulation_steps, max_grad_norm,
    gradient_checkpointing + kwargs, per_device_train_batch_size, optim, max_steps, packing /
    padding_free / max_length (trl), use_liger_kernel (--loss liger), a constant learning rate, sequential sampling (every
    micro-batch is the worst batch), no logging, reporting or saving."""
    common = dict(output_dir=out_dir, max_steps=int(steps), per_device_train_batch_size=int(batch),
                  gradient_accumulation_steps=int(r.gradient_accumulation), max_grad_norm=float(r.max_grad_norm),
                  bf16=r.mixed_precision == "bf16", fp16=r.mixed_precision == "fp16",
                  gradient_checkpointing=bool(gc), gradient_checkpointing_kwargs=checkpoint_kwargs(r) if gc else None,
                  optim=TRAINER_OPTIM[optimizer], learning_rate=1e-4, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, report_to="none", save_strategy="no", logging_strategy="no",
                  eval_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0,
                  dataloader_pin_memory=False, disable_tqdm=True, remove_unused_columns=False,
                  train_sampling_strategy="sequential", seed=0,
                  use_liger_kernel=r.loss == "liger")  # the Trainer's liger path (liger-kernel patches the model)
    if kind == "trl":
        from trl import SFTConfig

        packing = r.padding == "packing"
        return SFTConfig(**common, packing=packing, padding_free=r.padding == "padding-free",
                         max_length=None if r.padding == "padding-free" else int(seq))
    import transformers

    cls = transformers.Seq2SeqTrainingArguments if enc_dec else transformers.TrainingArguments
    return cls(**common)


def trainer_steps(kind: str, model, r, *, rows: list, collate_fn, steps: int, batch: int, seq: int,
                  optimizer: str, gc: bool, device: str, enc_dec: bool, marks: StepMarks, out_dir: str,
                  peft_config=None, on_built: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run ``steps`` optimizer steps of the real ``transformers.Trainer`` (``kind='hf'``;
    ``Seq2SeqTrainer`` for encoder-decoder models) or ``trl.SFTTrainer`` (``kind='trl'``, given
    the base model and ``peft_config``: it wraps the model itself) on ``rows``. ``on_built(trainer)``
    runs after the trainer is built (the burst's LoRA phase ends there for trl). Returns what the
    record's protocol says about the run."""
    import transformers

    args = trainer_args(kind, r, out_dir=out_dir, steps=steps, batch=batch, seq=seq, optimizer=optimizer, gc=gc,
                        device=device, enc_dec=enc_dec)
    cb = _callback(marks)
    if kind == "trl":
        import datasets
        from trl import SFTTrainer

        ds = datasets.Dataset.from_dict({"input_ids": [row["input_ids"] for row in rows]})
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_tokenizer(),
                             peft_config=peft_config, callbacks=[cb])
    else:
        cls = transformers.Seq2SeqTrainer if enc_dec else transformers.Trainer
        trainer = cls(model=model, args=args, train_dataset=rows, data_collator=collate_fn, callbacks=[cb])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # disable_tqdm adds it: it would print the run's metrics to stdout
    if on_built is not None:
        on_built(trainer)
    handle = trainer.model.register_forward_hook(_forward_hook(marks), with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    ga = int(r.gradient_accumulation)
    return {"trainer": type(trainer).__name__, "trainer_args": type(args).__name__,
            "optimizer_class": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                    else trainer.optimizer).__name__,
            "micro_steps": marks.micro_steps, "optimizer_steps": marks.optimizer_steps,
            "expected_micro_steps": steps * ga}


def dataset_rows(kind: str, padding: str, lengths, batch: int, seq: int, vocab: int, steps: int, ga: int,
                 enc_dec: bool, tseq: int | None) -> list[dict]:
    """Rows for a Trainer: every micro-batch the worst one (``batches.token_rows``), enough for
    ``steps`` x ``ga`` micro-batches. For trl with packing, the documents (``lengths``, or ``seq``)
    that SFTTrainer packs itself, enough of them to fill the steps."""
    from .batches import token_rows

    if kind == "trl" and padding == "packing":
        docs = token_rows("longest", lengths, len(lengths), seq, vocab) if lengths else \
            token_rows("max-length", None, 1, seq, vocab)
        need = steps * ga * batch * max(1, math.ceil(seq / min(len(d) for d in docs))) + batch
        return [{"input_ids": docs[i % len(docs)]} for i in range(need)]
    worst = token_rows(padding, lengths, batch, seq, vocab)
    out = []
    for i in range(steps * ga * batch):
        row = {"input_ids": worst[i % batch]}
        if enc_dec:
            row["labels"] = token_rows("max-length", None, batch, int(tseq or seq), vocab, seed=1)[i % batch]
        out.append(row)
    return out


def row_collator(padding: str, enc_dec: bool):
    """The Trainer's data_collator for :func:`dataset_rows` (``batches.collate``; encoder-decoder
    rows stack input_ids and labels)."""
    from .batches import collate

    def fn(rows: list[dict]) -> dict:
        if enc_dec:
            import torch

            return {"input_ids": torch.tensor([r["input_ids"] for r in rows]),
                    "labels": torch.tensor([r["labels"] for r in rows])}
        return collate([r["input_ids"] for r in rows], padding)

    return fn
