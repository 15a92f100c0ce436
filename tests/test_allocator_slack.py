"""The closed-form peak reserved (loraplan.estimate.allocator_slack) and the CUDA context data
(loraplan.estimate.context): each placement rule on hand-made numbers, arrays equal to scalars,
and the estimate wired to both."""

from __future__ import annotations

import pytest

from loraplan.allocator import replay
from loraplan.estimate import allocator_slack as sl
from loraplan.estimate.allocator_slack import WeightsState, step_segments_bytes
from loraplan.estimate.context import cuda_context, load_context_data, nccl_bytes
from loraplan.hf import spec_from_config

MiB = 2**20
LLAMA = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 704,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


# ----------------------------------------------------------------------- placement of the step
def test_small_blocks_pack_into_2mib_segments():
    """B <= 1 MiB: small pool, four 512 KiB blocks per kSmallBuffer (2 MiB) segment."""
    w = WeightsState(0, 0)
    assert step_segments_bytes(w, 3 * MiB, MiB // 2, 0.0) == 4 * MiB  # 6 blocks -> 2 segments
    # a free small-pool tail takes blocks first
    assert step_segments_bytes(WeightsState(0, 2 * MiB, small_free=(MiB,)), 3 * MiB, MiB // 2, 0.0) == 2 * MiB


def test_mid_blocks_fill_free_tails_then_20mib_segments():
    """1 MiB < B < 10 MiB: best fit into cached free blocks (split), then kLargeBuffer segments."""
    w = WeightsState(0, 0, large_free=(8 * MiB,))
    assert step_segments_bytes(w, 12 * MiB, 4 * MiB, 0.0) == 20 * MiB  # 3 blocks: 2 in the tail, 1 new segment
    assert step_segments_bytes(WeightsState(0, 0), 24 * MiB, 4 * MiB, 0.0) == 40 * MiB  # 6 blocks, 5 per segment


def test_large_blocks_round_to_2mib_and_phi_adds_stranded_blocks():
    assert step_segments_bytes(WeightsState(0, 0), 22 * MiB + 1, 11 * MiB, 0.0) == 24 * MiB
    assert step_segments_bytes(WeightsState(0, 0), 22 * MiB, 11 * MiB, 1.0) == 34 * MiB  # + one block of B
    # a free tail smaller than B holds none of it (best fit needs a block >= the request)
    assert step_segments_bytes(WeightsState(0, 0, large_free=(10 * MiB,)), 22 * MiB, 11 * MiB, 0.0) == 22 * MiB
    # the layer block's stranded bytes (phi_layer x B_layer) are placed like the rest: 2 MiB rounding
    assert step_segments_bytes(WeightsState(0, 0), 22 * MiB, 11 * MiB, 0.0, extra=5 * MiB) == 28 * MiB


def test_peak_reserved_adds_phi_layer_times_the_layer_block():
    from loraplan.estimate.memory import make_setup
    from loraplan.spec import LoraSpec, TrainSpec
    from loraplan.targets import select_targets

    model = spec_from_config(LLAMA, "tiny")
    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    s = make_setup(model, lora, TrainSpec(quant="bf16", batch=4, seq=2048), select_targets(model, lora.targets), "9.0")
    st, x, kind = s.structure, s.shape, s.attention
    _, layer = sl.step_blocks(st, x, kind)
    a = 4096 * MiB  # far above the model's segments: every stranded byte is new memory
    data = {"configs": {"default": {"phi": 0.5, "phi_layer": 0.0}}}
    base = sl.peak_reserved(st, x, kind, a, (), "default", data)
    data["configs"]["default"]["phi_layer"] = 2.0
    more = sl.peak_reserved(st, x, kind, a, (), "default", data)
    assert layer > 0 and more > base and abs(more - base - 2 * layer) < 2 * MiB  # up to one segment's rounding


def test_expandable_segments_grow_by_pages():
    w = WeightsState(0, 0, large_free=(8 * MiB,))
    assert step_segments_bytes(w, 12 * MiB, 4 * MiB, 0.0, "expandable_segments:True") == 20 * MiB
    assert step_segments_bytes(w, 8 * MiB, 4 * MiB, 0.0, "expandable_segments") == 0


def test_weights_state_is_the_allocator_replay():
    sizes = (3 * MiB, 100, 15 * MiB + 1)
    st = sl._replayed(sizes, "")
    r = replay([("alloc", i, n) for i, n in enumerate(sizes)])
    assert (st.allocated, st.reserved) == (r.peak_allocated, r.peak_reserved)
    # best fit: the 15 MiB request is carved from the 3 MiB block's 20 MiB segment (17 MiB free),
    # whose 2 MiB - 512 remainder (> kSmallSize) is split off and stays free
    assert st.large_free == (2 * MiB - 512,) and st.reserved == 22 * MiB
    assert st.small_free == (2 * MiB - 512,)


def test_arrays_equal_scalars():
    import numpy as np

    w = WeightsState(0, 0, small_free=(MiB,), large_free=(8 * MiB, 30 * MiB))
    D = np.array([3 * MiB, 12 * MiB, 22 * MiB, 200 * MiB])
    B = np.array([MiB // 2, 4 * MiB, 11 * MiB, 64 * MiB])
    for cfg in sl.CONFIGS:
        got = step_segments_bytes(w, D, B, 0.7, cfg)
        assert list(got) == [step_segments_bytes(w, int(d), int(b), 0.7, cfg) for d, b in zip(D, B)]
        E = np.array([0, MiB, 3 * MiB + 7, 40 * MiB])
        got = step_segments_bytes(w, D, B, 0.7, cfg, E)
        assert list(got) == [step_segments_bytes(w, int(d), int(b), 0.7, cfg, int(e)) for d, b, e in zip(D, B, E)]


def test_peak_reserved_on_a_setup_arrays_and_bounds():
    import numpy as np

    from loraplan.estimate.activations import Shape
    from loraplan.estimate.memory import make_setup
    from loraplan.spec import LoraSpec, TrainSpec
    from loraplan.targets import select_targets

    model = spec_from_config(LLAMA, "tiny")
    lora = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
    train = TrainSpec(quant="nf4", batch=2, seq=256)
    s = make_setup(model, lora, train, select_targets(model, lora.targets), "9.0")
    a = 100 * MiB
    one = sl.peak_reserved(s.structure, s.shape, s.attention, a, (32 * MiB, 32 * MiB))
    assert one >= a + sl.weights_slack(s.structure, 8, (32 * MiB, 32 * MiB))
    x = Shape(b=np.array([2, 2]), seq=np.array([256, 256]), tseq=np.array([256, 256]), r=np.array([8, 16]),
              dropout=np.array([0.05, 0.05]))
    arr = sl.peak_reserved(s.structure, x, s.attention, np.array([a, a]), (32 * MiB, 32 * MiB))
    assert arr[0] == one
    x16 = Shape(b=2, seq=256, tseq=256, r=16, dropout=0.05)
    assert arr[1] == sl.peak_reserved(s.structure, x16, s.attention, a, (32 * MiB, 32 * MiB))


def test_unknown_config_is_one_line():
    from loraplan.errors import InputError

    with pytest.raises(InputError, match="no closed form") as e:
        sl._config_name("max_split_size_mb:128")
    assert "\n" not in str(e.value)


def test_slack_data_has_provenance():
    d = sl.load_slack_data()
    for name in sl.CONFIGS:
        c = d["configs"][name]
        assert 0 < c["spread_of_allocated"] < 0.5 and c["fit"]["n"] > 0 and c["fit"]["source"]


# ----------------------------------------------------------------------------- CUDA context
def test_context_by_module_loading():
    d = load_context_data()
    lazy = cuda_context("9.0")  # the installed torch (>= 1.13): lazy loading
    assert lazy.mode == "lazy" and lazy.bytes == d["lazy"]["context_bytes"]["default"] + d["lazy"]["modules_bytes"]["value"]
    old = cuda_context("7.0", "torch=1.12")
    assert old.mode == "eager" and old.bytes == d["eager"]["context_bytes"]["by_compute_capability"]["7.0"]
    assert old.bytes > lazy.bytes  # every module at context creation
    assert all(s for s in lazy.sources)


def test_nccl_per_communicator():
    d = load_context_data()["nccl"]["per_communicator_bytes"]
    assert nccl_bytes(1) == 0 and nccl_bytes(2) == d["2"] and nccl_bytes(8, 2) == 2 * d["more"]


def test_estimate_uses_closed_form_and_published_context():
    from loraplan.catalog import load_calibration, load_gpu, load_model
    from loraplan.estimate.api import estimate
    from loraplan.spec import LoraSpec, TrainSpec

    gpu = load_gpu("a100-sxm-80gb")
    e = estimate(load_model("llama-2-7b"), LoraSpec(), TrainSpec(), gpu, load_calibration(gpu.id), with_time=False)
    m = e.memory
    assert m.outside_allocator_bytes["cuda_context_and_libraries"] == cuda_context(gpu.compute_capability).bytes
    assert m.peak_reserved_bytes > m.peak_allocated_bytes
    assert m.device_total_bytes == m.peak_reserved_bytes + cuda_context(gpu.compute_capability).bytes
    assert m.reserved_uncertainty_bytes > 0 and m.context_uncertainty_bytes == cuda_context("8.0").uncertainty_bytes


def test_cli_alloc_conf(run_cli):
    import json

    code, out, err = run_cli("estimate", "--model", "tiny-llama", "--format", "json")
    assert code == 0, err
    default = json.loads(out)
    code, out, err = run_cli("estimate", "--model", "tiny-llama", "--format", "json",
                             "--alloc-conf", "expandable_segments:True")
    assert code == 0, err
    exp = json.loads(out)
    assert exp["inputs"]["alloc_conf"] == "expandable_segments:True" and "alloc_conf" not in default["inputs"]
    assert exp["memory"]["peak_allocated_bytes"] == default["memory"]["peak_allocated_bytes"]
    assert exp["memory"]["peak_reserved_bytes"] != default["memory"]["peak_reserved_bytes"]
    code, out, err = run_cli("estimate", "--model", "tiny-llama", "--alloc-conf", "max_split_size_mb:128")
    assert code == 2 and "max_split_size_mb:128" in err and "expandable_segments:True" in err
    assert err.strip().count("\n") == 0
