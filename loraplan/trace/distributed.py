"""The real DDP / FSDP1 / FSDP2 engines in the meta trace, one rank of N in one process (issue 13).

``engine_for(train, rank, tracker)`` returns an ``Engine`` whose ``context()`` starts a fake
process group (``torch.testing._internal.distributed.fake_pg``: ``dist.init_process_group("fake",
store=FakeStore(), rank=r, world_size=N)``; every collective returns at once without touching
data, the approach of torch's ``torch/distributed/_tools/fsdp2_mem_tracker.py::FSDPMemTracker``
and torchtitan's memory estimation) and whose ``wrap(model)`` applies the real engine to the
built PEFT model (``trace/run.py::_run`` calls it before the optimizer is made). The step then
runs as usual under the live-tensor tracker on meta, so each rank's peak comes from the
engine's own allocations:

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel(model, device_ids=None)`` with its
  defaults (torch/nn/parallel/distributed.py: ``bucket_cap_mb`` 25, the first bucket 1 MiB
  (``dist._DEFAULT_FIRST_BUCKET_BYTES``), ``gradient_as_bucket_view=False``,
  ``find_unused_parameters=False``; the Reducer's bucket buffers are allocated by C++ through
  the dispatcher, so the tracker sees them). Only the parameters that require grad (the
  adapters) are bucketed. Two changes, both memory-neutral: the reduction is DDP's default
  all-reduce written as a Python comm hook (``_allreduce_in_place``: the fake group's future has
  no value for the C++ hook), and the bucket rebuild before the second forward is skipped
  (``_KeepBuckets``: it needs the bucket order's values on the host); the shape check of
  ``DDP.__init__`` (which reads values) is skipped too.
- ``fsdp`` with ``fsdp_version`` 1: ``FullyShardedDataParallel`` with peft's
  ``fsdp_auto_wrap_policy`` (``Engine._wrap_fsdp1``): flat parameters, one per unit, sharded
  with padding to N, ``use_orig_params`` as given (default False), accelerate's ``MixedPrecision``
  for a bf16 / fp16 ``mixed_precision`` (``train_step.fsdp_mixed_precision``: an fp32-loaded base is
  gathered in 16 bit); ``device_id`` meta (its device handle answers ``torch.cpu``'s no-op
  streams) and a no-op ``param_init_fn``, so nothing is materialized. FSDP1 flattens each unit
  into one dtype: a 4-bit base needs a float ``quant_storage`` (uint8 cannot be flattened), and
  the fp32 norms / embeddings of ``prepare_model_for_kbit_training`` cannot share a unit with a
  bf16 storage (the trace then fails with FSDP's own message; ``--no-prepare-kbit`` is what
  FSDP-QLoRA recipes run).
- ``fsdp`` / ``fsdp-offload`` with ``fsdp_version`` 2: ``fully_shard`` per decoder layer (the
  model's ``_no_split_modules`` classes, as accelerate's transformer auto-wrap does) and on the
  root, ``reshard_after_forward`` True for ``full`` (FULL_SHARD) and False for
  ``shard-grad-op`` (SHARD_GRAD_OP), accelerate's ``MixedPrecisionPolicy`` for a bf16 / fp16
  ``mixed_precision`` (``train_step.fsdp_mixed_precision``), else the default one (parameters gathered
  in their own dtypes). ``fsdp-offload`` is ``CPUOffloadPolicy(pin_memory=True)``
  emulated (a meta tensor cannot be copied to the host: ``foreach_reduce``'s
  ``new_sharded_grad.to("cpu")`` fails on meta): FSDP2 runs without the policy and the tracker
  ignores, as host memory, what the policy keeps on the host: the sharded parameters, the
  sharded gradients (the reduce-scatter output, copied to pinned memory and dropped on the
  device) and the whole optimizer step (its state and temporaries; the step runs on CPU);
  their bytes go to ``host_components``. Not emulated: the per-unit host-to-device copy of the
  shard before its all-gather (``FSDPParam.all_gather_inputs``: shard-sized, freed after the
  copy-in).
  FSDP2 runs on a "cpu" ``DeviceMesh`` whose device is switched to meta after ``fully_shard``
  (``Engine._to_meta``: each FSDPParamGroup/FSDPParam's ``device``; meta has no device module,
  so ``_get_device_handle("meta")`` answers ``torch.cpu``'s no-op streams; the meta-parameter
  check of ``lazy_init`` is skipped: the parameters are meant to stay on meta). FSDP2 resizes
  the unsharded parameters' storages in place (``_fsdp_param.py::alloc_storage`` /
  ``free_storage``, ``UntypedStorage.resize_``, which dispatch never sees): those two functions
  are wrapped to tell the tracker (``LiveTensorTracker._resync_storage``).

Ledger lines per rank (``categorize``): ``weights`` (this rank's frozen weights and buffers:
its shard under FSDP), ``gathered_params`` (all-gather outputs and unsharded parameters in
flight, incl. prefetch), ``lora_weights``, ``lora_gradients`` (sharded and unsharded),
``optimizer_state``, ``activations``, ``logits_loss``, ``ddp_buckets`` (DDP's
buckets), ``reduce_scatter_buffers`` (FSDP's reduce-scatter buffers) -- the analytic ledger's
names (estimate/parallel.py), ``other``. Allocations made inside the engine's
collectives are told apart by tracker phases (``all_gather``, ``reduce_scatter``,
``ddp_buckets``) nested in the step's phases.

Not traced here, with the reason: DeepSpeed ZeRO (``zero1``-``zero3-offload``) needs CUDA and
its compiled ops and is not installed (use ``--method analytic``, which models it from its
source); ``device-map`` (accelerate's layer split) is one process with several devices, not a
process group; FSDP1 with CPU offload (``fsdp-offload`` with ``fsdp_version`` 1); HYBRID_SHARD (one
flat mesh is traced).

Ranks: FSDP2 pads every parameter's dim 0 to a multiple of N and gives each rank the same
padded shard storage (``_fsdp_param.py::_init_sharded_param``), FSDP1 pads each flat parameter
to a multiple of N (``_flat_param.py::FlatParamHandle._get_shard``), DDP replicates: every rank
of these engines allocates the same, so ``trace_estimate`` traces rank 0 and rank N-1 and reports
both (and the others as rank 0 only when the two agree).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

from ..errors import InputError, TraceError
from ..estimate.parallel import accelerate_carves_fsdp2
from ..trainers import resolve_recipe

#: strategies this module runs (the others raise TraceError naming why)
TRACED = ("ddp", "fsdp", "fsdp-offload")

#: the trace's per-rank ledger lines, in order (``weights``..``other`` as the one-GPU trace's)
PARALLEL_CATEGORIES = ("weights", "gathered_params", "lora_weights", "lora_gradients", "optimizer_state",
                       "activations", "logits_loss", "reduce_scatter_buffers", "ddp_buckets", "other")

#: tracker phases that mark allocations made inside the engine's collectives
_ENGINE_PHASES = {"all_gather": "gathered_params", "reduce_scatter": "reduce_scatter_buffers",
                  "ddp_buckets": "ddp_buckets"}


def is_parallel(train) -> bool:
    """True when the spec asks for an engine over several ranks (not ``single``)."""
    return getattr(train, "strategy", "single") != "single"


def check_traceable(train) -> None:
    """Refuse, in one line with the fix, what this module cannot trace (see the module docstring).

    What the engines themselves refuse (int8 or a uint8 4-bit storage sharded, a multi-GPU engine
    on one rank, FSDP options that do not apply, ...) is ``trainers.check_parallel``'s, run here
    through ``resolve_recipe`` so the trace refuses it with the line estimate prints (InputError);
    what is left is the trace's own limits (TraceError)."""
    r = resolve_recipe(train)  # trainers.check_parallel: the engines' refusals
    s = r.strategy
    if s.startswith("zero"):
        raise TraceError(f"--strategy {s}: DeepSpeed needs CUDA and its compiled ops, which the meta trace "
                         "cannot run; use --method analytic (modelled from DeepSpeed's source)")
    if s == "device-map":
        raise TraceError("--strategy device-map: accelerate's layer split is one process over several devices, "
                         "not traced; use --method analytic")
    if s not in TRACED:
        raise InputError(f"--strategy {s} is not known to the trace; use one of {', '.join(TRACED)}")
    if s == "fsdp-offload" and r.fsdp_version == 1:
        raise TraceError("--strategy fsdp-offload --fsdp-version 1: FSDP1's CPUOffload is not traced; "
                         "use --fsdp-version 2 or --method analytic")
    if r.fsdp_sharding == "hybrid":  # check_parallel refuses it on one node, and for every strategy but FSDP
        raise TraceError("--fsdp-sharding hybrid: the trace runs one flat mesh; use full or shard-grad-op, "
                         "or --method analytic")


def fsdp_version(train) -> int:
    """The FSDP version the trace runs: the spec's, else the trainer's default (``resolve_recipe``:
    trainers.json)."""
    v = getattr(train, "fsdp_version", None)
    if v is None:
        v = resolve_recipe(train).fsdp_version
    return int(v)


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int):
    """``dist.init_process_group("fake", ...)`` for ``rank`` of ``world_size``; destroyed on exit."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise TraceError("a process group is already initialized in this process; the trace needs its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


class Engine:
    """One rank's engine: ``context()`` around the whole trace, ``wrap(model)`` before the
    optimizer, ``categorize(tracker, vocab)`` for the ledger at the peak, ``summary()`` for
    the result (strategy, world size, rank, units, host bytes)."""

    def __init__(self, train, rank: int, tracker, torch):
        check_traceable(train)
        self.train, self.rank, self.tracker, self.torch = train, int(rank), tracker, torch
        self.world = int(train.num_gpus)
        if not 0 <= self.rank < self.world:
            raise InputError(f"rank {rank} is outside world size {self.world}; use 0..{self.world - 1}")
        self.strategy = train.strategy
        self.units: list[str] = []
        self.host_components: dict[str, int] = {}
        self._fsdp_groups: list = []
        self._host_grads: dict[int, int] = {}
        self._wrapped = None
        self.streams = _StreamIds(torch)
        tracker.stream_fn = self.streams

    # ------------------------------------------------------------------ setup
    @contextlib.contextmanager
    def context(self):
        with fake_process_group(self.rank, self.world), contextlib.ExitStack() as stack:
            if self.strategy.startswith("fsdp"):
                stack.enter_context(self._fsdp_patches() if fsdp_version(self.train) == 2 else self._fsdp1_patches())
            yield self

    def wrap(self, model, mod_names: dict[int, str]):
        """The engine applied to the PEFT model; the wrapper's own id is named in ``mod_names``
        so allocations in its forward are attributed."""
        if self.strategy == "ddp":
            self._wrapped = self._wrap_ddp(model, mod_names)
        elif fsdp_version(self.train) == 1:
            self._wrapped = self._wrap_fsdp1(model)
        else:
            self._wrapped = self._wrap_fsdp2(model)
        return self._wrapped

    def _wrap_ddp(self, model, mod_names):
        import torch.nn.parallel.distributed as ddp_mod
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP.__init__ checks that every rank has the same parameter shapes (utils.py::
        # _verify_param_shape_across_processes: it reads the gathered sizes with .item(), which meta
        # cannot); one rank of identical replicas is traced, so the check is skipped
        verify = ddp_mod._verify_param_shape_across_processes
        ddp_mod._verify_param_shape_across_processes = lambda *a, **k: None
        try:
            with self.tracker.phase("ddp_buckets"):
                ddp = DDP(model, device_ids=None)
        finally:
            ddp_mod._verify_param_shape_across_processes = verify
        mod_names[id(ddp)] = "ddp"
        ddp.register_comm_hook(None, _allreduce_in_place)
        ddp.reducer = _KeepBuckets(ddp.reducer)
        orig = ddp._pre_forward
        tracker = self.tracker

        def pre_forward(*args, **kwargs):  # the second forward rebuilds the buckets (_rebuild_buckets)
            with tracker.phase("ddp_buckets"):
                return orig(*args, **kwargs)

        ddp._pre_forward = pre_forward
        self.units = ["ddp"]
        return ddp

    def _carve_embed_and_tail(self, model, kw: dict, fully_shard) -> None:
        """accelerate >= 1.14's units beside the decoder layers (version rule ``accelerate_fsdp2_units``;
        accelerate utils/fsdp_utils.py::fsdp2_prepare_model): the untied input embedding with the
        plugin's reshard_after_forward, then the tail [final norm, (tied input embedding,) output
        embedding] with reshard_after_forward=False. The final norm is accelerate's own
        ``_find_final_norm`` (None under PEFT: it scans the *ForCausalLM's children)."""
        from torch.distributed.fsdp import FSDPModule

        inp = model.get_input_embeddings()
        out = model.get_output_embeddings()
        tied = getattr(inp, "weight", None) is not None and getattr(inp, "weight", None) is getattr(out, "weight", None)
        if not tied and inp is not None and not isinstance(inp, FSDPModule):
            fully_shard(inp, **kw)
            self.units.append("(input embedding)")
        try:
            from accelerate.utils.fsdp_utils import _find_final_norm
            norm = _find_final_norm(model)
        except ImportError:  # an accelerate older than the rule's 1.14 installed: the same scan
            base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
            norms = [m for _, m in base.named_children() if "Norm" in type(m).__name__]
            norm = norms[-1] if norms else None
        tail = [m for m in ((norm, inp, out) if tied else (norm, out)) if m is not None and not isinstance(m, FSDPModule)]
        if tail:
            fully_shard(tail, **{**kw, "reshard_after_forward": False})
            self.units.append("(tail)")

    def _wrap_fsdp2(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mesh = init_device_mesh("cpu", (self.world,))
        reshard = self.train.fsdp_sharding != "shard-grad-op"
        kw = dict(mesh=mesh, reshard_after_forward=reshard, mp_policy=self._mixed_precision(2) or MixedPrecisionPolicy(),
                  offload_policy=OffloadPolicy())  # fsdp-offload: emulated (_offload_to_host)
        no_split = set(getattr(_base_model(model), "_no_split_modules", None) or ())
        if not no_split:
            raise TraceError(f"{type(_base_model(model)).__name__} names no _no_split_modules: no decoder layer to "
                             "wrap with fully_shard; use --method analytic")
        for name, mod in model.named_modules():
            if type(mod).__name__ in no_split:
                fully_shard(mod, **kw)
                self.units.append(name)
        if accelerate_carves_fsdp2(resolve_recipe(self.train)):
            self._carve_embed_and_tail(model, kw, fully_shard)
            root_kw = {k: v for k, v in kw.items() if k != "reshard_after_forward"}  # torch's None: False for the root
        else:
            root_kw = kw
        fully_shard(model, **root_kw)
        self.units.append("(root)")
        import gc

        gc.collect()  # the replaced full-size parameters sit in reference cycles of the built model
        self._to_meta(model)
        if self.strategy == "fsdp-offload":
            self._offload_to_host(model)
        return model

    def _mixed_precision(self, version: int):
        """accelerate's FSDP mixed-precision policy for the recipe, or None (``train_step.fsdp_mixed_precision``)."""
        from ..train_step import fsdp_mixed_precision

        return fsdp_mixed_precision(self.train, version)

    def _wrap_fsdp1(self, model):
        """FullyShardedDataParallel as accelerate builds it for a PEFT model: peft's
        ``fsdp_auto_wrap_policy`` (LoRA layers and the ``_no_split_modules`` layers in their own
        units), FULL_SHARD or SHARD_GRAD_OP, ``use_orig_params`` (default False), flat parameters,
        ``limit_all_gathers=True``, ``backward_prefetch`` of the resolved recipe (the trainer's
        default: trainers.json); ``device_id`` meta with ``param_init_fn`` a no-op, so nothing is
        materialized (``_init_utils.py::_materialize_with_param_init_fn``)."""
        import gc

        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import BackwardPrefetch
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        strategy = ShardingStrategy.SHARD_GRAD_OP if self.train.fsdp_sharding == "shard-grad-op" \
            else ShardingStrategy.FULL_SHARD
        prefetch = {"none": None, "backward-pre": BackwardPrefetch.BACKWARD_PRE,
                    "backward-post": BackwardPrefetch.BACKWARD_POST}[resolve_recipe(self.train).fsdp_backward_prefetch]
        wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=strategy,
                       use_orig_params=bool(self.train.use_orig_params), device_id=self.torch.device("meta"),
                       param_init_fn=lambda module: None, sync_module_states=False, limit_all_gathers=True,
                       backward_prefetch=prefetch, mixed_precision=self._mixed_precision(1))
        self.units = [n or "(root)" for n, m in wrapped.named_modules() if isinstance(m, FSDP)]
        gc.collect()  # the flattened originals sit in reference cycles of the built model
        return wrapped

    @contextlib.contextmanager
    def _fsdp1_patches(self):
        """FSDP1 on meta: its device handle for meta answers ``torch.cpu``'s no-op streams with
        ``current_device() == "meta"`` (``_common_utils.py::_FSDPDeviceHandle``); the flat
        parameter's storage resizes (``torch.distributed.utils._alloc_storage`` / ``_free_storage``,
        ``_typed_storage()._resize_``) are told to the tracker; the unsharded flat parameters
        (``FlatParamHandle.init_flat_param_attributes`` / ``_all_gather_flat_param``) and the
        reduce-scatter (``_runtime_utils.py::_reduce_grad``) run inside tracker phases, and the
        sharded gradient it leaves is labelled."""
        import torch.distributed.fsdp._flat_param as fparam
        import torch.distributed.fsdp._runtime_utils as rt
        from torch.distributed.fsdp._common_utils import _FSDPDeviceHandle

        torch, tracker = self.torch, self.tracker
        saved: list[tuple[Any, str, Any]] = []

        def patch(obj, name, new):
            saved.append((obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)))
            setattr(obj, name, new)

        class _MetaBackend:
            def __getattr__(self, name):
                return getattr(torch.cpu, name)

            def current_device(self):
                return "meta"

        orig_from_device = _FSDPDeviceHandle.from_device.__func__

        def from_device(cls, device):
            return cls(device, backend=_MetaBackend()) if device.type == "meta" else orig_from_device(cls, device)

        patch(_FSDPDeviceHandle, "from_device", classmethod(from_device))

        def resized(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def run(tensor, *args):
                out = fn(tensor, *args)
                tracker._resync(tensor)
                return out
            return run

        for name in ("_alloc_storage", "_free_storage"):
            patch(fparam, name, resized(getattr(fparam, name)))

        cls = fparam.FlatParamHandle
        orig_shard = cls.shard

        @functools.wraps(orig_shard)
        def shard(handle):
            # FlatParamHandle.shard frees the unsharded flat parameter with
            # ``_typed_storage()._resize_(0)`` before ``set_`` to the shard: tell the tracker
            storage = handle.flat_param.untyped_storage()
            out = orig_shard(handle)
            if storage._cdata in tracker._live:
                tracker._resync_storage(storage)
            return out

        patch(cls, "shard", shard)
        patch(cls, "init_flat_param_attributes", _in_phase(tracker, cls.init_flat_param_attributes, "all_gather"))
        patch(cls, "_all_gather_flat_param", _in_phase(tracker, cls._all_gather_flat_param, "all_gather"))
        orig_reduce = rt._reduce_grad

        @functools.wraps(orig_reduce)
        def reduce_grad(state, handle):
            with tracker.phase("reduce_scatter"):
                out = orig_reduce(state, handle)
            fp = handle.flat_param
            for g in (getattr(fp, "_saved_grad_shard", None), fp.grad):
                if g is not None:
                    tracker.label(g, "lora_gradients")
            return out

        patch(rt, "_reduce_grad", reduce_grad)
        try:
            yield
        finally:
            for obj, name, old in reversed(saved):
                setattr(obj, name, old)

    def _to_meta(self, model) -> None:
        """Switch every FSDP state, param group and param from the "cpu" mesh's device to meta."""
        from torch.distributed.fsdp import FSDPModule

        meta = self.torch.device("meta")
        for mod in model.modules():
            if not isinstance(mod, FSDPModule):
                continue
            state = mod._get_fsdp_state()
            state._device = meta
            group = state._fsdp_param_group
            if group is None:
                continue
            group.device = meta
            group._all_gather_output = self.torch.empty(0, device=meta)
            group._validate_no_meta_params = lambda: None  # kept on meta on purpose
            for fp in group.fsdp_params:
                fp.device = meta
            self._fsdp_groups.append(group)

    def _offload_to_host(self, model) -> None:
        """CPUOffloadPolicy keeps the sharded parameters in pinned host memory
        (``_fsdp_param.py::_init_sharded_param``: ``.cpu()`` then ``pin_memory``); on meta they
        stay on meta, ignored by the tracker and counted in ``host_components``."""
        n = 0
        for group in self._fsdp_groups:
            for fp in group.fsdp_params:
                local = fp._sharded_param_data
                n += local.numel() * local.element_size()
                self.tracker.ignore(local)
        self.host_components["sharded_parameters"] = n

    @contextlib.contextmanager
    def _fsdp_patches(self):
        """Meta has no device module (``_get_device_handle``), storage resizes are told to the
        tracker, collectives run inside tracker phases; everything restored on exit."""
        import torch.distributed.fsdp._fully_shard._fsdp_collectives as coll
        import torch.distributed.fsdp._fully_shard._fsdp_init as init
        import torch.distributed.fsdp._fully_shard._fsdp_param as fparam
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as group
        import torch.distributed.fsdp._fully_shard._fsdp_state as state

        torch, tracker = self.torch, self.tracker
        saved: list[tuple[Any, str, Any]] = []

        def patch(mod, name, new):
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, new)

        orig_handle = coll._get_device_handle

        def device_handle(device_type: str = "cuda"):
            return torch.cpu if device_type == "meta" else orig_handle(device_type)

        for mod in (coll, group, state, init):
            patch(mod, "_get_device_handle", device_handle)

        def resized(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def run(tensor):
                fn(tensor)
                tracker._resync(tensor)
            return run

        for mod in (fparam, group):
            patch(mod, "alloc_storage", resized(fparam.alloc_storage))
        patch(fparam, "free_storage", resized(fparam.free_storage))

        patch(group, "foreach_all_gather", _in_phase(tracker, coll.foreach_all_gather, "all_gather"))
        patch(group, "foreach_all_gather_copy_out", _in_phase(tracker, coll.foreach_all_gather_copy_out, "all_gather"))
        patch(group, "foreach_reduce", _in_phase(tracker, coll.foreach_reduce, "reduce_scatter"))
        orig_post_backward = group.FSDPParamGroup.post_backward
        engine = self

        def post_backward(self_group, *unused):
            # the unsharded gradients autograd made, then the sharded ones reduce-scatter made
            for fp in self_group.fsdp_params:
                if hasattr(fp, "_unsharded_param") and fp.unsharded_param.grad is not None:
                    tracker.label(fp.unsharded_param.grad, "lora_gradients")
            out = orig_post_backward(self_group, *unused)
            for fp in self_group.fsdp_params:
                g = fp.sharded_param.grad
                if g is not None:
                    if engine.strategy == "fsdp-offload":
                        engine._host_grad(fp, g)
                    else:
                        tracker.label(g, "lora_gradients")
            return out

        patch(group.FSDPParamGroup, "post_backward", post_backward)
        try:
            yield
        finally:
            for mod, name, old in reversed(saved):
                setattr(mod, name, old)

    def _host_grad(self, fsdp_param, grad) -> None:
        """A sharded gradient under the offload policy: pinned host memory (``foreach_reduce``)."""
        local = _local(grad)
        self.tracker.ignore(local)
        self._host_grads[id(fsdp_param)] = local.numel() * local.element_size()
        self.host_components["sharded_gradients"] = sum(self._host_grads.values())

    def attach_optimizer(self, opt) -> None:
        """Under the offload policy the optimizer step runs on the host (its parameters and
        gradients are CPU tensors): nothing it allocates is device memory. The tracker is paused
        for the step; the state's bytes go to ``host_components["optimizer_state"]``."""
        if self.strategy != "fsdp-offload":
            return
        tracker = self.tracker
        engine = self

        def pre(opt, args, kwargs):
            tracker.paused_before_step = tracker.paused
            tracker.paused = True

        def post(opt, args, kwargs):
            n = 0
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, engine.torch.Tensor):
                        local = _local(v)
                        tracker.ignore(local)  # later in-place updates of host state stay uncounted
                        n += local.numel() * local.element_size()
            engine.host_components["optimizer_state"] = n
            tracker.paused = tracker.paused_before_step

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)

    # ------------------------------------------------------------------ results
    def categorize(self, tracker, vocab: int, base: Callable) -> dict[str, int]:
        """The ledger at the peak in ``PARALLEL_CATEGORIES`` (sums to the tracker's peak):
        ``base`` (run.py's ``_categorize``) for what is not the engine's, the engine phases'
        lines for what its collectives allocated."""
        comp = dict.fromkeys(PARALLEL_CATEGORIES, 0)
        for key, v in base(tracker, vocab).items():
            comp[key] = comp.get(key, 0) + v
        for r in tracker.records_live_at("peak"):
            line = _ENGINE_PHASES.get(r["phase"])
            if line is None or r["label"] in ("lora_weights", "lora_gradients", "optimizer_state"):
                continue
            moved_from = _base_line(r)
            comp[moved_from] -= r["bytes"]
            comp[line] += r["bytes"]
        return comp

    def construction_prefix(self) -> list[tuple]:
        """FSDP1's constructor's allocations on the default stream, as replay events labelled
        "setup", for a recipe whose model reaches ``FullyShardedDataParallel`` on the host or meta
        (RAM-efficient loading: ``sync_module_states``, ``device_id`` the GPU) -- what the meta
        wrap here (``device_id`` meta, ``param_init_fn`` a no-op) does not allocate: per unit,
        in the order auto-wrap builds them (children first, the root last), the tensors of its
        flat parameter as stored (``FlatParameter._numels`` x element size) replayed by
        ``stream_reserved.unit_construction_events``; each kept shard is freed at the end, so
        the traced shards that follow take their blocks back (same sizes, best fit). [] for
        every other engine or recipe (the built model as traced)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from ..estimate.stream_reserved import unit_construction_events

        if (self._wrapped is None or not self.strategy.startswith("fsdp") or fsdp_version(self.train) != 1
                or not resolve_recipe(self.train).ram_efficient_loading):
            return []
        order: list = []

        def visit(m):
            for c in m.children():
                visit(c)
            if isinstance(m, FSDP) and m._handle is not None:
                order.append(m._handle.flat_param)

        visit(self._wrapped)
        units = [tuple(n * fp.element_size() for n in fp._numels) for fp in order]
        world = self.world // max(int(self.train.nodes), 1) if self.train.fsdp_sharding == "hybrid" else self.world
        ev = unit_construction_events(units, world, sync=True, offload=self.strategy == "fsdp-offload")
        freed = {e[1] for e in ev if e[0] == "free"}
        kept = [("free", e[1]) for e in ev if e[0] == "alloc" and e[1] not in freed]
        return [e[:1] + (("construction",) + e[1],) + e[2:] + ("setup",) for e in list(ev) + kept]

    def summary(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "world_size": self.world, "rank": self.rank,
                "fsdp_version": fsdp_version(self.train) if self.strategy.startswith("fsdp") else None,
                "fsdp_sharding": self.train.fsdp_sharding if self.strategy.startswith("fsdp") else None,
                "units": list(self.units), "host_components": dict(self.host_components),
                "host_bytes": sum(self.host_components.values()), "streams": self.stream_names()}

    def stream_names(self) -> dict[int, str]:
        """``{stream id: name}`` of the side streams the trace saw allocations on (0 = default):
        the engine's attribute that holds the stream (FSDP1 ``_FSDPState._unshard_stream`` ...,
        FSDP2 ``FSDPCommContext.all_gather_copy_in_stream`` ...)."""
        attrs = ("_unshard_stream", "_post_backward_stream", "_pre_unshard_stream", "_all_reduce_stream",
                 "all_gather_copy_in_stream", "all_gather_stream", "reduce_scatter_stream", "all_reduce_stream")
        names = {0: "default"}
        holders = []
        for mod in (self._wrapped.modules() if self._wrapped is not None else ()):
            holders.append(mod)
            get_state = getattr(mod, "_get_fsdp_state", None)
            if get_state is not None:
                holders.append(getattr(get_state(), "_comm_ctx", None))
        for sid, obj in self.streams.objects.items():
            for h in holders:
                name = next((a.lstrip("_") for a in attrs if h is not None and h.__dict__.get(a) is obj), None)
                if name:
                    names[sid] = name
                    break
            else:
                names[sid] = f"stream{sid}"
        return names


class _StreamIds:
    """The id of the stream current now, for ``LiveTensorTracker.stream_fn``: 0 for the default
    stream, 1, 2, ... for the others in order of first use. On meta both FSDPs' device handles
    answer ``torch.cpu`` (FSDP1 through ``_MetaBackend``, FSDP2 through the patched
    ``_get_device_handle``), whose ``Stream()`` makes distinct objects and whose ``stream(s)``
    context sets what ``current_stream()`` returns (torch/cpu/__init__.py: ``StreamContext``), so
    the engine's own ``with device_handle.stream(...)`` blocks (FSDP1 ``_runtime_utils.py::
    _unshard`` on ``_unshard_stream``, ``_post_backward_hook`` on ``_post_backward_stream``; FSDP2
    ``_fsdp_collectives.py::foreach_all_gather`` on ``all_gather_copy_in_stream``, ``foreach_reduce``
    on ``reduce_scatter_stream``) say which stream each allocation is on, as on CUDA."""

    def __init__(self, torch):
        self._cpu = torch.cpu
        self._default = torch.cpu.current_stream()
        self._ids: dict[int, int] = {}
        self.objects: dict[int, Any] = {}  # id -> stream object (kept alive: ids are by identity)

    def __call__(self) -> int:
        s = self._cpu.current_stream()
        if s is self._default:
            return 0
        sid = self._ids.get(id(s))
        if sid is None:
            sid = self._ids[id(s)] = len(self._ids) + 1
            self.objects[sid] = s
        return sid


class _KeepBuckets:
    """The DDP Reducer with ``_rebuild_buckets`` answering False: the rebuild (second forward)
    broadcasts the bucket order from rank 0 and copies it back to the host (reducer.cpp::
    sync_bucket_indices), which meta cannot. The buckets built at construction are kept: the
    rebuilt ones hold the same gradients in gradient-ready order, so the same total bytes
    (every trainable gradient in exactly one bucket, the first capped at 1 MiB, the others at
    25 MiB); only the moment they are allocated differs (before the second forward, old and new
    buckets briefly together -- a setup moment, below the step's peak). Everything else goes
    to the real Reducer."""

    def __init__(self, reducer):
        object.__setattr__(self, "_reducer", reducer)

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


def _allreduce_in_place(state, bucket):
    """DDP's default reduction (reducer.cpp: ``_AllReduceBySumCommHook``, then the division by the
    world size, in place on the bucket buffer) written as a Python comm hook: the fake process
    group's work returns a future without a value, which the C++ default hook cannot take.
    Allocates nothing beyond the bucket itself, as the default does."""
    import torch
    import torch.distributed as dist

    buf = bucket.buffer()
    dist.all_reduce(buf)
    buf.div_(dist.get_world_size())
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def _base_line(r: dict) -> str:
    """The line run.py's ``_categorize`` gave a record of an engine phase (none of forward /
    backward / optimizer): its label when it has one (what was live when the model was built is
    labelled "weights", DDP's first buckets too), else "other"."""
    return r["label"] if r["label"] == "weights" else "other"


def _in_phase(tracker, fn: Callable, name: str) -> Callable:
    """``fn`` run inside the tracker phase ``name`` (marks the allocations an engine's collective makes)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with tracker.phase(name):
            return fn(*args, **kwargs)
    return run


def _local(t):
    """A DTensor's local shard (``_local_tensor``, no autograd view as ``to_local`` makes), else ``t``."""
    return getattr(t, "_local_tensor", t)


def _base_model(model):
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def engine_for(train, rank: int, tracker, torch) -> Engine | None:
    """The Engine of ``train.strategy`` for ``rank``, or None for ``single``."""
    return Engine(train, rank, tracker, torch) if is_parallel(train) else None


# ---------------------------------------------------------------------------- several ranks
def _reserved_by_stream(t: dict) -> dict:
    """A rank's replayed peak reserved (default allocator config) and its per-stream peaks
    ({stream name: bytes}, trace/run.py::replay_allocations with the engine's streams)."""
    rep = (t.get("allocator") or {}).get("default")
    if not rep:
        return {}
    names = (t.get("parallel") or {}).get("streams") or {0: "default"}
    name = lambda sid: names.get(sid, f"stream{sid}")  # noqa: E731
    return {"peak_reserved_bytes": int(t.get("peak_reserved_bytes") or 0),
            "peak_reserved_by_stream": {name(k): int(v) for k, v in rep.get("peak_reserved_by_stream", {}).items()},
            "peak_allocated_by_stream": {name(k): int(v) for k, v in rep.get("peak_allocated_by_stream", {}).items()}}


def traced_ranks(train) -> list[int]:
    """The ranks traced for ``train``: 0 and N-1 (see the module docstring: these engines give
    every rank the same storage sizes, and the two traces check it)."""
    n = int(train.num_gpus)
    return [0] if n < 2 else [0, n - 1]


def assemble_ranks(runs: dict[int, dict], train) -> tuple[dict, dict]:
    """(the worst traced rank's trace result, the multi-GPU summary) from ``{rank: trace_step
    result}``. The summary: ``per_gpu`` (rank -> components summing to its peak: the traced
    ranks, and every other rank with rank 0's ledger when all traced ranks agree to the byte,
    else only the traced ones), ``ranks`` ({rank: peak_allocated_bytes, components,
    peak_moment} of the traced ranks), ``traced_ranks``, ``worst_rank``, ``host_components`` /
    ``host_bytes`` (per node: a traced rank's offloaded state x ranks per node, the largest
    rank's), the engine's ``units``, and ``notes``."""
    n, nodes = int(train.num_gpus), max(1, int(getattr(train, "nodes", 1) or 1))
    ranks = {r: {"peak_allocated_bytes": int(t["peak_allocated_bytes"]),
                 "components": {k: int(v) for k, v in t["components"].items()},
                 "peak_moment": str(t.get("peak_phase", "")),
                 **_reserved_by_stream(t)} for r, t in runs.items()}
    worst = max(ranks, key=lambda r: (ranks[r]["peak_allocated_bytes"], -r))
    agree = len({tuple(sorted(v["components"].items())) for v in ranks.values()}) == 1
    notes = []
    if agree:
        per_gpu = {r: dict(ranks[min(ranks)]["components"]) for r in range(n)}
        if n > len(ranks):
            notes.append(f"trace: ranks {', '.join(map(str, sorted(ranks)))} traced and equal to the byte; "
                         f"the other ranks of {train.strategy} allocate the same (equal padded shards / replicas)")
    else:
        per_gpu = {r: dict(v["components"]) for r, v in sorted(ranks.items())}
        notes.append(f"trace: the traced ranks differ; memory.per_gpu holds ranks "
                     f"{', '.join(map(str, sorted(ranks)))} only")
    host_rank = {}
    for t in runs.values():
        for k, v in (t.get("parallel") or {}).get("host_components", {}).items():
            host_rank[k] = max(host_rank.get(k, 0), int(v))
    per_node = -(-n // nodes)
    host = {k: v * per_node for k, v in host_rank.items()}
    summary = {"strategy": train.strategy, "world_size": n, "nodes": nodes, "traced_ranks": sorted(ranks),
               "worst_rank": worst, "ranks": ranks, "per_gpu": per_gpu, "host_components": host,
               "host_bytes": sum(host.values()), "ranks_per_node": per_node,
               "units": (runs[worst].get("parallel") or {}).get("units", []), "notes": notes}
    return runs[worst], summary
