"""The memory ledger: peak ``torch.cuda.max_memory_allocated()`` of a LoRA/QLoRA training burst.

Predicts the protocol of loraplan/data/h100-protocol.md (transformers + peft + bitsandbytes,
plain loop: ``loss = model(ids, labels=ids).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)``). Every ledger line is a function whose docstring gives its
formula (bytes per element × shape) and where it comes from; sources are the library files
read for transformers 5.x, peft 0.21, bitsandbytes 0.50, torch 2.11+.

The peak is a *moment*, not a sum of everything: the live bytes are evaluated at each
candidate moment of a steady-state step (step >= 2, the optimizer state exists) and the
largest wins:

- ``forward``:        end of the forward, inside the loss (logits + fp32 copy + log-softmax);
- ``loss backward``:  the start of backward, at the head (log-softmax saved, its grad in and out);
- ``layer backward``: inside the first decoder layer's backward (its saved tensors, recomputed
  when checkpointing, plus the gradient transients and the dequantized weight);
- ``encoder layer backward`` (encoder-decoder): inside the top encoder layer's backward;
- ``position bias`` (T5/mT5): the encoder's first block bucketing relative positions (int64
  [s_e, s_e] temporaries), in the forward or in its recompute at the end of backward;
- ``optimizer step``: LoRA weights + gradients + optimizer state + the step's temporaries.

Two halves: ``Structure`` holds what depends only on the model, the targets and the
quantization (weight bytes, sizes of the adapted Linears; cached), and the formulas take the
numbers (batch b, sequence s, rank r, dropout) as plain ints or as numpy arrays of equal
shape, so ``loraplan sweep`` evaluates the same physics over a whole grid at once.

Notation: T = b·s tokens, h hidden, I intermediate, n_h / n_kv heads, d head dim, V vocab,
L layers, r rank, a bytes of the residual stream (2 for a bf16/fp16 base; 4 for fp32 and for
a quantized base, because prepare_model_for_kbit_training makes embeddings and norms fp32).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .. import versions
from ..spec import Calibration, ExpertSpec, GpuSpec, LinearSpec, ModelSpec, TrainSpec
from ..errors import InputError
from ..storage import EXPERT_QUANTIZATION_PATHS, QUANTIZED, experts_unquantized
from ..trainers import resolve_recipe
from .activations import (Shape, check_attention_kernel, checkpoint_inputs, choose_attention, encoder_backward_activations,
                          encoder_kept_in_decoder_backward, encoder_layers_above_bottom, layer_saved,
                          position_bias_activations, recompute_shares_input, released_before_attention_backward,
                          rope_tables, saved_activations)
from .arrays import is_scalar as _is_scalar
from .arrays import maximum, where
from .coefficients import coefficient
from .sequences import batch_layout, check_attention, explicit_mask, sequence_notes
from .result import MemoryEstimate
from .transients import (autocast_copies, cuda_workspaces, default_int8_outlier_fraction, input_leaf_and_grad,
                         int8_matmul_transient, int8_retained_per_step, int8_saved_anyway, last_hidden_state,
                         layer_backward_transients, score_backward_peak)
from .steps import (_MLP_AND_O_ROLES, FUSED_HEAD_BYPASS_WARNING, checkpointed_layers, accumulated_gradients,
                    first_encoder_layer_gradients, check_loss, offload_host_bytes, offloaded_inputs, loss_backward,
                    loss_forward, grad_norm_temporaries, int8_inside_layer_backward, int8_kept_through_step,
                    int8_previous_step, kept_model_output, layer_gradients, loss_form_note, top_layer_gradients, previous_step_leaf,
                    reentrant_bias_output_grads, reentrant_layer_output, reentrant_position_bias_grad, step_recipe,
                    top_layer_checkpointed, uncheckpointed_saved)
from .weights import (Structure, lora_gradients, lora_weights, optimizer_state, optimizer_step_temporaries,
                      paged_optimizer_state, structure)

#: The moments of a step at which the peak can sit, in step order.
MOMENTS = ("forward", "int8 matmul", "loss backward", "layer backward", "encoder layer backward", "position bias",
           "grad norm",
           "optimizer step")


# ---------------------------------------------------------------------------------------------
# The peak: candidate moments
# ---------------------------------------------------------------------------------------------


def _present(v) -> bool:
    """A ledger line to add: a non-zero number, or an array of them (a sweep's cases)."""
    return not _is_scalar(v) or bool(v)


def moments(st: Structure, train: TrainSpec, kind: str, x: Shape, gpu: GpuSpec | None,
            cal: Calibration) -> dict[str, dict[str, Any]]:
    """Ledger (component -> bytes) at each candidate moment of a steady-state step."""
    m, opt = st.model, train.optimizer
    base = {
        "frozen_linear_weights": st.frozen_linear_weights,
        "unquantized_weights": st.unquantized_weights,
        "lora_weights": lora_weights(st, x.r),
        "optimizer_state": optimizer_state(st, x.r, opt),
        "cuda_workspaces": cuda_workspaces(gpu, cal, st.device, train.stack),
        "allocator_overhead": int(coefficient(cal, "allocator_overhead_bytes")),
    }
    if st.expert_weights:  # sparse-MoE families only: dense ledgers keep their keys
        base = {"expert_weights": st.expert_weights, **base}
    # the trainer's step structure (steps.py): checkpointing variant, accumulation, clipping,
    # what outlives a micro-step; the loop's defaults leave every term as it was
    rc = step_recipe(train)
    check_loss(st, rc)
    S = layer_saved(st, kind, x, "decoder")
    layer_input = st.stream_bytes * m.hidden_size * x.T
    acts = (saved_activations(st, kind, x, train.gradient_checkpointing) + uncheckpointed_saved(st, rc, S, layer_input)
            - offloaded_inputs(st, x, rc, "forward"))
    int8_all = int8_retained_per_step(st, x, train.int8_outlier_fraction, train.gradient_checkpointing)
    int8_keep = int8_kept_through_step(int8_all, st, rc)
    # this step's int8 inputs that autograd saves anyway (no double count: one storage, held by
    # both the ctx attribute and the saved tensor until this step's graph dies, so through the
    # forward, the loss backward and the top layer's backward alike); the previous step's graph
    # holds its own copies in full (the loop only)
    int8_now = int8_keep - int8_saved_anyway(st, kind, x, train.gradient_checkpointing)
    int8_prev = int8_previous_step(int8_keep, rc)
    grads = accumulated_gradients(st, x.r, rc)
    out: dict[str, dict[str, Any]] = {}
    # 1. forward, inside the loss. int8: the previous step's graph still holds its ctx tensors.
    leaf = input_leaf_and_grad(st, x, train.gradient_checkpointing)
    gc = train.gradient_checkpointing
    amp = {k: autocast_copies(st, x.r, gc, k, lm_head_called=rc.loss != "chunked")
           for k in ("forward", "loss backward", "layer backward")}
    out["forward"] = dict(base, activations=acts + int8_now + last_hidden_state(st, x),
                          logits_loss=loss_forward(st, x, rc), int8_previous_step=int8_prev,
                          previous_step_input_grad=previous_step_leaf(leaf, rc), lora_gradients=grads)
    if _present(amp["forward"]):
        out["forward"]["autocast_copies"] = amp["forward"]
    # 1b. int8: inside the last layer's int8 matmul of the forward (before the logits exist).
    if st.linear_quant == "int8":
        out["int8 matmul"] = dict(base, activations=acts + int8_now, int8_previous_step=int8_prev,
                                  previous_step_input_grad=previous_step_leaf(leaf, rc), lora_gradients=grads,
                                  kernel_transients=int8_matmul_transient(st, x, train.int8_outlier_fraction))
    # 2. loss backward, at the head.
    out["loss backward"] = dict(base, activations=acts + int8_now, logits_loss=loss_backward(st, x, rc),
                                lora_gradients=grads)
    if _present(amp["loss backward"]):
        out["loss backward"]["autocast_copies"] = amp["loss backward"]
    # 3. the first (top) decoder layer's backward: the other layers' inputs (checkpointing) or
    #    saved tensors, this layer's saved tensors (recomputed), gradient transients.
    top_ckpt = top_layer_checkpointed(st, rc)
    if train.gradient_checkpointing:
        below = (checkpoint_inputs(st, x, kind) + uncheckpointed_saved(st, rc, S, layer_input)
                 - offloaded_inputs(st, x, rc, "layer backward"))
        if not top_ckpt:  # every_n_layers left the top layer out: its S is added below, not its input
            below = below - S
    else:
        below = (m.num_layers - 1) * S
        if m.is_encoder_decoder:
            below = below + m.num_encoder_layers * layer_saved(st, kind, x, "encoder")
    below = below + encoder_kept_in_decoder_backward(st, x, train.gradient_checkpointing) + rope_tables(st, x)
    # gemma3: a global top layer saves and recomputes with the global layers' kernel; the
    # sliding layer below it (sliding kernel, its mask) may be the larger: the larger of the two
    S_top, top_transients = S, layer_backward_transients(st, x, kind, top_ckpt)
    if x.global_attention is not None and m.arch.global_top_layer and train.gradient_checkpointing:
        S_glob = layer_saved(st, x.global_attention, replace(x, global_attention=None), "decoder")
        S_sl = layer_saved(st, kind, replace(x, global_attention=None), "decoder")
        T_glob = layer_backward_transients(st, x, x.global_attention, top_ckpt)
        glob = S_glob + T_glob > S_sl + top_transients  # element-wise for the sweep's arrays
        S_top, top_transients = where(glob, S_glob, S_top), where(glob, T_glob, top_transients)
    if train.gradient_checkpointing and top_ckpt:  # the recompute's input norm keeps the checkpointed input
        S_top = S_top - recompute_shares_input(st, x)
    out["layer backward"] = dict(base, activations=below + S_top + int8_now
                                 + int8_inside_layer_backward(st, x, kind, rc, train.int8_outlier_fraction)
                                 + reentrant_layer_output(st, x, rc) + reentrant_bias_output_grads(st, x, rc),
                                 backward_transients=top_transients,
                                 lora_gradients=layer_gradients(st, x.r, rc, m.num_layers))
    # The top layer's own LoRA gradients arrive as its backward goes: while its MLP runs backward
    # only the MLP-out adapters' exist (steps.top_layer_gradients); the MLP-in and o_proj
    # adapters' come once the MLP, the norms after the attention and the o_proj / MLP LoRA
    # branches have released what they saved (released_before_attention_backward), q/k/v's after
    # the attention core. The moment is the largest of three stages: the MLP (``top_transients``
    # without the score stage), a score-matrix core's backward (math, eager:
    # transients.score_backward_peak) with the MLP and o_proj gradients, and the layer's end, all
    # its gradients beside what the attention still holds and the input gradient (a·T·h). Each
    # stage is what ``top_transients`` bounded with every gradient at once. Encoder-decoder,
    # sparse-MoE and mixed sliding/global (gemma3) models keep that bound: their stage order
    # differs.
    if not (m.is_encoder_decoder or m.moe is not None or x.global_attention is not None):
        lb = out["layer backward"]
        acc = accumulated_gradients(st, x.r, rc)
        stream = st.stream_bytes * x.T * m.hidden_size
        after_mlp = lb["activations"] - released_before_attention_backward(st, x)
        stages = [dict(activations=lb["activations"],
                       backward_transients=layer_backward_transients(st, x, kind, top_ckpt, score=False),
                       lora_gradients=top_layer_gradients(st, x.r) + acc),
                  dict(activations=after_mlp, backward_transients=stream, lora_gradients=lb["lora_gradients"])]
        if kind in ("math", "eager"):
            stages.append(dict(activations=after_mlp, backward_transients=score_backward_peak(st, kind, x) + stream,
                               lora_gradients=top_layer_gradients(st, x.r, _MLP_AND_O_ROLES) + acc))
        best = stages[0]
        for cand in stages[1:]:
            bigger = sum(cand.values()) > sum(best.values())  # element-wise for a sweep
            best = {k: where(bigger, cand[k], best[k]) for k in best}
        # the layers below run the same stages with every gradient of the layers above made and
        # what each of those held gone: its checkpointed input (a·T·h) or, without checkpointing,
        # its saved tensors S. Per layer down the change is g − that (g = one layer's LoRA
        # gradients), so the bottom layer's backward is the larger when g exceeds it (large ranks,
        # few tokens): (L − 1)·(g − that) above the top layer's
        if not rc.offload and (not gc or checkpointed_layers(st, rc) == m.num_layers):
            held = layer_input if gc else S
            g = lora_gradients(st, x.r) / max(m.num_layers, 1)
            lower = (g > held) * (m.num_layers - 1)  # element-wise for a sweep
            best["lora_gradients"] = best["lora_gradients"] + lower * g
            best["activations"] = best["activations"] - lower * held
        lb.update(best)
    if _present(amp["layer backward"]):
        out["layer backward"]["autocast_copies"] = amp["layer backward"]
    # 3b. encoder-decoder: the top encoder layer's backward, after the decoder's backward has
    #     released the decoder's saved tensors. It sets the peak when the encoder is the longer stack.
    #     The top encoder layer, or the bottom one (the last layer backward reaches: fewer
    #     checkpointed inputs below it, nearly every adapter's gradient made), whichever is larger.
    if m.is_encoder_decoder:
        enc_top = encoder_backward_activations(st, kind, x, train.gradient_checkpointing)
        grads_top = (lora_gradients(st, x.r) * m.num_layers / max(m.num_layers + m.num_encoder_layers, 1)
                     + accumulated_gradients(st, x.r, rc))
        enc_bottom = enc_top - encoder_layers_above_bottom(st, kind, x, train.gradient_checkpointing)
        grads_bottom = first_encoder_layer_gradients(st, x.r, rc)
        bottom = enc_bottom + grads_bottom > enc_top + grads_top  # element-wise for a sweep's arrays
        out["encoder layer backward"] = dict(
            base, activations=where(bottom, enc_bottom, enc_top) + int8_keep
            + int8_inside_layer_backward(st, x, kind, rc, train.int8_outlier_fraction, stack="encoder")
            + reentrant_layer_output(st, x, rc, stack="encoder")
            + reentrant_bias_output_grads(st, x, rc, stack="encoder"),
            backward_transients=layer_backward_transients(st, replace(x, tseq=x.seq), kind,
                                                          train.gradient_checkpointing, stack="encoder",
                                                          bias_grad=rc.checkpointing and rc.reentrant),
            lora_gradients=where(bottom, grads_bottom, grads_top))
    # 3c. T5/mT5: the encoder's first block computing its relative position bias (int64 bucketing
    #     temporaries over s_e²), in the forward or, with checkpointing, in its recompute at the
    #     end of backward, when little else is alive but the bucketing is large at long inputs
    pb = position_bias_activations(st, x, train.gradient_checkpointing)
    if _present(pb):
        out["position bias"] = dict(base, activations=pb + int8_keep + reentrant_position_bias_grad(st, x, rc),
                                    lora_gradients=lora_gradients(st, x.r) if train.gradient_checkpointing else grads)
    # 3d. the gradient norm (clipping, and Trainer's logged norm), before the optimizer step
    clip = grad_norm_temporaries(st, rc)
    #     and 4. the optimizer step. Both run while the loop's ``loss`` still holds this step's
    #     graph: its grad-requiring leaves with their ``.grad`` and its int8 ctx tensors.
    if clip:
        out["grad norm"] = dict(base, lora_gradients=lora_gradients(st, x.r), optimizer_temporaries=clip,
                                input_embedding_grad=previous_step_leaf(leaf, rc), int8_previous_step=int8_prev)
    out["optimizer step"] = dict(base, lora_gradients=lora_gradients(st, x.r),
                                 optimizer_temporaries=optimizer_step_temporaries(st, x.r, opt),
                                 input_embedding_grad=previous_step_leaf(leaf, rc), int8_previous_step=int8_prev)
    # 5. a loop that binds the model's output keeps its logits (--loop-outputs; steps.kept_model_output)
    for name, ledger in out.items():
        held = kept_model_output(st, x, rc, name, gc)
        if _present(held):
            ledger["model_output"] = held
    return out


def peak_of(ms: dict[str, dict[str, Any]]):
    """The one peak reduction over a step's moments (``moments()``): ``(peak_allocated, moment)``.

    Each moment's total is ``int(Σ components)``; the peak moment is the first largest in step
    order (MOMENTS); peak allocated is ``Σ int(component)`` at that moment, i.e. exactly the sum of
    the itemised lines an estimate prints. Components may be ints or numpy arrays of one shape
    (a sweep group): then both results are arrays (int64 bytes, object array of moment names).
    """
    names = list(ms)
    totals = [sum(v.values()) for v in ms.values()]
    if all(_is_scalar(t) for t in totals):
        ints = [int(t) for t in totals]
        i = max(range(len(ints)), key=lambda j: ints[j])
        return sum(int(v) for v in ms[names[i]].values()), names[i]
    import numpy as np

    shape = next(np.shape(t) for t in totals if not _is_scalar(t))

    def as_int(v):  # int(v), element-wise for arrays
        return int(v) if _is_scalar(v) else np.asarray(v).astype(np.int64)

    idx = np.stack([np.broadcast_to(as_int(t), shape) for t in totals]).argmax(axis=0)
    sums = np.stack([np.broadcast_to(sum(as_int(v) for v in ms[k].values()), shape) for k in names])
    moment = np.empty(len(names), dtype=object)
    moment[:] = names
    return np.take_along_axis(sums, idx[None, :], axis=0)[0], moment[idx]


@dataclass(frozen=True)
class Setup:
    """Everything the ledger needs for one case."""

    structure: Structure
    train: TrainSpec
    attention: str
    shape: Shape = field(repr=False)
    #: the user's recipe when the engine computes in another dtype (``parallel.compute_train``)
    loaded: TrainSpec | None = None


def make_setup(model: ModelSpec, lora, train: TrainSpec, adapted: tuple[LinearSpec | ExpertSpec, ...],
               compute_capability: str | None = "9.0") -> Setup:
    from ..storage import Dtypes

    from .parallel import compute_train

    loaded, train = train, compute_train(train)  # several GPUs: an fp32 base may run as a 16-bit model
    st = structure(model, adapted, Dtypes.of(train), train.double_quant, train.device)
    x = with_global_attention(model, train, compute_capability, sequence_shape(model, train, lora, compute_capability))
    return Setup(st, train, choose_attention(model, resolve_recipe(train), compute_capability), x,
                 loaded=loaded if loaded is not train else None)


def global_attention(model: ModelSpec, train: TrainSpec, compute_capability: str | None) -> str | None:
    """The kernel of the global layers of a model whose sliding window covers only some layers
    (gemma3 ``layer_types``, ``ArchSpec.sliding_layers``): the window never masks them
    (``choose_attention(sliding=False)``); None for every other model."""
    n_sl = model.arch.sliding_layers
    if n_sl is None or n_sl >= model.num_layers:
        return None
    return choose_attention(model, resolve_recipe(train), compute_capability, sliding=False)


def with_global_attention(model: ModelSpec, train: TrainSpec, compute_capability: str | None, x: Shape) -> Shape:
    """``x`` with ``Shape.global_attention`` set (``global_attention``)."""
    g = global_attention(model, train, compute_capability)
    return x if g is None else replace(x, global_attention=g)


def sequence_shape(model: ModelSpec, train: TrainSpec, lora, compute_capability: str | None) -> Shape:
    """The ledger's Shape for ``train``'s worst batch (``sequences.batch_layout``): b rows of s
    tokens as the model sees them (padding-free: 1 row of b·L), ``masked`` for a padded or packed
    batch (an explicit mask for sdpa/eager; none for flash_attention_2, which unpads or runs
    varlen), ``rope_rows`` = rows when position ids are passed (the RoPE tables are built from
    them: [rows, s, d]). Raises InputError for flash_attention_2 where flash-attn refuses
    (``sequences.check_attention``), for an sdpa kernel torch cannot run here
    (``activations.check_attention_kernel``) and for a padding mode on an encoder-decoder model."""
    recipe = resolve_recipe(train)
    from ..storage import Dtypes, dtype_bytes

    check_attention(recipe, compute_capability, dtype_bytes(Dtypes.of(recipe).stream))
    check_attention_kernel(model, recipe, compute_capability)  # an explicit --attention torch cannot run
    if train.padding == "max-length":  # today's shape (arrays from a sweep pass through)
        tseq = (train.target_seq if train.target_seq is not None else train.seq) if model.is_encoder_decoder else train.seq
        return Shape(b=train.batch, seq=train.seq, tseq=tseq, r=lora.rank, dropout=lora.dropout)
    if model.is_encoder_decoder:
        raise InputError(f"--padding {train.padding} is modelled for decoder-only models; {model.model_type} is "
                         f"encoder-decoder: use --padding max-length")
    layout = batch_layout(train)
    # falcon (arch.sdpa_mask) builds and passes its additive mask every call already: the packed
    # or padded mask replaces it, nothing is added
    masked = (explicit_mask(layout, model.model_type) and recipe.attn_implementation != "flash_attention_2"
              and not model.arch.sdpa_mask)
    fa2 = recipe.attn_implementation == "flash_attention_2"
    return Shape(b=layout.rows, seq=layout.row_len, tseq=layout.row_len, r=lora.rank, dropout=lora.dropout,
                 masked=masked, rope_rows=layout.rows if layout.packed else 1,
                 fa2_copies=fa2 and (layout.padded or (layout.packed and layout.rows == 1)))


def workspace_blocks(gpu: GpuSpec | None, cal: Calibration, device: str = "cuda", stack=None) -> tuple[int, ...]:
    """The cuBLAS workspaces as the allocator sees them: one block per handle
    (``transients.cuda_workspaces`` = handles x bytes per handle)."""
    total = int(cuda_workspaces(gpu, cal, device, stack))
    n = max(int(coefficient(cal, "cublas_handles")), 1)
    return (total // n,) * n if total else ()


def reserved_and_band(st: Structure, x: Shape, kind: str, peak_allocated, gpu: GpuSpec | None, cal: Calibration,
                      stack=None, alloc_conf: str = "", one_gpu: bool = True, train: TrainSpec | None = None,
                      rank_ledgers: dict | None = None, param_factor: float = 1):
    """(peak reserved, its uncertainty in bytes) from peak allocated: ints, or int64 arrays.

    A GPU calibration that fitted ``reserved_over_allocated_ratio`` from profile records (measured
    max_memory_reserved) wins: reserved = allocated × (1 + ratio), band ``reserved_over_allocated_
    uncertainty`` × allocated. Otherwise the allocator's closed form
    (``allocator_slack.peak_reserved``: the built model's segments replayed through the
    caching-allocator rules + the step's segments; PYTORCH_CUDA_ALLOC_CONF ``alloc_conf``: "" unset,
    or "expandable_segments:True"), band
    ``allocator_slack.slack_uncertainty`` (the fit's spread against the trace replays).
    ``one_gpu`` False (a multi-GPU engine): under FSDP (``train.strategy``, with the worst rank's
    ledger per moment ``rank_ledgers``) the per-stream closed form (``stream_reserved``: the
    caching allocator keeps the all-gather / reduce-scatter streams' blocks apart from the
    default stream's; its default-stream slack factors and band are the engine's, ``fsdp1`` /
    ``fsdp2``, where reserved-slack.json has them, ``allocator_slack.slack_factors``; ``param_factor``: the shards' stored dtype over the computed,
    ``parallel.param_factor``; FSDP1 with RAM-efficient loading: the constructor's blocks first,
    ``stream_reserved.construction_events``), band as above; DeepSpeed ZeRO and device_map (not replayed): the
    calibration's ratio. DDP (the whole model on the default stream) is ``one_gpu``."""
    from . import allocator_slack

    allocator_slack.check_config(alloc_conf)
    if (not one_gpu and not _calibrated(cal, "reserved_over_allocated_ratio") and train is not None
            and rank_ledgers and train.strategy in ("fsdp", "fsdp-offload")):
        from . import stream_reserved
        from .parallel import construction_tensors, fsdp_root_unit, layer_unit, layers_total, shard_group

        conf = alloc_conf or "default"
        recipe = resolve_recipe(train)
        version = recipe.fsdp_version
        engine = f"fsdp{version}"
        built = ()
        if version == 1 and recipe.ram_efficient_loading:
            # rank 0 on the host, the others on meta: the constructor moves / materializes each
            # unit on the GPU and broadcasts it (stream_reserved.construction_events)
            root_t, layer_t = construction_tensors(st, param_factor)
            built = stream_reserved.construction_events(root_t, layer_t, layers_total(st), shard_group(train),
                                                         offload=train.strategy == "fsdp-offload")
        c = allocator_slack.slack_factors(conf, engine)
        head, layer = allocator_slack.step_blocks(st, x, kind)
        extra = stream_reserved.round_up(c.get("phi_layer", 0.0) * layer, 1)
        r = stream_reserved.peak_reserved(rank_ledgers, version, maximum(head, layer), c["phi"], conf,
                                          root=fsdp_root_unit(st, recipe), unit=layer_unit(st, lora_weights(st, x.r)),
                                          extra=extra, shard_group=shard_group(train), param_factor=param_factor,
                                          construction=built, fill=layer if version == 1 else 0,
                                          lora_block=lora_mp_shard(st, train, x.r),
                                          offload=train.strategy == "fsdp-offload")
        r = maximum(r, peak_allocated)
        return ((int(r) if _is_scalar(r) else r.astype("int64")),
                allocator_slack.slack_uncertainty(peak_allocated, conf, engine=engine))
    if _calibrated(cal, "reserved_over_allocated_ratio") or not one_gpu:
        r = peak_allocated * (1 + coefficient(cal, "reserved_over_allocated_ratio"))
        u = peak_allocated * coefficient(cal, "reserved_over_allocated_uncertainty")
        if _is_scalar(r):
            return int(r), int(u)
        return r.astype("int64"), u.astype("int64")
    ws = workspace_blocks(gpu, cal, st.device, stack)
    return (allocator_slack.peak_reserved(st, x, kind, peak_allocated, ws, alloc_conf or "default"),
            allocator_slack.slack_uncertainty(peak_allocated, alloc_conf or "default"))


def lora_mp_shard(st: Structure, train: TrainSpec, r):
    """Bytes of the largest LoRA unit's low-precision shard FSDP1 casts before each all-gather
    (``stream_reserved.mp_shard_blocks``), 0 when none is cast: PEFT's wrap policy makes each
    lora_A / lora_B its own flat parameter in the adapter dtype, and accelerate's MixedPrecision
    (``param_dtype`` = ``mixed_precision``; not under ``--trainer loop``,
    ``train_step.fsdp_mixed_precision``) casts it when the two differ
    (_flat_param.py::FlatParamHandle._init_param_reduce_dtypes, ``_use_low_precision_shard``).
    The block is bounded by A and B together, r·(in+out) elements in the param dtype over N_s
    (padded to N_s: _flat_param.py::FlatParamHandle._get_shard); it decides the pool (small
    below 1 MiB)."""
    from ..storage import dtype_bytes
    from .parallel import shard_group

    rr = resolve_recipe(train)
    mp = rr.mixed_precision
    if (train.strategy not in ("fsdp", "fsdp-offload") or rr.fsdp_version != 1 or rr.trainer == "loop"
            or mp not in ("bf16", "fp16") or dtype_bytes(mp) == st.adapter_bytes or not st.lora_sizes):
        return 0
    ns = shard_group(train)
    return -(-(r * max(st.lora_sizes)) // ns) * dtype_bytes(mp)


def context_and_band(gpu: GpuSpec | None, cal: Calibration, stack=None) -> tuple[int, int]:
    """(CUDA context + kernel modules, its uncertainty), bytes: a GPU calibration's fitted
    ``cuda_context_bytes`` (NVML used - reserved from profile records) with its
    ``cuda_context_uncertainty_bytes``, else the published figures of data/cuda-context.json for
    the stack's module loading and the GPU generation (``context.cuda_context``)."""
    if _calibrated(cal, "cuda_context_bytes"):
        return int(coefficient(cal, "cuda_context_bytes")), int(coefficient(cal, "cuda_context_uncertainty_bytes"))
    from .context import cuda_context

    c = cuda_context(gpu.compute_capability if gpu else None, stack)
    return c.bytes, c.uncertainty_bytes


def device_totals(peak_allocated, paged, cal: Calibration, reserved=None, context=None):
    """(peak reserved, device total, CUDA context): ints, or int64 arrays.

    ``reserved``: peak reserved from ``reserved_and_band``; None -> the calibration's ratio,
    allocated × (1 + reserved_over_allocated_ratio). ``context``: from ``context_and_band``; None
    -> the calibration's ``cuda_context_bytes``. Device total (NVML used) = reserved + context +
    paged optimizer buffers, which live in managed memory outside torch's allocator."""
    context = int(coefficient(cal, "cuda_context_bytes")) if context is None else int(context)
    if reserved is None:
        reserved = peak_allocated * (1 + coefficient(cal, "reserved_over_allocated_ratio"))
        reserved = int(reserved) if _is_scalar(reserved) else reserved.astype("int64")
    return reserved, reserved + context + paged, context


def first_layer_input(st: Structure, x: Shape):
    """Activations alive when the first layer's forward starts: its input hidden states
    (a·T·h; the encoder's for an encoder-decoder model) and the RoPE tables (``rope_tables``)."""
    m = st.model
    return st.stream_bytes * m.hidden_size * (x.T_enc if m.is_encoder_decoder else x.T) + rope_tables(st, x)


def estimate_memory(s: Setup, gpu: GpuSpec | None, cal: Calibration, alloc_conf: str = "") -> MemoryEstimate:
    """Peak allocated = the largest moment; reserved and device totals from named coefficients."""
    from ..storage import dtype_bytes
    from .parallel import host_ledger, host_notes, host_total, paged_per_rank, param_factor, rank_moments

    st, x = s.structure, s.shape
    one_gpu = moments(st, s.train, s.attention, x, gpu, cal)
    # per rank (estimate.parallel; --strategy single: {0: the one-GPU moments}); the worst rank
    # (the first largest) gives the top-level numbers
    loaded = s.loaded or s.train
    ranks = rank_moments(one_gpu, st, s.train, x.r, param_factor(loaded, s.train), first_layer_input(st, x))
    peaks = {k: peak_of(v) for k, v in ranks.items()}
    worst = max(peaks, key=lambda k: peaks[k][0])
    ms = ranks[worst]
    peak, peak_name = peaks[worst]
    components = {k: int(v) for k, v in ms[peak_name].items() if v}
    per_gpu = {k: {c: int(v) for c, v in ranks[k][peaks[k][1]].items() if int(v)} for k in ranks}
    paged = paged_per_rank(int(paged_optimizer_state(st, x.r, s.train.optimizer)), s.train)
    # the allocator's closed form (allocator_slack) replays the one-GPU model's weights, which a
    # DDP rank holds too (on the default stream); an FSDP rank holds shards and allocates on side
    # streams (stream_reserved); ZeRO / device_map take the prior ratio
    reserved, reserved_band = reserved_and_band(st, x, s.attention, peak, gpu, cal, s.train.stack, alloc_conf,
                                                one_gpu=s.train.strategy in ("single", "ddp"), train=s.train,
                                                rank_ledgers=ms, param_factor=param_factor(loaded, s.train))
    context, context_band = context_and_band(gpu, cal, s.train.stack)
    reserved, device, context = device_totals(peak, paged, cal, reserved, context)
    outside = {"cuda_context_and_libraries": context}
    if paged:
        outside["paged_optimizer_state"] = paged
    notes = []
    newer = versions.stack_note(s.train.stack)
    if newer:  # --stack torch=9.9: a release the rules do not index yet
        notes.append(newer)
    old_loss = loss_form_note(st.model, s.train)
    if old_loss:  # --stack transformers=4.40 with a family the loss-head rule does not list
        notes.append(old_loss)
    if st.linear_quant == "fp32" and s.train.quant in QUANTIZED:
        notes.append(f"{st.model.model_type}: transformers' bitsandbytes quantizer converts only exact nn.Linear "
                     f"modules; this family's Linears stay unquantized and are upcast to fp32 by "
                     f"prepare_model_for_kbit_training")
    if experts_unquantized(st.model, s.train.quant):
        notes.append(expert_quantization_warning(st, s.train.quant))
    if st.linear_quant == "int8" and s.train.int8_outlier_fraction is None:
        f = default_int8_outlier_fraction(st, x.T)
        notes.append(f"int8: assumes {f:.0%} of MLP-out input columns are outliers (random-init weights); "
                     f"trained models have far fewer: set --int8-outlier-fraction")
    if st.model.arch.from_meta_build:
        notes.append(generic_terms_note(st.model))
    host = offload_host_bytes(st, x, step_recipe(s.train))
    load_ratio = dtype_bytes(loaded.quant) / dtype_bytes(s.train.quant) if s.loaded else 1
    host_components = host_ledger(st, s.train, x.r, int(host), load_ratio)
    if s.train.strategy != "single":
        notes.append(parallel_note(s.train, worst, peaks))
        notes.extend(host_notes(st, s.train, x.r, host_components, int(host), load_ratio))
    if host:
        notes.append(f"checkpoint offload: {int(host) / 2**20:.1f} MiB of layer inputs sit in pinned host memory "
                     f"(torch.autograd.graph.save_on_cpu), not on the GPU")
    notes.extend(sequence_notes(st.model.model_type, s.train))
    if st.head_adapted and step_recipe(s.train).loss == "chunked":
        notes.append(FUSED_HEAD_BYPASS_WARNING)
    if not _calibrated(cal, "cuda_context_bytes"):
        if s.train.strategy in ("single", "ddp"):
            how = "the caching allocator's closed form (checked against allocator replays of the trace)"
        elif s.train.strategy in ("fsdp", "fsdp-offload") and not _calibrated(cal, "reserved_over_allocated_ratio"):
            how = ("the caching allocator's closed form per CUDA stream (FSDP's all-gather and reduce-scatter "
                   "streams keep their own cached blocks; checked against stream-aware replays of the trace; "
                   "published FSDP runs reserve more, up to 25%)")
        else:
            how = ("peak allocated x the prior ratio (the engine's allocations are not replayed; "
                   "published runs show 10-25% above this)")
        notes.append("device total adds the CUDA context from published figures (data/cuda-context.json), not "
                     f"yet calibrated from NVML on this GPU; peak reserved is {how}; peak allocated is the checked "
                     "figure")
    return MemoryEstimate(
        components=components,
        peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved,
        device_total_bytes=device,
        peak_moment=peak_name,
        moments={k: int(sum(v.values())) for k, v in ms.items()},
        outside_allocator_bytes=outside,
        notes=tuple(notes),
        per_gpu=per_gpu,
        host_bytes=host_total(host_components),
        host_components=host_components,
        reserved_uncertainty_bytes=reserved_band,
        context_uncertainty_bytes=context_band,
    )


def parallel_note(train: TrainSpec, worst: int, peaks: dict) -> str:
    """One line naming the layout the per-GPU numbers assume and the rank that peaks."""
    t = train
    what = {"ddp": "DDP (replicated)", "device-map": "device_map layer split (one process)",
            "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3-offload": "ZeRO-3 + CPU offload"}
    if t.strategy in ("fsdp", "fsdp-offload"):
        from ..trainers import resolve_recipe

        r = resolve_recipe(t)
        name = f"FSDP{r.fsdp_version} {r.fsdp_sharding}" + (" + CPU offload" if t.strategy == "fsdp-offload" else "")
    else:
        name = what[t.strategy]
    same = len({int(p) for p, _ in peaks.values()}) == 1
    who = "every rank alike" if same else f"rank {worst} peaks"
    head = f"{t.num_gpus} GPUs ({t.nodes} node{'s' if t.nodes > 1 else ''}), {name}: numbers are per GPU ({who}); "
    if t.strategy == "device-map":
        return head + "one batch passes through the GPUs in turn; each holds its layers' saved activations"
    return head + f"activations are per rank (--batch {t.batch} rows each), never divided by the GPU count"


def expert_quantization_warning(st: Structure, quant: str) -> str:
    """The loud note of a bitsandbytes "QLoRA" of a sparse-MoE model: its experts are not quantized.

    transformers 5's bnb quantizer converts only ``type(module) is nn.Linear`` / Conv1D
    (integrations/bitsandbytes.py::replace_with_bnb_linear), and fused experts are 3-D
    nn.Parameters; prepare_model_for_kbit_training then upcasts them to fp32 (storage.expert_storage)."""
    gib = st.expert_weights / 2**30
    n = sum(e.numel for e in st.model.experts)
    return (f"WARNING: {quant} does NOT quantize this MoE's experts: bitsandbytes converts only nn.Linear, and "
            f"transformers 5 stores the {n / 1e9:.1f} B expert parameters as fused 3-D tensors, so they load in bf16 "
            f"and prepare_model_for_kbit_training upcasts them to fp32 ({gib:.1f} GiB, line 'expert_weights'); "
            f"the default grouped_mm experts kernel then rejects the fp32 experts (torch._grouped_mm: 'Expected "
            f"inputs of BF16 type'; seen in loraplan's meta trace), so the step fails unless "
            f"experts_implementation='eager'. "
            f"Instead: train the bf16 base (--quant bf16 halves this line), or quantize the experts with "
            f"{'; '.join(EXPERT_QUANTIZATION_PATHS)}")


def _calibrated(cal: Calibration, name: str) -> bool:
    """True when a GPU calibration (not the default priors) supplies ``name``."""
    return any(name in (prov or {}) for key, prov in cal.provenance.items() if key != "default")


def generic_terms_note(model: ModelSpec) -> str:
    """What an estimate for a family without a shape rule (a meta-device build) knows and guesses."""
    a = model.arch
    return (f"{model.model_type} has no shape rule: Linear shapes, LoRA, optimizer, gradient and logits lines "
            f"are exact (read from a meta-device build); activations use generic terms: "
            f"{a.norms_per_layer} {a.norm} norms per layer, a {a.mlp} MLP, {a.attention} attention, no per-head norms, "
            f"no family-specific scaling or dropout tensors; check with 'loraplan profile --trace'")
