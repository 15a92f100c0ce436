"""Peak reserved of one rank under FSDP: the caching allocator's pools are per CUDA stream.

The CUDA caching allocator hands a cached block only to a request of the stream that created
its segment (c10/cuda/CUDACachingAllocator.cpp: ``BlockComparatorSize`` orders by stream first,
``get_free_block`` refuses another stream's block; modelled in ``loraplan.allocator``), and a
replay never frees a segment before an OOM retry or ``empty_cache``, so peak reserved is the sum
over streams of each stream's own peak reserved -- reached at different moments of the step.
FSDP allocates on side streams (read from torch 2.13):

- FSDP1: the padded unsharded flat parameters (``gathered_params``) inside
  ``_runtime_utils.py::_unshard``'s ``with stream(unshard_stream)``
  (``_flat_param.py::FlatParamHandle._alloc_padded_unsharded_flat_param``); the reduce-scatter
  output, kept as the sharded gradient (``lora_gradients``), inside ``_post_backward_hook``'s
  ``with stream(post_backward_stream)`` (``_reduce_grad``: ``new_sharded_grad``).
- FSDP2: the flat all-gather output inside ``_fsdp_collectives.py::foreach_all_gather``'s
  ``with stream(all_gather_copy_in_stream)``; in forward the previous unit's output is freed
  only at the next unit's ``wait_for_unshard`` (``_fsdp_param_group.py``: ``all_gather_state``),
  after the next all-gather was allocated, so two consecutive units' outputs coexist: the root's
  and the first layer's. The unsharded parameters are copied out on the default stream
  (``foreach_all_gather_copy_out``). The reduce-scatter output / new sharded gradients
  (``lora_gradients``) are allocated in ``reduce_scatter_stream`` (``foreach_reduce``).
- DDP allocates its buckets on the default stream (one stream: the one-GPU closed form).

So, per rank (``reserved_by_stream``):

    reserved = R_default + sum over side streams of R_side
    R_default = A_def + the step's new segments for A_def, phi blocks of the step's largest
                block B and phi_layer layer blocks (allocator_slack.step_segments_bytes with no
                model segments: a rank's shards are a few large flat tensors, each its own segment)
    A_def     = max over moments of the moment's ledger minus its side-stream lines
    R_side    = max over moments of the stream's lines, rounded up to kRoundLarge (2 MiB)
                (FSDP2 all-gather: max(root, unit) + unit rounded the same way)

Checked against stream-aware replays of the fake-process-group trace
(``benchmarks/trace_parallel_table.py``). What replays cannot show: a real run frees the
unsharded flat parameter with ``record_stream`` (FSDP1 ``_free_unsharded_flat_param``) and its
CPU thread runs ahead of the GPU, so up to ``limit_all_gathers``' two freed blocks wait on
events while the next all-gather allocates (the rate limiter, ``_free_event_queue``): the
side-stream figure here is the program-order (lower) bound.
"""

from __future__ import annotations

import math

from ..allocator import K_ROUND_LARGE
from .arrays import is_scalar

__all__ = ["SIDE_LINES", "reserved_by_stream", "peak_reserved"]

#: ledger lines allocated on a side stream, per FSDP version: line -> stream (module docstring)
SIDE_LINES = {
    1: {"gathered_params": "unshard_stream", "lora_gradients": "post_backward_stream"},
    2: {"all_gather_buffers": "all_gather_copy_in_stream", "lora_gradients": "reduce_scatter_stream"},
}


def _max(a, b):
    if is_scalar(a) and is_scalar(b):
        return max(a, b)
    import numpy as np

    return np.maximum(a, b)


def _round_up(v, g: int):
    if is_scalar(v):
        return int(math.ceil(max(v, 0) / g)) * g
    import numpy as np

    return (np.ceil(np.maximum(v, 0) / g) * g).astype(np.int64)


def reserved_by_stream(moments: dict[str, dict], fsdp_version: int, B, phi: float, config: str = "default",
                       root=0, unit=0, extra=0) -> dict[str, object]:
    """{stream name: its peak reserved bytes} of one FSDP rank (module docstring).

    ``moments``: the rank's ledger per moment (``parallel.rank_moments``: line -> bytes, ints or
    arrays); ``B``: the step's largest block (``allocator_slack.largest_step_block``); ``phi``
    the closed form's step-slack factor for ``config``; ``root`` / ``unit``: bytes of the
    gathered root unit and of one layer unit (``parallel.layer_unit``), for FSDP2's two
    coexisting all-gather outputs; ``extra``: further stranded bytes on the default stream
    (``phi_layer`` x the layer block, as ``allocator_slack.peak_reserved``)."""
    from .allocator_slack import WeightsState, step_segments_bytes

    side = SIDE_LINES[int(fsdp_version)]
    a_def, peaks = 0, dict.fromkeys(side.values(), 0)
    for c in moments.values():
        total = sum(c.values())
        on_side = 0
        for line, stream in side.items():
            v = c.get(line, 0)
            on_side = on_side + v
            peaks[stream] = _max(peaks[stream], v)
        a_def = _max(a_def, total - on_side)
    if int(fsdp_version) == 2:
        peaks["all_gather_copy_in_stream"] = _max(peaks["all_gather_copy_in_stream"],
                                                  _round_up(_max(root, unit), K_ROUND_LARGE) + unit)
    out = {"default": _max(a_def, step_segments_bytes(WeightsState(0, 0), a_def, B, phi, config, extra))}
    for stream, v in peaks.items():
        out[stream] = _round_up(v, K_ROUND_LARGE)
    return out


def peak_reserved(moments: dict[str, dict], fsdp_version: int, B, phi: float, config: str = "default",
                  root=0, unit=0, extra=0):
    """Peak reserved bytes of one FSDP rank: the sum of ``reserved_by_stream``."""
    total = 0
    for v in reserved_by_stream(moments, fsdp_version, B, phi, config, root, unit, extra).values():
        total = total + v
    return total
