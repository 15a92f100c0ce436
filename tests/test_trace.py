"""Trace mode: the storage tracker on real CPU tensors, the CUDA-emulation pieces, and
meta-device traces of tiny llama / qwen2 / t5 models (bf16, nf4, int8; gc on/off; adamw/sgd)."""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from loraplan.estimate.result import ledger_keys  # noqa: E402
from loraplan.spec import LoraSpec, TrainSpec  # noqa: E402
from loraplan.errors import InputError  # noqa: E402
from loraplan.trace import emulation as em  # noqa: E402
from loraplan.trace.tracker import LiveTensorTracker, round_up  # noqa: E402

LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
QWEN2 = {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
T5 = {"model_type": "t5", "vocab_size": 256, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
      "num_decoder_layers": 2, "num_heads": 4}
QV = LoraSpec(rank=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))


# ----------------------------------------------------------------------------- tracker
def test_round_up():
    assert round_up(1, 512) == 512 and round_up(512, 512) == 512 and round_up(513, 512) == 1024
    assert round_up(0, 512) == 0 and round_up(7, None) == 7


def test_tracker_counts_storages_views_and_frees():
    tr = LiveTensorTracker()
    w = torch.randn(64, 64, requires_grad=True)
    assert tr.register(w, label="w") == 64 * 64 * 4
    assert tr.register(w) == 0  # never twice
    with tr:
        with tr.phase("forward"):
            x = torch.randn(32, 64)
            v = x[1:]  # a view: same storage
            assert tr.current == (64 * 64 + 32 * 64) * 4
            y = (x @ w).relu()
            loss = y.sum()
        with tr.phase("backward"):
            loss.backward()
        del x, v, y, loss
    # weight + its grad are all that is left
    assert tr.current == 2 * 64 * 64 * 4
    assert tr.live_bytes("w") == 64 * 64 * 4
    assert tr.peak >= tr.phase_peaks["backward"] >= tr.phase_peaks["forward"] > 0
    assert tr.peak == max(tr.phase_peaks.values())


def test_tracker_graph_keeps_saved_tensors_alive():
    tr = LiveTensorTracker()
    a = torch.randn(1000, requires_grad=True)
    tr.register(a)
    with tr:
        b = a.exp()  # exp saves its result
        c = b.sum()
        del b
        assert tr.current == 1000 * 4 * 2 + 4  # a, exp(a) kept by the graph, sum
        c.backward()
        assert tr.is_tracked(a.grad)
        del c
    assert tr.current == 1000 * 4 * 2  # a and a.grad


def test_tracker_rounding_snapshot_and_phases():
    tr = LiveTensorTracker(round_to=512)
    with tr:
        with tr.phase("one"):
            keep = torch.ones(10)  # 40 B -> 512
            tmp = torch.ones(1000)  # 4000 B -> 4096
        peak_groups = tr.snapshot("peak")
        del tmp
        with tr.phase("two"):
            t2 = torch.zeros(3, dtype=torch.float64)
    assert tr.peak == 512 + 4096
    assert tr.phase_peaks == {"one": 4608, "two": 1024}
    assert {(g.op, g.shape, g.bytes) for g in peak_groups} == {("ones", (10,), 512), ("ones", (1000,), 4096)}
    now = tr.snapshot("now")
    assert sum(g.bytes for g in now) == tr.current == 1024
    assert sum(g.bytes for g in tr.snapshot("one")) == 4608
    del keep, t2


def test_tracker_transient_ignore_and_label():
    tr = LiveTensorTracker(device="cpu")
    with tr:
        a = torch.empty(256)
        tr.transient(10_000, "kernel")
        assert tr.peak == 1024 + 10_000 and tr.peak_transient == ("kernel", 10_000)
        with tr.pause():
            b = torch.empty(1000)
        tr.ignore(b)
        b.add_(1)  # in-place on an ignored storage stays uncounted
        assert tr.current == 1024
        assert tr.label(a, "mine") and tr.live_bytes("mine") == 1024
        c = torch.empty(2, device="meta")  # other device: filtered out
        assert tr.current == 1024
    del a, b, c


def test_tracker_resize_is_followed():
    tr = LiveTensorTracker()
    with tr:
        t = torch.empty(0)
        t.resize_(100)
    assert tr.current == 400


def test_tracker_stream_has_transients_resizes_and_persistent_allocations():
    from loraplan.allocator import replay

    tr = LiveTensorTracker(device="cpu")
    with tr:
        with tr.phase("one"):
            a = torch.empty(100)  # record 0, 400 B
            tr.transient(5000, "kernel")  # alloc + free right after a
            tr.persistent(3000, "workspace")  # kept for good
            b = torch.empty(10)  # record 1
        with tr.phase("two"):
            a.resize_(1000)  # new block (record 2) allocated, then the old one (record 0) freed
            del b
    ev = tr.allocation_events(with_phase=True)
    kinds = [(e[0], e[1] if isinstance(e[1], int) else e[1][:2]) for e in ev]
    assert kinds == [("alloc", 0), ("alloc", ("transient", "kernel")), ("free", ("transient", "kernel")),
                     ("alloc", ("persistent", "workspace")), ("alloc", 1), ("alloc", 2), ("free", 0),
                     ("free", 1)]
    assert [e[-1] for e in ev] == ["one"] * 5 + ["two"] * 3
    assert ev[5][2] == 4000 and ev[1][2] == 5000 and ev[3][2] == 3000
    assert tr.n_resizes == 1 and tr.current == 4000  # the persistent bytes are stream-only
    r = replay(tr.allocation_events())
    assert r.final_allocated == 4096 + 3072 and r.live_at_end == 2
    # starting at a moment: what is live then comes first, in allocation order
    seq_b = tr._records[1][6]
    ev2 = tr.allocation_events(start_seq=seq_b)
    assert ev2[:3] == [("alloc", 0, 400), ("alloc", ("persistent", "workspace", 2), 3000), ("alloc", 1, 40)]
    assert ev2[3:] == [("alloc", 2, 4000), ("free", 0), ("free", 1)]
    del a


def test_tracker_resize_to_zero_only_frees():
    tr = LiveTensorTracker(device="cpu")
    with tr:
        t = torch.empty(256)
        t.untyped_storage().resize_(0)
        tr._resync(t)
        t.untyped_storage().resize_(2048)
        tr._resync(t)
    assert tr.allocation_events() == [("alloc", 0, 1024), ("free", 0), ("alloc", 2, 2048)]
    del t


# ----------------------------------------------------------------------------- emulation
@pytest.mark.parametrize("dtype,hd,mask,cc,want", [
    (torch.bfloat16, 128, False, "9.0", "flash"),
    (torch.bfloat16, 100, False, "9.0", "flash"),  # padded to 104 like torch does
    (torch.bfloat16, 128, True, "9.0", "efficient"),
    (torch.float32, 128, False, "9.0", "efficient"),
    (torch.bfloat16, 288, False, "9.0", "efficient"),
    (torch.float16, 128, False, "7.5", "efficient"),
    # sdp_utils.cpp can_use_mem_efficient_attention: less_than_sm80_mem_efficient_dtypes = {Half, Float}
    (torch.bfloat16, 128, False, "7.5", "math"),
    (torch.bfloat16, 100, True, "9.0", "math"),
    (torch.float64, 64, False, "9.0", "math"),
    (torch.bfloat16, 128, False, None, "math"),
])
def test_choose_sdpa_backend(dtype, hd, mask, cc, want):
    assert em.choose_sdpa_backend(dtype, hd, hd, mask, cc) == want
    assert em.choose_sdpa_backend(dtype, hd, hd, mask, cc, requested="math") == "math"


def test_choose_sdpa_backend_refuses_a_forced_kernel_torch_cannot_run():
    """sdpa_kernel([FLASH_ATTENTION]) on fp32 inputs raises 'No available kernel' in torch: the
    emulation refuses it in one line with the fix, as estimate does."""
    with pytest.raises(InputError, match=r"--attention flash: flash needs an fp16/bf16 stream.*--attention auto"):
        em.choose_sdpa_backend(torch.float32, 128, 128, False, "9.0", requested="flash")
    with pytest.raises(InputError, match=r"efficient takes bf16 on sm80\+ only"):
        em.choose_sdpa_backend(torch.bfloat16, 128, 128, False, "7.0", requested="efficient")
    assert em.choose_sdpa_backend(torch.float16, 128, 128, False, "7.0", requested="efficient") == "efficient"


def _saved_bytes(fn, *inputs):
    tr = LiveTensorTracker(device="meta")
    tr.register(inputs)
    with tr:
        out = fn(*inputs)
        base = tr.current
    return out, base


def test_flash_sdpa_saves_lse_not_scores():
    b, h, s, d = 1, 4, 1024, 64
    q, k, v = (torch.empty(b, h, s, d, dtype=torch.bfloat16, device="meta", requires_grad=True) for _ in range(3))
    used = []
    sdpa = em.cuda_like_sdpa("9.0", log=used.append)
    out, live = _saved_bytes(lambda *x: sdpa(*x, is_causal=True), q, k, v)
    assert used == ["flash"] and out.shape == q.shape
    # q, k, v + out (bf16) + fp32 logsumexp (+ philox seed/offset scalars); no s x s scores
    assert 0 <= live - (4 * b * h * s * d * 2 + b * h * s * 4) <= 64
    out.sum().backward()
    assert q.grad.shape == q.shape
    math = em.cuda_like_sdpa(None)
    _, live_math = _saved_bytes(lambda *x: math(*x, is_causal=True), q, k, v)
    assert live_math > b * h * s * s * 2  # the math path materialises scores


def test_flash_sdpa_gqa_and_padding():
    q = torch.empty(1, 8, 16, 100, dtype=torch.bfloat16, device="meta", requires_grad=True)
    k = torch.empty(1, 2, 16, 100, dtype=torch.bfloat16, device="meta", requires_grad=True)
    out = em.cuda_like_sdpa("9.0")(q, k, k, is_causal=True, enable_gqa=True)
    assert out.shape == (1, 8, 16, 100)
    out.sum().backward()
    assert k.grad.shape == k.shape


def test_efficient_sdpa_with_mask_runs():
    q = torch.empty(2, 4, 40, 64, dtype=torch.float32, device="meta", requires_grad=True)
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool, device="meta")
    used = []
    out = em.cuda_like_sdpa("9.0", log=used.append)(q, q, q, attn_mask=mask)
    out.sum().backward()
    assert used == ["efficient"] and q.grad.shape == q.shape


def test_fused_dropout_saves_bool_mask():
    x = torch.empty(1000, 1000, dtype=torch.float32, device="meta", requires_grad=True)
    tr = LiveTensorTracker(device="meta")
    with tr:
        y = em.fused_dropout(x, 0.1, True)
        # output (4 B) + bool mask (1 B) per element, not a 4 B noise tensor
        assert tr.current == 1000 * 1000 * 5
        y.sum().backward()
    assert em.fused_dropout(x, 0.1, False) is x and em.fused_dropout(x, 0.0, True) is x
    assert em.no_packed_sequences(torch.zeros(2, 3)) is None


def test_constant_terms_and_transients():
    assert em.constant_terms("9.0")["cublas_workspace"]["bytes"] == 64 << 20
    assert em.constant_terms("8.0")["cublas_workspace"]["bytes"] == 2 * (4096 * 1024 * 2 + 16 * 1024 * 8)
    assert em.constant_terms(None) == {}
    pytest.importorskip("bitsandbytes")
    A = torch.empty(512, 4096, dtype=torch.bfloat16, device="meta")
    B = torch.empty(11008 * 4096 // 2, 1, dtype=torch.uint8, device="meta")
    absmax8 = torch.empty(11008 * 4096 // 64, dtype=torch.uint8, device="meta")
    t = em.kernel_transients(torch.ops.bitsandbytes.gemm_4bit.default, (A, B, [11008, 4096], None, 64, "nf4"),
                             {"absmax_8bit": absmax8})
    assert t == [("bnb_4bit_dequant", 11008 * 4096 * 2 + 2 * absmax8.numel() * 4)]
    assert em.kernel_transients(torch.ops.aten.mm.default, (A, A), {}) == []


def test_int8_fakes_use_the_outlier_policy():
    pytest.importorskip("bitsandbytes")
    em.register_int8_fakes()
    A = torch.empty(512, 1000, dtype=torch.float16, device="meta")
    try:
        em.set_int8_outlier_policy(lambda cols: cols // 4)
        CA, SCA, cols = torch.ops.bitsandbytes.int8_vectorwise_quant(A, 6.0)
        assert CA.dtype == torch.int8 and cols.shape == (250,)
        CB = torch.empty(300, 1000, dtype=torch.int8, device="meta")
        SCB = torch.empty(300, dtype=torch.float32, device="meta")
        Af = torch.empty(512, 1000, dtype=torch.float32, device="meta")
        out, subA = torch.ops.bitsandbytes.int8_mixed_scaled_mm(Af, CA, CB, SCA, SCB, cols, None)
        assert out.shape == (512, 300) and subA.shape == (512, 250) and subA.dtype == torch.float32
        assert torch.ops.bitsandbytes.int8_vectorwise_quant(A, 0.0)[2] is None
    finally:
        em.set_int8_outlier_policy(lambda cols: 0)


# ----------------------------------------------------------------------------- traces
def _trace(cfg, lora=QV, **train):
    from loraplan.trace.run import trace_step

    return trace_step(cfg, lora, TrainSpec(**{"quant": "bf16", "batch": 2, "seq": 64, **train}))


def _check(r):
    comp = r["components"]
    assert tuple(comp) == ledger_keys("trace")  # the trace's lines are ledger-vocabulary keys
    assert sum(comp.values()) == r["peak_allocated_bytes"]
    assert r["peak_allocated_bytes"] > comp["weights"] > 0
    assert comp["lora_weights"] > 0
    assert r["params"]["total"] > r["params"]["trainable"] > 0
    assert set(r["phase_peaks"]) >= {"forward", "backward", "optimizer", "step1", "step2"}
    assert r["peak_allocated_bytes"] == max(r["phase_peaks"].values())
    assert r["versions"]["torch"]


@pytest.mark.slow
@pytest.mark.parametrize("gc", [True, False])
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_trace_bf16_llama(gc, opt):
    r = _trace(LLAMA, gradient_checkpointing=gc, optimizer=opt)
    _check(r)
    assert r["sdpa_backends"] == {"flash": 4 * (2 if gc else 1)}  # 2 layers x 2 steps (x2 recompute)
    # LoRA q,v on 2 layers, r=8: (64*8 + 8*64) + (64*8 + 8*32) per layer
    assert r["params"]["trainable"] == 2 * (64 * 8 + 8 * 64 + 64 * 8 + 8 * 32)
    if opt == "sgd":
        assert r["components"]["optimizer_state"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_trace_replays_its_stream_through_the_allocator_model(quant):
    from loraplan.allocator import K_LARGE_BUFFER, replay

    r = _trace(LLAMA, quant=quant, gradient_checkpointing=True)
    a = r["allocator"]
    # the stream holds everything the tracker counted: transients, resizes, cuBLAS workspaces
    # (the replay may read higher: torch counts an unsplit block's remainder as allocated)
    assert r["peak_allocated_bytes"] <= a["default"]["peak_allocated_bytes"] <= 1.01 * r["peak_allocated_bytes"]
    assert a["cublas_workspace_threads"] == ["backward", "forward"]
    assert r["peak_reserved_bytes"] == a["default"]["peak_reserved_bytes"] >= r["peak_allocated_bytes"]
    assert r["peak_reserved_expandable_bytes"] == a["expandable_segments"]["peak_reserved_bytes"]
    assert 0 <= r["fragmentation_at_peak"] < 1 and r["oom"] is None
    assert a["weights"]["reserved_bytes"] >= a["weights"]["allocated_bytes"] > 0
    # a card whose allocator can get less than the peak: OOM at an event inside a step
    from loraplan.trace.run import trace_step

    small = trace_step(LLAMA, QV, TrainSpec(quant=quant, batch=2, seq=64, gradient_checkpointing=True),
                       gpu_memory_bytes=r["peak_allocated_bytes"] // 2, return_events=True)
    oom = small["oom"]
    assert oom is not None and oom["phase"].startswith("step1/") and "out of memory" in oom["message"].lower()
    ev = small["_events"]
    assert ev[oom["event"]][0] == "alloc"
    assert replay(ev[:oom["event"]], capacity_bytes=r["peak_allocated_bytes"] // 2).oom_at is None
    # weights' order (build order vs a checkpoint's): shuffling it moves peak reserved by <= 1 segment
    import random

    n = a["weights"]["n_events"]
    for seed in range(3):
        w = ev[:n]
        random.Random(seed).shuffle(w)
        assert abs(replay(w + ev[n:]).peak_reserved - r["peak_reserved_bytes"]) <= K_LARGE_BUFFER


@pytest.mark.slow
def test_trace_gc_saves_activation_memory():
    big = {**LLAMA, "num_hidden_layers": 4}
    on = _trace(big, gradient_checkpointing=True, seq=256, batch=4)
    off = _trace(big, gradient_checkpointing=False, seq=256, batch=4)
    assert on["phase_peaks"]["forward"] < off["phase_peaks"]["forward"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_trace_quantized_llama(quant):
    pytest.importorskip("bitsandbytes")
    r = _trace(LLAMA, quant=quant, double_quant=True)
    _check(r)
    bf16 = _trace(LLAMA)
    # quantized Linears are smaller, but prepare_model_for_kbit_training makes embeddings fp32
    # fp32 stream -> no flash; grouped-query heads -> not mem-efficient either: math
    assert r["sdpa_backends"].get("math") and not r["sdpa_backends"].get("flash")
    if quant == "int8":
        assert set(r["int8_outlier_fraction"]) == {"down_proj"}  # the random-init default, MLP-out only
    assert bf16["components"]["weights"] != r["components"]["weights"]


@pytest.mark.slow
def test_trace_int8_outlier_fraction_grows_memory():
    pytest.importorskip("bitsandbytes")
    lo = _trace(LLAMA, quant="int8", int8_outlier_fraction=0.0)
    hi = _trace(LLAMA, quant="int8", int8_outlier_fraction=1.0)
    assert hi["peak_allocated_bytes"] > lo["peak_allocated_bytes"]


@pytest.mark.slow
def test_trace_bnb_optimizers():
    pytest.importorskip("bitsandbytes")
    big = {**LLAMA, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8}
    lora = LoraSpec(rank=256, alpha=512, dropout=0.0, targets=("q_proj", "v_proj"))  # 131072-elem matrices
    adam8 = _trace(big, lora, quant="nf4", optimizer="adamw_8bit")
    paged = _trace(big, lora, quant="nf4", optimizer="paged_adamw_8bit")
    _check(adam8)
    _check(paged)
    assert paged["paged_optimizer_bytes"] > 0
    assert paged["peak_allocated_bytes"] < adam8["peak_allocated_bytes"]


@pytest.mark.slow
def test_trace_qwen2_all_linear_and_t5():
    r = _trace(QWEN2, LoraSpec(rank=4, alpha=8, dropout=0.0, targets=("all-linear",)))
    _check(r)
    assert r["sdpa_backends"] == {"flash": 8}  # GQA goes to flash natively (2 layers x 2 steps x recompute)
    t5 = _trace(T5, LoraSpec(rank=4, alpha=8, dropout=0.1, targets=("q", "v")), target_seq=32)
    _check(t5)
    assert "flash" not in t5["sdpa_backends"]  # the position bias is a mask


@pytest.mark.slow
def test_trace_data_dependent_op_fails_loudly(monkeypatch):
    import transformers.masking_utils as mu

    from loraplan.errors import TraceDataDependentError

    monkeypatch.setattr(em, "no_packed_sequences", mu.find_packed_sequence_indices)
    with pytest.raises(TraceDataDependentError) as ei:
        _trace(LLAMA)
    msg = str(ei.value)
    assert "\n" not in msg and "op '" in msg and "module '" in msg


@pytest.mark.slow
def test_trace_subprocess_and_errors():
    from loraplan.errors import LoraplanError, TargetError, TraceTimeoutError
    from loraplan.trace import run_trace_subprocess

    r = run_trace_subprocess(LLAMA, QV, TrainSpec(quant="bf16", batch=1, seq=32), "9.0")
    _check(r)
    with pytest.raises(TargetError):
        run_trace_subprocess(LLAMA, LoraSpec(targets=("nope",)), TrainSpec(quant="bf16", batch=1, seq=32))
    with pytest.raises(TraceTimeoutError):
        run_trace_subprocess(LLAMA, QV, TrainSpec(quant="bf16"), timeout_s=0.01)
    assert issubclass(TraceTimeoutError, LoraplanError)


def test_import_does_not_load_torch():
    import subprocess

    code = "import sys, loraplan.trace; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
