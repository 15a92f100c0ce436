"""The per-GPU ledger: what each multi-GPU engine shards, replicates and gathers for LoRA.

Input: the one-GPU ledger at each moment of the step (``memory.moments``: component -> bytes);
output: one such ledger per rank (``rank_moments``) and the host RAM the run needs
(``host_ledger``). ``--strategy single`` returns the one-GPU moments unchanged, so every
one-GPU number stays as it was. Activations are per rank (every rank runs its own micro-batch
of ``--batch`` rows) and are never divided by N. Pure Python; components may be numpy arrays
(a sweep's grid): every rule is a product with a scalar.

Notation: N ranks, N_s ranks a parameter is sharded over (N; GPUs per node for HYBRID_SHARD),
L decoder (+ encoder) layers, p trainable (LoRA) parameters, h hidden size.

Units (what an engine gathers at once), with PEFT's ``fsdp_auto_wrap_policy``
(peft utils/other.py: the model's ``_no_split_modules`` class, i.e. the decoder layer, plus every
leaf module whose weight requires grad, i.e. each lora_A / lora_B, is its own FSDP unit; the
root unit keeps the rest):
- a layer unit = (frozen Linear + expert weights) / L + the layer's LoRA weights;
- the root unit = embeddings, final norm, lm_head (``unquantized_weights``; the per-layer norms,
  2·h per layer, are counted there: < 0.01% of a layer).

Ledger lines (stable names; the fake-process-group trace compares with them):
- kept from the one-GPU ledger, scaled per engine: ``frozen_linear_weights``,
  ``unquantized_weights``, ``expert_weights`` (the rank's shard), ``lora_weights``,
  ``lora_gradients``, ``optimizer_state``, ``optimizer_temporaries``, and the per-rank
  activation lines unchanged;
- ``gathered_params``: all-gathered (unsharded) units alive at the moment, on top of the shard;
- ``all_gather_buffers``: FSDP2's flat all-gather outputs alive beside the unsharded parameters
  they are copied out to (in forward each lives until the next unit's copy-out: ``FIRST_GATHER``);
- ``reduce_scatter_buffers``: a unit's unsharded gradient handed to reduce-scatter, plus its
  1/N_s output (FSDP), or DeepSpeed's gradient bucket (``reduce_bucket_size``);
- ``ddp_buckets``: DDP's flat gradient buckets;
- ``master_weights``: ZeRO's fp32 partition of the (16-bit) trainables;
- ``persistent_params``: ZeRO-3 parameters below ``stage3_param_persistence_threshold``, kept whole;
- ``quant_state``: a 4-bit base's bitsandbytes quant state (absmax, codes), not a parameter, so
  kept whole on every rank when FSDP / ZeRO-3 shard the packed data (also under CPU offload,
  where the dequantizing kernel reads it on the GPU).
NCCL's own buffers are allocated by NCCL outside torch's allocator (not in peak allocated); they
sit inside the CUDA-context prior's uncertainty and are not a ledger line.

Engines (read from the installed sources; DeepSpeed is not installed and cannot run without
CUDA here: its rules are read from deepspeedai/DeepSpeed's source and modelled analytically):
- ``ddp``: torch/nn/parallel/distributed.py::DistributedDataParallel, every tensor replicated;
  the Reducer allocates one flat bucket tensor per bucket for the parameters that require grad
  (csrc/distributed/c10d/reducer.cpp::Reducer::initialize_buckets) at construction, a second
  copy of the trainables' gradients while ``gradient_as_bucket_view=False`` (the default; also
  accelerate's DistributedDataParallelKwargs default): p × grad bytes at every moment.
- ``fsdp`` / ``fsdp-offload``: FSDP1 (torch/distributed/fsdp/_flat_param.py flat parameters,
  sharded 1/N_s) or FSDP2 (_fully_shard, per-parameter DTensor shards); FULL_SHARD frees a
  unit's gathered parameters after its forward except the root's
  (_runtime_utils.py::_post_forward_reshard: ``not state._is_root``; FSDP2
  _fsdp_state.py::_lazy_init: the root's post_forward_mesh_info = None), so the root stays
  gathered from forward to the end of backward; FSDP2's forward frees a unit's all-gather output
  only after the next unit's copy-out, so its first decoder layer holds the root and the layer
  twice each (unsharded + output: ``FIRST_GATHER``), the rank's peak when the weights outweigh
  the activations; in backward the current layer is gathered,
  plus the next: FSDP2 prefetches it when the layer's backward starts; FSDP1 all-gathers it
  before it frees the current frozen unit, whatever ``--fsdp-backward-prefetch`` (``_fsdp``). A gathered unit is a full-size
  allocation beside the rank's shard, which stays allocated. FSDP1 adds a first moment, its lazy
  init (``LAZY_INIT``: each unit's unsharded buffers allocated and freed beside the shards, the
  fp32 copy too under parameter mixed precision; ``_fsdp1_lazy_init``). SHARD_GRAD_OP keeps every unit gathered
  from its forward until its backward. Sharded gradients and optimizer state are 1/N_s.
  ``use_orig_params`` changes no line: with PEFT's wrap policy (which transformers' Trainer applies,
  distributed/fsdp.py::update_fsdp_plugin_peft) no unit mixes frozen and trainable parameters,
  so no frozen flat parameter gets a gradient either way.
  ``fsdp-offload`` (CPUOffload(offload_params=True)) keeps the shards, their gradients and the
  optimizer (the step runs on CPU) in host RAM (pinned for the gradients:
  _flat_param.py ``_cpu_grad``); only gathered units and activations are on the GPU.
- ``zero1`` / ``zero2`` / ``zero3`` (deepspeed/runtime/zero/stage_1_and_2.py::DeepSpeedZeroOptimizer,
  stage3.py::DeepSpeedZeroOptimizer_Stage3, partition_parameters.py::Init): with bf16/fp16 the engine
  casts the module to 16 bit (runtime/engine.py::_configure_distributed_model), so LoRA weights
  are 2 B/param; the optimizer holds an fp32 master partition (4p/N) and its state on it (Adam:
  8p/N); ZeRO-1 keeps full 16-bit gradients until the boundary, ZeRO-2/3 reduce them in buckets
  of ``reduce_bucket_size`` elements (``ipg`` buffer) and keep their partition; at the step the
  partition's gradient is fp32 (4p/N). ZeRO-3 partitions the frozen base 1/N, keeps parameters
  below ``stage3_param_persistence_threshold`` elements whole, and gathers the running layer plus
  a prefetch of ``stage3_prefetch_bucket_size`` elements; ``zero3-offload`` puts the partitions,
  the master weights, gradients partitions and optimizer state in host RAM.
- ``device-map``: accelerate's big_modeling dispatch (one process): layers split evenly in
  order (the first L mod N GPUs take one more), the embeddings on the first GPU, final norm and
  lm_head (and the logits) on the last; each GPU holds its layers' weights, adapters, gradients,
  optimizer state and saved activations; the worst rank is usually the last.
"""

from __future__ import annotations

from typing import Any

from ..spec import TrainSpec
from ..storage import dtype_bytes
from .arrays import is_scalar, maximum
from .weights import Structure

#: the FSDP strategies (trainers.py owns the layout refusals)
from ..trainers import FSDP_STRATEGIES, parallel_setting

ZERO = ("zero1", "zero2", "zero3", "zero3-offload")
#: lines a sharding engine divides by N_s (the rank's shard of parameters, gradients, optimizer)
PARAM_LINES = ("frozen_linear_weights", "unquantized_weights", "expert_weights")
TRAINABLE_LINES = ("lora_weights", "lora_gradients", "optimizer_state", "optimizer_temporaries")
#: moments at which a decoder (encoder) layer's backward runs: a layer unit is gathered
BACKWARD_MOMENTS = ("layer backward", "encoder layer backward")


def compute_train(train: TrainSpec) -> TrainSpec:
    """The recipe the GPUs compute with. FSDP's MixedPrecision(param_dtype=bf16/fp16) (accelerate
    builds it from mixed_precision: utils/dataclasses.py::FullyShardedDataParallelPlugin.set_mixed_precision;
    FSDP2 MixedPrecisionPolicy; the trace and the bursts: ``train_step.fsdp_mixed_precision``, which
    ``--trainer loop``, a plain loop under torch.autocast with torch's FSDP defaults, does not
    use) gathers an fp32 base's parameters in 16 bit, and DeepSpeed casts
    the module to 16 bit (runtime/engine.py::_configure_distributed_model: ``module.bfloat16()``),
    so an fp32-loaded base under bf16/fp16 mixed precision runs as a 16-bit model (its
    activations, gathered units); FSDP keeps the shards in fp32 (``param_factor``). Otherwise
    ``train`` unchanged."""
    if train.strategy not in FSDP_STRATEGIES + ZERO or train.quant != "fp32":
        return train
    from dataclasses import replace

    from ..trainers import resolve_recipe

    r = resolve_recipe(train)
    mp = r.mixed_precision
    if mp not in ("bf16", "fp16") or (train.strategy in FSDP_STRATEGIES and r.trainer == "loop"):
        return train
    return replace(train, quant=mp, load_dtype=None)


def param_factor(loaded: TrainSpec, computed: TrainSpec) -> float:
    """Bytes of a stored (sharded) base parameter over its computed size: 2 for FSDP's fp32
    shards of a base gathered in 16 bit (``compute_train``), else 1 (DeepSpeed's cast is in place)."""
    if loaded.quant == computed.quant or loaded.strategy not in FSDP_STRATEGIES:
        return 1
    return dtype_bytes(loaded.quant) / dtype_bytes(computed.quant)


def shard_group(train: TrainSpec) -> int:
    """N_s: ranks a parameter is sharded over (HYBRID_SHARD: the GPUs of one node)."""
    if train.strategy in FSDP_STRATEGIES and train.fsdp_sharding == "hybrid":
        return train.num_gpus // train.nodes
    return train.num_gpus


def layers_total(st: Structure) -> int:
    m = st.model
    return max(m.num_layers + m.num_encoder_layers, 1)


def layer_unit(st: Structure, lora_weights) -> Any:
    """Bytes of one decoder-layer unit as gathered: (frozen Linear + expert weights - the
    replicated 4-bit quant state)/L + its LoRA."""
    return (st.frozen_linear_weights - quant_state_bytes(st) + st.expert_weights + lora_weights) / layers_total(st)


def _root_bytes_per_element(st: Structure) -> float:
    """Bytes per element of the root's parameters as ``unquantized_weights`` stores them (embeddings,
    position tables, norms, biases, an untied lm_head)."""
    m = st.model
    numel = sum(p.numel for p in m.others) + sum(l.out_features for l in m.linears if l.bias and l.role != "lm_head")
    numel += sum(l.in_features * l.out_features for l in m.linears if l.role == "lm_head" and not m.tie_word_embeddings)
    return st.unquantized_weights / max(numel, 1)


def accelerate_carves_fsdp2(train: TrainSpec) -> bool:
    """Whether the resolved ``train`` runs FSDP2 FULL_SHARD under a Trainer whose accelerate cuts the
    input embedding and the tail into units of their own (version rule ``accelerate_fsdp2_units``)."""
    from ..versions import rule

    return (train.strategy in FSDP_STRATEGIES and train.fsdp_version == 2 and train.trainer != "loop"
            and train.fsdp_sharding != "shard-grad-op"
            and rule("accelerate_fsdp2_units", train.stack) == "embed_and_tail")


def fsdp2_units(st: Structure, train: TrainSpec) -> dict | None:
    """The non-layer FSDP2 units a Trainer's accelerate builds (version rule ``accelerate_fsdp2_units``):
    None where the root holds everything but the decoder layers (a plain loop's fully_shard, accelerate
    < 1.14, SHARD_GRAD_OP where every unit stays gathered anyway); else bytes as gathered of ``rest`` (the
    root: norms, position tables, biases; torch's None heuristic keeps it gathered from its forward to
    its post-backward), ``embed`` (the untied input embedding, resharded after its forward: 0 when
    tied), ``tail`` (the output embedding, or the tied embedding, gathered from its forward until its
    post-backward at the start of backward: reshard_after_forward=False) and ``tied``."""
    if not accelerate_carves_fsdp2(train):
        return None
    m = st.model
    b = _root_bytes_per_element(st)
    embeds = [p.numel for p in m.others if p.kind == "embedding"]
    token = embeds[0] * b if embeds else 0
    tied = bool(m.tie_word_embeddings)
    head = 0 if tied else sum(l.in_features * l.out_features for l in m.linears if l.role == "lm_head") * b
    return {"rest": st.unquantized_weights - token - head, "embed": 0 if tied else token,
            "tail": token if tied else head, "tied": tied}


def fsdp_root_unit(st: Structure, train: TrainSpec):
    """The largest non-layer unit FSDP all-gathers (``fsdp2_units``; else the root, every parameter
    outside the decoder layers): for the all-gather stream's two coexisting outputs."""
    u = fsdp2_units(st, train)
    return st.unquantized_weights if u is None else maximum(maximum(u["rest"], u["embed"]), u["tail"])


def construction_tensors(st: Structure, param_factor: float = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(root, layer): bytes of each tensor FSDP1's constructor moves onto the GPU for the root
    unit (embeddings, position tables, an untied lm_head) and for one decoder-layer unit (its
    frozen Linear weights as stored: ``layer_unit``'s frozen part split by element count; the
    replicated 4-bit quant state is not a parameter), in the stored dtype (x ``param_factor``).
    Norms and biases (small-pool blocks) and LoRA factors (their own units) are left out; fused
    MoE experts too (one tensor per layer, not split here). For ``stream_reserved.construction_events``."""
    m = st.model
    head = [l for l in m.linears if l.role == "lm_head" and not m.tie_word_embeddings]
    b = _root_bytes_per_element(st) * param_factor
    root = [p.numel * b for p in m.others if p.kind in ("embedding", "position")]
    root += [l.in_features * l.out_features * b for l in head]
    first = [l for l in m.linears if l.role != "lm_head" and l.layer == 0 and l.stack == "decoder"]
    elems = sum(l.in_features * l.out_features for l in first)
    frozen = (st.frozen_linear_weights - quant_state_bytes(st)) / layers_total(st) * param_factor
    layer = [frozen * l.in_features * l.out_features / elems for l in first] if elems else []
    return tuple(int(v) for v in root), tuple(int(v) for v in layer)


def _replicate_quant_state(c: dict, st: Structure) -> None:
    """Move the 4-bit quant state out of ``frozen_linear_weights`` into its own, unsharded line
    (``quant_state``) before the shards are scaled."""
    qs = quant_state_bytes(st)
    if qs and "frozen_linear_weights" in c:
        c["frozen_linear_weights"] = c["frozen_linear_weights"] - qs
        c["quant_state"] = qs


def quant_state_bytes(st: Structure) -> int:
    """bitsandbytes 4-bit quantization state of the frozen Linears (absmax, nested absmax, code
    tables: ``weights.quantized_linear_bytes`` minus the packed data n/2): attributes of each
    Params4bit (``weight.quant_state``), not parameters, so neither FSDP's flat parameters nor
    ZeRO-3's partitions hold them: every rank keeps all of them on its GPU, where the 4-bit
    matmul dequantizes (bitsandbytes nn/modules.py::Linear4bit.forward, functional.py::dequantize_4bit).
    0 for a base that is not 4-bit."""
    from ..storage import linear_storage
    from .weights import _blocks, quantized_linear_bytes

    m, total = st.model, 0
    for l in m.linears:
        if l.role == "lm_head":
            continue
        q = linear_storage(m, st.dt, l)
        if q in ("nf4", "fp4"):
            total += quantized_linear_bytes(l, q, st.double_quant) - _blocks(l.in_features * l.out_features / 2)
    return int(total)


def lm_head_bytes(st: Structure) -> int:
    """lm_head (or the tied embedding) in the unquantized dtype: V·h·bytes."""
    m = st.model
    return m.vocab_size * m.hidden_size * dtype_bytes(st.dt.unquantized)


def trainable_params(st: Structure, r) -> Any:
    """p: LoRA parameters (r·(in+out) per adapted Linear)."""
    return sum(count * r * size for size, count in st.lora_sizes.items())


def rank_moments(ms: dict[str, dict[str, Any]], st: Structure, train: TrainSpec, r,
                 stored: float = 1, first_layer_input: Any = 0) -> dict[int, dict[str, dict]]:
    """Rank -> (moment -> ledger) for ``train.strategy`` over ``train.num_gpus`` ranks.

    ``single``: {0: ms}, unchanged. Data-parallel engines (DDP, FSDP, ZeRO) run the same step on
    every rank, so all ranks have one ledger (rank 0's is returned for every rank);
    device-map ranks differ. ``r`` is the LoRA rank (an int or a sweep array); ``stored``: bytes of
    a stored base parameter over its computed size (``param_factor``: FSDP's fp32 shards).
    ``first_layer_input``: bytes of activations alive when the first decoder layer's forward
    starts (its input hidden states and the RoPE tables), for FSDP2's ``FIRST_GATHER`` moment."""
    s = train.strategy
    if s == "single":
        return {0: ms}
    from ..trainers import resolve_recipe

    train = resolve_recipe(train)  # the engine defaults (FSDP version, ...) filled in
    if s == "device-map":
        return _device_map(ms, st, train)
    if s == "ddp":
        rule = _ddp
    elif s in FSDP_STRATEGIES:
        rule = _fsdp
    else:
        rule = _zero
    if rule is _fsdp and train.fsdp_version == 2 and "forward" in ms:
        ms = {**_fsdp2_forward_gathers(ms["forward"], first_layer_input), **ms}  # before "forward" in step order
    one = {name: rule(name, dict(c), st, train, r) for name, c in ms.items()}
    if stored != 1:
        for c in one.values():
            _scale(c, PARAM_LINES, stored)
    if rule is _fsdp and train.fsdp_version == 1 and one:
        one = {LAZY_INIT: _fsdp1_lazy_init(next(iter(one.values())), st, stored), **one}  # first in step order
    return {k: one for k in range(train.num_gpus)}


#: FSDP2's forward all-gathers (``_fsdp2_forward_gathers``): the copy-out of the first decoder
#: layer's all-gather (the root's all-gather output still alive) and of the last layer's
FIRST_GATHER = "first layer all-gather"
LAST_GATHER = "last layer all-gather"
#: lines of the one-GPU "forward" ledger not yet made when a layer's forward starts
_AFTER_LAYERS = ("logits_loss",)


def _fsdp2_forward_gathers(fwd: dict, first_layer_input: Any) -> dict[str, dict]:
    """The one-GPU ledgers of FSDP2's two forward all-gather moments, from the forward's.

    FSDP2 in forward (implicit prefetch: ``_fsdp_param_group.py::FSDPParamGroup.wait_for_unshard``)
    keeps a unit's flat all-gather output in ``comm_ctx.all_gather_state`` after its copy-out, and
    the next unit's ``wait_for_unshard`` drops it -- but through the local ``prev_all_gather_state``,
    so the output is freed only when that function returns, after this unit's copy-out
    (``foreach_all_gather_copy_out`` -> ``FSDPParam.alloc_all_gather_outputs``, the unsharded
    parameters). At that copy-out the previous unit's output, this unit's output and its unsharded
    parameters are alive at once (``_fsdp`` says which units). The two candidate moments:
    ``FIRST_GATHER``, the first decoder layer (after the root's: the largest all-gathers, almost no
    activations yet: ``first_layer_input``) and ``LAST_GATHER``, the last layer (the others'
    saved activations: the forward's ``activations`` line, an upper bound by the last layer's
    own saved tensors and the final norm's, which do not exist yet). Neither holds the loss."""
    last = {k: v for k, v in fwd.items() if k not in _AFTER_LAYERS}
    first = {k: v for k, v in last.items() if k not in ("activations", "autocast_copies")}
    first["activations"] = first_layer_input
    return {FIRST_GATHER: first, LAST_GATHER: last}


#: FSDP1's lazy init (the first forward's root pre-forward), a moment before the step's own
LAZY_INIT = "lazy init"
#: lines alive at FSDP1's lazy init: the rank's shards and adapters, the constant workspaces (no
#: optimizer state yet, no activations)
_LAZY_INIT_LINES = PARAM_LINES + ("quant_state", "lora_weights", "cuda_workspaces")


def _fsdp1_lazy_init(c: dict, st: Structure, stored: float = 1) -> dict:
    """FSDP1's lazy init (``_runtime_utils.py::_lazy_init`` -> ``_flat_param.py::FlatParamHandle.
    init_flat_param_attributes``, on the default stream): per handle it allocates and at once frees
    ``_full_param_padded`` (the unit as gathered) and, with parameter mixed precision,
    ``_full_prec_full_param_padded`` (the unit as stored: ``stored`` x, an fp32-loaded base gathered
    in 16 bit), beside the shards that ``FullyShardedDataParallel.__init__`` made. The moment: the
    ``_LAZY_INIT_LINES`` of ``c`` (a rank's moment) plus the largest such block as
    ``gathered_params`` (the trace's line for it: the root or a layer unit, frozen; each LoRA unit
    is smaller). Above the step's own moments when the fp32 root outweighs the activations (small
    batches); its segments are ``stream_reserved.lazy_init_state``'s."""
    out = {k: c[k] for k in _LAZY_INIT_LINES if k in c}
    out["gathered_params"] = maximum(st.unquantized_weights, layer_unit(st, 0)) * max(stored, 1)
    return out


def _scale(c: dict, keys, f) -> None:
    for k in keys:
        if k in c:
            c[k] = c[k] * f


def _ddp(moment: str, c: dict, st: Structure, train: TrainSpec, r) -> dict:
    """Replicated, plus the Reducer's flat buckets: one copy of the trainables' gradients
    (grad dtype = parameter dtype: ``lora_weights`` bytes), alive from construction."""
    c["ddp_buckets"] = c["lora_weights"]
    return c


def _fsdp(moment: str, c: dict, st: Structure, train: TrainSpec, r) -> dict:
    """FSDP1/FSDP2 per rank (module docstring): shards /N_s, gathered units per moment."""
    ns = shard_group(train)
    lw = c["lora_weights"]  # the full adapters: the gathered units carry theirs
    _replicate_quant_state(c, st)
    _scale(c, PARAM_LINES + TRAINABLE_LINES, 1 / ns)
    L = layers_total(st)
    unit = layer_unit(st, lw)
    root = st.unquantized_weights
    carved = fsdp2_units(st, train)
    if moment in ("grad norm", "optimizer step"):
        gathered = 0  # every unit resharded after its backward
    elif carved is not None:
        gathered, buffers = _fsdp2_carved(moment, carved, unit)
    elif moment == FIRST_GATHER:  # FSDP2: the root and the first layer being copied out, either sharding
        gathered = root + unit  # (_fsdp2_forward_gathers)
    elif train.fsdp_sharding == "shard-grad-op":
        gathered = root + L * unit  # kept gathered from each unit's forward until its backward
    elif moment in BACKWARD_MOMENTS and train.fsdp_version == 2:
        gathered = root + 2 * unit  # fully_shard prefetches the next layer when this one's backward starts
    elif moment == LAST_GATHER:  # FSDP2 FULL_SHARD: the root (resharded only after the loss) and the
        gathered = root + unit  # last layer being copied out; the others resharded after their forward
    elif moment in BACKWARD_MOMENTS:
        # FSDP1, any backward_prefetch: under PEFT's wrap policy a layer unit holds only frozen
        # parameters, so it is resharded by a hook on its input (_runtime_utils.py::
        # _register_post_backward_reshard_only_hook); that tensor is the previous unit's output,
        # whose hook (_register_pre_backward_hooks, registered first) all-gathers the previous unit
        # before this one is freed. At that boundary this layer's backward transients are gone:
        # the layer's peak holds one unit, the boundary two (the trace shows both regimes).
        # BACKWARD_PRE's prefetch targets the previous handle in post-forward order, this layer's
        # last LoRA unit (_exec_order_utils.py::get_handle_to_backward_prefetch), and reaches the
        # previous layer only from the layer's first LoRA unit, at the same boundary.
        gathered = root + unit + maximum(unit - c.get("backward_transients", 0), 0)
    else:  # forward / loss backward: the root only (never resharded after forward; FSDP2's last
        # layer all-gather output at the loss: all_gather_buffers below)
        gathered = root
    # the unsharded flat parameter / all-gather output is a full-size allocation beside the rank's
    # own shard, which stays allocated (_flat_param.py::FlatParamHandle._alloc_padded_unsharded_flat_param;
    # FSDP2 _fsdp_param.py::FSDPParam.init_unsharded_param)
    c["gathered_params"] = gathered
    if carved is not None and moment not in ("grad norm", "optimizer step"):
        if not is_scalar(buffers) or buffers:
            c["all_gather_buffers"] = buffers
    elif train.fsdp_version == 2 and moment in BACKWARD_MOMENTS:
        # _fsdp_collectives.py::foreach_all_gather: one flat output buffer of the unit, copied out
        # to the per-parameter tensors (foreach_all_gather_copy_out) before it is freed
        c["all_gather_buffers"] = unit
    elif train.fsdp_version == 2 and moment in (FIRST_GATHER, LAST_GATHER, "forward", "loss backward"):
        # forward: the all-gather outputs FSDPParamGroup.wait_for_unshard keeps (_fsdp2_forward_gathers):
        # the first layer's beside the root's, the last layer's beside the one before, and at the
        # loss the last layer's, which only the root's post-forward frees
        # (_fsdp_state.py::FSDPState._post_forward: ``all_gather_state = None``); at the loss
        # backward the last layer's, which the root's pre-backward prefetches
        # (FSDPParamGroup.pre_backward -> _backward_prefetch) and nothing copies out yet
        c["all_gather_buffers"] = {FIRST_GATHER: root + unit, LAST_GATHER: 2 * unit}.get(moment, unit)
    if moment in BACKWARD_MOMENTS:
        # the layer's LoRA gradients unsharded (FSDP1: the flat parameter's .grad; FSDP2: the
        # reduce-scatter input) and the 1/N_s output (_runtime_utils.py::_reduce_grad)
        c["reduce_scatter_buffers"] = lw / L * (1 + 1 / ns)
    if train.strategy == "fsdp-offload":  # shards, their grads and the optimizer in host RAM
        for k in PARAM_LINES + TRAINABLE_LINES:
            if k in c:
                c[k] = c[k] * 0
    return c


def _fsdp2_carved(moment: str, u: dict, unit) -> tuple:
    """(gathered, all-gather outputs) of ``_fsdp`` under accelerate's embedding / tail units
    (``fsdp2_units``): the root's rest is gathered throughout; the untied input embedding only inside
    its own forward, so its flat all-gather output is the one alive at the first layer's copy-out;
    the tail (output embedding, or the tied embedding from the forward's start) from its forward until
    its post-backward, before the layers' backward; the layers as in ``_fsdp`` (FULL_SHARD: resharded
    after forward, the next prefetched in backward)."""
    rest, tied, tail = u["rest"], u["tied"], u["tail"]
    held_tail = tail if tied else 0  # the tied embedding is gathered from the forward's start
    if moment == FIRST_GATHER:
        return rest + held_tail + unit, (tail if tied else u["embed"]) + unit
    if moment == LAST_GATHER:
        return rest + held_tail + unit, 2 * unit
    if moment in BACKWARD_MOMENTS:
        return rest + 2 * unit, unit
    if moment == "forward":  # at the loss: the tail's all-gather output (untied) or the last layer's
        return rest + tail, unit if tied else tail
    return rest + tail, 0  # loss backward: the tail still gathered, no all-gather output held


def deepspeed_setting(st: Structure, train: TrainSpec, key: str) -> int:
    """A DeepSpeed size in elements (trainers.json 'parallel.deepspeed' of ``--deepspeed-buckets``:
    a number, or {hidden_power k, factor f} = int(f·h^k), transformers' 'auto' fill)."""
    v = parallel_setting("deepspeed", train.deepspeed_buckets)[key]
    if isinstance(v, dict):
        return int(v["factor"] * st.model.hidden_size ** v["hidden_power"])
    return int(v)


def zero_bit16_dtype(adapter: str, train: TrainSpec) -> str:
    """The dtype DeepSpeed holds the trainables in: bf16/fp16 under that mixed precision (the
    engine casts the module: runtime/engine.py::_configure_distributed_model), else ``adapter``
    (PEFT's adapter dtype, ``Dtypes.adapter``)."""
    return train.mixed_precision if train.mixed_precision in ("bf16", "fp16") else adapter


def zero_bit16_bytes(st: Structure, train: TrainSpec) -> int:
    """Bytes per trainable element under DeepSpeed (``zero_bit16_dtype``)."""
    return dtype_bytes(zero_bit16_dtype(st.dt.adapter, train))


def engine_line_dtypes(train: TrainSpec, adapter: str, moment: str | None) -> dict[str, str]:
    """The dtype of the trainable ledger lines where the engine holds them in another than PEFT's
    ``adapter`` dtype, at ``moment`` (the ledger shown), from the same places as ``_zero``'s bytes:
    ZeRO's LoRA weights are the 16-bit copies (``zero_bit16_dtype``); its gradients are 16-bit
    until the step, where stage 1/2 hold the fp32 partition and stage 3 its 16-bit flat buffer
    and the fp32 copy. Other strategies: {} (the adapter dtype)."""
    if train.strategy not in ZERO:
        return {}
    b16 = zero_bit16_dtype(adapter, train)
    step = moment in ("grad norm", "optimizer step")
    if int(train.strategy[4]) == 3:
        grads = f"{b16} + fp32" if step and b16 != "fp32" else b16
    else:
        grads = "fp32" if step else b16
    return {"lora_weights": b16, "lora_gradients": grads}


def persistent_lora(st: Structure, train: TrainSpec, r) -> Any:
    """ZeRO-3: LoRA tensors with numel <= stage3_param_persistence_threshold are not partitioned
    (partition_parameters.py: ``ds_persist``); their bytes in 16 bit."""
    thr = deepspeed_setting(st, train, "stage3_param_persistence_threshold")
    b = zero_bit16_bytes(st, train)
    total = 0
    for size, count in st.lora_sizes.items():
        n = r * size
        total = total + count * n * b * (n <= thr)
    return total


def _zero(moment: str, c: dict, st: Structure, train: TrainSpec, r) -> dict:
    """DeepSpeed ZeRO-1/2/3 per rank (module docstring)."""
    n = train.num_gpus
    stage = int(train.strategy[4])
    offload = train.strategy.endswith("offload")
    p = trainable_params(st, r)
    b16 = zero_bit16_bytes(st, train)
    ratio = b16 / st.adapter_bytes  # the PEFT-dtype lines -> DeepSpeed's 16-bit copies
    full_grads = c.get("lora_gradients", 0) * ratio  # as far as the step has produced them
    lw16 = c["lora_weights"] * ratio
    c["lora_weights"] = lw16
    fp32_opt = 4 / st.adapter_bytes if train.optimizer == "adamw" else 1
    c["optimizer_state"] = c["optimizer_state"] * fp32_opt / n
    if "optimizer_temporaries" in c:
        c["optimizer_temporaries"] = c["optimizer_temporaries"] * fp32_opt / n
    c["master_weights"] = 4 * p / n if b16 != 4 else 0  # fp32 partition of the 16-bit trainables
    step = moment in ("grad norm", "optimizer step")
    if stage == 3:
        # stage3.py::DeepSpeedZeroOptimizer_Stage3.__init__: grad_partitions_flat_buffer, zeros of the
        # rank's partition in gradient_accumulation_dtype (engine.py::get_data_types: the model dtype
        # unless data_types.grad_accum_dtype), allocated at init; every reduced gradient lands there.
        # At the step the partition's gradient is copied to fp32 (_prepare_fp32_grad_for_sub_group)
        c["lora_gradients"] = b16 * p / n + (4 * p / n if step else 0)
    elif step:
        c["lora_gradients"] = 4 * p / n  # the fp32 gradient of the partition
    elif "lora_gradients" in c:
        c["lora_gradients"] = full_grads if stage == 1 else full_grads / n
    if stage >= 2:
        # the ipg bucket: reduce_bucket_size elements in the 16-bit dtype whatever the trainables'
        # count (contiguous_gradients, DeepSpeedZeroConfig's default True): stage3.py allocates it at
        # init (``bucket.buffer = torch.empty(self.reduce_bucket_size, ...)``), stage_1_and_2.py::
        # setup_buckets before the first backward, and neither frees it between steps
        # (overlap_comm, off by default below stage 3, would add a second one there)
        c["reduce_scatter_buffers"] = deepspeed_setting(st, train, "reduce_bucket_size") * b16
    if stage == 3:
        _replicate_quant_state(c, st)
        _scale(c, PARAM_LINES, 1 / n)
        persist = persistent_lora(st, train, r)
        c["lora_weights"] = (lw16 - persist) / n
        c["persistent_params"] = persist
        unit = layer_unit(st, 0)
        prefetch = deepspeed_setting(st, train, "stage3_prefetch_bucket_size") * 2  # 16-bit elements
        if moment in BACKWARD_MOMENTS:
            gathered = unit + min(prefetch, unit)
        elif moment in ("forward", "loss backward"):
            gathered = lm_head_bytes(st)  # the head, gathered for the loss
        else:
            gathered = 0
        c["gathered_params"] = gathered  # param.data gathered in full; ds_tensor (the partition) stays
    if offload:  # partitions, master weights, fp32 grads and optimizer state in host RAM
        for k in PARAM_LINES + ("lora_weights", "optimizer_state", "optimizer_temporaries", "master_weights"):
            if k in c:
                c[k] = c[k] * 0
        if moment in ("grad norm", "optimizer step"):
            c["lora_gradients"] = c["lora_gradients"] * 0
        c["gathered_params"] = gathered
    return c


def device_map_layers(num_layers: int, n: int) -> list[int]:
    """Layers per GPU in order: L // N each, the first L mod N one more."""
    return [num_layers // n + (1 if k < num_layers % n else 0) for k in range(n)]


#: device-map: lines that follow the layers a GPU holds; lines on the first / last GPU only
_PER_LAYER = ("frozen_linear_weights", "expert_weights", "lora_weights", "lora_gradients", "optimizer_state",
              "optimizer_temporaries", "activations", "autocast_copies", "int8_previous_step")
_FIRST_ONLY = ("previous_step_input_grad", "input_embedding_grad")
_LAST_ONLY = ("logits_loss", "model_output")


def _device_map(ms: dict[str, dict[str, Any]], st: Structure, train: TrainSpec) -> dict[int, dict[str, dict]]:
    """Per GPU under a device_map split (module docstring). The embeddings sit on GPU 0, the
    lm_head on the last (a tied head stays with the embedding on GPU 0); every GPU runs a layer
    backward (its ``backward_transients``) and has its own cuBLAS workspaces."""
    n, L = train.num_gpus, layers_total(st)
    counts = device_map_layers(L, n)
    head = 0 if st.model.tie_word_embeddings else lm_head_bytes(st)
    out: dict[int, dict[str, dict]] = {}
    for k in range(n):
        f = counts[k] / L
        rank: dict[str, dict] = {}
        for name, comp in ms.items():
            c = dict(comp)
            _scale(c, _PER_LAYER, f)
            un = c.get("unquantized_weights", 0)
            c["unquantized_weights"] = ((un - head) if k == 0 else 0) + (head if k == n - 1 else 0)
            if k != 0:
                for key in _FIRST_ONLY:
                    c.pop(key, None)
            if k != n - 1:
                for key in _LAST_ONLY:
                    c.pop(key, None)
            rank[name] = c
        out[k] = rank
    return out


def host_ledger(st: Structure, train: TrainSpec, r, checkpoint_offload_bytes=0, loaded: float = 1) -> dict[str, int]:
    """CPU RAM of one machine (bytes), by component:

    - ``model_load_copies``: at load, every rank on the node materialises the model in host RAM
      (as stored: transformers' bnb quantizer quantizes tensor by tensor as the checkpoint is read,
      quantizers/quantizer_bnb_4bit.py) unless RAM-efficient loading, where rank 0 loads and the
      others start on the meta device (accelerate fsdp_cpu_ram_efficient_loading +
      sync_module_states); device-map is one process (one copy);
    - ``offloaded_params`` / ``offloaded_gradients`` / ``offloaded_optimizer``: the state the
      offload strategies keep on the host, summed over the node's ranks (a rank's shards: 1/N);
      FSDP1 pins each flat parameter's shard and a gradient of its size, frozen or not, in
      power-of-two blocks (``pinned_blocks``), and ``offload_init_copies`` are its unpinned shards,
      alive at lazy init only;
    - ``checkpoint_offload``: inputs saved on CPU by --checkpoint-offload, per rank.
    ``loaded``: bytes of a loaded base parameter over its computed size (2: an fp32 checkpoint load
    of a base the engine computes in 16 bit, ``compute_train``).
    ZeRO-3 builds the model inside zero.Init (transformers modeling_utils: deepspeed.zero.Init when
    is_deepspeed_zero3_enabled): each parameter is partitioned onto the GPUs as it is created and
    the checkpoint is read shard by shard (memory-mapped page cache, not counted), so no copy of
    the model is held in host RAM (zero3-offload: the partitions themselves are).
    The host need is the largest of load time, FSDP1's lazy init and the step (the load copies are
    freed once the engine has its shards): ``host_total``.
    """
    from ..trainers import resolve_recipe

    n, nodes, s = train.num_gpus, train.nodes, train.strategy
    per_node = n // nodes
    stored = (st.frozen_linear_weights + st.unquantized_weights + st.expert_weights) * loaded
    from .weights import lora_weights, optimizer_state

    lw = lora_weights(st, r)
    loaders = 1 if (s in ("single", "device-map") or train.ram_efficient_loading) else per_node
    if s in ("zero3", "zero3-offload"):
        loaders = 0
    out = {"model_load_copies": loaders * stored}
    if s == "fsdp-offload" and resolve_recipe(train).fsdp_version == 1:
        # FSDP1 (_flat_param.py::FlatParamHandle.init_flat_param_attributes, at lazy init): each flat
        # parameter's shard is copied to pinned memory (_local_shard.pin_memory()) and gets a pinned
        # sharded gradient of the same size (_cpu_grad = zeros_like(...).pin_memory()), frozen units
        # included; pinned blocks are rounded up to a power of two (pinned_blocks). The unpinned shard
        # FSDP's constructor made (_init_utils.py::_init_param_handle_from_params: flat_param_to(cpu))
        # stays the flat parameter's data until that unit's first unshard (pre_unshard: flat_param_to
        # the GPU), so at lazy init all three are alive (offload_init_copies)
        units = fsdp1_units(st, loaded)
        pinned = sum(count * pinned_blocks(b / n) for b, count in units) + lw / n  # LoRA units: not rounded
        out["offload_init_copies"] = (stored + lw) * per_node / n
        out["offloaded_params"] = pinned * per_node
        out["offloaded_gradients"] = pinned * per_node
        out["offloaded_optimizer"] = optimizer_state(st, r, train.optimizer) * per_node / n
    elif s == "fsdp-offload":
        out["offloaded_params"] = (stored + lw) * per_node / n  # the fp32 shards of a 16-bit-computed base
        out["offloaded_gradients"] = lw * per_node / n
        out["offloaded_optimizer"] = optimizer_state(st, r, train.optimizer) * per_node / n
    elif s == "zero3-offload":
        p = trainable_params(st, r)
        out["offloaded_params"] = (stored / loaded + lw) * per_node / n  # cast to 16 bit before partitioning
        out["offloaded_gradients"] = 4 * p * per_node / n
        fp32_opt = 4 / st.adapter_bytes if train.optimizer == "adamw" else 1
        out["offloaded_optimizer"] = (optimizer_state(st, r, train.optimizer) * fp32_opt + 4 * p) * per_node / n
    if checkpoint_offload_bytes:
        out["checkpoint_offload"] = checkpoint_offload_bytes * (per_node if s != "device-map" else 1)
    return {k: int(v) for k, v in out.items() if v}


def host_notes(st: Structure, train: TrainSpec, r, components: dict[str, int], checkpoint_offload_bytes=0,
               loaded: float = 1) -> list[str]:
    """What the host ledger (``host_ledger``: ``components``) assumed, when the user can change it:
    FSDP without RAM-efficient loading, where every rank of a node loads the whole model on the CPU
    and ``--ram-efficient-loading`` (rank 0 loads, the others start on meta: accelerate
    ``fsdp_cpu_ram_efficient_loading`` / transformers ``fsdp_config`` ``cpu_ram_efficient_loading``,
    with ``sync_module_states``) would cut the machine's need, by how much (both from
    ``host_ledger``); ZeRO-3, where no rank holds a copy (zero.Init, see ``host_ledger``)."""
    from dataclasses import replace

    from .arrays import is_scalar

    gib = 2**30
    per_node = train.num_gpus // train.nodes
    out = []
    if train.strategy in FSDP_STRATEGIES and not train.ram_efficient_loading and per_node > 1:
        now = host_total(components)
        alt = host_total(host_ledger(st, replace(train, ram_efficient_loading=True), r, checkpoint_offload_bytes,
                                     loaded))
        if is_scalar(alt) and is_scalar(now) and alt < now:  # a sweep's arrays: no note
            copy = components.get("model_load_copies", 0) / per_node
            out.append(f"host RAM: each of the node's {per_node} ranks loads the whole model on the CPU "
                       f"({copy / gib:,.2f} GiB each); --ram-efficient-loading (rank 0 loads, the others start on "
                       f"the meta device and receive it by sync_module_states: accelerate "
                       f"fsdp_cpu_ram_efficient_loading, or fsdp_config cpu_ram_efficient_loading) needs "
                       f"{alt / gib:,.2f} GiB per machine instead of {now / gib:,.2f} GiB")
    elif train.strategy in ("zero3", "zero3-offload") and "model_load_copies" not in components:
        from ..storage import is_quantized

        how = ("bitsandbytes quantizes each tensor onto the rank's GPU as it is read (from_pretrained skips "
               "zero.Init for quantized models: modeling_utils needs_zero3_init)" if is_quantized(train.quant) else
               "transformers' from_pretrained builds it inside deepspeed.zero.Init under ZeRO-3 (modeling_utils "
               "needs_zero3_init: each parameter is partitioned onto the GPUs as it is created), given the "
               "DeepSpeed config before from_pretrained: TrainingArguments(deepspeed=...) or accelerate's "
               "zero3_init_flag, on by default for stage 3")
        out.append(f"host RAM: no rank holds a CPU copy of the model: {how}; the checkpoint is read memory-mapped")
    return out


def fsdp1_units(st: Structure, loaded: float = 1) -> list[tuple[float, int]]:
    """(bytes, count) of FSDP1's frozen flat parameters under PEFT's wrap policy, as stored: one per
    decoder layer (its frozen Linear and expert weights, without the 4-bit quant state) and the
    root (``unquantized_weights``). The LoRA units (one per lora_A / lora_B) are not listed."""
    L = layers_total(st)
    layer = (st.frozen_linear_weights - quant_state_bytes(st) + st.expert_weights) * loaded / L
    return [(layer, L), (st.unquantized_weights * loaded, 1)]


def pinned_blocks(nbytes) -> int:
    """Bytes the pinned-memory allocator reserves for a request: the next power of two
    (ATen/core/CachingHostAllocator.h::CachingHostAllocatorImpl::allocate: ``PowerOf2Ceil(size)``
    while below pinned_max_round_threshold, unlimited by default)."""
    nbytes = int(-(-nbytes // 1))
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def host_total(components: dict[str, int]) -> int:
    """The host need (``host_ledger``): the largest of load time (the model copies), FSDP1's lazy
    init (the unpinned shards beside their pinned copies and gradients) and the step (everything
    but those two)."""
    load = components.get("model_load_copies", 0)
    init = components.get("offload_init_copies", 0)
    step = sum(v for k, v in components.items() if k not in ("model_load_copies", "offload_init_copies"))
    if init:
        init += components.get("offloaded_params", 0) + components.get("offloaded_gradients", 0)
    return max(load, init, step)


def worst_rank_peak(ranks: dict[int, dict[str, dict]]):
    """(peak allocated, moment) of the worst rank by ``memory.peak_of`` per rank: ints, or arrays
    over a sweep's cases (element-wise worst rank; ties: the lowest rank)."""
    from .memory import peak_of

    peaks = [peak_of(v) for v in ranks.values()]
    if len(peaks) == 1 or all(p is peaks[0] for p in peaks):
        return peaks[0]
    from .arrays import is_scalar

    if all(is_scalar(p) for p, _ in peaks):
        return max(peaks, key=lambda pm: int(pm[0]))
    import numpy as np

    allp = np.stack([np.asarray(p) for p, _ in peaks])
    idx = allp.argmax(axis=0)
    moments_ = np.stack([np.broadcast_to(np.asarray(m, dtype=object), allp.shape[1:]) for _, m in peaks])
    return np.take_along_axis(allp, idx[None], 0)[0], np.take_along_axis(moments_, idx[None], 0)[0]


def paged_per_rank(paged, train: TrainSpec):
    """Paged optimizer bytes on one GPU: the optimizer holds a 1/N partition under FSDP and ZeRO,
    runs on the host under the offload strategies, and is whole under DDP, device_map, single."""
    if train.strategy in ("fsdp", "zero1", "zero2", "zero3"):
        return paged // train.num_gpus
    if train.strategy in ("fsdp-offload", "zero3-offload"):
        return paged * 0
    return paged
