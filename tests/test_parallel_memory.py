"""Issue 13: the analytic per-GPU ledger (loraplan/estimate/parallel.py). Pure Python, no torch.

Per strategy: the sharded lines scale 1/N, activations do not; single is the one-GPU estimate
exactly; device_map's worst rank is the last when the logits dominate; the JSON carries
memory.per_gpu / memory.host_bytes; bad layouts are one-line InputErrors (exit 2 in the CLI).
"""

import json
from dataclasses import replace

import pytest

from loraplan.catalog import load_model
from loraplan.errors import InputError
from loraplan.estimate.api import estimate
from loraplan.estimate.parallel import device_map_layers
from loraplan.spec import LoraSpec, TrainSpec

MODEL = load_model("llama-2-7b")
LORA = LoraSpec(rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
QLORA = TrainSpec(quant="nf4", batch=2, seq=1024, trainer="trl", quant_storage="bf16")
BF16 = TrainSpec(quant="bf16", batch=2, seq=1024, trainer="trl")


def mem(train, **kw):
    return estimate(MODEL, LORA, replace(train, **kw), with_time=False).memory


def ledger(train, moment, **kw):
    """The rank-0 ledger at ``moment`` (all moments: estimate.parallel.rank_moments)."""
    from loraplan.estimate.memory import first_layer_input, make_setup, moments
    from loraplan.estimate.parallel import rank_moments
    from loraplan.catalog import load_calibration
    from loraplan.targets import select_targets

    t = replace(train, **kw)
    s = make_setup(MODEL, LORA, t, select_targets(MODEL, LORA.targets))
    ms = moments(s.structure, t, s.attention, s.shape, None, load_calibration(None))
    return rank_moments(ms, s.structure, t, LORA.rank, first_layer_input=first_layer_input(s.structure, s.shape))[0][moment]


def test_single_is_the_one_gpu_estimate_exactly():
    m = mem(QLORA, quant_storage=None)
    assert m.per_gpu == {0: m.components}
    assert sum(m.components.values()) == m.peak_allocated_bytes
    assert m.host_components == {"model_load_copies": m.host_bytes}


@pytest.mark.parametrize("strategy,train", [("fsdp", QLORA), ("zero3", QLORA), ("fsdp", BF16), ("zero3", BF16)])
def test_base_sharding_scales_the_base_not_the_activations(strategy, train):
    one = ledger(train, "layer backward", quant_storage=None) if train is BF16 else None
    two = ledger(train, "layer backward", strategy=strategy, num_gpus=2)
    four = ledger(train, "layer backward", strategy=strategy, num_gpus=4)
    for k in ("frozen_linear_weights", "unquantized_weights"):
        assert four[k] == pytest.approx(two[k] / 2, rel=1e-9)
    assert four["activations"] == two["activations"]  # per rank, never divided
    if one is not None:
        assert two["activations"] == one["activations"]
    # each rank's peak allocated is its ledger's sum, and the worst rank is the top level
    m = mem(train, strategy=strategy, num_gpus=4)
    assert all(sum(v.values()) == m.peak_allocated_bytes for v in m.per_gpu.values())
    assert len(m.per_gpu) == 4


def test_fsdp_gathered_units_are_root_plus_layers_in_backward():
    c2 = ledger(QLORA, "layer backward", strategy="fsdp", num_gpus=2, fsdp_version=1)
    c_fwd = ledger(QLORA, "forward", strategy="fsdp", num_gpus=2, fsdp_version=1)
    c_opt = ledger(QLORA, "optimizer step", strategy="fsdp", num_gpus=2, fsdp_version=1)
    assert c2["gathered_params"] > c_fwd["gathered_params"] > 0  # the root stays gathered after forward
    assert c_opt["gathered_params"] == 0
    # FSDP2 prefetches one more layer in backward and stages the all-gather output (accelerate 1.13's
    # units: the root holds the embeddings and lm_head through the backward)
    v2 = ledger(QLORA, "layer backward", strategy="fsdp", num_gpus=2, fsdp_version=2, stack="accelerate=1.13")
    assert v2["gathered_params"] >= c2["gathered_params"] and v2["all_gather_buffers"] > 0
    # accelerate >= 1.14 cuts the embeddings into their own units: not gathered in the layers' backward
    v2c = ledger(QLORA, "layer backward", strategy="fsdp", num_gpus=2, fsdp_version=2)
    root = 2 * MODEL.vocab_size * MODEL.hidden_size * 2  # untied embedding + lm_head, bf16
    assert v2["gathered_params"] - v2c["gathered_params"] == root
    assert v2c["all_gather_buffers"] == v2["all_gather_buffers"]
    # SHARD_GRAD_OP keeps every layer gathered through forward: about the whole base
    sgo = ledger(QLORA, "forward", strategy="fsdp", num_gpus=2, fsdp_sharding="shard-grad-op")
    assert sgo["gathered_params"] > 0.9 * sgo["frozen_linear_weights"]


def test_fsdp2_forward_all_gather_outputs_outlive_the_next_copy_out():
    """FSDP2 frees a unit's all-gather output in forward only when the next unit's wait_for_unshard
    returns, after its copy-out (_fsdp_param_group.py): the first layer holds root + layer twice,
    the last layer the previous output beside its own, the loss the last layer's output."""
    from loraplan.estimate.memory import make_setup
    from loraplan.estimate.parallel import FIRST_GATHER, LAST_GATHER, layer_unit
    from loraplan.targets import select_targets

    kw = dict(strategy="fsdp", num_gpus=2, fsdp_version=2, stack="accelerate=1.13")  # the root-unit layout
    st = make_setup(MODEL, LORA, replace(QLORA, **kw), select_targets(MODEL, LORA.targets)).structure
    root = st.unquantized_weights
    first, last, fwd = (ledger(QLORA, m, **kw) for m in (FIRST_GATHER, LAST_GATHER, "forward"))
    unit = layer_unit(st, first["lora_weights"] * 2)  # the rank holds 1/2
    assert first["gathered_params"] == first["all_gather_buffers"] == pytest.approx(root + unit, rel=1e-9)
    assert last["all_gather_buffers"] == pytest.approx(2 * unit, rel=1e-9)
    assert fwd["all_gather_buffers"] == pytest.approx(unit, rel=1e-9) and fwd["gathered_params"] == root
    assert "logits_loss" not in first and "logits_loss" not in last
    assert first["activations"] < last["activations"] == fwd["activations"]
    with pytest.raises(KeyError):  # FSDP1 frees the unsharded flat parameter at once: no such moments
        ledger(QLORA, FIRST_GATHER, strategy="fsdp", num_gpus=2, fsdp_version=1)
    # accelerate >= 1.14's units: the first layer's copy-out holds the input embedding's output, not
    # its parameters (resharded after its forward); the loss holds lm_head's output and parameters
    kw.pop("stack")
    first, fwd = (ledger(QLORA, m, **kw) for m in (FIRST_GATHER, "forward"))
    embedding = MODEL.vocab_size * MODEL.hidden_size * 2
    assert first["all_gather_buffers"] == pytest.approx(embedding + unit, rel=1e-9)
    assert first["gathered_params"] == pytest.approx(root - 2 * embedding + unit, rel=1e-9)
    assert fwd["all_gather_buffers"] == embedding and fwd["gathered_params"] == pytest.approx(root - embedding, rel=1e-9)


def test_trainable_state_is_sharded_1_over_n():
    for strategy in ("fsdp", "zero2", "zero3"):
        a = ledger(BF16, "optimizer step", strategy=strategy, num_gpus=2)
        b = ledger(BF16, "optimizer step", strategy=strategy, num_gpus=4)
        assert b["optimizer_state"] == pytest.approx(a["optimizer_state"] / 2)
    z = ledger(BF16, "optimizer step", strategy="zero1", num_gpus=4)
    assert z["master_weights"] > 0  # fp32 partition of the bf16 trainables


def test_ddp_replicates_and_adds_buckets():
    one = mem(BF16)
    ddp = mem(BF16, strategy="ddp", num_gpus=4)
    assert ddp.components["ddp_buckets"] == one.components["lora_weights"]
    assert ddp.peak_allocated_bytes == one.peak_allocated_bytes + ddp.components["ddp_buckets"]
    assert ddp.host_components["model_load_copies"] == 4 * one.host_components["model_load_copies"]


def test_offload_moves_state_to_host():
    on = mem(QLORA, strategy="fsdp-offload", num_gpus=2)
    off = mem(QLORA, strategy="fsdp", num_gpus=2)
    assert "frozen_linear_weights" not in on.components and on.peak_allocated_bytes < off.peak_allocated_bytes
    assert on.host_components["offloaded_params"] > 0 and on.host_bytes >= on.host_components["offloaded_params"]
    ram = mem(QLORA, strategy="fsdp", num_gpus=2, ram_efficient_loading=True)
    assert ram.host_components["model_load_copies"] * 2 == off.host_components["model_load_copies"]
    z = mem(QLORA, strategy="zero3-offload", num_gpus=2)
    assert z.host_components["offloaded_optimizer"] > 0 and "optimizer_state" not in z.components


def test_device_map_worst_rank_is_the_last_when_logits_dominate():
    assert device_map_layers(32, 3) == [11, 11, 10]
    m = mem(BF16, strategy="device-map", num_gpus=4, batch=8, seq=2048, trainer="hf")
    peaks = {k: sum(v.values()) for k, v in m.per_gpu.items()}
    assert max(peaks, key=peaks.get) == 3 and "logits_loss" in m.per_gpu[3]
    assert "logits_loss" not in m.per_gpu[0]
    assert m.peak_allocated_bytes == peaks[3]


@pytest.mark.parametrize("kw,needle", [
    (dict(num_gpus=2), "choose --strategy"),
    (dict(strategy="ddp", num_gpus=16), "add --nodes 2"),
    (dict(strategy="ddp", num_gpus=6, nodes=4), "not a multiple of --nodes 4"),
    (dict(strategy="fsdp", num_gpus=2, quant="int8"), "--quant int8 with --strategy fsdp"),
    (dict(strategy="fsdp", num_gpus=2, quant="nf4"), "use --quant-storage bf16"),
    (dict(strategy="zero3", num_gpus=2, quant="nf4", quant_storage="uint8"), "use --quant-storage bf16"),
    (dict(strategy="ddp", num_gpus=2, fsdp_sharding="hybrid"), "is an FSDP setting"),
    (dict(strategy="fsdp", num_gpus=2, fsdp_sharding="hybrid"), "use --fsdp-sharding full"),
    (dict(strategy="fsdp", num_gpus=2, quant="nf4", quant_storage="bf16", trainer="hf", fsdp_version=1),
     "--no-prepare-kbit"),
    (dict(quant="bf16", quant_storage="bf16"), "4-bit bases only"),
    (dict(strategy="zero2", num_gpus=1), "--num-gpus 2 or more"),
])
def test_bad_layouts_are_one_line(kw, needle):
    with pytest.raises(InputError) as e:
        estimate(MODEL, LORA, replace(TrainSpec(), **kw), with_time=False)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_json_and_exit_2(run_cli):
    code, out, err = run_cli("estimate", "--format", "json", "--strategy", "fsdp", "--num-gpus", "2",
                             "--quant-storage", "bf16", "--trainer", "trl")
    assert code == 0, err
    d = json.loads(out)["memory"]
    assert set(d["per_gpu"]) == {"0", "1"} and d["host_bytes"] > 0
    assert d["peak_allocated_bytes"] == max(sum(v.values()) for v in d["per_gpu"].values())
    code, out, err = run_cli("estimate", "--num-gpus", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("estimate", "--strategy", "fsdp", "--num-gpus", "2")
    assert code == 2 and "--quant-storage bf16" in err


def test_4bit_quant_state_is_not_sharded():
    """absmax/code tables are Params4bit attributes, not parameters: every rank keeps them whole."""
    a = ledger(QLORA, "layer backward", strategy="fsdp", num_gpus=2)
    b = ledger(QLORA, "layer backward", strategy="fsdp", num_gpus=4)
    assert a["quant_state"] == b["quant_state"] > 0
    one = ledger(QLORA, "layer backward", quant_storage=None)
    assert b["frozen_linear_weights"] * 4 + b["quant_state"] == pytest.approx(one["frozen_linear_weights"], rel=1e-6)
    assert "quant_state" not in ledger(BF16, "layer backward", strategy="fsdp", num_gpus=2)


def test_worst_rank_over_a_sweeps_arrays():
    import numpy as np

    from loraplan.estimate.parallel import worst_rank_peak

    ranks = {0: {"forward": {"a": np.array([1, 5])}}, 1: {"forward": {"a": np.array([3, 2])}}}
    peak, moment = worst_rank_peak(ranks)
    assert peak.tolist() == [3, 5] and list(moment) == ["forward", "forward"]


@pytest.mark.parametrize("kw", [dict(strategy="fsdp", num_gpus=4), dict(strategy="device-map", num_gpus=3, batch=4),
                                dict(strategy="fsdp", num_gpus=2, fsdp_version=2, batch=1, seq=64),  # first layer all-gather
                                dict(strategy="zero3", num_gpus=8, quant="fp32", mixed_precision="bf16")])
def test_sweep_totals_match_estimate(kw):
    """sweep's per-group totals (_memory_totals) read the same per-GPU rules as estimate()."""
    from loraplan.catalog import load_calibration
    from loraplan.estimate.activations import choose_attention
    from loraplan.estimate.memory import moments, sequence_shape
    from loraplan.sweep import _Group, _memory_totals

    train = replace(BF16, **kw)
    want = mem(train).peak_allocated_bytes
    g = _Group(MODEL, LORA, train)
    cal = load_calibration(None)
    x = sequence_shape(MODEL, g.resolved, LORA, "9.0")
    kind = choose_attention(MODEL, g.resolved, "9.0")
    ms = moments(g.structure, g.resolved, kind, x, None, cal)
    assert int(_memory_totals(g.structure, g.resolved, x, ms, cal, kind, None, g.stored)[0]) == want


@pytest.mark.parametrize("trainer,prefetch", [("loop", None), ("hf", None), ("hf", "backward-pre"),
                                              ("loop", "backward-post")])
@pytest.mark.parametrize("batch,seq", [(1, 64), (8, 2048)])
def test_fsdp1_gathered_units_are_full_size_and_two_at_the_layer_boundary(trainer, prefetch, batch, seq):
    """The unsharded flat parameter is a full allocation beside the shard: root + current layer,
    + the previous layer, all-gathered before the current frozen unit is freed (any backward_prefetch)
    once the layer's backward transients are gone: weight-bound, two units; activation-bound, one."""
    from loraplan.estimate.memory import make_setup
    from loraplan.estimate.parallel import layer_unit
    from loraplan.targets import select_targets

    kw = dict(quant="bf16", strategy="fsdp", num_gpus=4, fsdp_version=1, mixed_precision="no", batch=batch, seq=seq)
    t = replace(BF16, trainer=trainer, fsdp_backward_prefetch=prefetch, **kw)
    st = make_setup(MODEL, LORA, t, select_targets(MODEL, LORA.targets)).structure
    c = ledger(t, "layer backward")
    unit = layer_unit(st, c["lora_weights"] * 4)  # the rank holds 1/4
    extra = max(unit - c["backward_transients"], 0)
    assert c["gathered_params"] == pytest.approx(st.unquantized_weights + unit + extra, rel=1e-9)
    assert (extra > 0.9 * unit) if batch == 1 else (extra == 0)


def test_fsdp_backward_prefetch_is_an_fsdp1_setting():
    with pytest.raises(InputError, match="FSDP1 setting") as e:
        mem(BF16, strategy="fsdp", num_gpus=2, fsdp_version=2, fsdp_backward_prefetch="backward-pre")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="is an FSDP setting"):
        mem(BF16, strategy="ddp", num_gpus=2, fsdp_backward_prefetch="none")
    from loraplan.trainers import resolve_recipe

    assert resolve_recipe(replace(BF16, trainer="loop", strategy="fsdp", num_gpus=2, fsdp_version=1)
                          ).fsdp_backward_prefetch == "backward-pre"  # torch's default
    assert resolve_recipe(replace(BF16, strategy="fsdp", num_gpus=2, fsdp_version=1)
                          ).fsdp_backward_prefetch == "none"  # accelerate's (trl)
    assert resolve_recipe(replace(BF16, strategy="fsdp", num_gpus=2)).fsdp_backward_prefetch is None  # FSDP2


def test_hybrid_shards_within_a_node_and_host_ram_is_per_machine():
    full = ledger(BF16, "optimizer step", strategy="fsdp", num_gpus=2)
    hyb = ledger(BF16, "optimizer step", strategy="fsdp", num_gpus=4, nodes=2, fsdp_sharding="hybrid")
    assert hyb["frozen_linear_weights"] == pytest.approx(full["frozen_linear_weights"])  # sharded over 2 per node
    m4 = mem(BF16, strategy="ddp", num_gpus=4, nodes=2)
    m2 = mem(BF16, strategy="ddp", num_gpus=2)
    assert m4.host_components["model_load_copies"] == m2.host_components["model_load_copies"]  # 2 ranks per machine
    assert mem(BF16, strategy="zero3", num_gpus=2).host_bytes == 0  # zero.Init: no host copy of the model


def test_fsdp1_offload_pins_each_shard_and_a_gradient_of_its_size_in_power_of_two_blocks():
    """FSDP1 CPU offload (_flat_param.py::init_flat_param_attributes): pinned _local_shard and
    _cpu_grad for every flat parameter, frozen ones too, each rounded up to a power of two by the
    pinned allocator; at lazy init the unpinned shards are still alive beside them."""
    from loraplan.estimate.memory import make_setup
    from loraplan.estimate.parallel import fsdp1_units, pinned_blocks
    from loraplan.targets import select_targets

    assert [pinned_blocks(b) for b in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
    t = replace(QLORA, trainer="hf", strategy="fsdp-offload", num_gpus=2, fsdp_version=1, prepare_kbit=False)
    m = mem(t)
    h = m.host_components
    st = make_setup(MODEL, LORA, t, select_targets(MODEL, LORA.targets)).structure
    frozen = sum(count * pinned_blocks(b / 2) for b, count in fsdp1_units(st))
    assert h["offloaded_params"] == h["offloaded_gradients"] >= 2 * frozen  # two ranks on the node
    assert h["offloaded_params"] > h["offload_init_copies"]  # the rounding
    assert m.host_bytes == h["offload_init_copies"] + h["offloaded_params"] + h["offloaded_gradients"]
    v2 = mem(replace(t, fsdp_version=None, prepare_kbit=None)).host_components  # FSDP2: no frozen gradients
    assert v2["offloaded_gradients"] < 0.1 * h["offloaded_gradients"] and "offload_init_copies" not in v2


@pytest.mark.parametrize("buckets,elements", [("deepspeed", 500_000_000), ("auto", MODEL.hidden_size ** 2)])
def test_zero_ipg_bucket_is_the_whole_reduce_bucket_at_every_moment(buckets, elements):
    """stage3.py allocates the ipg bucket at init as reduce_bucket_size 16-bit elements, whatever the
    adapters' count, and keeps it (stage_1_and_2.py: from the first backward on); stage 3 also holds
    its gradient partition (grad_partitions_flat_buffer, in the model dtype) from init, plus an fp32
    copy at the step. --deepspeed-buckets picks DeepSpeed's defaults or transformers' 'auto' fill."""
    from loraplan.estimate.memory import make_setup
    from loraplan.estimate.parallel import trainable_params
    from loraplan.targets import select_targets

    t = replace(BF16, mixed_precision="bf16", strategy="zero3", num_gpus=2, deepspeed_buckets=buckets)
    p = trainable_params(make_setup(MODEL, LORA, t, select_targets(MODEL, LORA.targets)).structure, LORA.rank)
    for moment in ("forward", "layer backward", "optimizer step"):
        c = ledger(t, moment)
        assert c["reduce_scatter_buffers"] == 2 * elements
        assert c["lora_gradients"] == pytest.approx(2 * p / 2 + (4 * p / 2 if moment == "optimizer step" else 0))
    assert ledger(replace(t, strategy="zero2"), "forward")["reduce_scatter_buffers"] == 2 * elements
    with pytest.raises(InputError, match="DeepSpeed setting"):
        mem(BF16, strategy="fsdp", num_gpus=2, deepspeed_buckets="auto")


def test_host_ram_notes_say_what_ram_efficient_loading_saves_and_why_zero3_holds_none():
    """FSDP without RAM-efficient loading: every rank of the node loads the model on the CPU; the
    note gives the host need with --ram-efficient-loading (host_ledger's own figure). ZeRO-3
    holds no copy (zero.Init), and says so; the table line names no empty list of parts."""
    from loraplan.estimate.memory import make_setup
    from loraplan.estimate.parallel import host_ledger, host_total
    from loraplan.render import per_gpu_summary
    from loraplan.targets import select_targets

    t = replace(BF16, strategy="fsdp", num_gpus=4, ram_efficient_loading=False)
    m = mem(t)
    s = make_setup(MODEL, LORA, t, select_targets(MODEL, LORA.targets))
    alt = host_total(host_ledger(s.structure, replace(s.train, ram_efficient_loading=True), LORA.rank))
    assert alt < m.host_bytes
    (note,) = [n for n in m.notes if n.startswith("host RAM")]
    assert "--ram-efficient-loading" in note and "4 ranks" in note
    assert f"needs {alt / 2**30:,.2f} GiB per machine instead of {m.host_bytes / 2**30:,.2f} GiB" in note
    assert not any(n.startswith("host RAM") for n in mem(t, ram_efficient_loading=True).notes)
    z = mem(BF16, strategy="zero3", num_gpus=2)
    assert z.host_bytes == 0 and any("deepspeed.zero.Init" in n for n in z.notes)
    lines, _ = per_gpu_summary({"per_gpu": z.per_gpu, "host_bytes": 0, "host_components": {}})
    assert not any(line.endswith(": )") for line in lines) and any("no model copy" in line for line in lines)
    zq = mem(QLORA, strategy="zero3", num_gpus=2)
    assert any("skips zero.Init for quantized" in n for n in zq.notes)


@pytest.mark.parametrize("strategy, mp, moment, weights, grads", [
    ("zero3", "bf16", "layer backward", "bf16", "bf16"),
    ("zero3", "bf16", "optimizer step", "bf16", "bf16 + fp32"),
    ("zero2", "bf16", "optimizer step", "bf16", "fp32"),
    ("zero2", "bf16", "layer backward", "bf16", "bf16"),
    ("zero3", "no", "layer backward", "fp32", "fp32"),
])
def test_zero_lora_labels_come_from_the_bytes_dtype(strategy, mp, moment, weights, grads):
    """ZeRO holds the LoRA weights as 16-bit copies under bf16 mixed precision: the label names
    the dtype the bytes were computed in (parallel.zero_bit16_dtype), not PEFT's fp32."""
    from loraplan.estimate.parallel import trainable_params, zero_bit16_bytes
    from loraplan.estimate.memory import make_setup
    from loraplan.estimate.result import ledger_labels
    from loraplan.storage import dtype_bytes
    from loraplan.targets import select_targets

    t = replace(BF16, trainer="hf", strategy=strategy, num_gpus=8, mixed_precision=mp)
    labels = ledger_labels(("lora_weights", "lora_gradients"), t, MODEL, moment)
    assert labels == {"lora_weights": f"LoRA weights ({weights})", "lora_gradients": f"LoRA gradients ({grads})"}
    s = make_setup(MODEL, LORA, t, select_targets(MODEL, LORA.targets))
    assert zero_bit16_bytes(s.structure, s.train) == dtype_bytes(weights)
    if strategy == "zero2" and moment == "layer backward":
        p = trainable_params(s.structure, LORA.rank)
        assert ledger(t, moment)["lora_weights"] == pytest.approx(p * dtype_bytes(weights), rel=0.01)
