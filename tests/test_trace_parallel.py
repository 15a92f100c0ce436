"""The meta trace of the real DDP / FSDP2 engines for one rank of N (loraplan/trace/distributed.py),
on a tiny llama: what each engine adds to or takes from the one-GPU trace, rank by rank."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from loraplan.errors import TraceError  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.trace.distributed import PARALLEL_CATEGORIES, assemble_ranks, traced_ranks  # noqa: E402
from loraplan.trace.run import trace_step  # noqa: E402

H, I, LAYERS, V = 128, 256, 4, 512
CFG = dict(model_type="llama", hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=4,
           num_key_value_heads=4, vocab_size=V, max_position_embeddings=256)
LORA = LoraSpec(rank=8, targets=("q_proj", "v_proj"))
#: bf16 bytes of one decoder layer's Linear weights and of the root's (embeddings + lm_head)
LAYER_BYTES = 2 * (4 * H * H + 3 * H * I)
ROOT_BYTES = 2 * (2 * V * H)
#: fp32 LoRA A and B of q and v in every layer
LORA_BYTES = 4 * LAYERS * 2 * (8 * H + H * 8)

_CACHE: dict = {}


def trace(strategy="single", n=1, quant="bf16", rank=0, **kw):
    if strategy.startswith("fsdp"):
        kw.setdefault("fsdp_version", 2)  # fully_shard unless a test asks for FSDP1 (the loop's default is 1)
    key = (strategy, n, quant, rank, tuple(sorted(kw.items())))
    if key not in _CACHE:
        train = TrainSpec(quant=quant, batch=2, seq=64, strategy=strategy, num_gpus=n, **kw)
        _CACHE[key] = trace_step(CFG, LORA, train, rank=rank)
    return _CACHE[key]


@pytest.mark.parametrize("n", [2, 4])
def test_ddp_is_the_one_gpu_trace_plus_its_bucket(n):
    one, ddp = trace(), trace("ddp", n)
    c1, c = one["components"], ddp["components"]
    assert set(c) == set(PARALLEL_CATEGORIES) and sum(c.values()) == ddp["peak_allocated_bytes"]
    # all LoRA gradients fit the first bucket (1 MiB): one flat fp32 buffer, beside the grads
    # (gradient_as_bucket_view=False)
    assert c["ddp_buckets"] == -(-LORA_BYTES // 512) * 512
    assert ddp["peak_allocated_bytes"] == one["peak_allocated_bytes"] + c["ddp_buckets"]
    for k in ("weights", "lora_weights", "optimizer_state", "activations", "logits_loss", "other"):
        assert c[k] == c1[k], k
    assert ddp["parallel"]["world_size"] == n


@pytest.mark.parametrize("n", [2, 4])
def test_fsdp_full_shard_keeps_a_shard_and_at_most_the_root_and_two_layers_in_flight(n):
    one, fsdp = trace(), trace("fsdp", n)
    c1, c = one["components"], fsdp["components"]
    assert sum(c.values()) == fsdp["peak_allocated_bytes"]
    # frozen weights per rank: total / N (dim 0 padded to N: exact here), buffers unsharded
    assert abs(c["weights"] - c1["weights"] / n) <= 0.01 * c1["weights"]
    assert c["lora_weights"] == pytest.approx(c1["lora_weights"] / n, rel=0.05)
    # in flight at the peak: the root unit (not resharded) and at most the current and the
    # prefetched layer (their all-gather outputs may overlap the copy-out)
    assert 0 < c["gathered_params"] <= ROOT_BYTES + 2 * 2 * LAYER_BYTES + LORA_BYTES
    assert c["gathered_params"] < c1["weights"]
    # activations are never divided by N
    assert c["activations"] == c1["activations"]
    assert fsdp["parallel"]["units"][-1] == "(root)" and len(fsdp["parallel"]["units"]) == LAYERS + 1


def test_more_ranks_less_memory_per_rank():
    assert trace("fsdp", 4)["components"]["weights"] < trace("fsdp", 2)["components"]["weights"]


def test_shard_grad_op_keeps_more_than_full_shard():
    full, sgo = trace("fsdp", 2), trace("fsdp", 2, fsdp_sharding="shard-grad-op")
    assert sgo["peak_allocated_bytes"] > full["peak_allocated_bytes"]
    assert sgo["components"]["gathered_params"] > full["components"]["gathered_params"]


def test_offload_moves_the_shards_gradients_and_optimizer_to_the_host():
    full, off = trace("fsdp", 2), trace("fsdp-offload", 2)
    c, host = off["components"], off["parallel"]["host_components"]
    assert c["weights"] < 0.01 * full["components"]["weights"]  # only unsharded buffers (rope) stay
    assert c["lora_weights"] == 0 and c["optimizer_state"] == 0 and c["lora_gradients"] == 0
    # the same shards, counted exactly on the host (the device count rounds each to 512 B)
    assert host["sharded_parameters"] == pytest.approx(full["components"]["weights"] + full["components"]["lora_weights"],
                                                       rel=0.05)
    assert host["optimizer_state"] > 0 and host["sharded_gradients"] > 0
    assert off["peak_allocated_bytes"] < full["peak_allocated_bytes"]


def test_fsdp_qlora_with_a_float_quant_storage():
    one, fsdp = trace(quant="nf4"), trace("fsdp", 2, quant="nf4", quant_storage="bf16")
    w1, w = one["components"]["weights"], fsdp["components"]["weights"]
    # the packed 4-bit weights are sharded; their quant states (absmax, code: module attributes,
    # not parameters) stay whole on every rank: at most an eighth of the packed bytes on top of half
    assert w1 / 2 < w <= w1 / 2 + w1 / 8
    assert fsdp["components"]["activations"] == one["components"]["activations"]


def test_last_rank_equals_rank_zero():
    a, b = trace("fsdp", 2), trace("fsdp", 2, rank=1)
    assert a["components"] == b["components"]


@pytest.mark.parametrize("strategy,extra,word", [("zero3", {}, "DeepSpeed"), ("device-map", {}, "device-map"),
                                                 ("fsdp-offload", {"fsdp_version": 1}, "fsdp-version 1")])
def test_what_is_not_traced_is_refused_in_one_line(strategy, extra, word):
    with pytest.raises(TraceError, match=word) as e:
        trace_step(CFG, LORA, TrainSpec(quant="bf16", batch=2, seq=64, strategy=strategy, num_gpus=2, **extra))
    assert "\n" not in str(e.value) and "--method analytic" in str(e.value)


@pytest.mark.parametrize("quant,extra,word", [("int8", {}, "int8"), ("nf4", {"fsdp_version": 1}, "quant-storage bf16"),
                                               ("int8", {"strategy": "zero3"}, "int8"),
                                               ("bf16", {"num_gpus": 1}, "--num-gpus 2 or more")])
def test_what_fsdp_cannot_shard_is_bad_input(quant, extra, word):
    """The engines' refusals are trainers.check_parallel's, word for word, whether the trace or
    the analytic path (which resolves the recipe) meets them first."""
    from loraplan.errors import InputError
    from loraplan.trace.distributed import check_traceable
    from loraplan.trainers import resolve_recipe

    t = TrainSpec(quant=quant, batch=2, seq=64, **{"strategy": "fsdp", "num_gpus": 2, **extra})
    with pytest.raises(InputError, match=word) as analytic:
        resolve_recipe(t)
    for refuse in (lambda: check_traceable(t), lambda: trace_step(CFG, LORA, t)):
        with pytest.raises(InputError) as e:
            refuse()
        assert str(e.value) == str(analytic.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("n", [2, 4])
def test_fsdp1_flat_parameters_keep_a_shard_and_unchanged_activations(n):
    one, f1, f2 = trace(), trace("fsdp", n, fsdp_version=1), trace("fsdp", n)
    c1, c = one["components"], f1["components"]
    assert sum(c.values()) == f1["peak_allocated_bytes"]
    assert abs(c["weights"] - c1["weights"] / n) <= 0.01 * c1["weights"]
    assert c["activations"] == c1["activations"]
    assert 0 < c["gathered_params"] <= ROOT_BYTES + 2 * LAYER_BYTES + LORA_BYTES
    # FSDP1 all-gathers into the flat parameter itself; FSDP2 copies out of an all-gather buffer
    assert c["gathered_params"] <= f2["components"]["gathered_params"]
    assert "(root)" in f1["parallel"]["units"] and f1["parallel"]["fsdp_version"] == 1


def test_fsdp1_qlora_needs_a_float_storage_and_runs_with_it():
    one = trace(quant="nf4", prepare_kbit=False)
    f1 = trace("fsdp", 2, quant="nf4", fsdp_version=1, quant_storage="bf16", prepare_kbit=False)
    w1, w = one["components"]["weights"], f1["components"]["weights"]
    assert w1 / 2 < w <= w1 / 2 + w1 / 8  # quant states stay whole on every rank


def _run(peak, comp, host=None):
    return {"peak_allocated_bytes": peak, "components": comp, "peak_phase": "backward",
            "parallel": {"units": ["x"], "host_components": host or {}}}


def test_assemble_ranks_fills_equal_ranks_and_keeps_unequal_ones_apart():
    train = TrainSpec(strategy="fsdp-offload", num_gpus=4, nodes=2)
    assert traced_ranks(train) == [0, 3]
    same = {0: _run(10, {"weights": 10}, {"sharded_parameters": 5}), 3: _run(10, {"weights": 10})}
    lead, s = assemble_ranks(same, train)
    assert sorted(s["per_gpu"]) == [0, 1, 2, 3] and s["worst_rank"] == 0
    assert s["host_components"] == {"sharded_parameters": 10} and s["host_bytes"] == 10  # 2 ranks per node
    diff = {0: _run(10, {"weights": 10}), 3: _run(12, {"weights": 12})}
    lead, s = assemble_ranks(diff, train)
    assert sorted(s["per_gpu"]) == [0, 3] and s["worst_rank"] == 3 and lead["peak_allocated_bytes"] == 12
    assert s["notes"]


def test_parallel_lines_are_vocabulary_keys():
    from loraplan.estimate.result import LEDGER_BY_KEY, ledger_keys
    from loraplan.trace.run import CATEGORIES

    assert set(PARALLEL_CATEGORIES) <= set(LEDGER_BY_KEY)
    assert set(PARALLEL_CATEGORIES) == set(CATEGORIES) | set(ledger_keys("trace-parallel"))


def test_estimate_method_trace_reports_every_rank(monkeypatch):
    """``estimate --method trace --strategy fsdp --num-gpus 4``: memory.per_gpu (the contract of
    issue 13) from the traced ranks 0 and 3; the workers run in-process here (same trace_step)."""
    import json

    import loraplan.trace as trace_pkg
    from loraplan.catalog import load_gpu, load_model
    from loraplan.estimate.api import estimate

    import threading

    lock, hosts = threading.Lock(), {}

    def in_process(model_config, lora, train, gpu_cc="9.0", timeout_s=300, steps=2, gpu_memory_bytes=None, rank=0,
                   count_work=False):
        with lock:  # one fake process group per process: the real workers are processes
            t = trace_step(model_config, lora, train, gpu_cc, steps, gpu_memory_bytes=gpu_memory_bytes, rank=rank,
                           count_work=count_work)
        hosts[rank] = t["parallel"]["host_components"]
        return t

    monkeypatch.setattr(trace_pkg, "run_trace_subprocess", in_process)
    model, gpu = load_model("tiny-llama"), load_gpu("h100-sxm-80gb")
    train = TrainSpec(quant="bf16", batch=2, seq=64, strategy="fsdp-offload", num_gpus=4, nodes=2, fsdp_version=2)
    e = trace_pkg.trace_estimate(estimate(model, LORA, train, gpu), model, LORA, train, gpu)
    m = e.memory
    assert sorted(m.per_gpu) == [0, 1, 2, 3]
    assert all(sum(c.values()) == m.peak_allocated_bytes for c in m.per_gpu.values())
    assert m.components == {k: v for k, v in m.per_gpu[0].items() if v}
    # two ranks per node, each with its offloaded shard, gradients and optimizer state
    assert m.host_bytes == sum(m.host_components.values()) > 0
    assert hosts[0] == hosts[3] and m.host_components == {k: 2 * v for k, v in hosts[0].items()}
    d = json.loads(json.dumps(e.to_dict()))
    assert set(d["memory"]["per_gpu"]) == {"0", "1", "2", "3"} and d["memory"]["host_bytes"] == m.host_bytes
    assert d["detail"]["parallel"]["traced_ranks"] == [0, 3]
    one = estimate(model, LORA, TrainSpec(quant="bf16", batch=2, seq=64), gpu).to_dict()
    assert list(one["memory"]["per_gpu"]) == ["0"]  # one GPU: rank 0's ledger is the components


@pytest.mark.parametrize("prefetch", ["none", "backward-pre", "backward-post"])
def test_fsdp1_gathers_the_next_layer_before_it_frees_this_one_whatever_the_prefetch(prefetch):
    """Under PEFT's wrap policy a layer unit is frozen, so FSDP1 reshards it from a hook on its input
    (_register_post_backward_reshard_only_hook), the same tensor whose hook, registered earlier as
    the previous unit's output, all-gathers that unit (_register_pre_backward_hooks): two layer
    units are allocated at the boundary with any --fsdp-backward-prefetch. Weights dominate here
    (one row of 8 tokens), so the boundary is the peak (estimate/parallel.py::_fsdp models both)."""
    train = TrainSpec(quant="bf16", batch=1, seq=8, strategy="fsdp", num_gpus=2, fsdp_version=1,
                      fsdp_backward_prefetch=prefetch)
    t = trace_step(CFG, LORA, train)
    g = t["components"]["gathered_params"]
    assert ROOT_BYTES + 2 * LAYER_BYTES <= g <= ROOT_BYTES + 2 * LAYER_BYTES + LORA_BYTES
    assert t["parallel"]["fsdp_version"] == 1


# ----------------------------------------------------------------------------- streams
def _by_stream(t, what="peak_allocated_by_stream"):
    names = t["parallel"]["streams"]
    return {names[k]: v for k, v in t["allocator"]["default"][what].items()}


def test_fsdp1_gathers_on_the_unshard_stream_and_reduces_on_the_post_backward_stream():
    # _runtime_utils.py::_unshard allocates the padded unsharded flat parameters inside
    # `with stream(unshard_stream)`: the root (embeddings + lm_head) and at most two layers at once
    t = trace("fsdp", 2, fsdp_version=1)
    alloc = _by_stream(t)
    assert set(alloc) == {"default", "unshard_stream", "post_backward_stream"}
    assert ROOT_BYTES + LAYER_BYTES <= alloc["unshard_stream"] <= ROOT_BYTES + 2 * LAYER_BYTES + 16 * 1024
    assert 0 < alloc["post_backward_stream"] <= LORA_BYTES  # the sharded LoRA gradients (fp32) and less
    # segments are freed only on an OOM retry or empty_cache: reserved peaks add up over streams
    assert t["peak_reserved_bytes"] == sum(_by_stream(t, "peak_reserved_by_stream").values())


def test_fsdp2_all_gather_outputs_live_on_the_copy_in_stream_and_ddp_on_the_default_one():
    t = trace("fsdp", 2)
    alloc = _by_stream(t)
    assert {"all_gather_copy_in_stream", "reduce_scatter_stream"} <= set(alloc)
    # in forward the previous unit's all-gather output is freed only after the next one is
    # allocated (_fsdp_param_group.py: all_gather_state): the root's and a layer's coexist
    assert alloc["all_gather_copy_in_stream"] >= ROOT_BYTES + LAYER_BYTES
    assert set(_by_stream(trace("ddp", 2))) == {"default"}


@pytest.mark.parametrize("version,stream", [(1, "unshard_stream"), (2, "all_gather_copy_in_stream")])
def test_an_fp32_base_under_bf16_mixed_precision_is_gathered_in_bf16(version, stream):
    """accelerate builds FSDP's mixed-precision policy from ``mixed_precision`` (utils/dataclasses.py::
    FullyShardedDataParallelPlugin.set_mixed_precision: param_dtype bf16), so PEFT's FSDP recipe
    (fp32-loaded base, bf16) keeps fp32 shards and all-gathers bf16 units: the side stream holds the
    bf16 root and layers (LAYER_BYTES / ROOT_BYTES are bf16), and the shards stay fp32 (2x the bf16 trace's)."""
    kw = dict(fsdp_version=version, trainer="hf", mixed_precision="bf16", use_orig_params=False)
    t, b = trace("fsdp", 2, quant="fp32", **kw), trace("fsdp", 2, quant="bf16", **kw)
    alloc = _by_stream(t)
    assert ROOT_BYTES + LAYER_BYTES <= alloc[stream] <= ROOT_BYTES + 2 * LAYER_BYTES + ROOT_BYTES // 2 + 16 * 1024
    assert t["components"]["weights"] >= 1.9 * b["components"]["weights"]
    if version == 1:  # each fp32 shard cast to bf16 (_mp_shard) before its all-gather, one at a time (+ norms)
        assert LAYER_BYTES // 2 <= alloc["pre_unshard_stream"] <= LAYER_BYTES // 2 + 1024
        # a plain loop wraps with torch's defaults (no policy, autocast only; profile/distributed.py): fp32 units
        loop = _by_stream(trace("fsdp", 2, quant="fp32", **{**kw, "trainer": "loop"}))
        assert "pre_unshard_stream" not in loop and loop[stream] >= 2 * (ROOT_BYTES + LAYER_BYTES)


#: a small llama whose root unit (embeddings + head, 62.5 MiB in bf16) is large beside a layer (6 MiB)
SMALL = dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024)


@pytest.mark.parametrize("quant,extra", [("bf16", {}), ("fp32", {"trainer": "hf", "mixed_precision": "bf16",
                                                                    "stack": "accelerate=1.13"})])
def test_fsdp2_forward_holds_the_root_and_first_layer_twice_on_both_views(quant, extra):
    """FSDP2's forward frees the previous unit's all-gather output only when the next unit's
    ``wait_for_unshard`` returns (``prev_all_gather_state`` is a local), after that unit's copy-out
    (_fsdp_param_group.py): at the first layer the root's output and unsharded parameters and the
    layer's output and unsharded parameters are alive at once, 2 x (root + layer), the peak of a
    weight-bound rank; the analytic ledger's ``first layer all-gather`` moment agrees within 1%."""
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.estimate.parallel import FIRST_GATHER
    from loraplan.hf import spec_from_config

    train = TrainSpec(quant=quant, batch=1, seq=64, strategy="fsdp", num_gpus=2, fsdp_version=2, **extra)
    t = trace_step(SMALL, LORA, train, rank=0)
    gpu = load_gpu("h100-sxm-80gb")
    m = estimate(spec_from_config(SMALL, name="small"), LORA, train, gpu, load_calibration(gpu.id),
                 with_time=False).memory
    assert t["peak_phase"] == "forward" and m.peak_moment == FIRST_GATHER, (t["peak_phase"], m.peak_moment)
    root = 2 * SMALL["vocab_size"] * SMALL["hidden_size"] * 2  # bf16 gathers (accelerate's policy for fp32)
    gathered = m.components["gathered_params"] + m.components["all_gather_buffers"]
    assert 2 * root < gathered == pytest.approx(t["components"]["gathered_params"], rel=0.005)
    assert m.peak_allocated_bytes == pytest.approx(t["peak_allocated_bytes"], rel=0.01)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_accelerate_fsdp2_embedding_and_tail_units_on_both_views(tied, batch):
    """A Trainer's accelerate >= 1.14 (version rule accelerate_fsdp2_units) cuts the input embedding
    and the tail (output embedding, or the tied embedding) into units of their own: the untied
    embedding is resharded after its forward, the tail from its post-backward on, so neither is
    gathered while the layers run backward, where the plain root unit stays. Both views follow it
    (measured: +0.03..+0.13%); accelerate 1.13's root unit keeps the embeddings gathered longer."""
    from loraplan.catalog import load_calibration, load_gpu
    from loraplan.estimate.api import estimate
    from loraplan.hf import spec_from_config

    cfg = dict(SMALL, tie_word_embeddings=tied)
    gpu = load_gpu("h100-sxm-80gb")
    peaks = {}
    for stack in (None, "accelerate=1.13"):
        train = TrainSpec(quant="bf16", batch=batch, seq=256, strategy="fsdp", num_gpus=2, fsdp_version=2,
                          trainer="hf", stack=stack)
        t = trace_step(cfg, LORA, train, rank=0)
        e = estimate(spec_from_config(cfg, name="small"), LORA, train, gpu, load_calibration(gpu.id), with_time=False)
        assert e.memory.peak_allocated_bytes == pytest.approx(t["peak_allocated_bytes"], rel=0.005)
        peaks[stack] = (t["peak_allocated_bytes"], e.memory.moments["layer backward"])
    assert peaks[None][0] <= peaks["accelerate=1.13"][0]
    embedding = SMALL["vocab_size"] * SMALL["hidden_size"] * 2  # bf16, 31.25 MiB
    # the root's embeddings (both, or the tied one) are not gathered in the layers' backward any more
    assert peaks["accelerate=1.13"][1] - peaks[None][1] == (1 if tied else 2) * embedding
