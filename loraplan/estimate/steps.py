"""The trainer's step structure in the ledger (issue 11): which checkpointing variant, how many
micro-steps per optimizer step, gradient clipping, and what outlives a micro-step.

Every function reads the resolved recipe (``loraplan.trainers.resolve_recipe``); with the loop
trainer's defaults (non-reentrant, accumulation 1, no clipping, every layer checkpointed) each
returns what ``memory.moments`` assumed before, so the protocol's numbers do not move.

Sources (transformers 5.24, torch 2.13, bitsandbytes 0.50):

- reentrant checkpointing, torch/utils/checkpoint.py::CheckpointFunction: ``forward`` runs the
  layer under ``torch.no_grad()`` and saves only its tensor inputs; ``backward`` reruns the whole
  layer with grad enabled on detached inputs, holds its ``outputs`` while it runs
  ``torch.autograd.backward(outputs, grads)`` through that inner graph, and returns the inputs'
  ``.grad``. So every tensor a layer keeps (saved tensors and ctx attributes alike, such as
  bitsandbytes MatMul8bitLt's ``ctx.tensors``) lives only inside that layer's backward. The
  non-reentrant variant (``_checkpoint_without_reentrant_generator``) runs the forward with grad
  and drops only what goes through saved-tensor hooks: ctx attributes stay for the whole step.
  Both need an input that requires grad: transformers' ``_activation_checkpointing_enable``
  calls ``enable_input_require_grads`` (the embedding output becomes a grad-requiring leaf whose
  ``.grad`` the graph keeps: ``transients.input_leaf_and_grad``), for either variant.
- what outlives a micro-step: the protocol's loop keeps ``loss`` (its whole graph) bound until
  the next forward returns; transformers trainer.py::Trainer.training_step returns
  ``loss.detach()``, so its graph dies at the end of the micro-step.
- accumulation, Trainer._inner_training_loop: ``model.zero_grad()`` only after the optimizer
  step, so micro-steps after the first run with every LoRA ``.grad`` alive; AccumulateGrad adds
  each new gradient in place (``variable.grad += new_grad``), the new one a transient.
- clipping: torch/nn/utils/clip_grad.py::clip_grad_norm_ (``_get_total_norm``,
  ``_clip_grads_with_norm_``), reached through accelerate ``Accelerator.clip_grad_norm_``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import versions
from ..errors import InputError
from ..storage import dtype_bytes
from ..trainers import fused_lm_head, fused_lm_head_outputs, resolve_recipe
from .arrays import maximum as _max, minimum as _min, where as _where
from .activations import _relative_bias
from .transients import int8_retained_per_layer, int8_saved_anyway_per_layer
from .weights import Structure, lora_gradients


@dataclass(frozen=True)
class StepRecipe:
    """The resolved fields the step structure reads."""

    trainer: str
    checkpointing: bool
    reentrant: bool
    accumulation: int
    max_grad_norm: float
    every_n_layers: int
    loss: str = "standard"
    offload: bool = False
    #: (model_type, form) pairs: how the stack's transformers holds the logits at the standard
    #: loss (version rule ``causal_lm_loss_logits``; ``lm_loss_form``)
    lm_loss_forms: tuple = ()
    #: how long the loop keeps the model's output object (``TrainSpec.loop_outputs``)
    loop_outputs: str = "dropped"

    @property
    def graph_outlives_step(self) -> bool:
        """The loop keeps ``loss`` (and its graph) into the next forward; Trainer does not."""
        return self.trainer == "loop"

    @property
    def computes_grad_norm(self) -> bool:
        """Trainer computes the total norm at every optimizer step (clip_grad_norm_ with max_norm
        inf when max_grad_norm is 0: ``_get_grad_norm``); the loop only when clipping."""
        return self.max_grad_norm > 0 or self.trainer != "loop"


def step_recipe(train) -> StepRecipe:
    r = resolve_recipe(train)
    return StepRecipe(trainer=r.trainer, checkpointing=bool(r.gradient_checkpointing), reentrant=bool(r.reentrant),
                      accumulation=int(r.gradient_accumulation), max_grad_norm=float(r.max_grad_norm or 0.0),
                      every_n_layers=int(r.checkpoint_every_n_layers), loss=r.loss,
                      offload=bool(r.checkpoint_offload) and bool(r.gradient_checkpointing),
                      lm_loss_forms=lm_loss_forms(train.stack), loop_outputs=r.loop_outputs or "dropped")


def lm_loss_forms(stack) -> tuple:
    """Version rule ``causal_lm_loss_logits`` for ``stack`` as sorted (model_type, form) pairs."""
    return tuple(sorted(versions.rule("causal_lm_loss_logits", stack).items()))


def loss_form_note(model, train) -> str:
    """A note when ``train.stack``'s transformers predates the rule ``causal_lm_loss_logits``'s last
    boundary and the causal LM's model_type is not among the families it lists for that release:
    the newest loss head is assumed there, and an older release may hold fp32 logits in the model
    (its output's logits, the shifted copy). '' otherwise (encoder-decoder models, fused losses)."""
    r = resolve_recipe(train)
    if r.loss != "standard" or model.is_encoder_decoder or not model.arch.loss_upcasts_logits:
        return ""
    entries = versions.rules_data()["rules"]["causal_lm_loss_logits"]["values"]
    tf = versions.resolve(train.stack)["transformers"]
    if versions.version_tuple(tf) >= versions.version_tuple(entries[-1]["since"]):
        return ""
    if model.model_type in dict(lm_loss_forms(train.stack)):
        return ""
    return (f"transformers {tf}: how {model.model_type}'s loss head held the logits in that release is not in the "
            f"version rules (causal_lm_loss_logits); the newest form is assumed (lm_head's logits, their fp32 copy "
            f"inside the loss), while older releases upcast them in the model for some families: up to 2·T·V more "
            f"bytes at the loss")


def lm_loss_form(model_type: str, forms: tuple) -> str:
    """"model_upcast", "loss_shift" or "loss_pad" (a model_type the rule does not list: the
    newest form) for ``model_type`` under ``forms`` (``lm_loss_forms``)."""
    return dict(forms).get(model_type, "loss_pad")


def kept_model_output(st: Structure, x, rc: StepRecipe, moment: str, gradient_checkpointing: bool = True):
    """Bytes of the model's output object a plain loop keeps bound at ``moment`` (a MOMENTS name),
    beyond what the ledger counts there anyway: 0 for ``loop_outputs`` "dropped" (``loss =
    model(...).loss``: the output dies as ``.loss`` is read, the protocol) and for every Trainer
    (compute_loss returns the loss).

    With ``outputs = model(**batch)`` the output is bound through backward and the optimizer
    step: "micro-step" (``outputs = None`` at the end of the micro-step, AnswerDotAI fsdp_qlora
    train.py) holds it at every moment after this step's forward; "next-forward" (the name is
    rebound only when the next forward returns) also at the next forward's moments, where it is
    the previous micro-step's. What it holds (use_cache=False: no cache): ``logits``, [T, V] in
    the dtype the forward returns them -- fp32 where the stack's transformers upcasts inside
    ``*ForCausalLM.forward`` (version rule ``causal_lm_loss_logits`` "model_upcast": ``logits =
    logits.float()``), else lm_head's dtype (the upcast is the loss's own copy,
    loss/loss_utils.py::ForCausalLMLoss); none with a fused loss (trl's chunked head returns
    ``log_probs``, fp32 [B, S] per field; Liger returns no logits when labels are given).
    Encoder-decoder models (Seq2SeqLMOutput) also hold ``encoder_last_hidden_state``
    (a·T_enc·h), which the decoder's layers keep anyway in their backward
    (``encoder_kept_in_decoder_backward``) and, with checkpointing, their checkpointed inputs at
    the loss backward: it counts at the other moments after the forward and in the next forward. Without
    checkpointing the position-bias moment is in the forward, before the output exists."""
    mode = rc.loop_outputs
    if mode == "dropped" or rc.trainer != "loop":
        return 0
    before = moment in ("forward", "int8 matmul") or (moment == "position bias" and not gradient_checkpointing)
    if before and mode != "next-forward":
        return 0
    m = st.model
    if rc.loss == "chunked":
        logits = len(fused_lm_head_outputs(rc.trainer)) * _blk(4 * x.T)
    elif rc.loss == "liger":
        logits = 0
    else:
        from .transients import logits_bytes

        up = m.arch.loss_upcasts_logits and lm_loss_form(m.model_type, rc.lm_loss_forms) == "model_upcast"
        logits = (4 if up else logits_bytes(st)) * x.T * m.vocab_size
    enc = 0
    kept_anyway = ("layer backward",) + (("loss backward",) if gradient_checkpointing else ())
    if m.is_encoder_decoder and (before or moment not in kept_anyway):
        enc = st.stream_bytes * x.T_enc * m.hidden_size
    return logits + enc


def checkpointed_layers(st: Structure, rc: StepRecipe) -> int:
    """How many decoder layers ``_set_gradient_checkpointing(every_n_layers=n)`` checkpoints:
    layer i when i % n == 0 -> ceil(L / n); all with n = 1, none without checkpointing.
    Raises InputError for an encoder-decoder model with n > 1 (its count runs over encoder then
    decoder layers; not modelled)."""
    return checkpointed_layer_count(st.model, rc)


def checkpointed_layer_count(m, rc: StepRecipe) -> int:
    """``checkpointed_layers`` of a ModelSpec ``m`` (the time model's entry: no Structure)."""
    if not rc.checkpointing:
        return 0
    if rc.offload and m.is_encoder_decoder:
        raise InputError("--checkpoint-offload is not modelled for encoder-decoder models; drop it")
    if rc.every_n_layers > 1 and m.is_encoder_decoder:
        raise InputError(f"--checkpoint-every-n-layers {rc.every_n_layers} is not modelled for encoder-decoder "
                         f"models; use 1")
    return math.ceil(m.num_layers / rc.every_n_layers)


def top_layer_checkpointed(st: Structure, rc: StepRecipe) -> bool:
    """Whether the last decoder layer (whose backward the 'layer backward' moment describes) is
    checkpointed: (L − 1) % n == 0."""
    return rc.checkpointing and (st.model.num_layers - 1) % rc.every_n_layers == 0


def uncheckpointed_saved(st: Structure, rc: StepRecipe, S, layer_input):
    """Bytes the layers left out by ``every_n_layers`` add to a checkpointed forward: each keeps
    its saved tensors S instead of its input (a·T·h). 0 when every layer is checkpointed."""
    u = st.model.num_layers - checkpointed_layers(st, rc) if rc.checkpointing else 0
    return u * (S - layer_input)


def int8_kept_through_step(int8_keep, st: Structure, rc: StepRecipe):
    """This step's MatMul8bitLt ctx tensors alive from the forward until backward ends.
    Reentrant: checkpointed layers ran their forward under no_grad (the ctx dies with the
    Function call), so only the layers left out by every_n_layers keep theirs. An
    encoder-decoder model's encoder blocks are checkpointed too (T5Block is a
    GradientCheckpointingLayer; transformers modeling_utils.py::_set_gradient_checkpointing
    flags every one, encoder and decoder, and every_n_layers > 1 is refused for these models)."""
    if not (rc.checkpointing and rc.reentrant):
        return int8_keep
    m = st.model
    L = m.num_layers + m.num_encoder_layers
    return int8_keep * (L - checkpointed_layers(st, rc) - m.num_encoder_layers) / max(L, 1)


def int8_previous_step(int8_kept, rc: StepRecipe):
    """What the previous micro-step's graph still holds during this forward: its int8 ctx
    tensors for the loop (``loss`` not yet rebound), nothing under Trainer."""
    return int8_kept if rc.graph_outlives_step else 0


def int8_inside_layer_backward(st: Structure, x, kind: str, rc: StepRecipe, outlier_fraction=None,
                               stack: str = "decoder"):
    """Reentrant: the backward-running layer's int8 ctx tensors (the top decoder layer's, or with
    ``stack="encoder"`` the encoder layer's), recreated by its recompute and held by the inner
    graph during its backward (``transients.int8_retained_per_layer``), less the inputs the
    recompute's autograd saves anyway (one storage: ``transients.int8_saved_anyway_per_layer``,
    e.g. the attention output o reads). torch/utils/checkpoint.py::CheckpointFunction.backward
    reruns one layer and frees its inner graph before the next layer's backward, so one layer's
    worth at a time. 0 otherwise (non-reentrant: already in ``int8_kept_through_step``)."""
    if not (rc.checkpointing and rc.reentrant) or (stack == "decoder" and not top_layer_checkpointed(st, rc)):
        return 0
    return (int8_retained_per_layer(st, x, stack, outlier_fraction)
            - int8_saved_anyway_per_layer(st, kind, x, stack))


def reentrant_layer_output(st: Structure, x, rc: StepRecipe, stack: str = "decoder"):
    """Reentrant recompute runs the whole layer and CheckpointFunction.backward holds its
    ``outputs`` (the layer output, a·T·h; T = T_enc for ``stack="encoder"``) during the inner
    backward; the non-reentrant recompute stops once the last saved tensor exists and makes no
    output."""
    if not (rc.checkpointing and rc.reentrant) or (stack == "decoder" and not top_layer_checkpointed(st, rc)):
        return 0
    return st.stream_bytes * (x.T_enc if stack == "encoder" else x.T) * st.model.hidden_size


def reentrant_bias_output_grads(st: Structure, x, rc: StepRecipe, stack: str = "decoder"):
    """Reentrant, T5/mT5: a T5Block also returns the position biases it was given
    (modeling_t5.py T5Block.forward: self-attention, and for a decoder block cross-attention),
    and CheckpointFunction's outputs all require grad. The top block's are used by no one, so
    autograd hands its backward zero-filled gradients for them (torch/autograd/function.py
    FunctionCtx.set_materialize_grads, True by default), alive while CheckpointFunction.backward
    runs: a·n_h·s_e² for the top encoder block, a·n_h·s_t·(s_t + s_e) for the top decoder block.
    0 otherwise (non-reentrant checkpointing is not a Function: the unused outputs get no grad)."""
    m = st.model
    if not (rc.checkpointing and rc.reentrant) or not m.is_encoder_decoder or not _relative_bias(m):
        return 0
    if stack == "decoder" and not top_layer_checkpointed(st, rc):
        return 0
    a = st.stream_bytes * m.num_heads
    return a * x.seq * x.seq if stack == "encoder" else a * x.tseq * (x.tseq + x.seq)


def reentrant_position_bias_grad(st: Structure, x, rc: StepRecipe):
    """Reentrant, T5/mT5 with two or more encoder blocks: the gradient of the position bias the
    first encoder block returns, alive through that block's backward (its bias recompute
    included, ``activations.position_bias_activations``): a·n_h·s_e². The blocks above take the
    bias as a grad-requiring input (every CheckpointFunction output requires grad); their
    backward accumulates its gradient into the detached input's ``.grad`` (AccumulateGrad
    copies it to the permuted bias's strides: clone_obey_contract, new_empty_strided [1, n_h, s,
    s]) and returns it, and autograd hands it to the first block's CheckpointFunction.backward
    as a grad output, held while it runs (torch/utils/checkpoint.py CheckpointFunction.backward).
    Checked against the meta trace (small t5, bf16, b1 s2048). 0 otherwise (non-reentrant: the
    bias comes from the frozen relative_attention_bias and needs no gradient)."""
    m = st.model
    if (not (rc.checkpointing and rc.reentrant) or not m.is_encoder_decoder or not _relative_bias(m)
            or m.num_encoder_layers < 2):
        return 0
    return st.stream_bytes * m.num_heads * x.seq * x.seq


def previous_step_leaf(leaf, rc: StepRecipe):
    """The grad-requiring embedding output and its ``.grad`` (``input_leaf_and_grad``), kept by
    the graph ``loss`` holds: into the next forward for the loop only."""
    return leaf if rc.graph_outlives_step else 0


def accumulated_gradients(st: Structure, r, rc: StepRecipe):
    """LoRA ``.grad`` alive through the forward and backward of micro-steps 2..k (k > 1)."""
    return lora_gradients(st, r) if rc.accumulation > 1 else 0


#: the roles of a layer's MLP (feed-forward) Linears
MLP_ROLES = ("gate", "up", "gate_up", "fc_in", "down", "fc_out")


def _adapter_grads(st: Structure, r, keep) -> int:
    """One ``.grad`` per lora_A [r, in] and lora_B [out, r] in the adapter dtype (512 B blocks),
    summed over the adapted Linears ``keep(l)`` selects."""
    return sum(_blocks(r * l.in_features * st.adapter_bytes) + _blocks(r * l.out_features * st.adapter_bytes)
               for l in st.adapted if keep(l))


def layer_gradients(st: Structure, r, rc: StepRecipe, layers: int):
    """Gradients alive inside one layer's backward: that layer's new ones (the total over
    ``layers``) and, when accumulating, every accumulated ``.grad`` as well. Encoder-decoder
    models: the ones made by the time the top decoder layer's FFN runs its backward, where its
    peak sits (``transients.layer_backward_transients``: the FFN sub-layer is the last of T5's
    block, so its backward runs first, before the cross- and self-attention's; modeling_t5.py
    T5Block.forward): the FFN adapters' and lm_head's (made at the head of backward), not
    the attention adapters' nor a share of the encoder's."""
    m = st.model
    if m.is_encoder_decoder:
        own = _adapter_grads(st, r, lambda l: l.role == "lm_head" or (
            l.stack == "decoder" and l.layer == m.num_layers - 1 and l.role in MLP_ROLES))
        return own + accumulated_gradients(st, r, rc)
    return lora_gradients(st, r) / max(layers, 1) + accumulated_gradients(st, r, rc)


def first_encoder_layer_gradients(st: Structure, r, rc: StepRecipe):
    """Encoder-decoder models: the gradients alive at the peak of the encoder's first (bottom)
    layer's backward, the last layer backward reaches: every adapter's but that layer's own (its
    peak is in the recompute or the FFN's backward, before its adapters' gradients are made;
    checked against the meta-device trace at rank 256), plus the accumulated ``.grad``."""
    own = lora_gradients(st, r) - _adapter_grads(st, r, lambda l: l.stack == "encoder" and l.layer == 0)
    return own + accumulated_gradients(st, r, rc)


#: the LoRA-adaptable Linears that read an MLP's product (``LinearSpec.role``)
_MLP_OUT_ROLES = ("down", "fc_out")


#: ... and every MLP Linear plus the attention output projection
_MLP_AND_O_ROLES = ("gate", "up", "gate_up", "down", "fc_in", "fc_out", "o")


def top_layer_gradients(st: Structure, r, roles=_MLP_OUT_ROLES):
    """The ``.grad`` of the top decoder layer's adapted Linears of ``roles`` (lora_A and lora_B,
    one 512 B-rounded block each, as ``lora_weights``). The default, the MLP-out Linears
    (down_proj / fc2), gives the only LoRA gradients of the layer that exist while its MLP runs
    backward: autograd runs a layer's nodes in reverse creation order (a higher sequence number
    first; torch autograd engine.cpp ReadyQueue), so the MLP-out branch's lora_B and lora_A
    backward (AccumulateGrad) run first; the MLP-in and o_proj adapters' come before the
    attention core's backward (``_MLP_AND_O_ROLES``), q/k/v's after it."""
    m = st.model
    top = [l for l in st.adapted if l.stack == "decoder" and l.layer == m.num_layers - 1 and l.role in roles]
    return sum(_blocks(r * l.in_features * st.adapter_bytes) + _blocks(r * l.out_features * st.adapter_bytes)
               for l in top)


def _blocks(n):
    return -(-n // 512) * 512


def lora_tensor_count(st: Structure) -> int:
    """Number of trainable tensors (lora_A and lora_B per adapted module): Σ of ``lora_sizes``."""
    return int(sum(st.lora_sizes.values()))


def grad_norm_temporaries(st: Structure, rc: StepRecipe) -> int:
    """clip_grad_norm_ beside the gradients, at its largest (inside ``_get_total_norm``): the
    fp32 [N] ``_foreach_norm`` output (CUDA: one tensor, the N norms are its views; all LoRA grads
    are fp32 on one device: one group), ``torch.stack`` of them (fp32 [N]) and the total norm
    (a scalar): 512 B blocks each (the caching allocator's minimum). On CPU ``_foreach_norm`` is
    ATen's slow fallback (aten/src/ATen/native/ForeachOpsKernels.cpp ``foreach_tensor_norm_slow``:
    one ``linalg_vector_norm`` scalar per tensor): N·512 instead of the [N] buffer.
    0 when no norm is computed."""
    if not rc.computes_grad_norm:
        return 0
    n = lora_tensor_count(st)
    norms = n * 512 if st.device == "cpu" else _blocks(4 * n)
    return norms + _blocks(4 * n) + 512


# ---------------------------------------------------------------------------------------------
# Loss paths
# ---------------------------------------------------------------------------------------------

#: Liger-Kernel read: linkedin/Liger-Kernel src/liger_kernel/ops/fused_linear_cross_entropy.py
#: (main, commit 00eba634) and transformers/model/loss_utils.py::LigerForCausalLMLoss
LIGER_SOURCE = "liger_kernel ops/fused_linear_cross_entropy.py::fused_linear_cross_entropy_forward (main 00eba634)"


def check_loss(st: Structure, rc: StepRecipe) -> None:
    """``check_model_loss`` for the Structure's model."""
    check_model_loss(st.model, rc)


def check_model_loss(model, rc: StepRecipe) -> None:
    """Refuse loss paths the ledger does not model (one line with the fix): ``liger`` and
    ``chunked`` for encoder-decoder models (Liger patches decoder-only *ForCausalLM forwards;
    trl's add_fused_lm_head reads a causal LM's ``base_model`` output), trl on them, and trl
    with Liger. LoRA on lm_head under ``chunked`` is not refused (trl runs it) but warned about:
    ``FUSED_HEAD_BYPASS_WARNING``. Called when a case resolves (``case.resolve_case``) and by the
    ledger (``memory.moments``), for callers of the estimator that bypass resolve_case."""
    if rc.loss in ("liger", "chunked") and model.is_encoder_decoder:
        what = ("Liger's fused linear cross-entropy patches" if rc.loss == "liger"
                else "trl's fused chunked LM head patches")
        raise InputError(f"--loss {rc.loss}: {what} decoder-only *ForCausalLM forwards, not "
                         f"{model.model_type} (encoder-decoder); use --loss standard")
    if rc.trainer == "trl" and model.is_encoder_decoder:
        raise InputError(f"--trainer trl: SFTTrainer's fused LM head patches decoder-only *ForCausalLM forwards, "
                         f"not {model.model_type} (encoder-decoder); use --trainer hf")
    if rc.trainer == "trl" and rc.loss == "liger":
        raise InputError("--trainer trl with --loss liger: SFTTrainer 1.16 refuses Liger's fused linear "
                         "cross-entropy (it patches the LM head itself); use --loss standard")


def liger_chunk_rows(BT, H: int, V: int):
    """Liger's token chunk: inc = ceil(V / H), chunk = min(next_pow2(ceil(BT / inc)), BT), so the
    transient logits stay near BT·H elements (``chunk_mem_const`` 1, the default)."""
    inc = -(-V // H)
    rows = -(-BT // inc)
    if hasattr(rows, "shape"):  # a sweep group's arrays (numpy only then: explain never imports it)
        import numpy as np

        p2 = np.power(2, np.ceil(np.log2(np.maximum(rows, 1)))).astype(np.int64)
        return np.minimum(p2, BT)
    return min(1 << max(int(rows) - 1, 0).bit_length(), int(BT))


def liger_forward_bytes(st: Structure, x):
    """Inside LigerFusedLinearCrossEntropyFunction.forward, on top of the final hidden state
    (BT = b·s tokens, a the hidden/lm_head dtype bytes): ``grad_input = zeros_like(_input)``
    (a·BT·H: the hidden state's gradient, computed chunk by chunk in the forward and saved for
    backward), ``loss_1d`` fp32 [BT], ``target != ignore_index`` bool [BT], the
    ``logits_storage`` [chunk, V] buffer (a; ``torch.mm(..., out=)`` on CUDA: the CE kernel turns
    it into the logits' gradient in place, then ``mm(out=grad_input[chunk])``), and from
    LigerForCausalLMLoss the padded labels int64 [b, s+1] and their shifted contiguous copy
    int64 [BT]. The B·T·V logits never exist."""
    m, a = st.model, st.stream_bytes
    BT = x.T
    chunk = liger_chunk_rows(BT, m.hidden_size, m.vocab_size)
    return a * BT * m.hidden_size + 4 * BT + BT + a * chunk * m.vocab_size + 8 * (BT + x.b) + 8 * BT


def liger_backward_bytes(st: Structure, x):
    """At the head of backward: the saved ``grad_input`` (a·BT·H), scaled in place by the
    loss's gradient (``element_mul_kernel``; ``torch.equal(grad_output, tensor(1.0))`` makes
    one scalar) and returned as the hidden state's gradient."""
    return st.stream_bytes * x.T * st.model.hidden_size + 512


# trl 1.16's fused chunked LM head (``--loss chunked``): trl/trainer/utils.py::add_fused_lm_head
# (its ``_fused_forward``) and trl/kernels/chunked_logprob.py::ChunkedLogProbFunction, CUDA path
# (``_use_triton``: Triton kernels, compact scoring of the valid positions only). SFTTrainer calls
# add_fused_lm_head with cast_lm_head_to_fp32 left False (no fp32 copy of the hidden state, the
# tiles in the autocast dtype) and compute_loss with loss_type "nll" (no label smoothing or
# compute_loss_func, which would build the full logits besides). Its metrics (entropy, token
# accuracy: ``is_top1``) are per-token [N] tensors: 512 B blocks, not in the ledger lines.

#: read: trl 1.16 kernels/chunked_logprob.py::ChunkedLogProbFunction.forward/backward and
#: trainer/utils.py::add_fused_lm_head
FUSED_HEAD_SOURCE = "trl 1.16 kernels/chunked_logprob.py::ChunkedLogProbFunction, trainer/utils.py::add_fused_lm_head"


#: LoRA on lm_head with the fused head: trl/trainer/utils.py::add_fused_lm_head multiplies by
#: ``lm_head.weight`` (peft's lora.Linear.weight is its base layer's), never calling the module
FUSED_HEAD_BYPASS_WARNING = (
    "WARNING: LoRA on lm_head is bypassed by trl's fused chunked LM head (--loss chunked): it multiplies "
    "by lm_head.weight directly, so the lm_head adapter is never used or trained; its weights are counted, "
    "and its gradient and optimizer state (never made) are counted too (an over-estimate of "
    "r x (h + V) x the adapter's gradient and state bytes); drop lm_head from --targets")


def _blk(n):
    """A small tensor's bytes as the caching allocator hands them out (512 B blocks)."""
    return -(-n // 512) * 512


def fused_head_dims(st: Structure, x):
    """(N, n0, C, a, c): N = b·(s − 1) scored positions (``last_hidden_state[:, :-1]``; every
    label valid in the protocol's batch, so compact scoring keeps all of them), n0 = min(N,
    token_chunk) tile rows, C = vocab_chunk tile columns (32768 whatever V: ``mm_buf`` is
    [min(N, TOKEN_CHUNK_SIZE), chunk_size]), a the hidden state's bytes (the final norm's output:
    ``transients.final_hidden_dtype``), c the compute dtype's (``get_autocast_dtype`` under
    autocast, else the hidden dtype)."""
    from .transients import final_hidden_dtype

    fh = fused_lm_head()
    N = x.T - x.b
    a = dtype_bytes(final_hidden_dtype(st))
    return N, _min(N, fh["token_chunk"]), int(fh["vocab_chunk"]), a, st.autocast_bytes or a


def _tiles(st: Structure, x):
    """The tile loop's shapes: (n0, n1, n_last) token-chunk rows (first, second, last; n1 = 0 with
    one chunk) and (wf, w2, wl) vocabulary-tile widths (first, second, last; w2 = 0 with one
    tile), and the bytes per copied row/column: ``hidden[chunk].to(compute_dtype)`` (c·H per row
    when the hidden state's dtype is not the compute dtype) and ``weight[start:end].to(compute_dtype)``
    (c·H per column when lm_head's, ``Dtypes.unquantized``, is not)."""
    N, n0, C, a, c = fused_head_dims(st, x)
    H, V = st.model.hidden_size, st.model.vocab_size
    n1 = _min(n0, _max(N - n0, 0))
    n_last = N - n0 * _max(-(-N // _max(n0, 1)) - 1, 0)  # N = 0 (one-token rows): no chunk
    k = -(-V // C)
    wf, wl = min(C, V), V - C * (k - 1)
    w2 = 0 if k < 2 else (C if k > 2 else wl)
    from .transients import final_hidden_dtype

    hidden = final_hidden_dtype(st)
    compute = st.dt.autocast or hidden  # dtypes, not sizes: bf16 -> fp16 is a copy too
    return (n0, n1, n_last), (wf, w2, wl), (c * H if hidden != compute else 0), \
        (c * H if st.dt.unquantized != compute else 0)


def fused_head_forward_bytes(st: Structure, x, rc: StepRecipe):
    """Inside ChunkedLogProbFunction.forward's tile loop, on top of the final hidden state
    (``transients.last_hidden_state``): from ``_fused_forward`` the label mask (bool [N]), the
    compact ``hidden_states[mask]`` (a·N·H, saved for backward) and ``labels[mask]`` (int64 [N],
    saved); from forward the seven fp32 [N] online-logsumexp accumulators (``running_max``,
    ``sum_exp``, ``x_sum_exp``, ``sq_sum_exp``, ``z_sum``, ``max_before_target``,
    ``target_logit``: allocated whatever ``outputs`` asks), ``mm_buf`` [n0, C] in c (the tile
    ``torch.mm(..., out=tile)`` writes; the Triton ``_forward_kernel`` folds it in place and
    allocates nothing) and the dtype copies (``_tiles``) at their largest: the token chunk's
    hidden copy beside the inline weight-tile copy of a ``torch.mm``, or, where the next token
    chunk's copy is made while the previous one is still bound, both hidden copies. The B·T·V
    logits never exist; softcapping and logit scaling are kernel arguments (no memory)."""
    N, n0, C, a, c = fused_head_dims(st, x)
    (n0, n1, _), (wf, _, _), hb, wb = _tiles(st, x)
    copies = _max(hb * n0 + wb * wf, hb * (n0 + n1))
    return _blk(N) + a * N * st.model.hidden_size + _blk(8 * N) + 7 * _blk(4 * N) + c * n0 * C + copies


def fused_head_backward_bytes(st: Structure, x, rc: StepRecipe):
    """Inside ChunkedLogProbFunction.backward, on top of what stays alive through it: the saved
    compact hidden state (a·N·H), targets (int64 [N]), ``log_z`` and ``entropy`` (fp32 [N] each;
    without entropy in ``outputs`` the second slot is ``log_z`` again), the label mask (bool
    [N], kept by the index and masked_scatter backward), ``grad_logprobs`` (fp32 [N],
    masked_scatter backward's ``masked_select``), ``grad_hidden`` (fp32 [N, H] zeros: 'Always
    accumulate in fp32'; ``_addmm_fp32`` adds each tile's product with ``addmm(out_dtype=
    float32, out=acc)`` on CUDA, no fp32 copies) and ``mm_buf`` [n0, C] in c (the tile;
    ``_backward_kernel`` overwrites it with the logits' gradient in place). Then the largest of:
    the dtype copies (``_tiles``) where a named copy is rebound (the new one is made while the
    old is bound: two weight tiles, or two token chunks' hidden copies beside the last weight
    tile, or the last weight tile beside the next chunk's first) and the return,
    ``grad_hidden.to(hidden.dtype)`` (a·N·H when a ≠ 4) beside the last chunk's copies.
    lm_head's weight is frozen: no ``grad_weight``."""
    N, n0, C, a, c = fused_head_dims(st, x)
    H = st.model.hidden_size
    (n0, n1, n_last), (wf, w2, wl), hb, wb = _tiles(st, x)
    entropy = _blk(4 * N) if "entropy" in fused_lm_head_outputs(rc.trainer) else 0
    saved = a * N * H + _blk(8 * N) + _blk(4 * N) + entropy + _blk(N)
    more_chunks = _where(n1 > 0, 1, 0)
    copies = _max(hb * n0 + wb * (wf + w2), more_chunks * (hb * (n0 + n1) + wb * wl))
    copies = _max(copies, more_chunks * (hb * n1 + wb * (wl + wf)))
    end = hb * n_last + wb * wl + (a * N * H if a != 4 else 0)
    return saved + _blk(4 * N) + 4 * N * H + c * n0 * C + _max(copies, end)


def loss_forward(st: Structure, x, rc: StepRecipe):
    """The 'logits_loss' line at the end of the forward: Liger's buffers, trl's fused chunked
    LM head's, or the standard loss (``transients.loss_forward_transient``)."""
    from .transients import loss_forward_transient

    if rc.loss == "chunked":
        return fused_head_forward_bytes(st, x, rc)
    return liger_forward_bytes(st, x) if rc.loss == "liger" else loss_forward_transient(
        st, x, lm_loss_form(st.model.model_type, rc.lm_loss_forms))


def loss_backward(st: Structure, x, rc: StepRecipe):
    """The 'logits_loss' line at the head of backward (``transients.loss_backward_transient``
    for the standard loss)."""
    from .transients import loss_backward_transient

    if rc.loss == "chunked":
        return fused_head_backward_bytes(st, x, rc)
    return liger_backward_bytes(st, x) if rc.loss == "liger" else loss_backward_transient(st, x)


def offloaded_inputs(st: Structure, x, rc: StepRecipe, moment: str):
    """Device bytes that checkpoint offload moves to pinned host memory at ``moment``
    (subtracted from the activations line).

    transformers 5.24 modeling_utils.py::_activation_checkpointing_enable(offload=True) runs each
    checkpoint under torch.autograd.graph.save_on_cpu: what the checkpoint saves for itself (its
    tensor inputs: _NoopSaveInputs non-reentrant, ctx.save_for_backward reentrant) is packed to
    host and the device copy dies with its last reference; the layer's inner saved tensors go
    through checkpoint's own hooks (recomputed), so nothing else moves. Layer 0's input stays:
    it is the grad-requiring embedding leaf the graph holds (``input_leaf_and_grad``). In a
    layer's backward its input is unpacked back to the device (``tensor.to(device)``): the
    'layer backward' moment has the top layer's input on the device again.
    Per checkpointed layer a·T·h; (n − 1) of them at the forward moments, (n − 2) in the top
    layer's backward when that layer is checkpointed."""
    if not rc.offload:
        return 0
    n = checkpointed_layers(st, rc)
    back = 1 if moment == "layer backward" and top_layer_checkpointed(st, rc) and st.model.num_layers > 1 else 0
    return max(n - 1 - back, 0) * st.stream_bytes * st.model.hidden_size * x.T


def offload_host_bytes(st: Structure, x, rc: StepRecipe):
    """Pinned host memory the offloaded checkpoint inputs take at the end of the forward: one
    a·T·h copy per checkpointed layer (save_on_cpu packs every one, layer 0's too)."""
    if not rc.offload:
        return 0
    return checkpointed_layers(st, rc) * st.stream_bytes * st.model.hidden_size * x.T
