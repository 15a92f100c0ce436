"""The per-stream closed form of an FSDP rank's peak reserved (loraplan/estimate/stream_reserved.py)
on hand-made ledgers whose outcome follows from the allocator rules."""

from __future__ import annotations

from loraplan.allocator import K_ROUND_LARGE
from loraplan.estimate.stream_reserved import peak_reserved, reserved_by_stream

MiB = 1 << 20


def test_each_stream_reserves_its_own_peak_and_the_sum_is_the_rank_peak():
    ms = {"forward": {"weights": 100 * MiB, "activations": 50 * MiB, "gathered_params": 30 * MiB},
          "layer backward": {"weights": 100 * MiB, "activations": 10 * MiB, "gathered_params": 41 * MiB,
                             "lora_gradients": 1 * MiB},
          "optimizer step": {"weights": 100 * MiB, "optimizer_state": 20 * MiB, "lora_gradients": 3 * MiB}}
    r = reserved_by_stream(ms, 1, B=0, phi=0.0)
    # default: the largest moment without the side lines (forward: 150 MiB), to whole 2 MiB segments
    assert r["default"] == 150 * MiB
    # unshard stream: its own peak (backward: 41 MiB) rounded to kRoundLarge, though the rank's
    # allocated peak (forward, 180 MiB) holds only 30 MiB of it
    assert r["unshard_stream"] == 42 * MiB and r["post_backward_stream"] == 4 * MiB
    assert peak_reserved(ms, 1, B=0, phi=0.0) == 196 * MiB > max(sum(c.values()) for c in ms.values())


def test_step_slack_on_the_default_stream_and_fsdp2s_two_all_gather_outputs():
    ms = {"layer backward": {"weights": 100 * MiB, "activations": 20 * MiB, "all_gather_buffers": 30 * MiB}}
    r = reserved_by_stream(ms, 2, B=40 * MiB, phi=0.5, root=50 * MiB, unit=30 * MiB)
    assert r["default"] == 140 * MiB  # 120 MiB + phi * B, whole 2 MiB segments (allocator_slack)
    assert r["all_gather_copy_in_stream"] == 80 * MiB  # the root's output and a layer's coexist in forward
    assert r["reduce_scatter_stream"] == 0 and r["all_gather_copy_in_stream"] % K_ROUND_LARGE == 0


def test_arrays_of_a_sweep_give_the_same_numbers():
    import numpy as np

    ms = {"m": {"weights": np.array([100 * MiB, 200 * MiB]), "gathered_params": np.array([5 * MiB, 5 * MiB])}}
    got = peak_reserved(ms, 1, B=np.array([0, 0]), phi=0.0)
    assert list(got) == [peak_reserved({"m": {k: int(v[i]) for k, v in ms["m"].items()}}, 1, B=0, phi=0.0)
                         for i in range(2)]


def test_estimate_takes_the_per_stream_form_under_fsdp_and_the_closed_form_under_ddp():
    from loraplan.catalog import load_calibration, load_gpu, load_model
    from loraplan.estimate import allocator_slack, stream_reserved
    from loraplan.estimate.api import estimate
    from loraplan.spec import LoraSpec, TrainSpec

    model, gpu = load_model("qwen2.5-0.5b"), load_gpu("h100-sxm-80gb")
    cal, lora = load_calibration(gpu.id), LoraSpec(rank=16)
    seen = {}
    orig = stream_reserved.peak_reserved

    def spy(*a, **k):
        seen["by_stream"] = stream_reserved.reserved_by_stream(*a, **k)
        return orig(*a, **k)

    stream_reserved.peak_reserved = spy
    try:
        m = estimate(model, lora, TrainSpec(quant="bf16", batch=4, seq=512, strategy="fsdp", num_gpus=2), gpu, cal,
                     with_time=False).memory
    finally:
        stream_reserved.peak_reserved = orig
    assert m.peak_reserved_bytes == max(sum(seen["by_stream"].values()), m.peak_allocated_bytes)
    assert seen["by_stream"]["unshard_stream"] > 0  # FSDP1 (the loop's default) gathers on its unshard stream
    calls = []
    orig_closed = allocator_slack.peak_reserved
    allocator_slack.peak_reserved = lambda *a, **k: calls.append(a) or orig_closed(*a, **k)
    try:
        estimate(model, lora, TrainSpec(quant="bf16", batch=4, seq=512, strategy="ddp", num_gpus=2), gpu, cal,
                 with_time=False)
    finally:
        allocator_slack.peak_reserved = orig_closed
    assert calls  # DDP: the whole model and its buckets on the default stream, the one-GPU closed form
