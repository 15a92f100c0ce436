"""Communication of a multi-GPU LoRA step: bytes per collective per engine, their time over the
interconnect, and the step time it adds to the per-rank compute (pure Python, no torch).

Per optimizer step (``gradient_accumulation`` = k micro-steps), for LoRA (a frozen base P_f, few
trainable parameters P_t, the ``TrainSpec.strategy`` engine over ``num_gpus`` = n ranks):

- **ddp** (torch/nn/parallel/distributed.py): one all-reduce of the trainable gradients, bucketed
  (``_DEFAULT_BUCKET_CAP_MB`` 25 MiB, first bucket ``dist._DEFAULT_FIRST_BUCKET_BYTES`` 1 MiB), in
  the gradients' dtype (the adapter dtype). accelerate's ``Accelerator.accumulate`` (hence
  transformers.Trainer and trl.SFTTrainer) runs the k−1 first micro-steps under ``no_sync``: one
  all-reduce per optimizer step; a plain loop (``--trainer loop``) all-reduces every micro-step.
  Buckets are all-reduced as their gradients become ready during backward; the last one cannot hide.
- **fsdp** (FSDP1 torch/distributed/fsdp/_runtime_utils.py, FSDP2 _fully_shard/_fsdp_state.py),
  wrapped by peft's ``utils/other.py::fsdp_auto_wrap_policy`` (what accelerate/Trainer apply to a
  PEFT model): every decoder layer is a unit holding its frozen weights, every LoRA leaf Linear
  (``lora_A``/``lora_B``, the only modules with a trainable ``weight``) is its own unit, the rest
  (embeddings, final norm, lm_head) is the root unit. FULL_SHARD all-gathers every unit in forward
  and, resharded after forward, again in backward — except the root, which FSDP1 does not reshard
  after forward ("Do not free the root's parameters in the post-forward": _runtime_utils.py::
  _post_forward_reshard). FSDP2 as accelerate applies it (utils/fsdp_utils.py::
  fsdp2_prepare_model): the input embedding is its own unit, resharded after forward and gathered
  again in backward (FSDP2's backward prefetch), the final norm + lm_head a unit kept from forward
  to backward, the root left with no parameters. With gradient checkpointing the recompute runs
  inside the unit's backward, its parameters are already gathered. (DDP and FSDP2 are checked
  against the real engines under a fake process group: tests/test_comm_engines.py.) Gradients are reduce-scattered only for units whose parameters require grad
  (the LoRA units; frozen flat parameters have no gradient), once per optimizer step under
  ``no_sync`` (as DDP). SHARD_GRAD_OP keeps the parameters gathered from forward to backward (one
  all-gather per micro-step). HYBRID_SHARD shards within a node and all-reduces the gradient shards
  across nodes. accelerate's FSDP mixed precision (utils/dataclasses.py::set_mixed_precision:
  ``param_dtype = reduce_dtype`` = the mixed-precision dtype) sets the all-gather and
  reduce-scatter dtype; a 4-bit base is gathered as its packed storage (n/2 bytes: with
  ``bnb_4bit_quant_storage`` bf16 the same bytes as bf16 elements; the quantization state is not
  a parameter and stays replicated). **fsdp-offload** (``CPUOffload(offload_params=True)``) copies
  each shard host→device before its all-gather and each gradient shard device→host.
- **zero1/zero2/zero3** (DeepSpeed, not installed here: modelled from its source,
  deepspeed/runtime/zero/config.py, stage_1_and_2.py, stage3.py): the frozen base stays replicated
  under ZeRO-1/2; gradients are reduce-scattered (``reduce_scatter`` True, ``reduce_bucket_size``
  5e8 elements: one bucket for LoRA) — ZeRO-1 at the accumulation boundary, ZeRO-2 every
  micro-step — and the updated trainable partitions are all-gathered after the optimizer step
  (``allgather_partitions``); ``overlap_comm`` defaults to True for stage 3 only
  (``overlap_comm_valid``), so ZeRO-1/2 reductions are not overlapped. ZeRO-3 partitions every
  parameter of at least ``stage3_param_persistence_threshold`` (1e5) elements, fetches each
  module's parameters (one coalesced all-gather) in forward and again in backward — except the
  last ``stage3_max_reuse_distance`` (1e9) elements of forward, still resident when backward
  starts — and reduce-scatters gradients every micro-step, overlapped. DeepSpeed casts the module
  to the mixed-precision dtype (bf16/fp16 ``enabled``), which sets the communication dtype.
  **zero3-offload** (``offload_param`` cpu) copies each fetched partition host→device and each
  gradient partition device→host. The CPU optimizer step of offloaded engines is not timed (LoRA's
  trainable shard is small).
- **device-map** (accelerate's layer split, one process): the hidden states (b·s·h in the stream
  dtype) cross each of the n−1 stage boundaries in forward and their gradient in backward; one
  GPU works at a time, so compute is the one-GPU step (not divided) and nothing overlaps.

Time of one collective (NCCL ring; nccl-tests doc/PERFORMANCE.md, NVIDIA/nccl src/graph/tuning.cc
``ncclTopoTuneModel``): ``latency + S·f/busbw`` with f = 2(n−1)/n for all-reduce and (n−1)/n for
all-gather / reduce-scatter (S: the all-reduce buffer, the all-gather output, the reduce-scatter
input), latency = base + steps × per-step latency of the link; several nodes: the ring's bus
bandwidth is the slower of NVLink/PCIe and the network. Links, their measured bus bandwidths and
latencies: loraplan/data/interconnects.json (with sources); host copies: host-links.json (line
rate: a lower bound on their time).

Overlap (``parallel_time``): the compute is the one-GPU step time at the per-rank micro-batch
(data-parallel engines do not shrink a rank's work; throughput is n × its tokens). Forward
collectives hide behind forward compute and backward ones behind backward compute (FSDP/ZeRO-3
prefetch, DDP's bucket hooks); the backward share of a step is (1 + c)/(2 + c), c = 1 with
gradient checkpointing (estimate/time.py's counting rules: one forward pass, one input-gradient
pass ``FROZEN_BACKWARD_PASSES``, one recompute). Per phase, exposed = max(the part that cannot
hide — the first unit's all-gather, the last bucket's or unit's reduction —, communication −
compute); step-end collectives (ZeRO's, device_map's transfers) are exposed whole. The step is
communication-bound (``TimeEstimate.bound = "communication"``) when the communication stream's
total time is at least the compute step's (the links are the critical path); otherwise it keeps
the compute step's own bound (host, compute, memory), however much communication is exposed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..spec import GpuSpec, LoraSpec, ModelSpec, TrainSpec
from ..storage import FOUR_BIT, Dtypes, dtype_bytes, expert_storage, linear_storage
from .arrays import ceil as _ceil, is_scalar as _is_scalar, maximum as _max, minimum as _min, where as _where
from .result import TimeEstimate

DATA = Path(__file__).resolve().parents[1] / "data"

#: torch/nn/parallel/distributed.py ``_DEFAULT_BUCKET_CAP_MB`` (25 MiB) and
#: torch.distributed ``_DEFAULT_FIRST_BUCKET_BYTES`` (1 MiB: the first bucket starts the overlap early)
DDP_BUCKET_BYTES = 25 * 1024 * 1024
DDP_FIRST_BUCKET_BYTES = 1024 * 1024
#: deepspeed/runtime/zero/config.py: ``reduce_bucket_size`` / ``allgather_bucket_size`` 5e8 elements,
#: ``stage3_param_persistence_threshold`` 1e5 elements, ``stage3_max_reuse_distance`` 1e9 elements
ZERO_BUCKET_ELEMENTS = 500_000_000
ZERO3_PERSISTENCE_ELEMENTS = 100_000
ZERO3_REUSE_ELEMENTS = 1_000_000_000
#: time.py's counting rules: a frozen Linear's backward is one input-gradient pass per forward pass
FROZEN_BACKWARD_PASSES = 1

#: engines that replicate the step on every rank (throughput n × one rank's tokens)
DATA_PARALLEL = ("ddp", "fsdp", "fsdp-offload", "zero1", "zero2", "zero3", "zero3-offload")
FSDP = ("fsdp", "fsdp-offload")
ZERO = ("zero1", "zero2", "zero3", "zero3-offload")
#: what a collective's bytes go through: the GPUs' links (NCCL), or the host link (copies)
OPS = ("all_reduce", "all_gather", "reduce_scatter", "p2p", "h2d", "d2h")
#: a parameter name inside a repeated block (model.layers.3.input_layernorm.weight): not the root unit
_IN_LAYER = re.compile(r"\.\d+\.")


@lru_cache(maxsize=None)
def interconnects() -> dict:
    """loraplan/data/interconnects.json: links, networks, platforms, NCCL ring latencies (with sources)."""
    return json.loads((DATA / "interconnects.json").read_text())


@lru_cache(maxsize=None)
def _host_links() -> dict:
    return json.loads((DATA / "host-links.json").read_text())["links"]


@dataclass(frozen=True)
class Fabric:
    """The links one job's collectives cross: ``ranks`` GPUs over ``nodes`` machines."""

    platform: str
    intra: str            # key of interconnects.json ``links``
    intra_kind: str       # nvlink | pcie (NCCL's per-step latency class)
    intra_busbw: float    # bytes/s
    network: str          # key of ``networks``
    net_busbw: float      # bytes/s
    gpus_per_node: int
    host_bytes_per_s: float | None  # host link line rate (offload copies)


def fabric(gpu: GpuSpec) -> Fabric:
    """The GPU's platform (``GpuSpec.interconnect``) resolved to its links. InputError when the
    catalog entry names none (a GPU file without ``interconnect``: add one of interconnects.json's
    ``platforms``)."""
    data = interconnects()
    pid = getattr(gpu, "interconnect", None)
    if pid not in data["platforms"]:
        raise InputError(f"GPU '{gpu.id}' names no interconnect platform ({pid!r}); add \"interconnect\": one of "
                         f"{', '.join(data['platforms'])} to its catalog file to estimate several GPUs")
    p = data["platforms"][pid]
    link, net = data["links"][p["intra"]], data["networks"][p["network"]]
    host = _host_links().get(gpu.host_link or "")
    return Fabric(pid, p["intra"], link["kind"], float(link["busbw_bytes_per_s"]), p["network"],
                  float(net["busbw_bytes_per_s"]), int(p["gpus_per_node"]),
                  float(host["bytes_per_s"]) if host else None)


def check_layout(train: TrainSpec, gpu: GpuSpec | None) -> None:
    """One-line InputError when the layout needs more GPUs per node than the GPU's platform holds
    (interconnects.json ``gpus_per_node``): the fix names ``--nodes``. The rules that do not depend
    on the GPU (strategy and GPU count, nodes, quantization and storage) are
    ``trainers.check_parallel``'s, which every command runs when it resolves the recipe."""
    n, nodes = train.num_gpus, train.nodes
    if gpu is not None and n > 1 and not n % nodes:
        per_node, cap = n // nodes, fabric(gpu).gpus_per_node
        if per_node > cap:
            need = -(-n // cap)
            raise InputError(f"--num-gpus {n} on {nodes} node{'s' if nodes > 1 else ''} is {per_node} {gpu.id} per "
                             f"node, more than a node holds ({cap}); add --nodes {need}")


# ---------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamBytes:
    """What the engines move, in the dtype they move it in (``comm_dtype``; None: as stored)."""

    layer_bytes: int        # frozen weights inside the decoder/encoder layers (gathered per layer unit)
    root_bytes: int         # frozen weights outside them: embeddings, final norms, lm_head
    embed_bytes: int        # of which the input embeddings (FSDP2's own unit under accelerate)
    frozen_elements: int    # elements of the frozen base (ZeRO-3's reuse distance)
    layer_units: int        # FSDP layer units (decoder + encoder layers)
    frozen_modules: int     # modules with a frozen weight ZeRO-3 partitions (it fetches one module at a time)
    trainable: Any          # trainable parameters (elements; an array with an array rank)
    lora_tensors: int       # LoRA A/B tensors (FSDP units under peft's wrap policy)
    trainable_bytes: Any    # trainable parameters in the communication dtype
    grad_bytes: Any         # their gradients in the reduction dtype
    zero3_trainable_bytes: Any  # the trainable tensors ZeRO-3 partitions (>= 1e5 elements)
    zero3_trainable_modules: Any
    zero3_persistent_bytes: int  # frozen parameters below 1e5 elements (ZeRO-3 never partitions them)


def comm_dtype(train: TrainSpec) -> str | None:
    """The dtype FSDP and DeepSpeed communicate floating parameters and gradients in: the
    mixed-precision dtype (accelerate FullyShardedDataParallelPlugin.set_mixed_precision
    ``param_dtype``/``reduce_dtype``; DeepSpeed bf16/fp16 ``enabled`` casts the module), or None
    without mixed precision (each tensor in its own dtype). FSDP with a 4-bit base stored as a
    float: that storage dtype (transformers distributed/fsdp.py ``update_fsdp_plugin_peft``:
    ``fsdp_plugin.set_mixed_precision(bnb_4bit_quant_storage, override=True)``)."""
    if train.strategy in FSDP and train.quant in FOUR_BIT and train.quant_storage not in (None, "uint8"):
        return train.quant_storage
    return Dtypes.of(train).autocast


def param_bytes(model: ModelSpec, lora: LoraSpec, train: TrainSpec, adapted) -> ParamBytes:
    """The frozen base and the adapters as the engines move them (see the module docstring)."""
    dt = Dtypes.of(train)
    cd = comm_dtype(train)
    layer_b = root_b = small_b = embed_b = 0
    elements = modules = 0
    for l in model.linears:
        if l.role == "lm_head" and model.tie_word_embeddings:
            continue  # the embedding's weight
        # bitsandbytes converts every nn.Linear but lm_head (weights.frozen_linear_weights)
        st = dt.unquantized if l.role == "lm_head" else linear_storage(model, dt, l)
        n = l.in_features * l.out_features
        b = -(-n // 2) if st in FOUR_BIT else (n if st == "int8" else n * dtype_bytes(cd or st))
        b += l.out_features * dtype_bytes(cd or dt.unquantized) if l.bias else 0
        elements += n
        if n < ZERO3_PERSISTENCE_ELEMENTS:
            small_b += b
        else:
            modules += 1
        if l.layer is None:
            root_b += b
        else:
            layer_b += b
    for p in model.others:
        b = p.numel * dtype_bytes(cd or dt.unquantized)
        elements += p.numel
        if p.numel < ZERO3_PERSISTENCE_ELEMENTS:
            small_b += b
        if _IN_LAYER.search(p.name):
            layer_b += b
        else:
            root_b += b
            embed_b += b if p.kind == "embedding" else 0
            modules += p.kind == "embedding" and p.numel >= ZERO3_PERSISTENCE_ELEMENTS
    for e in model.experts:
        layer_b += e.numel * dtype_bytes(cd or expert_storage(dt))
        elements += e.numel
        modules += 1
    from .params import count_params

    r = lora.rank
    trainable = count_params(model, lora, adapted).trainable
    n_tensors = 2 * len(adapted)
    ab, gb = dtype_bytes(cd or dt.adapter), dtype_bytes(cd or dt.adapter)
    z3_elems, z3_mods = 0, 0
    for l in adapted:
        fin, fout = getattr(l, "in_features", 0), getattr(l, "out_features", 0)
        for numel in (r * fin, r * fout):
            big = numel >= ZERO3_PERSISTENCE_ELEMENTS
            z3_elems = z3_elems + _where(big, numel, 0)
            z3_mods = z3_mods + _where(big, 1, 0)
    layers = model.num_layers + (model.num_encoder_layers or 0 if model.is_encoder_decoder else 0)
    return ParamBytes(layer_bytes=int(layer_b), root_bytes=int(root_b), embed_bytes=int(embed_b),
                      frozen_elements=int(elements),
                      layer_units=int(layers), frozen_modules=int(modules), trainable=trainable,
                      lora_tensors=n_tensors, trainable_bytes=trainable * ab, grad_bytes=trainable * gb,
                      zero3_trainable_bytes=z3_elems * ab, zero3_trainable_modules=z3_mods,
                      zero3_persistent_bytes=int(small_b))


@dataclass(frozen=True)
class Collective:
    """One kind of communication of a step: ``calls`` per optimizer step of ``bytes`` each (NCCL's
    S: the all-reduce buffer, the all-gather output, the reduce-scatter input; a copy's bytes)."""

    what: str
    op: str        # OPS
    bytes: Any     # per call (an array in a sweep)
    calls: Any     # per optimizer step
    group: str     # world | node (within a node) | nodes (across nodes, one rank per node) | host | peer
    phase: str     # forward | backward | step (what compute can hide it; step: nothing)
    #: the bytes of the one call that cannot hide (the first all-gather, the last reduction); 0: none
    exposed_bytes: Any = 0
    #: how often per optimizer step that call recurs (each micro-step's first all-gather; each sync's last reduction)
    exposed_times: int = 1

    @property
    def bytes_per_step(self):
        return self.bytes * self.calls


def _split(total, calls):
    """Bytes per call of ``total`` spread over ``calls`` calls (0 calls: 0)."""
    return _where(calls > 0, total / _max(calls, 1), 0)


def collectives(model: ModelSpec, lora: LoraSpec, train: TrainSpec, adapted=None) -> tuple[Collective, ...]:
    """Every collective of one optimizer step of ``train.strategy`` (see the module docstring)."""
    from ..trainers import resolve_recipe
    from ..targets import select_expert_targets, select_targets

    if adapted is None:
        adapted = select_targets(model, lora.targets) + select_expert_targets(model, lora.targets, lora.dropout)
    r = resolve_recipe(train)
    s, n, nodes = r.strategy, r.num_gpus, r.nodes
    k = int(r.gradient_accumulation)
    no_sync = r.trainer in ("hf", "trl")  # accelerate's accumulate(); a plain loop syncs every micro-step
    syncs = 1 if no_sync else k
    if s == "single" or (n <= 1 and s not in ("fsdp-offload", "zero3-offload")):
        return ()
    pb = param_bytes(model, lora, r, adapted)
    out: list[Collective] = []
    if s == "ddp":
        g = pb.grad_bytes
        calls = _where(g > DDP_FIRST_BUCKET_BYTES, 1 + _ceil((g - DDP_FIRST_BUCKET_BYTES) / DDP_BUCKET_BYTES), 1)
        last = _where(calls > 1, g - DDP_FIRST_BUCKET_BYTES - (calls - 2) * DDP_BUCKET_BYTES, g)
        out.append(Collective("gradient all-reduce (DDP buckets)", "all_reduce", _split(g, calls), calls * syncs,
                              "world", "backward", last, syncs))
    elif s in FSDP:
        hybrid = r.fsdp_sharding == "hybrid" and nodes > 1
        group = "node" if hybrid else "world"
        total = pb.layer_bytes + pb.root_bytes + pb.trainable_bytes
        if (r.fsdp_version or 1) == 2 and pb.embed_bytes and not model.tie_word_embeddings:
            # accelerate fsdp2_prepare_model: the input embedding is a unit (resharded after forward, and
            # gathered again by FSDP2's backward prefetch), the final norm + lm_head a unit kept after forward
            units, first, kept = pb.layer_units + pb.lora_tensors + 2, pb.embed_bytes, pb.root_bytes - pb.embed_bytes
            kept_units = 1
        else:  # FSDP1: the root unit (embeddings, final norm, lm_head) is not resharded after forward
            units, first, kept, kept_units = pb.layer_units + pb.lora_tensors + 1, pb.root_bytes, pb.root_bytes, 1
        out.append(Collective("forward all-gather of every unit", "all_gather", total / units, units * k, group,
                              "forward", first, k))
        if r.fsdp_sharding != "shard-grad-op":  # FULL_SHARD / HYBRID_SHARD reshard after forward (not the root)
            back = total - kept
            out.append(Collective("backward all-gather (resharded after forward)", "all_gather",
                                  back / (units - kept_units), (units - kept_units) * k, group, "backward", 0))
        per = pb.grad_bytes / pb.lora_tensors
        out.append(Collective("gradient reduce-scatter (LoRA units)", "reduce_scatter", per,
                              pb.lora_tensors * syncs, group, "backward", per, syncs))
        shard = n // nodes if hybrid else n
        if hybrid:
            out.append(Collective("gradient shard all-reduce across nodes (HYBRID_SHARD)", "all_reduce",
                                  per / shard, pb.lora_tensors * syncs, "nodes", "backward", per / shard, syncs))
        if s == "fsdp-offload":  # each all-gather's shard is copied to the GPU first
            out.append(Collective("parameter shards host to device (CPU offload, forward)", "h2d", total / shard,
                                  k, "host", "forward", 0))
            if r.fsdp_sharding != "shard-grad-op":
                out.append(Collective("parameter shards host to device (CPU offload, backward)", "h2d",
                                      (total - kept) / shard, k, "host", "backward", 0))
            out.append(Collective("gradient shards device to host (CPU offload)", "d2h", pb.grad_bytes / shard,
                                  syncs, "host", "backward", 0))
    elif s in ("zero1", "zero2"):
        g = pb.grad_bytes
        calls = _ceil(pb.trainable / ZERO_BUCKET_ELEMENTS)
        reduces = syncs if s == "zero1" else k  # ZeRO-2 reduces in backward hooks every micro-step
        out.append(Collective(f"gradient reduce-scatter (ZeRO-{s[-1]}, overlap_comm off)", "reduce_scatter",
                              _split(g, calls), calls * reduces, "world", "step", 0))
        out.append(Collective("updated trainable partitions all-gather", "all_gather", _split(pb.trainable_bytes, calls),
                              calls, "world", "step", 0))
    elif s in ("zero3", "zero3-offload"):
        frozen = pb.layer_bytes + pb.root_bytes - pb.zero3_persistent_bytes
        part = frozen + pb.zero3_trainable_bytes
        mods = pb.frozen_modules + pb.zero3_trainable_modules
        per = part / _max(mods, 1)
        reuse = _min(part, ZERO3_REUSE_ELEMENTS * (frozen / max(pb.frozen_elements, 1)))
        out.append(Collective("forward parameter fetch (all-gather per module)", "all_gather", per, mods * k,
                              "world", "forward", per, k))
        back_calls = _max(mods - _ceil(reuse / _max(per, 1)), 0)
        out.append(Collective("backward parameter fetch (beyond the reuse distance)", "all_gather", per,
                              back_calls * k, "world", "backward", 0))
        rs_calls = _ceil(pb.trainable / ZERO_BUCKET_ELEMENTS)
        rs = _split(pb.grad_bytes, rs_calls)
        out.append(Collective("gradient reduce-scatter (overlap_comm)", "reduce_scatter", rs, rs_calls * k,
                              "world", "backward", rs, k))
        if s == "zero3-offload":  # each fetched partition is copied to the GPU first
            out.append(Collective("parameter partitions host to device (offload_param, forward)", "h2d", part / n,
                                  k, "host", "forward", 0))
            out.append(Collective("parameter partitions host to device (offload_param, backward)", "h2d",
                                  per * back_calls / n, k, "host", "backward", 0))
            out.append(Collective("gradient partitions device to host", "d2h", pb.grad_bytes / n, k, "host",
                                  "backward", 0))
    elif s == "device-map":
        T = r.batch * (r.target_seq if (model.is_encoder_decoder and r.target_seq) else r.seq)
        act = T * model.hidden_size * dtype_bytes(Dtypes.of(r).stream)
        out.append(Collective("hidden states to the next GPU (forward)", "p2p", act, (n - 1) * k, "peer", "step", 0))
        out.append(Collective("their gradients back (backward)", "p2p", act, (n - 1) * k, "peer", "step", 0))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------


def collective_seconds(op: str, size, ranks: int, nodes: int, fab: Fabric):
    """Seconds of one call: NCCL's ring model (module docstring); ``size`` bytes (S).

    ``ranks`` take part over ``nodes`` machines; a copy to or from the host runs at the host link's
    line rate; a peer transfer is one ring step."""
    lat = interconnects()["ring_latency_s"]
    if op in ("h2d", "d2h"):
        if not fab.host_bytes_per_s:
            raise InputError("this GPU names no host link (catalog 'host_link'); offloaded engines need one")
        return size / fab.host_bytes_per_s
    if op == "p2p":
        return lat["base"] + lat["per_step"][fab.intra_kind] + size / fab.intra_busbw
    if ranks <= 1:
        return 0.0 * size
    factor = 2 if op == "all_reduce" else 1
    steps, inter = factor * (ranks - 1), factor * (nodes - 1)
    busbw = fab.intra_busbw if nodes <= 1 else min(fab.intra_busbw, fab.net_busbw)
    latency = lat["base"] + (steps - inter) * lat["per_step"][fab.intra_kind] + inter * lat["per_step"]["net"]
    return latency + size * steps / ranks / busbw


def _group(c: Collective, n: int, nodes: int) -> tuple[int, int]:
    """(ranks, nodes) a collective spans."""
    if c.group == "node":
        return n // nodes, 1
    if c.group == "nodes":
        return nodes, nodes
    return n, nodes


def backward_share(train: TrainSpec) -> float:
    """The share of a step's GPU time spent in backward: (1 + c)/(2 + c), c = 1 with gradient
    checkpointing (one forward pass, ``FROZEN_BACKWARD_PASSES`` input-gradient pass, one recompute:
    estimate/time.py's counting rules, where the frozen Linears dominate)."""
    c = 1 if train.gradient_checkpointing else 0
    return (FROZEN_BACKWARD_PASSES + c) / (1 + FROZEN_BACKWARD_PASSES + c)


def parallel_time(model: ModelSpec, lora: LoraSpec, train: TrainSpec, gpu: GpuSpec, compute: TimeEstimate,
                  adapted=None) -> tuple[TimeEstimate, dict[str, Any]]:
    """The step of ``train.strategy`` on ``train.num_gpus`` GPUs: ``compute`` (the one-GPU step at
    the per-rank micro-batch, ``time.estimate_step_time``) plus the exposed communication, and the
    communication detail (collective -> bytes per step, seconds; JSON ``detail.communication``).

    Components added (seconds per optimizer step): ``comm_<op>_s`` per kind, ``comm_s`` (all of
    it, on its own stream), ``comm_overlapped_s`` (hidden behind compute), ``comm_exposed_s`` and
    ``compute_s`` (the per-rank compute step). tokens/s counts every data-parallel rank's tokens.
    ``compute``'s values may be numpy arrays (sweep); so are the results."""
    r = train
    cs = collectives(model, lora, train, adapted)
    n, nodes = r.num_gpus, r.nodes
    if not cs and r.strategy == "single":
        return compute, {}
    fab = fabric(gpu)
    beta = backward_share(r)
    step0 = compute.step_s
    windows = {"forward": step0 * (1 - beta), "backward": step0 * beta, "step": 0.0 * step0}
    per_phase = {p: 0.0 * step0 for p in windows}
    fixed = {p: 0.0 * step0 for p in windows}
    by_op: dict[str, Any] = {}
    rows = []
    for c in cs:
        ranks, nn = _group(c, n, nodes)
        one = collective_seconds(c.op, c.bytes, ranks, nn, fab)
        secs = one * c.calls
        per_phase[c.phase] = per_phase[c.phase] + secs
        if not (_is_scalar(c.exposed_bytes) and c.exposed_bytes == 0):
            once = _where(c.calls > 0, collective_seconds(c.op, c.exposed_bytes, ranks, nn, fab), 0.0)
            fixed[c.phase] = _max(fixed[c.phase], once * c.exposed_times)
        by_op[c.op] = by_op.get(c.op, 0.0) + secs
        rows.append((c, ranks, nn, secs))
    exposed = per_phase["step"]
    for p in ("forward", "backward"):
        exposed = exposed + _max(fixed[p], per_phase[p] - windows[p])
    total = sum(per_phase.values())
    # the links are the critical path when the communication stream is busy at least as long as the
    # compute step (the step cannot be shorter than either); a phase whose collectives outlast its
    # compute by a little adds that little (``comm_exposed_s``) but does not set the step
    comm_bound = total >= step0
    step = step0 + exposed
    dp = n if r.strategy in DATA_PARALLEL else 1
    tokens = compute.tokens_per_s * step0 * dp
    tps = tokens / step if _is_scalar(step) else _safe_div(tokens, step)
    bound = _where(comm_bound, "communication", compute.bound)
    comps = dict(compute.components)
    comps["compute_s"] = step0
    for op in OPS:
        if op in by_op:
            comps[f"comm_{op}_s"] = by_op[op]
    comps.update(comm_s=total, comm_overlapped_s=total - exposed, comm_exposed_s=exposed)
    time = TimeEstimate(step_s=step, tokens_per_s=tps, components=comps, bound=bound)
    detail = {
        "strategy": r.strategy, "num_gpus": n, "nodes": nodes, "platform": fab.platform, "link": fab.intra,
        "network": fab.network if nodes > 1 else None, "data_parallel_ranks": dp,
        "backward_share": beta,
        "bytes_per_step": {op: _num(sum(c.bytes_per_step for c in cs if c.op == op)) for op in OPS
                           if any(c.op == op for c in cs)},
        "collectives": [{"what": c.what, "op": c.op, "bytes_per_call": _num(c.bytes), "calls": _num(c.calls),
                         "bytes_per_step": _num(c.bytes_per_step), "ranks": ranks, "nodes": nn, "phase": c.phase,
                         "seconds": _num(secs, float)} for c, ranks, nn, secs in rows],
        "exposed_s": _num(exposed, float), "overlapped_s": _num(total - exposed, float),
    } if _is_scalar(step) else {}
    return time, detail


def _safe_div(a, b):
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / b, 0.0)


def _num(v, kind=int):
    """A JSON number (ints for bytes and counts)."""
    if kind is int:
        return int(round(float(v)))
    return float(v)


def is_parallel(train: TrainSpec) -> bool:
    """True when ``train`` runs an engine other than the one-GPU step (its time gains communication)."""
    return train.strategy != "single"


def with_communication(model: ModelSpec, lora: LoraSpec, train: TrainSpec, gpu: GpuSpec, compute: TimeEstimate,
                       adapted=None) -> tuple[TimeEstimate, dict[str, Any]]:
    """``parallel_time`` for a multi-GPU ``train`` (checked by ``check_layout`` first: ``estimate()``
    and the sweep do); the one-GPU step as is."""
    if not is_parallel(train):
        return compute, {}
    return parallel_time(model, lora, train, gpu, compute, adapted)


