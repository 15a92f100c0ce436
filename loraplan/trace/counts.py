"""Counted work of a training step, read off the real code as it runs (issue 12).

``WorkCounter`` is a ``TorchDispatchMode`` (usable on its own, or fed by the meta trace's
``LiveTensorTracker.op_hook``) that records, per aten op the step dispatches:

- FLOPs, from torch's own per-op formulas (``torch.utils.flop_counter.flop_registry``: mm,
  addmm, bmm, baddbmm, convolution, the sdpa flash / mem-efficient / cuDNN kernels forward and
  backward). The registry counts sdpa as full s_q·s_k scores ("We aren't accounting for causal
  attention"); a causal kernel (``is_causal`` set) is billed ``CAUSAL_FRACTION`` of that, the
  pairs at or below the diagonal that flash / mem-efficient compute (whole masked blocks are
  skipped; ``estimate.time.attention_work`` uses the same ½); bitsandbytes' matmul ops
  (``BNB_MATMUL_OPS``, not in the registry): 2 · numel(A) · N; torch's ``_grouped_mm`` (MoE
  experts, not in the registry either): ``GROUPED_MM_OPS``;
- bytes read and written: the sum of the ``numel · itemsize`` of the op's tensor inputs and
  outputs. This is the *unfused upper bound* of its memory traffic: a kernel that keeps data in
  registers or caches (flash attention's tiles, a GEMM's re-reads) moves less, an expanded
  (stride-0) input is counted at its logical size;
- the dtype (of the first tensor input, int8 for bitsandbytes' int8 GEMMs; a matmul's FLOPs go
  to that dtype);
- kernel launches: one per op, except ops on host (CPU) tensors only (the optimizer's step
  counters: host arithmetic, no kernel, no sync), the views and metadata / allocation-only ops
  (``NO_LAUNCH_OPS`` and any ``OpOverload.is_view``), which launch nothing, and the foreach ops,
  which launch ``foreach_launches`` kernels (CUDA's multi_tensor_apply chunking).

Each op is put in one work class (``WORK_CLASSES``, the time model's terms): the innermost
``nn.Module`` it runs in (``ModuleOwners``: forward hooks; in backward, the autograd node being
executed, which the forward tagged with its module) mapped by ``module_kinds`` (LoRA branches,
frozen Linears, lm_head, attention, norms / elementwise, embedding, the top-level loss), the
optimizer phase, and the op (sdpa / eager score ops in an attention module are ``attention``).
Python-level calls of bitsandbytes (``MatMul4Bit``, ``MatMul8bitLt``, ``MatMul8bitFp`` forward
and backward, ``functional.dequantize_4bit`` / ``dequantize_blockwise``) and peft LoRA forward
calls are counted by wrapping them (``python_calls``) and by the module hooks.

What a meta run cannot show: work inside a kernel that dispatch never sees (the flash-attn 2
emulation's ``emulation._FlashAttnEmulation`` only allocates; its FLOPs are added from q/k shapes by
``python_calls`` as ``flash_attn_2`` FLOPs), and which cuBLAS / cutlass kernel a matmul picks
(one launch is assumed per matmul; split-K GEMMs launch a second reduction kernel).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["WORK_CLASSES", "NO_LAUNCH_OPS", "WorkCounter", "ModuleOwners", "module_kinds",
           "foreach_launches", "python_calls", "classify_op"]

#: the work classes, as the time model's terms (estimate/time.py) bill them
WORK_CLASSES = ("frozen_linear", "lora", "lm_head", "attention", "elementwise", "loss", "embedding",
                "optimizer", "other")

#: aten ops that launch no GPU kernel: views and metadata (they make a new TensorImpl over the
#: same storage), allocation without initialisation (the caching allocator, no kernel), and
#: autograd bookkeeping. Any op whose schema says it returns a view (``OpOverload.is_view``) is
#: treated the same.
NO_LAUNCH_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "expand_as",
    "as_strided", "slice", "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "chunk",
    "narrow", "diagonal", "unfold", "view_as", "view_as_real", "view_as_complex", "alias", "detach", "lift_fresh",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
    "_make_dep_token", "_assert_async", "_functional_assert_async",
})

#: sdpa-family ops that take an ``is_causal`` argument (their position in the schema is read by name)
_CAUSAL_ATTENTION = frozenset({
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_flash_attention_forward", "_flash_attention_backward",
})
#: useful fraction of a causal kernel's s_q·s_k scores (flash / mem-efficient skip masked blocks)
CAUSAL_FRACTION = 0.5
#: ops billed as attention when they run in an attention module itself (eager attention: the two
#: score matmuls, the softmax and its backward, the sdpa math path)
_ATTENTION_OPS = frozenset({"bmm", "baddbmm", "_softmax", "_softmax_backward_data", "softmax", "matmul",
                            "_scaled_dot_product_attention_math"})
#: matmul ops whose FLOPs are tensor-core / GEMM work (the rest of flop_registry is convolution)
#: flash-attn 2 backward kernels per call (csrc/flash_attn/src/flash_bwd_launch_template.h:
#: flash_bwd_dot_do_o_kernel, flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel, flash_bwd_convert_dq_kernel)
FA2_BACKWARD_LAUNCHES = 3
#: bitsandbytes custom matmul ops (bitsandbytes/_ops.py; not in torch's flop_registry): 2 FLOPs per
#: multiply-add of A [..., K] with the [N, K] weight, i.e. 2 · numel(A) · N (N: the output's last dim)
BNB_MATMUL_OPS = frozenset({"gemm_4bit", "int8_linear_matmul", "int8_scaled_mm", "int8_mixed_scaled_mm"})
#: torch's grouped GEMM (transformers' default MoE experts kernel; not in flop_registry):
#: ``_grouped_mm(a, b, offs)`` multiplies each row group of ``a`` by its group's matrix of ``b``:
#: 2 · numel(a) · b.shape[-1] FLOPs for a [tokens, K] × b [G, K, N], a [G, M, K] × b [G, K, N] and the
#: weight-gradient form a [K, tokens] × b [tokens, N] -> [G, K, N] alike
GROUPED_MM_OPS = frozenset({"_grouped_mm", "_scaled_grouped_mm"})
#: kernels of one ``bitsandbytes::gemm_4bit`` call: the CUDA backend's dequantize_4bit + linear
#: fallback (backends/cuda/ops.py::_dequant_linear_fallback), as the trace assumes for training
#: shapes (``emulation.UNCERTAIN``)
GEMM_4BIT_LAUNCHES = 2
MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_grouped_mm", "_scaled_grouped_mm"}
                       | BNB_MATMUL_OPS)

#: CUDA multi_tensor_apply (aten/src/ATen/native/cuda/MultiTensorApply.cuh): tensors per launch
#: by list depth (depth_to_max_tensors = {110, 64, 48, 36, 30}), blocks per launch (320) and
#: elements per block chunk (kChunkSize = 65536)
FOREACH_MAX_TENSORS = (110, 64, 48, 36, 30)
FOREACH_MAX_BLOCKS = 320
FOREACH_CHUNK = 65536


def _op_name(func) -> str:
    try:
        return func.overloadpacket.__name__
    except AttributeError:
        return str(func)


def _tensors(x) -> list:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def foreach_launches(args) -> int:
    """Kernels one ``_foreach_*`` op launches on CUDA: multi_tensor_apply walks the lists'
    tensors in ``FOREACH_CHUNK`` chunks (one block each) and launches when a launch holds
    ``FOREACH_MAX_TENSORS[depth-1]`` tensors or ``FOREACH_MAX_BLOCKS`` blocks
    (MultiTensorApply.cuh::multi_tensor_apply). ``depth``: the number of tensor lists among the
    arguments (scalar-list and tensor-scalar arguments are not lists of tensors)."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
    if not lists:
        return 1
    max_t = FOREACH_MAX_TENSORS[min(len(lists), len(FOREACH_MAX_TENSORS)) - 1]
    launches, n_t, n_b = 0, 0, 0
    for t in lists[0]:
        n = t.numel()
        if n == 0:
            continue
        n_t += 1
        chunks = -(-n // FOREACH_CHUNK)
        for chunk in range(chunks):
            n_b += 1
            last = chunk == chunks - 1
            if (n_t == max_t and last) or n_b == FOREACH_MAX_BLOCKS:
                launches += 1
                n_b = 0
                n_t = 0 if last else 1  # a tensor cut mid-way continues in the next launch
    return launches + (1 if n_b else 0)


def _causal(func, args, kwargs) -> bool:
    if kwargs.get("is_causal"):
        return True
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    for i, a in enumerate(schema.arguments):
        if a.name == "is_causal":
            return bool(args[i]) if i < len(args) else bool(kwargs.get("is_causal", False))
    return False


# ----------------------------------------------------------------------------- module owners
def module_kinds(model) -> dict[str, str]:
    """Work class of each module path of ``model`` (``named_modules`` names) for the ops it runs
    itself (not its children's):

    - peft LoRA layers (``peft.tuners.lora.LoraLayer``: the input cast, scaling, the add) and
      everything under their ``lora_*`` children (dropout, lora_A, lora_B): ``lora``;
    - the frozen layer a LoRA layer wraps (``base_layer``) and every other Linear (``nn.Linear``,
      bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, transformers' Conv1D): ``frozen_linear``,
      ``lm_head`` for the output embedding (``get_output_embeddings``) or a leaf named lm_head;
    - ``nn.Embedding``: ``embedding``; modules whose class name has ``Attention``: ``attention``
      (split by op in ``classify_op``); the top-level model and peft's wrappers (the logits
      slice and the loss run there, transformers ``*ForCausalLM.forward``): ``loss``;
    - everything else (norms, MLP glue, activations, rotary tables, decoder-layer residuals):
      ``elementwise``; one that owns weights directly (fused MoE experts) bills its matmuls as
      ``frozen_linear`` (``classify_op``: kind ``weights``)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a trace dependency
        LoraLayer = ()
    linear_types: tuple = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types += (Conv1D,)
    except ImportError:
        pass
    head = None
    with contextlib.suppress(Exception):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
    kinds: dict[str, str] = {}
    roots = {""}
    wrapper = model
    path = ""
    for attr in ("base_model", "model"):  # PeftModel.base_model (LoraModel).model
        inner = getattr(wrapper, attr, None)
        if not isinstance(inner, torch.nn.Module) or not hasattr(wrapper, "peft_config"):
            break
        path = f"{path}.{attr}" if path else attr
        roots.add(path)
        wrapper = inner
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or (LoraLayer and isinstance(mod, LoraLayer)):
            kind = "lora"
        elif isinstance(mod, linear_types):
            is_head = mod is head or leaf == "lm_head" or (leaf == "base_layer" and len(parts) > 1 and parts[-2] == "lm_head")
            kind = "lm_head" if is_head else "frozen_linear"
        elif isinstance(mod, torch.nn.Embedding):
            kind = "embedding"
        elif name in roots:
            kind = "loss"
        elif "Attention" in type(mod).__name__:
            kind = "attention"
        elif any(True for _ in mod.parameters(recurse=False)):
            kind = "weights"
        else:
            kind = "elementwise"
        kinds[name] = kind
    return kinds


def classify_op(kind: str | None, op: str, phase: str) -> str:
    """Work class of one op: ``optimizer`` inside the optimizer phase (the step, clipping,
    zero_grad); else the owner module's kind (``module_kinds``), with in an attention module the
    sdpa family and eager score ops (``_ATTENTION_OPS``) as ``attention`` and its other ops
    (RoPE, transposes, casts) as ``elementwise``; in a module that owns weights directly its
    matmuls as ``frozen_linear``; ops outside any known module ``other``."""
    if phase == "optimizer":
        return "optimizer"
    if kind is None:
        return "other"
    if kind == "attention":
        if "attention" in op or op in _ATTENTION_OPS:
            return "attention"
        return "elementwise"
    if kind == "weights":
        return "frozen_linear" if op in MATMUL_OPS else "elementwise"
    if "attention" in op and kind == "elementwise":  # e.g. a family's attention function module
        return "attention"
    return kind


_OWNER_KEY = "loraplan_owner"


class ModuleOwners:
    """Which module an op belongs to, forward and backward.

    Forward (and checkpoint recompute): a stack of module paths pushed / popped by global module
    forward hooks. Each module's forward post hook tags the autograd nodes it created itself
    (walking back from its outputs' ``grad_fn`` to its inputs', not re-tagging nodes a child
    already tagged) with its path in ``node.metadata``; in backward the owner is the tag of the
    node being executed (``torch._C._current_autograd_node``). Entries pushed by a non-reentrant
    checkpoint recompute (torch/utils/checkpoint.py::_recomputation_hook) that stopped early
    never see their post hook; they are dropped once that recompute's saved-tensor hook is no
    longer the active one."""

    def __init__(self, model, active_fn: Callable[[], bool] | None = None):
        self.active_fn = active_fn or (lambda: True)
        self.names = {id(m): n for n, m in model.named_modules()}
        self.kinds = module_kinds(model)
        self.stack: list[tuple[str, Any]] = []  # (path, recompute hook at push or None)
        self._inputs: dict[int, list] = {}
        self._handles: list = []
        self.module_calls = 0
        self.lora_forward_calls = 0
        self.errors: dict[str, int] = {}
        from contextlib import suppress

        self._lora_types: tuple = ()
        with suppress(ImportError):
            from peft.tuners.lora import LoraLayer

            self._lora_types = (LoraLayer,)

    @staticmethod
    def _recompute_hook():
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None:
            return None
        pack = top[0]
        return pack if "_recomputation_hook" in getattr(pack, "__qualname__", "") else None

    def _pre(self, module, args):
        name = self.names.get(id(module))
        if name is None:
            return
        if self.active_fn():
            self.module_calls += 1
            if self._lora_types and isinstance(module, self._lora_types):
                self.lora_forward_calls += 1
        hook = self._recompute_hook() if torch._C._current_graph_task_id() != -1 else None
        self.stack.append((name, hook))
        # node wrappers are kept (not only their ids): a freed wrapper's id may be reused
        ins = {id(n): n for n in (t.grad_fn for t in _tensors(args)) if n is not None}
        self._inputs.setdefault(id(module), []).append(ins)

    def _post(self, module, args, output):
        name = self.names.get(id(module))
        if name is None:
            return
        if self.stack and self.stack[-1][0] == name:
            self.stack.pop()
        ins_list = self._inputs.get(id(module))
        stop = ins_list.pop() if ins_list else {}
        if not torch.is_grad_enabled():
            return
        try:
            todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
            seen: dict[int, Any] = {}  # id -> node, held so ids stay unique during the walk
            while todo:
                node = todo.pop()
                if node is None or id(node) in seen or id(node) in stop:
                    continue
                seen[id(node)] = node
                md = node.metadata
                if _OWNER_KEY not in md:
                    md[_OWNER_KEY] = name
                todo.extend(n for n, _ in node.next_functions if n is not None)
        except Exception as e:  # noqa: BLE001 - ownership is bookkeeping: never fail the step
            self.errors[f"tagging {name}: {type(e).__name__}"] = self.errors.get(f"tagging {name}: {type(e).__name__}", 0) + 1

    def owner(self) -> str | None:
        """Path of the module the current op runs in, or None (outside every module)."""
        if self.stack and torch._C._current_graph_task_id() != -1:
            hook = self._recompute_hook()
            while self.stack and self.stack[-1][1] is not None and self.stack[-1][1] is not hook:
                self.stack.pop()  # a recompute that stopped early
        if self.stack:
            return self.stack[-1][0]
        node = torch._C._current_autograd_node()
        if node is None:
            return None
        return node.metadata.get(_OWNER_KEY)

    def kind(self) -> str | None:
        name = self.owner()
        return None if name is None else self.kinds.get(name)

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.stack.clear()
        self._inputs.clear()


# ----------------------------------------------------------------------------- python-level calls
#: (module, attribute path, counter name): bitsandbytes' Python-level matmul / dequantize entry
#: points (bitsandbytes 0.50 autograd/_functions.py, functional.py)
PYTHON_CALLS = (
    ("bitsandbytes", "matmul_4bit", "bnb.matmul_4bit"),  # nn/modules.py Linear4bit.forward: bnb.matmul_4bit(...)
    ("bitsandbytes", "matmul", "bnb.matmul"),  # Linear8bitLt.forward: bnb.matmul(...)
    ("bitsandbytes.autograd._functions", "MatMul4Bit.forward", "bnb.MatMul4Bit.forward"),
    ("bitsandbytes.autograd._functions", "MatMul4Bit.backward", "bnb.MatMul4Bit.backward"),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt.forward", "bnb.MatMul8bitLt.forward"),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt.backward", "bnb.MatMul8bitLt.backward"),
    ("bitsandbytes.autograd._functions", "MatMul8bitFp.forward", "bnb.MatMul8bitFp.forward"),
    ("bitsandbytes.autograd._functions", "MatMul8bitFp.backward", "bnb.MatMul8bitFp.backward"),
    ("bitsandbytes.functional", "dequantize_4bit", "bnb.functional.dequantize_4bit"),
    ("bitsandbytes.functional", "dequantize_blockwise", "bnb.functional.dequantize_blockwise"),
)


@contextlib.contextmanager
def python_calls(counts: dict[str, int], active: Callable[[], bool] = lambda: True,
                 on_call: Callable[[str, tuple], None] | None = None):
    """Count calls of ``PYTHON_CALLS`` (and the flash-attn 2 emulation's forward / backward,
    ``emulation._FlashAttnEmulation``) into ``counts`` while ``active()``, by wrapping them in place;
    restored on exit. ``on_call(name, args)`` sees each counted call (the FA2 FLOPs)."""
    patched: list[tuple[Any, str, Any]] = []
    targets = list(PYTHON_CALLS) + [("loraplan.trace.emulation", "_FlashAttnEmulation.forward", "flash_attn_2.forward"),
                                    ("loraplan.trace.emulation", "_FlashAttnEmulation.backward", "flash_attn_2.backward")]
    for mod_name, attr, key in targets:
        try:
            owner = importlib.import_module(mod_name)
        except ImportError:
            continue
        *path, leaf = attr.split(".")
        for p in path:
            owner = getattr(owner, p, None)
            if owner is None:
                break
        if owner is None or leaf not in vars(owner):
            continue
        raw = vars(owner)[leaf]
        fn = raw.__func__ if isinstance(raw, staticmethod) else raw

        def wrapper(*args, _fn=fn, _key=key, **kwargs):
            if active():
                counts[_key] = counts.get(_key, 0) + 1
                if on_call is not None:
                    try:
                        on_call(_key, args)
                    except Exception as e:  # noqa: BLE001 - counting never fails the call it counts
                        counts[f"error in {_key}: {type(e).__name__}"] = counts.get(f"error in {_key}: {type(e).__name__}", 0) + 1
            return _fn(*args, **kwargs)

        setattr(owner, leaf, staticmethod(wrapper) if isinstance(raw, staticmethod) else wrapper)
        patched.append((owner, leaf, raw))
    try:
        yield counts
    finally:
        for owner, leaf, raw in reversed(patched):
            setattr(owner, leaf, raw)


# ----------------------------------------------------------------------------- the counter
_REC_COUNT, _REC_LAUNCH, _REC_FLOPS, _REC_READ, _REC_WRITE = range(5)


class WorkCounter(TorchDispatchMode):
    """Per-op work of the ops dispatched while active (see the module docstring).

    Args:
        owners: a ``ModuleOwners`` (entered by the caller) for the work class; None puts every
            op in ``other`` (or ``optimizer`` in that phase).
        phase_fn: returns "forward" | "backward" | "optimizer" | "" for the current op; default:
            backward while autograd runs a graph, else forward.
        active_fn: count only while it returns True (the trace counts its last step).
    """

    def __init__(self, owners: ModuleOwners | None = None, phase_fn: Callable[[], str] | None = None,
                 active_fn: Callable[[], bool] | None = None):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.flop_registry = flop_registry
        self.owners = owners
        self.phase_fn = phase_fn or (lambda: "backward" if torch._C._current_graph_task_id() != -1 else "forward")
        self.active_fn = active_fn or (lambda: True)
        #: (class, op, dtype, phase) -> [count, launches, flops, bytes read, bytes written]
        self.table: dict[tuple[str, str, str, str], list] = {}
        self.python_calls: dict[str, int] = {}
        self.syncs = 0
        self._fa2: dict[int, tuple] = {}
        self.errors: dict[str, int] = {}  # ops whose counting raised (filled by callers that guard record)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.record(func, args, kwargs or {}, out)
        return out

    def record(self, func, args, kwargs, out) -> None:
        """Count one dispatched op (``func`` an OpOverload; ``out`` its result)."""
        if not self.active_fn():
            return
        op = _op_name(func)
        phase = self.phase_fn()
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        on_host = all(t.device.type == "cpu" for t in ins + outs) and bool(ins or outs)
        if on_host or op in NO_LAUNCH_OPS or getattr(func, "is_view", False):
            launches, read, written = 0, 0, 0
        else:
            launches = foreach_launches(args) if op.startswith("_foreach_") else 1
            read = sum(_nbytes(t) for t in ins)
            written = sum(_nbytes(t) for t in outs)
            if op == "_local_scalar_dense":
                self.syncs += 1
        flops = 0
        if op in BNB_MATMUL_OPS and ins and outs:
            flops = 2 * ins[0].numel() * outs[0].shape[-1]
        elif op in GROUPED_MM_OPS and len(ins) >= 2:
            flops = 2 * ins[0].numel() * ins[1].shape[-1]
            if op == "gemm_4bit" and launches:
                launches = GEMM_4BIT_LAUNCHES
        packet = getattr(func, "overloadpacket", None)
        if packet in self.flop_registry:
            try:
                flops = int(self.flop_registry[packet](*args, **kwargs, out_val=out))
            except Exception:  # noqa: BLE001 - a formula that cannot read these args counts 0
                flops = 0
            if flops and op in _CAUSAL_ATTENTION and _causal(func, args, kwargs):
                flops = int(flops * CAUSAL_FRACTION)
        dtype = str(ins[0].dtype).replace("torch.", "") if ins else (str(outs[0].dtype).replace("torch.", "") if outs else "")
        if op.startswith("int8_") and op in BNB_MATMUL_OPS:
            dtype = "int8"  # the GEMM multiplies the int8 copies (CA x CB), whatever A's dtype
        kind = self.owners.kind() if self.owners is not None else None
        cls = classify_op(kind, op, phase)
        key = (cls, op, dtype, phase)
        rec = self.table.get(key)
        if rec is None:
            rec = self.table[key] = [0, 0, 0, 0, 0]
        rec[_REC_COUNT] += 1
        rec[_REC_LAUNCH] += launches
        rec[_REC_FLOPS] += flops
        rec[_REC_READ] += read
        rec[_REC_WRITE] += written

    def add_flops(self, cls: str, op: str, dtype: str, phase: str, flops: int, launches: int = 0) -> None:
        """Work dispatch does not see (a kernel emulated by allocation only)."""
        rec = self.table.setdefault((cls, op, dtype, phase), [0, 0, 0, 0, 0])
        rec[_REC_COUNT] += 1
        rec[_REC_LAUNCH] += launches
        rec[_REC_FLOPS] += flops

    def add_fa2_call(self, name: str, args: tuple) -> None:
        """FLOPs of the flash-attn 2 emulation (``emulation._FlashAttnEmulation``), which only
        allocates: forward from q/k/v ([b, s, h, d], or varlen [total, h, d] taken as ``n_seq``
        equal documents) by torch's ``sdpa_flop_count`` × ``CAUSAL_FRACTION`` (transformers calls
        flash-attn causal for decoders), one launch; backward ``sdpa_backward_flop_count`` ×
        ``CAUSAL_FRACTION`` of the same shapes, ``FA2_BACKWARD_LAUNCHES`` launches."""
        from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

        if not name.startswith("flash_attn_2"):
            return
        if name.endswith(".forward"):
            ctx, q, k, v, n_seq = args[:5]
            if q.dim() == 3:  # varlen: n_seq documents of total / n_seq tokens
                L = q.shape[0] // max(int(n_seq), 1)
                shapes = [(int(n_seq), t.shape[1], L, t.shape[2]) for t in (q, k, v)]
            else:
                shapes = [(t.shape[0], t.shape[2], t.shape[1], t.shape[3]) for t in (q, k, v)]
            self._fa2[id(ctx)] = (shapes, str(q.dtype).replace("torch.", ""))
            self.add_flops("attention", "flash_attn_2_forward", self._fa2[id(ctx)][1], self.phase_fn(),
                           int(sdpa_flop_count(*shapes) * CAUSAL_FRACTION), 1)
        else:
            hit = self._fa2.pop(id(args[0]), None)
            if hit is None:
                return
            (qs, ks, vs), dtype = hit
            self.add_flops("attention", "flash_attn_2_backward", dtype, self.phase_fn(),
                           int(sdpa_backward_flop_count(qs, qs, ks, vs) * CAUSAL_FRACTION), FA2_BACKWARD_LAUNCHES)

    def summary(self, top: int = 40) -> dict[str, Any]:
        """Plain dict: ``classes`` (per work class: ops, launches, flops, matmul_flops,
        flops_by_dtype, bytes_read, bytes_written), ``total`` (the same summed), ``phases``
        (launches and flops per phase), ``python_calls``, ``module_calls``,
        ``lora_forward_calls``, ``syncs`` (``_local_scalar_dense``: host waits), and ``ops``:
        the ``top`` (class, op, dtype, phase) rows by launches then FLOPs."""
        classes: dict[str, dict[str, Any]] = {}
        phases: dict[str, dict[str, int]] = {}
        for (cls, op, dtype, phase), (n, launches, flops, rd, wr) in self.table.items():
            c = classes.setdefault(cls, {"ops": 0, "launches": 0, "flops": 0, "matmul_flops": 0,
                                         "flops_by_dtype": {}, "bytes_read": 0, "bytes_written": 0})
            c["ops"] += n
            c["launches"] += launches
            c["flops"] += flops
            if flops and (op in MATMUL_OPS or "attention" in op or op.startswith("flash_attn")):
                c["matmul_flops"] += flops
            if flops:
                c["flops_by_dtype"][dtype] = c["flops_by_dtype"].get(dtype, 0) + flops
            c["bytes_read"] += rd
            c["bytes_written"] += wr
            p = phases.setdefault(phase, {"launches": 0, "flops": 0})
            p["launches"] += launches
            p["flops"] += flops
        total = {k: sum(c[k] for c in classes.values())
                 for k in ("ops", "launches", "flops", "matmul_flops", "bytes_read", "bytes_written")}
        rows = sorted(self.table.items(), key=lambda kv: (-kv[1][_REC_LAUNCH], -kv[1][_REC_FLOPS]))[:top]
        return {
            "classes": {k: classes[k] for k in WORK_CLASSES if k in classes},
            "total": total,
            "phases": phases,
            "python_calls": dict(sorted(self.python_calls.items())),
            "module_calls": self.owners.module_calls if self.owners is not None else None,
            "lora_forward_calls": self.owners.lora_forward_calls if self.owners is not None else None,
            "syncs": self.syncs,
            "errors": {**self.errors, **(self.owners.errors if self.owners is not None else {})},
            "ops": [{"class": c, "op": o, "dtype": d, "phase": p, "count": r[0], "launches": r[1], "flops": r[2],
                     "bytes": r[3] + r[4]} for (c, o, d, p), r in rows],
            "bytes_rule": "sum of input and output tensor sizes per launching op: the unfused upper bound",
        }
