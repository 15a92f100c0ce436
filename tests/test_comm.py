"""Communication of multi-GPU steps (estimate/comm.py): the bytes each engine moves on a tiny model
against hand computation, NCCL's ring formulas, the overlap limits, NVLink vs PCIe, the bad layouts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loraplan.case import resolve_case
from loraplan.catalog import load_gpu, load_model
from loraplan.errors import InputError
from loraplan.estimate import comm
from loraplan.estimate.api import estimate
from loraplan.estimate.result import TimeEstimate

TINY = "tiny-llama"  # h 64, 2 layers, vocab 256, untied: 106,816 params


def _case(**kw):
    base = {"model": TINY, "quant": "bf16", "rank": 8, "targets": "q_proj,v_proj", "batch": 2, "seq": 128}
    base.update(kw)
    return resolve_case(base)


def _by_what(cs, word):
    return [c for c in cs if word in c.what]


def _lora_trainable(m, r=8):
    # q_proj, v_proj per layer: lora_A [r, 64] + lora_B [out, r]
    q = next(l for l in m.linears if l.name.endswith("layers.0.self_attn.q_proj"))
    v = next(l for l in m.linears if l.name.endswith("layers.0.self_attn.v_proj"))
    return m.num_layers * r * (q.in_features + q.out_features + v.in_features + v.out_features)


def test_ring_formulas_match_nccl_model():
    fab = comm.fabric(load_gpu("h100-sxm-80gb"))
    lat = comm.interconnects()["ring_latency_s"]
    S, n = 1e9, 4
    ar = comm.collective_seconds("all_reduce", S, n, 1, fab)
    ag = comm.collective_seconds("all_gather", S, n, 1, fab)
    rs = comm.collective_seconds("reduce_scatter", S, n, 1, fab)
    assert ar == pytest.approx(lat["base"] + 6 * lat["per_step"]["nvlink"] + S * 2 * 3 / 4 / fab.intra_busbw)
    assert ag == pytest.approx(lat["base"] + 3 * lat["per_step"]["nvlink"] + S * 3 / 4 / fab.intra_busbw)
    assert rs == ag
    assert comm.collective_seconds("all_reduce", S, 1, 1, fab) == 0
    # two nodes: the ring runs at the slower of NVLink and the network, inter-node steps at NET latency
    two = comm.collective_seconds("all_gather", S, 16, 2, fab)
    bw = min(fab.intra_busbw, fab.net_busbw)
    assert two == pytest.approx(lat["base"] + 14 * lat["per_step"]["nvlink"] + 1 * lat["per_step"]["net"]
                                + S * 15 / 16 / bw)


def test_ddp_all_reduces_the_trainable_gradients_in_buckets():
    m, lora, t = _case(strategy="ddp", num_gpus=2)
    cs = comm.collectives(m, lora, t)
    assert [c.op for c in cs] == ["all_reduce"]
    grads = _lora_trainable(m) * 4  # fp32 adapters and gradients
    assert cs[0].bytes_per_step == pytest.approx(grads)
    assert cs[0].calls == 1  # far below the 1 MiB first bucket
    # 8 MiB of gradients: the 1 MiB first bucket + one 25 MiB bucket
    m, lora, t = _case(strategy="ddp", num_gpus=2, model="llama-2-7b", quant="nf4", rank=64,
                       targets="all-linear", seq=512, batch=1)
    c = comm.collectives(m, lora, t)[0]
    g = comm.param_bytes(m, lora, t, _adapted(m, lora)).grad_bytes
    assert c.calls == 1 + -(-(g - comm.DDP_FIRST_BUCKET_BYTES) // comm.DDP_BUCKET_BYTES)
    assert c.bytes_per_step == pytest.approx(g)


def _adapted(m, lora):
    from loraplan.targets import select_expert_targets, select_targets

    return select_targets(m, lora.targets) + select_expert_targets(m, lora.targets, lora.dropout)


def test_accumulation_no_sync_only_under_accelerate():
    """Trainer/SFTTrainer (accelerate's accumulate -> no_sync) reduce once per optimizer step; a plain
    loop reduces every micro-step. All-gathers happen every micro-step either way."""
    for trainer, syncs in (("hf", 1), ("loop", 4)):
        # FSDP1 for both (transformers 5 defaults to FSDP2, whose embedding unit gathers again in backward)
        m, lora, t = _case(strategy="fsdp", num_gpus=2, trainer=trainer, gradient_accumulation=4, fsdp_version=1)
        cs = comm.collectives(m, lora, t)
        rs = _by_what(cs, "reduce-scatter")[0]
        assert rs.calls == 4 * m.num_layers * syncs  # 2 adapted Linears x (A, B) per layer
        fwd = _by_what(cs, "forward all-gather")[0]
        assert fwd.calls == 4 * (m.num_layers + 4 * m.num_layers + 1)
        m, lora, t = _case(strategy="ddp", num_gpus=2, trainer=trainer, gradient_accumulation=4)
        assert comm.collectives(m, lora, t)[0].calls == syncs


def test_fsdp_full_shard_gathers_everything_twice_but_the_root():
    m, lora, t = _case(strategy="fsdp", num_gpus=4)
    cs = comm.collectives(m, lora, t)
    trainable = _lora_trainable(m)
    frozen = m.total_params * 2  # bf16 base, no mixed precision: as stored
    fwd, bwd = _by_what(cs, "forward all-gather")[0], _by_what(cs, "backward all-gather")[0]
    assert fwd.bytes_per_step == pytest.approx(frozen + trainable * 4)
    root = (256 * 64 + 64 + 64 * 256) * 2  # embed_tokens, final norm, lm_head
    assert bwd.bytes_per_step == pytest.approx(frozen + trainable * 4 - root)
    rs = _by_what(cs, "reduce-scatter")[0]
    assert rs.bytes_per_step == pytest.approx(trainable * 4)  # only the LoRA units have gradients
    # SHARD_GRAD_OP keeps the parameters from forward to backward
    m, lora, t = _case(strategy="fsdp", num_gpus=4, fsdp_sharding="shard-grad-op")
    assert not _by_what(comm.collectives(m, lora, t), "backward all-gather")
    # bf16 mixed precision: everything moves in bf16 (accelerate's param_dtype = reduce_dtype)
    m, lora, t = _case(strategy="fsdp", num_gpus=4, mixed_precision="bf16", trainer="hf")
    cs = comm.collectives(m, lora, t)
    assert _by_what(cs, "forward all-gather")[0].bytes_per_step == pytest.approx(frozen + trainable * 2)
    assert _by_what(cs, "reduce-scatter")[0].bytes_per_step == pytest.approx(trainable * 2)


def test_fsdp_qlora_gathers_the_packed_weights():
    """In the storage dtype: transformers sets FSDP's param dtype to bnb_4bit_quant_storage (no autocast here)."""
    m, lora, t = _case(strategy="fsdp", num_gpus=2, quant="nf4", quant_storage="bf16", mixed_precision="no",
                       trainer="hf", prepare_kbit=False)
    fwd = _by_what(comm.collectives(m, lora, t), "forward all-gather")[0]
    lin = sum(l.numel for l in m.linears if l.role != "lm_head")
    others = sum(p.numel for p in m.others) + m.lm_head.numel
    assert fwd.bytes_per_step == pytest.approx(lin / 2 + others * 2 + _lora_trainable(m) * 2)


def test_hybrid_shards_in_the_node_and_all_reduces_across():
    m, lora, t = _case(strategy="fsdp", num_gpus=16, nodes=2, fsdp_sharding="hybrid")
    cs = comm.collectives(m, lora, t)
    assert {c.group for c in cs if c.op in ("all_gather", "reduce_scatter")} == {"node"}
    ar = [c for c in cs if c.op == "all_reduce"]
    assert len(ar) == 1 and ar[0].group == "nodes"
    assert ar[0].bytes_per_step == pytest.approx(_lora_trainable(m) * 4 / 8)


def test_zero_stages():
    m, lora, t = _case(strategy="zero2", num_gpus=2, gradient_accumulation=2, trainer="hf")
    cs = comm.collectives(m, lora, t)
    g = _lora_trainable(m) * 4
    assert {c.op for c in cs} == {"reduce_scatter", "all_gather"}
    assert _by_what(cs, "reduce-scatter")[0].bytes_per_step == pytest.approx(2 * g)  # every micro-step
    assert all(c.phase == "step" for c in cs)  # overlap_comm is off below stage 3
    m, lora, t = _case(strategy="zero1", num_gpus=2, gradient_accumulation=2, trainer="hf")
    assert _by_what(comm.collectives(m, lora, t), "reduce-scatter")[0].bytes_per_step == pytest.approx(g)
    # ZeRO-3: parameters below 1e5 elements are never partitioned (all of tiny-llama's): nothing is fetched
    m, lora, t = _case(strategy="zero3", num_gpus=2)
    cs = comm.collectives(m, lora, t)
    assert sum(c.bytes_per_step for c in cs if c.op == "all_gather") == 0
    # a 7B base is fetched in forward and again in backward beyond the 1e9-element reuse distance
    m, lora, t = _case(strategy="zero3", num_gpus=2, model="llama-2-7b", seq=512, batch=1)
    cs = comm.collectives(m, lora, t)
    fwd, bwd = _by_what(cs, "forward parameter")[0], _by_what(cs, "backward parameter")[0]
    assert 0 < bwd.bytes_per_step < fwd.bytes_per_step
    part = comm.param_bytes(m, lora, t, _adapted(m, lora))
    assert fwd.bytes_per_step == pytest.approx(part.layer_bytes + part.root_bytes - part.zero3_persistent_bytes)


def test_offload_adds_host_copies():
    m, lora, t = _case(strategy="fsdp-offload", num_gpus=2)
    cs = comm.collectives(m, lora, t)
    h2d = sum(c.bytes_per_step for c in cs if c.op == "h2d")
    fwd, bwd = _by_what(cs, "forward all-gather")[0], _by_what(cs, "backward all-gather")[0]
    assert h2d == pytest.approx((fwd.bytes_per_step + bwd.bytes_per_step) / 2)  # a shard per all-gather


def test_device_map_hands_hidden_states_over_and_does_not_multiply_throughput():
    m, lora, t = _case(strategy="device-map", num_gpus=3)
    cs = comm.collectives(m, lora, t)
    act = 2 * 128 * 64 * 2  # b x s x h, bf16 stream
    assert [c.bytes_per_step for c in cs] == [act * 2, act * 2]  # 2 boundaries, forward and backward
    gpu = load_gpu("h100-sxm-80gb")
    e = estimate(m, lora, t, gpu)
    one = estimate(*_case(), gpu)
    assert e.time.step_s > one.time.step_s
    assert e.time.tokens_per_s < one.time.tokens_per_s  # one GPU works at a time
    d = estimate(*_case(strategy="ddp", num_gpus=4), gpu)
    assert d.time.tokens_per_s == pytest.approx(4 * one.time.tokens_per_s * one.time.step_s / d.time.step_s)


def _fake(step):
    return TimeEstimate(step_s=step, tokens_per_s=1000.0 / step, components={}, bound="compute")


def test_overlap_limits():
    """Exposed communication is at least what cannot hide (the first all-gather, the last reduction) and at
    most all of it; with no compute to hide behind, all of it; with plenty, only the fixed parts."""
    m, lora, t = _case(strategy="fsdp", num_gpus=8, model="llama-2-7b", seq=512, batch=1)
    gpu = load_gpu("h100-pcie-80gb")
    big, _ = comm.parallel_time(m, lora, t, gpu, _fake(1e6))
    tiny, d = comm.parallel_time(m, lora, t, gpu, _fake(1e-9))
    total = tiny.components["comm_s"]
    assert tiny.components["comm_exposed_s"] == pytest.approx(total, rel=1e-6)
    assert tiny.bound == "communication"
    assert 0 < big.components["comm_exposed_s"] < 0.05 * total
    assert big.bound == "compute"
    assert big.step_s == pytest.approx(1e6 + big.components["comm_exposed_s"])
    assert d["bytes_per_step"]["all_gather"] > 0


def test_nvlink_is_faster_than_pcie():
    case = _case(strategy="fsdp", num_gpus=8, model="llama-2-7b", seq=512, batch=1)
    sxm, _ = comm.parallel_time(*case, load_gpu("h100-sxm-80gb"), _fake(1.0))
    pcie, _ = comm.parallel_time(*case, load_gpu("h100-pcie-80gb"), _fake(1.0))
    assert pcie.components["comm_s"] > 5 * sxm.components["comm_s"]


def test_single_gpu_estimate_has_no_communication():
    e = estimate(*_case(), load_gpu("h100-sxm-80gb"))
    assert "communication" not in e.detail
    assert "comm_s" not in e.time.components


def test_multi_gpu_estimate_carries_the_detail():
    e = estimate(*_case(strategy="fsdp", num_gpus=2), load_gpu("h100-sxm-80gb"))
    d = e.to_dict()["detail"]["communication"]
    assert d["link"] == "nvlink4" and d["num_gpus"] == 2
    assert set(d["bytes_per_step"]) == {"all_gather", "reduce_scatter"}
    assert e.time.components["comm_s"] > 0


@pytest.mark.parametrize("kw, word", [
    ({"strategy": "fsdp", "quant": "int8"}, "--quant int8"),
    ({"strategy": "zero3", "quant": "int8"}, "--quant int8"),
    ({"strategy": "fsdp", "quant": "nf4"}, "--quant-storage bf16"),
    ({"strategy": "fsdp", "quant": "nf4", "quant_storage": "fp16", "mixed_precision": "bf16", "trainer": "hf"},
     "--quant-storage bf16"),
    ({"strategy": "fsdp", "quant": "nf4", "quant_storage": "bf16"}, "--no-prepare-kbit"),
    ({"strategy": "fsdp", "quant": "nf4", "quant_storage": "fp16", "prepare_kbit": False}, "--quant-storage bf16"),
    ({"strategy": "ddp", "num_gpus": 16}, "--nodes 2"),
    ({"strategy": "ddp", "num_gpus": 3, "nodes": 2}, "multiple of --nodes"),
    ({"strategy": "device-map", "num_gpus": 4, "nodes": 2}, "one machine"),
])
def test_bad_layouts_are_one_line_errors(kw, word):
    kw.setdefault("num_gpus", 2)
    with pytest.raises(InputError) as e:
        estimate(*_case(**kw), load_gpu("h100-sxm-80gb"))
    assert word in str(e.value) and "\n" not in str(e.value)


def test_every_catalog_gpu_names_a_platform():
    from loraplan.catalog import gpu_ids

    for g in gpu_ids():
        f = comm.fabric(load_gpu(g))
        assert f.intra_busbw > 0 and f.gpus_per_node >= 1
    data = comm.interconnects()
    for group in ("links", "networks", "platforms"):
        for k, v in data[group].items():
            assert v.get("source"), (group, k)


def test_tiny_model_is_the_one_described():
    m = load_model(TINY)
    assert (m.hidden_size, m.num_layers, m.vocab_size, m.total_params) == (64, 2, 256, 106816)


def test_cli_estimate_names_the_communication(capsys):
    from loraplan.cli import main

    code = main(["estimate", "--model", TINY, "--quant", "bf16", "--strategy", "fsdp", "--num-gpus", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "communication (fsdp, 2 GPUs over nvlink4)" in " ".join(out.split())
    code = main(["estimate", "--model", TINY, "--quant", "int8", "--strategy", "fsdp", "--num-gpus", "2"])
    out, err = capsys.readouterr()
    assert code == 2 and "--quant int8" in err and len(err.strip().splitlines()) == 1


def test_bound_names_what_sets_the_step():
    """issue 12 review: a phase whose collectives outlast its compute by a little (0.002 s exposed
    of a 0.575 s host-bound step) is not communication-bound. The label is "communication" only
    when the communication stream is busy at least as long as the compute step; otherwise the
    compute step's own bound, scalar and array alike."""
    import numpy as np

    m, lora, t = _case(strategy="fsdp", num_gpus=8, model="llama-2-7b", seq=512, batch=1)
    gpu = load_gpu("h100-pcie-80gb")
    total = comm.parallel_time(m, lora, t, gpu, _fake(1.0))[0].components["comm_s"]
    # compute a little shorter than the communication: comm-bound; a little longer: the compute's
    # bound, though the forward phase's all-gathers still outlast the forward window (exposed > fixed)
    below, _ = comm.parallel_time(m, lora, t, gpu, _fake(0.9 * total))
    above, _ = comm.parallel_time(m, lora, t, gpu, replace(_fake(1.2 * total), bound="host"))
    assert below.bound == "communication"
    assert above.bound == "host" and above.components["comm_exposed_s"] > 0
    arr = TimeEstimate(step_s=np.asarray([0.9 * total, 1.2 * total]), tokens_per_s=np.asarray([1.0, 1.0]),
                       components={}, bound=np.asarray(["compute", "host"], dtype=object))
    both, _ = comm.parallel_time(m, lora, t, gpu, arr)
    assert list(both.bound) == ["communication", "host"]
    # the reviewer's case: ZeRO-3 of llama-2-70b on two H100s is host-bound
    e = estimate(*_case(model="llama-2-70b", quant="bf16", strategy="zero3", num_gpus=2, targets="q_proj,v_proj",
                        batch=1, seq=512),
                 load_gpu("h100-sxm-80gb"))
    assert e.time.components["comm_s"] < e.time.components["compute_s"]
    assert e.time.bound != "communication"
