"""The per-stream closed form of an FSDP rank's peak reserved (loraplan/estimate/stream_reserved.py)
on hand-made ledgers whose outcome follows from the allocator rules."""

from __future__ import annotations

import pytest

from loraplan.allocator import K_ROUND_LARGE
from loraplan.estimate import stream_reserved as sr
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


def test_fsdp1_lazy_init_leaves_the_largest_unit_cached_and_free_on_the_default_stream():
    root, unit = 500 * MiB, 96 * MiB + 512  # Llama-2-7B QLoRA: embeddings + head, one layer
    blocks = sr.lazy_init_blocks(1, root, unit)
    assert blocks == (root, unit)
    w = sr.lazy_init_state(blocks)
    assert w.allocated == 0 and w.reserved == root  # the layer's block is split from the root's freed one
    assert w.large_free == (root,)
    # parameter mixed precision (fp32 shards gathered in bf16): the mp shard, the bf16 and the fp32 copies
    assert sr.lazy_init_blocks(1, root, unit, shard_group=2, param_factor=2) == (
        root // 2, root, 2 * root, unit // 2, unit, 2 * unit)
    # each block larger than every cached free one takes a new segment (get_free_block finds none)
    w = sr.lazy_init_state(sr.lazy_init_blocks(1, root, unit, 2, 2))
    assert w.reserved == root // 2 + root + 2 * root and sorted(w.large_free) == [root // 2, root, 2 * root]
    assert sr.lazy_init_blocks(2, root, unit) == ()  # FSDP2 allocates its buffers per all-gather


def test_fsdp1_unshard_stream_holds_the_root_and_two_units():
    moments = {"layer backward": {"gathered_params": 600 * MiB, "activations": 900 * MiB}}
    out = sr.reserved_by_stream(moments, 1, 100 * MiB, 0.0, root=500 * MiB, unit=100 * MiB + 1)
    assert out["unshard_stream"] == 500 * MiB + 2 * (100 * MiB + K_ROUND_LARGE)


#: a small llama whose root unit (embeddings + head, 62.5 MiB) is large beside its layers, as in real models
CFG = dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024)


def _replay_and_analytic(cfg, lora, train, spec):
    for mod in ("torch", "transformers", "peft"):
        pytest.importorskip(mod)
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.trace.run import trace_step

    t = trace_step(cfg, lora, train, rank=0)
    names = t["parallel"]["streams"]
    replay = {names.get(k, str(k)): v for k, v in t["allocator"]["default"]["peak_reserved_by_stream"].items()}
    gpu = load_gpu("h100-sxm-80gb")
    seen: dict = {}
    orig = sr.peak_reserved

    def spy(*args, **kw):
        seen.update(sr.reserved_by_stream(*args, **kw))
        return orig(*args, **kw)

    sr.peak_reserved = spy
    try:
        m = estimate(spec, lora, train, gpu, load_calibration(gpu.id), with_time=False)
    finally:
        sr.peak_reserved = orig
    return replay, t["peak_reserved_bytes"], seen, m.memory.peak_reserved_bytes


def test_fsdp1_small_rank_side_streams_match_the_replay_and_the_default_stream_is_not_under_it():
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec, TrainSpec

    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    train = TrainSpec(quant="bf16", batch=2, seq=512, strategy="fsdp", num_gpus=2, fsdp_version=1)
    replay, _, an, _ = _replay_and_analytic(CFG, lora, train, spec_from_config(CFG, name="small"))
    assert set(an) == set(replay)
    assert abs(an["unshard_stream"] - replay["unshard_stream"]) <= 0.10 * replay["unshard_stream"], (an, replay)
    assert an["post_backward_stream"] == replay["post_backward_stream"]
    # the default stream's factors are fitted at full size (engines.fsdp1, reserved-slack.json), where a
    # step strands more than on 4 small layers: here they may only read high, the safe side
    assert an["default"] >= replay["default"], (an, replay)


@pytest.mark.slow
def test_fsdp1_full_size_rank_reserved_within_5_percent_of_the_stream_aware_replay():
    """answerai's Llama-2-7B FSDP-QLoRA b1 ctx2048 rank (benchmarks/data/published-multigpu.json), ~20 s."""
    import json
    from pathlib import Path

    from loraplan.case import resolve_case

    data = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "published-multigpu.json"
    case = next(c["case"] for c in json.loads(data.read_text())["cases"]
                if c["id"] == "answerai-fsdp-qlora-llama-2-7b-b1-ctx2048")
    model, lora, train = resolve_case(dict(case))
    replay, replay_total, an, an_total = _replay_and_analytic(dict(model.config), lora, train, model)
    for stream, v in replay.items():
        assert abs(an[stream] - v) <= 0.05 * v, (stream, an, replay)
    assert abs(an_total - replay_total) <= 0.05 * replay_total, (an_total, replay_total)


def test_fsdp1_construction_from_the_host_leaves_the_moved_tensors_and_the_flat_parameter_cached():
    # a root unit of two 100 MiB tensors on 2 ranks: moved (2 x 100), broadcast as one 200 MiB cat
    # copy (freed; the flat parameter takes its block), this rank's 100 MiB shard kept
    ev = sr.construction_events((100 * MiB, 100 * MiB), (), 0, 2, sync=True)
    w = sr.lazy_init_state((), "default", ev)
    assert w.allocated == 100 * MiB and w.reserved == 500 * MiB
    assert sorted(w.large_free) == [100 * MiB, 100 * MiB, 200 * MiB]
    # the lazy init's unsharded root (200 MiB) takes the freed flat parameter's block: nothing new
    assert sr.lazy_init_state((200 * MiB,), "default", ev).reserved == 500 * MiB
    # CPU offload: the shard leaves for the host, its block stays cached
    w = sr.lazy_init_state((), "default", sr.construction_events((100 * MiB, 100 * MiB), (), 0, 2, offload=True))
    assert w.allocated == 0 and w.reserved == 500 * MiB
    # one-tensor broadcast buckets are views: no copy (250 MiB closes a bucket)
    big = sr.PARAM_BROADCAST_BUCKET_SIZE
    assert not [e for e in sr.construction_events((big, big), (), 0, 2) if e[1][1] == "bucket"]


def test_cached_blocks_smaller_than_the_head_block_take_the_steps_layer_tensors():
    from loraplan.estimate.allocator_slack import WeightsState, step_segments_bytes

    w = WeightsState(0, 200 * MiB, (), (200 * MiB,))
    # the head's 300 MiB block does not fit the cached 200 MiB: without fill it is no use to the step
    assert step_segments_bytes(w, 400 * MiB, 300 * MiB, 0.0) == 400 * MiB
    # with the layer's 64 MiB tensors it holds three of them (192 MiB)
    assert step_segments_bytes(w, 400 * MiB, 300 * MiB, 0.0, fill=64 * MiB) == 208 * MiB


def test_ram_efficient_fsdp1_rank_keeps_the_constructors_segments_on_its_default_stream():
    import json
    from pathlib import Path

    from loraplan.case import resolve_case
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate

    data = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "published-multigpu.json"
    case = next(c["case"] for c in json.loads(data.read_text())["cases"]
                if c["id"] == "answerai-fsdp-qlora-llama-2-7b-b1-ctx512")
    gpu = load_gpu("rtx3090-24gb")
    seen: dict = {}
    orig = sr.peak_reserved

    def spy(*args, **kw):
        seen[kw["construction"] != ()] = (sr.reserved_by_stream(*args, **kw), kw)
        return orig(*args, **kw)

    sr.peak_reserved = spy
    try:
        for ram_efficient in (True, False):
            model, lora, train = resolve_case({**case, "ram_efficient_loading": ram_efficient})
            estimate(model, lora, train, gpu, load_calibration(gpu.id), with_time=False)
    finally:
        sr.peak_reserved = orig
    (built, kw), (plain, _) = seen[True], seen[False]
    w = sr.lazy_init_state((), "default", kw["construction"])
    # Llama-2-7B nf4 in bf16 storage on 2 ranks: the root's moved embedding and head and its flat
    # parameter (~1 GiB) stay cached; a b1 ctx512 step cannot fill them
    assert w.reserved - w.allocated > 1 << 30
    assert built["default"] >= w.reserved and built["default"] > plain["default"]
    assert {k: v for k, v in built.items() if k != "default"} == {k: v for k, v in plain.items() if k != "default"}


def test_fsdp1_ram_efficient_small_rank_replays_the_constructor_and_the_analytic_follows():
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec, TrainSpec

    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    kw = dict(quant="bf16", batch=1, seq=128, strategy="fsdp", num_gpus=2, fsdp_version=1)
    spec = spec_from_config(CFG, name="small")
    plain, _, an_plain, _ = _replay_and_analytic(CFG, lora, TrainSpec(**kw), spec)
    built, _, an_built, _ = _replay_and_analytic(CFG, lora, TrainSpec(**kw, ram_efficient_loading=True), spec)
    # the constructor's blocks (the root's moved embedding and head, 2 x 31.25 MiB, beside the
    # flat parameter's 62.5 MiB that the lazy init caches anyway) stay cached on the default
    # stream; a b1 x 128 step fills part of them
    assert built["default"] >= plain["default"] + 32 * MiB, (built, plain)
    assert {k: v for k, v in built.items() if k != "default"} == {k: v for k, v in plain.items() if k != "default"}
    assert an_built["default"] > an_plain["default"]
    assert abs(an_built["default"] - built["default"]) <= 0.10 * built["default"], (an_built, built)


def test_arrays_with_the_constructor_and_fill_give_the_scalar_numbers():
    import numpy as np

    ev = sr.construction_events((100 * MiB, 100 * MiB), (30 * MiB, 30 * MiB), 2, 2)
    a = np.array([300 * MiB, 500 * MiB, 900 * MiB])
    B, fill, unit = np.array([150 * MiB, 300 * MiB, 600 * MiB]), np.array([20 * MiB, 40 * MiB, 60 * MiB]), 60 * MiB
    ms = {"m": {"weights": a, "gathered_params": np.array([5 * MiB] * 3)}}
    got = peak_reserved(ms, 1, B, 0.5, root=200 * MiB, unit=np.array([unit] * 3), construction=ev, fill=fill)
    want = [peak_reserved({"m": {k: int(v[i]) for k, v in ms["m"].items()}}, 1, int(B[i]), 0.5, root=200 * MiB,
                          unit=unit, construction=ev, fill=int(fill[i])) for i in range(3)]
    assert list(got) == want


def test_fsdp1_fp32_base_under_bf16_mixed_precision_gathers_in_bf16_on_both_views():
    """PEFT's FSDP recipe (run_peft_fsdp.sh: an fp32-loaded base, accelerate ``mixed_precision: bf16``):
    accelerate's MixedPrecision(param_dtype=bf16) makes FSDP1 all-gather every unit in bf16 on the
    unshard stream (_flat_param.py::_init_param_reduce_dtypes, _get_padded_unsharded_flat_param:
    ``_full_param_padded`` is low precision) after casting the fp32 shard to ``_mp_shard`` on the
    pre-unshard stream (_use_low_precision_shard). Gathered in fp32, the unshard stream would be
    twice the analytic's."""
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec, TrainSpec

    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    train = TrainSpec(quant="fp32", batch=2, seq=512, strategy="fsdp", num_gpus=2, fsdp_version=1, trainer="hf",
                      mixed_precision="bf16", use_orig_params=False)
    replay, _, an, _ = _replay_and_analytic(CFG, lora, train, spec_from_config(CFG, name="small"))
    assert set(an) == set(replay) == {"default", "pre_unshard_stream", "unshard_stream", "post_backward_stream"}
    root_bf16 = 2 * CFG["vocab_size"] * CFG["hidden_size"] * 2  # embeddings + lm_head, 62.5 MiB
    assert root_bf16 < replay["unshard_stream"] < 1.5 * root_bf16  # the root and two small layers, in bf16
    assert abs(an["unshard_stream"] - replay["unshard_stream"]) <= 0.10 * replay["unshard_stream"], (an, replay)
    # the root's bf16 shard (31.25 MiB -> 32), the layers' reuse it, the fp32 LoRA units' shards a small segment
    assert an["pre_unshard_stream"] == replay["pre_unshard_stream"] == 34 * MiB, (an, replay)
    # the default stream is the fitted closed form (phi, phi_layer and the layer block's fill of cached
    # blocks, reserved-slack.json engines.fsdp1, fitted on full-size replays: -1.2%..+8.5% there); on
    # two small layers it reads -1.9% (without the fill credit +10.8%): held to 5% either way
    assert abs(an["default"] - replay["default"]) <= 0.05 * replay["default"], (an, replay)


def test_fsdp1_shards_made_before_the_lazy_init_do_not_fit_in_its_free_blocks():
    """FullyShardedDataParallel.__init__ makes the rank's shards; the lazy init then allocates and frees
    each unit's buffers (here an fp32-loaded base under a bf16 policy: the root's bf16 shard, bf16 and
    fp32 unsharded copies). Only what the step allocates later can reuse those free blocks; the
    shards keep their own segments (llama-3.2-1b with 2 layers, the trace's default stream: 2,632 MB
    replayed, 1,843 MB analytic when the shards were counted into the free blocks, 2,613 MB now)."""
    root, unit = 500 * MiB, 60 * MiB
    ms = {"forward": {"frozen_linear_weights": 120 * MiB, "unquantized_weights": 250 * MiB, "lora_weights": 1 * MiB,
                      "activations": 50 * MiB, "gathered_params": root}}
    out = sr.reserved_by_stream(ms, 1, B=10 * MiB, phi=0.0, root=root, unit=unit, shard_group=2, param_factor=2)
    lazy = sr.lazy_init_state(sr.lazy_init_blocks(1, root, unit, 2, 2)).reserved  # 250 + 500 + 1000 MiB
    assert lazy == 1750 * MiB
    # the 50 MiB of activations fit in the lazy init's free blocks; the 371 MiB held before it do not
    assert out["default"] == 372 * MiB + lazy


def test_fsdp2_fp32_base_under_bf16_mixed_precision_casts_the_shard_beside_the_output():
    """FSDP2 under accelerate's MixedPrecisionPolicy(param_dtype=bf16) casts each fp32 shard in the
    copy-in stream before the copy-in (_fsdp_collectives.py::foreach_all_gather ->
    FSDPParam.all_gather_inputs): the root's bf16 shard (31.25 MiB -> 32) beside its bf16 output
    (62.5 MiB -> 64); an fp32 all-gather would hold twice the output. The root unit is accelerate
    1.13's (--stack accelerate=1.13); from 1.14 the embeddings are units of their own
    (test_fsdp2_embedding_units_under_bf16_mixed_precision_keep_the_rank_total_above_the_replay)."""
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec, TrainSpec

    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    train = TrainSpec(quant="fp32", batch=2, seq=512, strategy="fsdp", num_gpus=2, fsdp_version=2, trainer="hf",
                      mixed_precision="bf16", stack="accelerate=1.13")
    replay, _, an, _ = _replay_and_analytic(CFG, lora, train, spec_from_config(CFG, name="small"))
    assert an["all_gather_copy_in_stream"] == replay["all_gather_copy_in_stream"] == 96 * MiB, (an, replay)
    assert an["reduce_scatter_stream"] == replay["reduce_scatter_stream"]


def test_fsdp2_embedding_units_under_bf16_mixed_precision_keep_the_rank_total_above_the_replay():
    """accelerate >= 1.14's embedding / tail units with an fp32 base under bf16 mixed precision: the
    copy-in stream holds the input embedding's cast shard and output beside the first layer's
    (the previous all-gather's state lives until the next unit's wait_for_unshard), spread over more
    segments than the closed form's two blocks (measured: 82 MiB replayed, 48 MiB analytic), while
    the default stream's slack over-covers it: the rank's total stays at or above the replay,
    within 5%."""
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec, TrainSpec

    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    train = TrainSpec(quant="fp32", batch=2, seq=512, strategy="fsdp", num_gpus=2, fsdp_version=2, trainer="hf",
                      mixed_precision="bf16")
    replay, _, an, _ = _replay_and_analytic(CFG, lora, train, spec_from_config(CFG, name="small"))
    total_an, total_replay = sum(an.values()), sum(replay.values())
    assert total_replay <= total_an <= 1.05 * total_replay, (an, replay)


def test_fsdp1_lazy_init_of_an_fp32_base_is_the_peak_of_a_short_step_on_both_views():
    """FSDP1's lazy init allocates and frees each unit's fp32 ``_full_prec_full_param_padded`` beside the
    rank's shards (_flat_param.py::FlatParamHandle.init_flat_param_attributes, parameter mixed
    precision): with one short row the root's (embeddings + head, 125 MiB in fp32) is the rank's peak,
    above every moment of the step (estimate/parallel.py::_fsdp1_lazy_init)."""
    for mod in ("torch", "transformers", "peft"):
        pytest.importorskip(mod)
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.hf import spec_from_config
    from loraplan.spec import LoraSpec, TrainSpec
    from loraplan.trace.run import trace_step

    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    train = TrainSpec(quant="fp32", batch=1, seq=64, strategy="fsdp", num_gpus=2, fsdp_version=1, trainer="hf",
                      mixed_precision="bf16", use_orig_params=False)
    t = trace_step(CFG, lora, train, rank=0)
    gpu = load_gpu("h100-sxm-80gb")
    m = estimate(spec_from_config(CFG, name="small"), lora, train, gpu, load_calibration(gpu.id), with_time=False).memory
    assert m.peak_moment == "lazy init" and t["peak_phase"] == "forward"  # the first forward's root pre-forward
    root_fp32 = 2 * CFG["vocab_size"] * CFG["hidden_size"] * 4  # + the norms (fp32, 2h per layer + h)
    assert root_fp32 <= m.components["gathered_params"] <= root_fp32 + 4 * CFG["hidden_size"] * (2 * 4 + 1)
    assert abs(m.peak_allocated_bytes - t["peak_allocated_bytes"]) <= 0.01 * t["peak_allocated_bytes"], \
        (m.peak_allocated_bytes, t["peak_allocated_bytes"])


def test_fsdp1_cpu_offload_copies_each_shard_to_the_device_before_its_all_gather():
    """FSDP1 with CPU offload and no parameter mixed precision: FlatParamHandle.pre_unshard copies the
    host shard to the device on the pre-unshard stream (flat_param_to(self.device)), a shard-sized
    block freed once the all-gather has read it; the root's shard is the largest, the layers' reuse
    its block. Without offload nothing is allocated there."""
    root, unit = 1000 * MiB, 400 * MiB
    assert sr.mp_shard_blocks(1, root, unit, 2) == ()
    assert sr.mp_shard_blocks(1, root, unit, 2, offload=True) == (500 * MiB, 200 * MiB)
    assert sr.mp_shard_blocks(2, root, unit, 2, offload=True) == ()  # FSDP2: not this path
    ms = {"layer backward": {"activations": 2000 * MiB}}
    on = sr.reserved_by_stream(ms, 1, 100 * MiB, 1.0, root=root, unit=unit, shard_group=2, offload=True)
    off = sr.reserved_by_stream(ms, 1, 100 * MiB, 1.0, root=root, unit=unit, shard_group=2)
    assert "pre_unshard_stream" not in off and on["pre_unshard_stream"] == 500 * MiB
