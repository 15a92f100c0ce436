"""The analytic reserved model (loraplan.estimate.reserved): weight tensors exactly as bitsandbytes
stores them, the step script replayed through the allocator model against the trace's own replay,
and the paged-optimizer fit verdict."""

from __future__ import annotations


import pytest

from loraplan.allocator import replay
from loraplan.errors import InputError  # noqa: F401 - the package imports cleanly without torch
from loraplan.estimate.arrays import blocks as _blocks
from loraplan.estimate.weights import quantized_linear_bytes
from loraplan.estimate.reserved import (PAGED_MIN_NUMEL, StepScript, load_host_links, paging_cost,
                                        peak_reserved_bytes, replay_step, weight_tensor_bytes)
from loraplan.hf import spec_from_config
from loraplan.spec import LoraSpec, TrainSpec
from loraplan.targets import default_targets, select_targets

MiB = 2**20

LLAMA = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 704,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
QWEN2 = {"model_type": "qwen2", "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 1216,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
T5 = {"model_type": "t5", "vocab_size": 2048, "d_model": 256, "d_kv": 64, "d_ff": 1024, "num_layers": 2,
      "num_decoder_layers": 2, "num_heads": 4, "feed_forward_proj": "relu"}


# ----------------------------------------------------------------------------- pure Python
@pytest.mark.parametrize("quant,dq", [("nf4", True), ("nf4", False), ("int8", False), ("bf16", False)])
def test_weight_tensors_are_the_ledgers_tensors(quant, dq):
    """Each frozen Linear's tensors, 512-B rounded, sum to weights.py's quantized_linear_bytes."""
    model = spec_from_config(LLAMA, "tiny")
    w = weight_tensor_bytes(model, (), quant, dq, 8)
    linears = [l for l in model.linears if l.role != "lm_head"]
    want = sum(quantized_linear_bytes(l, quant, dq) for l in linears)
    others = sum(_blocks(p.numel * (4 if quant != "bf16" else 2)) for p in model.others)
    head = model.lm_head
    head_b = 0 if model.tie_word_embeddings else _blocks(head.in_features * head.out_features * (4 if quant != "bf16" else 2))
    assert sum(_blocks(x) for x in w) == want + others + head_b
    n4 = 2 + (4 if dq else 1)
    assert len(w) == len(model.others) + len(linears) * {"nf4": n4, "int8": 2, "bf16": 1}[quant] + (0 if model.tie_word_embeddings else 1)


def test_lora_tensors_and_replay_basics():
    model = spec_from_config(LLAMA, "tiny")
    adapted = select_targets(model, ("q_proj", "v_proj"))
    w = weight_tensor_bytes(model, adapted, "bf16", False, 8)
    lora = w[-2 * len(adapted):]
    assert lora[:2] == [8 * 256 * 4, 256 * 8 * 4]
    # nothing dynamic: reserved is the weights' segments, peak allocated their rounded sum
    r = replay_step(w, StepScript(), steps=1)
    assert r.peak_allocated == sum(_blocks(x) for x in w) and r.peak_reserved % (2 * MiB) == 0
    assert peak_reserved_bytes(w, StepScript(), "expandable_segments:True") <= r.peak_reserved + 20 * MiB


def test_step_script_frees_everything_it_allocates():
    from loraplan.estimate.reserved import _events, reserved_for_setup, step_script

    model = spec_from_config(LLAMA, "tiny")
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))
    for gc in (True, False):
        train = TrainSpec(quant="nf4", batch=2, seq=256, gradient_checkpointing=gc)
        adapted = select_targets(model, lora.targets)
        s = step_script(model, lora, train, adapted, "9.0", (32 * MiB, 32 * MiB))
        w = weight_tensor_bytes(model, adapted, "nf4", True, 8)
        r = replay(_events(w, s, 2))
        # left alive: weights, inputs, workspaces, optimizer state
        live = len(w) + len(s.input_bytes) + 2 + len(s.optimizer_state_bytes)
        assert r.live_at_end == live
        assert reserved_for_setup(model, lora, train, "9.0", (32 * MiB, 32 * MiB)).peak_reserved == r.peak_reserved


# ----------------------------------------------------------------------------- paged optimizers
def test_paging_cost_follows_the_bitsandbytes_cost_model():
    links = load_host_links()
    G = 2**30
    v = paging_cost(5 * G, "pcie5_x16")
    bw = links["links"]["pcie5_x16"]["bytes_per_s"]
    eff = links["paging_efficiency"]["value"]
    assert v.seconds_per_step == pytest.approx(5 * G / (eff * bw))
    assert v.lower_bound_s == pytest.approx(5 * G / bw) and v.lower_bound_s < v.seconds_per_step
    # the bitsandbytes docs' own example: 1 GB evicted per step over PCIe 3.0 x16 ~ 125 ms
    assert paging_cost(10**9, "pcie3_x16").seconds_per_step == pytest.approx(0.125, rel=0.02)
    # NVLink-C2C moves the same bytes ~29x faster than PCIe 4
    assert paging_cost(5 * G, "nvlink_c2c").seconds_per_step < v.seconds_per_step / 5
    with pytest.raises(KeyError):
        paging_cost(5 * G, "pcie9")
    assert PAGED_MIN_NUMEL == 100_000


def test_fits_with_paging_reports_its_time_cost():
    """A paged optimizer whose state alone does not fit: the verdict says so and the estimate
    carries the per-step paging time over the GPU's host link (catalog data)."""
    from loraplan.catalog import load_gpu, load_model
    from loraplan.estimate.api import estimate

    gpu = load_gpu("rtx4090-24gb")
    assert gpu.host_link == "pcie4_x16"
    m = load_model("llama-3-8b")
    for rank in (256, 512, 1024, 2048):
        e = estimate(m, LoraSpec(rank=rank, targets=("all-linear",)), TrainSpec(quant="nf4",
                     optimizer="paged_adamw_32bit"), gpu, with_time=False)
        if e.verdict == "fits with paging":
            break
    assert e.verdict == "fits with paging", e.verdict
    over = e.memory.device_total_bytes - gpu.memory_bytes
    p = e.detail["paging"]
    assert p["evicted_bytes"] == over and 0 < over <= e.memory.outside_allocator_bytes["paged_optimizer_state"]
    assert p["seconds_per_step"] == pytest.approx(paging_cost(over, "pcie4_x16").seconds_per_step)
    assert any("paging" in n and "pcie4_x16" in n for n in e.memory.notes)


def test_host_links_have_sources():
    data = load_host_links()
    for name, link in data["links"].items():
        assert link["bytes_per_s"] > 1e9 and link["source"], name
    assert data["paging_efficiency"]["source"]


# ----------------------------------------------------------------------------- against the trace
#: |analytic - trace replay| on peak reserved, measured on these configs: -8 .. +16 % of 82-180 MiB.
#: The unit of error is a segment: one kLargeBuffer (20 MiB, K_LARGE_BUFFER) is 10-25 % of a tiny
#: model's reserved memory. Tolerance: the larger of one such segment and 12 % (bf16/nf4) / 20 %
#: (int8: its retained ctx tensors are spread evenly over layers in the script, not where the
#: trace has them). Full-size agreement is printed by benchmarks/reserved_from_replay.py --full.
TOLERANCE = {"bf16": 0.12, "nf4": 0.12, "int8": 0.20}


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [LLAMA, QWEN2, T5], ids=["llama", "qwen2", "t5"])
@pytest.mark.parametrize("quant", ["bf16", "nf4", "int8"])
@pytest.mark.parametrize("gc", [True, False])
def test_reserved_model_tracks_the_trace_replay(cfg, quant, gc):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    if quant != "bf16":
        pytest.importorskip("bitsandbytes")
    from loraplan.estimate.reserved import reserved_for_setup
    from loraplan.trace import emulation as em
    from loraplan.trace.run import trace_step

    model = spec_from_config(cfg, "tiny")
    lora = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=default_targets(model))
    train = TrainSpec(quant=quant, batch=2, seq=256, gradient_checkpointing=gc,
                      target_seq=256 if model.is_encoder_decoder else None)
    tr = trace_step(cfg, lora, train, "9.0")
    ws = em.cublas_workspace_bytes("9.0")
    an = reserved_for_setup(model, lora, train, "9.0", (ws, ws))
    # the weights' segments are exact (same tensors, same rules)
    adapted = select_targets(model, lora.targets)
    w = weight_tensor_bytes(model, adapted, quant, train.double_quant, lora.rank)
    assert replay([("alloc", i, b) for i, b in enumerate(w)]).final_reserved == tr["allocator"]["weights"]["reserved_bytes"]
    # the step: the script's peak allocated within 8 % (measured: -5.5 .. +2.4 %), peak reserved
    # within the stated tolerance
    assert an.peak_allocated == pytest.approx(tr["peak_allocated_bytes"], rel=0.08)
    from loraplan.allocator import K_LARGE_BUFFER

    want = tr["peak_reserved_bytes"]
    assert abs(an.peak_reserved - want) <= max(TOLERANCE[quant] * want, K_LARGE_BUFFER)
    # the closed form the estimate uses (allocator_slack): within its fitted spread of peak
    # allocated plus one kLargeBuffer (the segment granularity that dominates tiny models)
    from loraplan.estimate import allocator_slack as sl
    from loraplan.estimate.memory import make_setup

    setup = make_setup(model, lora, train, adapted, "9.0")
    a = an.peak_allocated
    closed = sl.peak_reserved(setup.structure, setup.shape, setup.attention, a, (ws, ws))
    assert abs(closed - want) <= sl.slack_uncertainty(a) + K_LARGE_BUFFER
