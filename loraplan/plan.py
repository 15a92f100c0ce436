"""Plan a whole fine-tuning job across GPUs: what fits, largest batch / sequence, time and cost.

Library code: returns plain data (dataclasses with ``to_dict``), never prints. For each GPU:

- the estimate at the requested micro-batch (fits, headroom);
- the largest micro-batch that fits at this sequence length and the largest sequence length that
  fits at this micro-batch (binary search over the memory estimate, which grows with both),
  capped at the model's max_position_embeddings (``seq_limit`` says when RoPE scaling would be
  needed for more);
- step time, tokens/s and, for a job with a size, total hours and dollars;
- the fit verdict against the model's uncertainty (``Estimate.verdict``);
- when nothing fits: the single changes that would help (gradient checkpointing, 4-bit base,
  8-bit / paged optimizer, micro-batch 1 + gradient accumulation, shorter sequence, and the
  recipe changes the trainer has: ``trainers.recipe_levers``), each re-estimated, with its
  memory saving and whether it alone makes the run fit; a change that saves nothing is not listed.

Several GPUs (issue 13): every row is a configuration, N GPUs of one type with a strategy
(``Layout``). ``plan_job(layouts=...)`` takes them; ``search_layouts`` lists 1, 2, 4 and 8 GPUs of
each type with the strategies that apply (``SEARCH_STRATEGIES``), or only the ``--strategy`` /
``--num-gpus`` the user fixed. Each configuration is estimated as a whole (per-rank memory, the
step with its communication: ``estimate.comm``); the rows are ranked by fit, then dollars (price
× N GPUs), then time. A layout the engines cannot run on the GPU's platform (``comm.check_layout``)
is not offered; FSDP with a 4-bit base gets ``--quant-storage`` (the mixed-precision dtype, else
bf16), which FSDP-QLoRA needs.

Job size (optional; without it no hours or dollars): ``tokens`` (packed: every row holds ``seq``
tokens) or ``examples`` (one example per row, padded to ``seq``), times ``epochs``. With an effective batch E, the micro-batch is the
largest that fits (at most E) and gradient accumulation makes up the rest: ceil(E / micro);
without one, the accumulation is ``train.gradient_accumulation``. Either way every estimate is
of the recipe with that accumulation (the training-stack fields of ``train`` pass through). With N
data-parallel ranks an optimizer step takes micro × accumulation × N sequences; the job's hours
are its optimizer steps × the step time (which covers the accumulation's micro-steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Iterable

from .errors import InputError, LoraplanError, UnknownNameError, suggest
from .spec import MAX_OPTION, PARALLEL_FIELDS, Calibration, GpuSpec, LoraSpec, ModelSpec, TrainSpec

#: upper bounds of the binary searches (a search stops at the first size that does not fit)
MAX_SEARCH_BATCH = 4096
MAX_SEARCH_SEQ = 1 << 20
#: the memory-only sequence search goes to this many times max_position_embeddings (what RoPE
#: scaling factors commonly reach), so a plan can say how far scaling would get within memory
MAX_SEQ_OVER_POSITIONS = 4

EstimateFn = Callable[..., object]  # estimate(model, lora, train, gpu, calibration) -> Estimate

#: job sizes beyond these are typos, not jobs: 10^15 tokens (or examples) per epoch is ~30 x the
#: largest pretraining corpora (Qwen3: 36T tokens), 10^4 passes over the data; an effective batch
#: is at most spec.MAX_OPTION's accumulation bound (2^16 sequences), so that the accumulation it
#: implies at micro-batch 1 is one a TrainSpec takes
MAX_JOB_TOKENS = 10**15
MAX_EPOCHS = 10_000

#: GPU counts a plan searches when --num-gpus is not given
SEARCH_GPU_COUNTS = (1, 2, 4, 8)
#: strategies a plan searches on several GPUs when --strategy is not given: DDP (replicas: the
#: fastest when one GPU holds the run), FSDP and ZeRO-3 (sharded: fit larger runs), device_map
#: (layers split, one GPU at a time). ZeRO-1/2 shard only gradients and optimizer state, which are
#: LoRA-sized: for memory and time they are DDP; offloading variants trade time for memory and are
#: planned when asked for (--strategy fsdp-offload / zero3-offload)
SEARCH_STRATEGIES = ("ddp", "fsdp", "zero3", "device-map")


@dataclass(frozen=True)
class Layout:
    """N GPUs of one type running ``strategy`` (``TrainSpec.strategy``/``num_gpus``)."""

    strategy: str = "single"
    num_gpus: int = 1


def search_layouts(train: TrainSpec, strategy_given: bool, num_gpus_given: bool) -> list[Layout]:
    """The configurations a plan compares: ``train``'s own strategy / GPU count where the user gave
    them, else every GPU count of SEARCH_GPU_COUNTS and strategy of SEARCH_STRATEGIES (one GPU:
    single)."""
    counts = (train.num_gpus,) if num_gpus_given else SEARCH_GPU_COUNTS
    strategies = (train.strategy,) if strategy_given else ("single",) + SEARCH_STRATEGIES
    out = []
    for n in counts:
        for s in strategies:
            if (n == 1) == (s == "single"):  # a multi-GPU engine on one GPU is refused (check_parallel)
                out.append(Layout(s, n))
    return out or [Layout(train.strategy, train.num_gpus)]


@dataclass(frozen=True)
class Job:
    """How much training: tokens (packed) or examples (padded rows), times epochs."""

    tokens: int | None = None
    examples: int | None = None
    tokens_per_example: int | None = None
    epochs: float = 1.0
    effective_batch: int | None = None  # sequences per optimizer step (micro-batch x accumulation)

    @property
    def sized(self) -> bool:
        """True when the job has a size (tokens or examples): hours and dollars can be computed."""
        return self.tokens is not None or self.examples is not None

    def validate(self) -> None:
        """One-line errors naming the bad value and the fix. No size is valid: the plan then
        answers fit / largest batch / largest sequence only."""
        from .inputs import finite, positive_int

        if self.tokens is not None and self.examples is not None:
            raise InputError("give either --tokens or --examples, not both")
        if self.tokens is not None:
            positive_int(self.tokens, "--tokens", "give the training tokens per epoch, e.g. --tokens 5e7", MAX_JOB_TOKENS)
        if self.examples is not None:
            positive_int(self.examples, "--examples", "give the number of examples per epoch, e.g. --examples 50000",
                         MAX_JOB_TOKENS)
        if self.tokens_per_example is not None:
            positive_int(self.tokens_per_example, "--tokens-per-example", "give typical tokens per example, e.g. 512")
        if self.tokens_per_example is not None and self.examples is None:
            raise InputError("--tokens-per-example needs --examples N (the number of examples)")
        fix = "give a positive number of passes over the data, e.g. --epochs 1"
        if not 0 < finite(self.epochs, "--epochs", fix) <= MAX_EPOCHS:
            raise InputError(f"--epochs {self.epochs!r} is not a number of passes from 0 to {MAX_EPOCHS:,}; {fix}")
        if self.effective_batch is not None:
            positive_int(self.effective_batch, "--effective-batch",
                         "give the sequences per optimizer step, e.g. --effective-batch 16, or leave it out",
                         MAX_OPTION["gradient_accumulation"])

    def rows(self, seq: int, padding: str = "max-length") -> float | None:
        """Rows of ``seq`` tokens the whole job trains (None without a size). ``--tokens``: packed,
        tokens / seq. ``--examples``: one row per example, padded or truncated to ``seq``
        (max-length / longest padding), unless the rows are packed ("packing", "padding-free": TRL's
        SFTConfig(packing=True / padding_free=True) concatenates examples), where examples x
        tokens per example fill tokens / seq rows."""
        if not self.sized:
            return None
        if self.examples is None:
            return self.tokens * self.epochs / seq
        if self.tokens_per_example is not None and padding in PACKED:
            return self.examples * self.tokens_per_example * self.epochs / seq
        return self.examples * self.epochs

    def micro_steps(self, micro_batch: int, seq: int, padding: str = "max-length") -> int | None:
        """Forward/backward passes of ``micro_batch`` rows of ``seq`` tokens over the whole job
        (None for a job without a size); rows as ``rows``."""
        rows = self.rows(seq, padding)
        return None if rows is None else max(1, math.ceil(rows / micro_batch))

    def assumption(self, seq: int, padding: str = "max-length") -> str | None:
        """One line on how ``--tokens-per-example`` and ``--seq`` combine when they differ (None
        when they agree or one is missing): what each example becomes and what that costs."""
        tpe, n = self.tokens_per_example, self.examples
        if tpe is None or n is None or tpe == seq:
            return None
        if padding in PACKED:
            rows = self.rows(seq, padding) / self.epochs
            return (f"{n:,} examples x {tpe:,} tokens packed ({padding}) into {math.ceil(rows):,} rows of "
                    f"--seq {seq:,} per epoch")
        if tpe > seq:
            return (f"each of the {n:,} examples is one row truncated to --seq {seq:,}: {tpe - seq:,} of its "
                    f"{tpe:,} tokens ({(tpe - seq) / tpe:.0%}) are not trained; give --seq {tpe} to train "
                    f"them, or --padding packing")
        if padding == "longest":
            return (f"each of the {n:,} examples is one row, padded to the longest row of its micro-batch "
                    f"(at most --seq {seq:,})")
        return (f"each of the {n:,} examples is one row padded to --seq {seq:,}: {(seq - tpe) / seq:.0%} of "
                f"every row is padding; give --seq {tpe}, or --padding packing")


#: hours or dollars within this fraction of the best tie for fastest / cheapest: the printed
#: precision (3 significant digits); e.g. host-bound steps take the same time on every GPU
TIE_REL = 1e-3

#: paddings that concatenate examples into full rows (spec.Padding): a job of examples counts tokens
PACKED = ("packing", "padding-free")


@dataclass(frozen=True)
class Suggestion:
    """One change that lowers peak memory when a setup does not fit."""

    change: str             # human description, e.g. "4-bit base (nf4)"
    option: str             # the CLI option that makes it, e.g. "--quant nf4"
    device_total_bytes: int
    saving_bytes: int
    fits: bool
    verdict: str | None = None  # Estimate.verdict of the changed setup ("fits, within the uncertainty": in band)


@dataclass
class GpuPlan:
    gpu: str
    name: str
    memory_bytes: int
    fits: bool
    device_total_bytes: int
    headroom_bytes: int
    micro_batch: int
    grad_accum: int
    seq: int
    max_micro_batch: int      # largest micro-batch that fits at this seq (0: none)
    max_seq: int              # largest seq that fits at this micro-batch, within the model's positions (0: none)
    step_s: float | None
    tokens_per_s: float | None
    bound: str
    micro_steps: int | None   # None: no job size given
    total_hours: float | None
    price_usd_per_hour: float | None
    total_usd: float | None
    cheapest: bool = False    # the least total $ (every row within TIE_REL of it: a tie)
    fastest: bool = False     # the fewest hours (every row within TIE_REL of it: a tie)
    suggestions: list[Suggestion] = field(default_factory=list)
    verdict: str | None = None          # Estimate.verdict: the headroom against the model's uncertainty
    margin_bytes: int | None = None     # headroom beyond the uncertainty band
    max_positions: int | None = None    # the model's max_position_embeddings (None: no limit known)
    max_seq_memory: int = 0             # largest seq memory allows (searched to MAX_SEQ_OVER_POSITIONS x positions)
    seq_limit: str = ""                 # what caps max_seq when not memory: how to go further
    #: the largest micro-batch / seq that fit with the whole uncertainty band to spare (verdict
    #: "fits"); max_micro_batch / max_seq may sit inside the band
    max_micro_batch_clear: int = 0
    max_seq_clear: int = 0
    #: the configuration: N GPUs of this type, the strategy, the nodes they sit in, and the options
    #: that select it (with what the layout needs, e.g. --quant-storage bf16 for FSDP-QLoRA)
    num_gpus: int = 1
    strategy: str = "single"
    nodes: int = 1
    layout_options: str = ""
    #: dollars per million trained tokens (price x N GPUs / tokens per second); None without a price
    usd_per_mtok: float | None = None
    #: (fastest, slowest) seconds per step over the host speeds seen (TimeEstimate.step_s_host_range):
    #: set when the user's host is unknown and the step depends on it
    step_s_host_range: tuple[float, float] | None = None
    #: bf16 compute emulated on a GPU without bf16 tensor cores (T4, V100): the step with fp16
    #: instead and the option that gives it (TimeEstimate.step_s_fp16 / fp16_option); else None, ""
    step_s_fp16: float | None = None
    fp16_option: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["suggestions"] = [asdict(s) for s in self.suggestions]
        return d


@dataclass
class Plan:
    inputs: dict
    job: Job
    gpus: list[GpuPlan]
    #: what the estimate says about the setup on every GPU (e.g. experts that bitsandbytes leaves
    #: unquantized): the notes common to all GPUs' estimates
    notes: tuple[str, ...] = ()
    #: (GPU id, why): GPUs that cannot run the recipe at all (bf16 below sm80, FA2 below sm80)
    skipped: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "job": asdict(self.job), "gpus": [g.to_dict() for g in self.gpus],
                "notes": list(self.notes), "skipped": [{"gpu": g, "reason": r} for g, r in self.skipped]}


def parse_prices(items: Iterable[str], known_ids: Iterable[str]) -> dict[str, float]:
    """['h100-sxm-80gb=2.5', ...] -> {id: usd_per_hour}; one-line errors for bad entries."""
    known = list(known_ids)
    out: dict[str, float] = {}
    for item in items or ():
        if "=" not in item:
            raise InputError(f"--price '{item}' must look like GPU_ID=USD_PER_HOUR, e.g. h100-sxm-80gb=2.49")
        gid, _, val = item.partition("=")
        gid = gid.strip().lower()
        if gid not in known:
            raise UnknownNameError(f"--price names unknown GPU '{gid}'{suggest(gid, known)} (see 'loraplan gpus')")
        try:
            usd = float(val)
        except ValueError:
            raise InputError(f"--price {gid}='{val}' is not a number; give US dollars per hour, e.g. {gid}=2.49") from None
        if not math.isfinite(usd) or usd < 0:
            raise InputError(f"--price {gid}={val} is not a non-negative finite number of US dollars per hour; "
                             f"give one like {gid}=2.49")
        out[gid] = usd
    return out


def _default_estimate() -> EstimateFn:
    from .estimate.api import estimate

    return estimate


class _Evaluator:
    """Memoized memory estimates for one (model, lora, gpu, calibration)."""

    def __init__(self, estimate_fn: EstimateFn, model: ModelSpec, lora: LoraSpec, gpu: GpuSpec, cal: Calibration):
        self.fn, self.model, self.lora, self.gpu, self.cal = estimate_fn, model, lora, gpu, cal
        self.cache: dict[TrainSpec, object] = {}

    def __call__(self, train: TrainSpec, with_time: bool = False):
        key = (train, with_time)
        if key not in self.cache:
            self.cache[key] = self.fn(self.model, self.lora, train, self.gpu, self.cal, with_time=with_time)
        return self.cache[key]

    def total(self, train: TrainSpec) -> int:
        return int(self(train).memory.device_total_bytes)

    def fits(self, train: TrainSpec) -> bool:
        """The fit predicate of every search: the estimate's verdict (``Estimate.verdict``: device
        total with the caching allocator's peak reserved, the CUDA context, paged optimizer state
        that the driver may evict) is not "does not fit"; an estimate without a verdict: device
        total <= the card. A size the setup cannot run at all (an explicit --attention flash once a
        sliding window is reached: ``activations.check_attention_kernel``) does not fit."""
        try:
            est = self(train)
        except InputError:
            return False
        verdict = getattr(est, "verdict", None)
        if verdict is not None:
            return verdict != "does not fit"
        return self.total(train) <= self.gpu.memory_bytes

    def verdict(self, train: TrainSpec) -> str | None:
        """The estimate's verdict (``Estimate.verdict``); "does not fit" for a size the setup cannot run."""
        try:
            return getattr(self(train), "verdict", None)
        except InputError:
            return "does not fit"

    def clear(self, train: TrainSpec) -> bool:
        """Fits with the whole uncertainty band to spare (Estimate.verdict "fits")."""
        if not self.fits(train):
            return False
        band = getattr(self(train), "uncertainty_bytes", None) or 0
        return self.total(train) + band <= self.gpu.memory_bytes


def _largest(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with fits(n), assuming fits is monotone (True then False); 0 if none."""
    if not fits(lo):
        return 0
    # gallop up to bracket the boundary, then bisect
    n = lo
    while n < hi:
        nxt = min(hi, n * 2)
        if not fits(nxt):
            hi = nxt - 1
            break
        n = nxt
    else:
        return n
    good, bad = n, hi + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


#: the recipe fields a suggestion may change (``trainers.recipe_levers``)
_LEVER_FIELDS = ("gradient_accumulation", "loss", "mixed_precision", "prepare_kbit", "checkpoint_offload",
                 "attn_implementation", "attention")


def _suggestions(ev: _Evaluator, train: TrainSpec, max_seq: int, clear_seq: int = 0) -> list[Suggestion]:
    """Changes that lower the device total of a setup that does not fit, each with the changed
    setup's verdict; the shorter sequence is the longest that keeps the uncertainty band
    (``clear_seq``), else the longest that fits inside it (``max_seq``)."""
    base = ev.total(train)
    cands: list[tuple[str, str, TrainSpec]] = []
    if not train.gradient_checkpointing:
        cands.append(("gradient checkpointing", "--gradient-checkpointing", replace(train, gradient_checkpointing=True)))
    if train.quant not in ("nf4", "fp4"):
        cands.append(("4-bit base (nf4 + double quant)", "--quant nf4 --double-quant",
                      replace(train, quant="nf4", double_quant=True, int8_outlier_fraction=None)))
    if train.optimizer in ("adamw", "paged_adamw_32bit"):
        cands.append(("paged 8-bit AdamW", "--optimizer paged_adamw_8bit", replace(train, optimizer="paged_adamw_8bit")))
    if train.batch > 1:
        ga = train.gradient_accumulation * train.batch  # the same sequences per optimizer step
        cands.append((f"micro-batch 1 + gradient accumulation x{ga}",
                      f"--batch 1 --gradient-accumulation {ga} (or --effective-batch {ga})",
                      replace(train, batch=1, gradient_accumulation=ga)))
    short = clear_seq if 0 < clear_seq < train.seq else max_seq
    if 0 < short < train.seq:
        cands.append((f"shorter sequences ({short} tokens)", f"--seq {short}", replace(train, seq=short)))
    elif max_seq == 0 and train.seq > 128:
        cands.append(("shorter sequences (128 tokens)", "--seq 128", replace(train, seq=128)))
    from .trainers import recipe_levers

    cands += recipe_levers(train)  # kept only where the estimator says they save memory (total < base)
    out = []
    combined, combined_total, options = train, base, []
    for change, option, t in cands:
        try:
            total = ev.total(t)
        except LoraplanError:  # a change this setup cannot take (e.g. a kernel the GPU lacks): not offered
            continue
        if total < base:  # a 4-bit base alone can cost more (fp32 stream) without checkpointing
            out.append(Suggestion(change, option, total, base - total, ev.fits(t), ev.verdict(t)))
        if not change.startswith("shorter"):
            # greedy combination: apply this change on top of the ones kept so far
            trial = replace(combined, **{f: getattr(t, f) for f in
                                         ("gradient_checkpointing", "quant", "double_quant", "optimizer", "batch",
                                          "int8_outlier_fraction", *_LEVER_FIELDS) if getattr(t, f) != getattr(train, f)})
            try:
                trial_total = ev.total(trial)
            except LoraplanError:  # the combination is refused (e.g. fp16 autocast with fp16 adapters)
                continue
            if trial_total < combined_total:
                combined, combined_total = trial, trial_total
                options.append(option.split(" (")[0])
    out.sort(key=lambda s: -s.saving_bytes)
    if len(options) > 1 and not any(s.fits for s in out):
        total = ev.total(combined)
        fits = ev.fits(combined)
        change = "these changes together"
        if not fits:
            ms = _largest(lambda n: ev.fits(replace(combined, seq=n)), 1, train.seq)
            ms = (_largest(lambda n: ev.clear(replace(combined, seq=n)), 1, ms) if ms else 0) or ms
            if ms:
                options.append(f"--seq {ms}")
                change = f"these changes together, with sequences of {ms} tokens"
                combined = replace(combined, seq=ms)
                total, fits = ev.total(combined), True
        out.append(Suggestion(change, " ".join(options), total, base - total, fits, ev.verdict(combined)))
    return out


def _position_cap(model: ModelSpec, max_mem: int) -> tuple[int, str]:
    """(largest usable sequence, what caps it beyond memory): a sequence longer than
    max_position_embeddings needs RoPE scaling (rope models) or is not possible (learned
    positions); the plan says so instead of capping silently."""
    pos = model.max_positions
    if not pos or max_mem <= pos:
        return max_mem, ""
    if model.arch.position == "rope":
        more = f"{max_mem:,}" if max_mem < pos * MAX_SEQ_OVER_POSITIONS else f">= {max_mem:,}"
        return pos, (f"memory allows {more} tokens; beyond max_position_embeddings {pos:,} needs RoPE scaling "
                     f"(rope_scaling in config.json)")
    return pos, f"memory allows more, but {model.model_type} has {model.arch.position} positions up to {pos:,}"


#: TrainSpec's multi-GPU fields at their one-GPU defaults
ONE_GPU = {f.name: f.default for f in fields(TrainSpec) if f.name in PARALLEL_FIELDS}


def layout_case(train: TrainSpec, layout: Layout) -> tuple[TrainSpec, str]:
    """``train`` on ``layout`` (on ``train.nodes`` machines; a 4-bit base under FSDP gets a float
    ``quant_storage``, the mixed-precision dtype or bf16) and the options that select it. Raises
    the InputError ``estimate`` raises where no GPU can run it (``trainers.check_recipe``: e.g.
    int8 sharded by FSDP, an FSDP1 option under FSDP2, flash_attention_2 on fp32)."""
    from .storage import Dtypes
    from .trainers import BASE_SHARDING, FSDP_STRATEGIES, check_recipe, default_of

    t = replace(train, strategy=layout.strategy, num_gpus=layout.num_gpus)
    opts = [f"--strategy {layout.strategy}", f"--num-gpus {layout.num_gpus}"] if layout.num_gpus > 1 or \
        layout.strategy != "single" else []
    if train.nodes > 1:
        opts.append(f"--nodes {train.nodes}")
    if layout.strategy in BASE_SHARDING and train.quant in ("nf4", "fp4"):
        if train.quant_storage is None:  # FSDP / ZeRO-3 cannot shard the packed uint8 weights
            t = replace(t, quant_storage=train.load_dtype or "bf16")  # the dtype the shards hold (check_parallel)
            opts.append(f"--quant-storage {t.quant_storage}")
        version = t.fsdp_version or default_of(t.trainer, "fsdp_version", True, t.stack)
        if layout.strategy in FSDP_STRATEGIES and version == 1 and train.prepare_kbit is None and \
                Dtypes.of(replace(train, **ONE_GPU)).prepare_kbit:  # the one-GPU recipe's (t's would refuse it)
            t = replace(t, prepare_kbit=False)  # FSDP1 flattens norms and packed weights into one dtype
            opts.append("--no-prepare-kbit")
    check_recipe(t)  # the engines' own refusals (trainers.check_parallel), one line each
    return t, " ".join(opts)


def plan_job(model: ModelSpec, lora: LoraSpec, train: TrainSpec, gpus: list[GpuSpec], job: Job, *,
             prices: dict[str, float] | None = None, calibrations: dict[str, Calibration] | None = None,
             fixed_batch: bool = True, estimate_fn: EstimateFn | None = None,
             layouts: Iterable[Layout] | None = None) -> Plan:
    """Plan ``job`` on every GPU in ``gpus``, for each of ``layouts`` (N GPUs with a strategy;
    default: ``train``'s own, one row per GPU in the order given). Several layouts: the rows are
    ranked by fit, then dollars (total, else per million tokens), then hours; a GPU type that fits
    on one GPU is not searched at more (every layout is evaluated when none is one GPU).

    ``fixed_batch``: keep ``train.batch`` as the micro-batch; otherwise (with
    ``job.effective_batch``) use the largest micro-batch that fits, up to the effective batch.
    """
    from .catalog import load_calibration
    from .estimate.comm import DATA_PARALLEL, check_layout
    from .estimate.time import estimate_step_time
    from .spec import run_inputs
    from .trainers import gpu_refusal

    job.validate()
    estimate_fn = estimate_fn or _default_estimate()
    prices = prices or {}
    calibrations = calibrations or {}
    if job.effective_batch is not None and fixed_batch and job.effective_batch % train.batch:
        raise InputError(f"--effective-batch {job.effective_batch} is not a multiple of --batch {train.batch}; "
                         f"give one or the other, or make them divisible")
    if job.effective_batch is not None and train.gradient_accumulation != 1:
        raise InputError(f"--gradient-accumulation {train.gradient_accumulation} with --effective-batch "
                         f"{job.effective_batch}: the plan derives the accumulation from the effective batch; "
                         f"give one of them")
    rows: list[GpuPlan] = []
    notes: list[tuple[str, ...]] = []
    skipped: list[tuple[str, str]] = []
    layouts = list(layouts) if layouts is not None else [Layout(train.strategy, train.num_gpus)]
    searching = len(layouts) > 1
    base_train = train
    # what no GPU can run (int8 sharded, an FSDP1 option under FSDP2, ...) is refused once, before
    # the GPUs: a layout that does not apply is not offered, and when none applies the input is
    # wrong on every GPU: the one-line error estimate gives (exit 2), not a table of refusals
    cases: dict[Layout, tuple[TrainSpec, str]] = {}
    refusals: list[str] = []
    for layout in layouts:
        try:
            cases[layout] = layout_case(base_train, layout)
        except InputError as e:
            refusals.append(str(e))
    if not cases:
        raise InputError(refusals[0])
    one_fits: set[str] = set()  # GPU types a search found to fit on one GPU
    gpu_why: dict[str, str] = {}  # a GPU's first refusal (its platform, its kernels)
    planned: set[str] = set()  # GPU types with a row
    for gpu, layout in ((g, lay) for g in gpus for lay in layouts if lay in cases):
        if searching and layout.num_gpus > 1 and gpu.id in one_fits:
            continue  # one GPU already fits: more of them are not searched (give --num-gpus to compare)
        train, layout_opts = cases[layout]
        try:
            check_layout(train, gpu)  # the GPU's platform: GPUs per node
            why = gpu_refusal(train, gpu, model)  # the GPU cannot run the recipe at all
        except InputError as e:
            why = str(e)
        if why is not None:
            gpu_why.setdefault(gpu.id, why)
            if searching:  # a layout this GPU cannot take (too many GPUs per node): not offered
                continue
            if len(gpus) == 1:  # one GPU asked for: the one-line error; among several: listed as skipped
                raise InputError(why)
            if gpu.id not in {g for g, _ in skipped}:
                skipped.append((gpu.id, why))
            continue
        planned.add(gpu.id)
        cal = calibrations.get(gpu.id) or load_calibration(gpu.id)
        ev = _Evaluator(estimate_fn, model, lora, gpu, cal)
        seq = train.seq
        max_b = _largest(lambda b: ev.fits(replace(train, batch=b)), 1, MAX_SEARCH_BATCH)
        micro = train.batch
        if not fixed_batch and job.effective_batch is not None:
            micro = max(1, min(max_b, job.effective_batch)) if max_b else train.batch
        # the accumulation the job runs with (--effective-batch / (micro x data-parallel ranks), else
        # --gradient-accumulation)
        dp = train.num_gpus if train.strategy in DATA_PARALLEL else 1
        accum = (max(1, math.ceil(job.effective_batch / (micro * dp))) if job.effective_batch
                 else train.gradient_accumulation)
        t = replace(train, batch=micro, gradient_accumulation=accum)
        # without a position limit (T5's relative positions) memory alone decides, up to MAX_SEARCH_SEQ
        seq_hi = MAX_SEARCH_SEQ if not model.max_positions else min(
            MAX_SEARCH_SEQ, max(seq, model.max_positions * MAX_SEQ_OVER_POSITIONS))
        max_mem = _largest(lambda s: ev.fits(replace(t, seq=s)), 1, seq_hi)
        max_s, seq_limit = _position_cap(model, max_mem)
        clear_b = _largest(lambda b: ev.clear(replace(train, batch=b)), 1, max_b) if max_b else 0
        clear_s = _largest(lambda s: ev.clear(replace(t, seq=s)), 1, max_s) if max_s else 0
        est = ev(t, with_time=True)
        notes.append(tuple(getattr(est.memory, "notes", ())))
        total = int(est.memory.device_total_bytes)
        fits = ev.fits(t)
        te = getattr(est, "time", None) or estimate_step_time(model, lora, t, gpu, cal)
        steps = job.micro_steps(micro * dp, seq, train.padding)  # micro-steps of each rank
        # te.step_s is one optimizer step: ``accum`` micro-steps (estimate/time.py step_work)
        hours = math.ceil(steps / accum) * te.step_s / 3600.0 if steps is not None else None
        price = prices.get(gpu.id, gpu.price_usd_per_hour)
        n_gpus = train.num_gpus
        rows.append(GpuPlan(
            gpu=gpu.id, name=gpu.name, memory_bytes=gpu.memory_bytes, fits=fits, device_total_bytes=total,
            headroom_bytes=gpu.memory_bytes - total, micro_batch=micro, grad_accum=accum, seq=seq,
            max_micro_batch=max_b, max_seq=max_s, step_s=te.step_s, tokens_per_s=te.tokens_per_s,
            bound=te.bound, micro_steps=steps, total_hours=hours, price_usd_per_hour=price,
            total_usd=hours * price * n_gpus if price is not None and hours is not None else None,
            suggestions=[] if fits else _suggestions(ev, t, max_s, clear_s),
            verdict=getattr(est, "verdict", None), margin_bytes=getattr(est, "margin_bytes", None),
            max_positions=model.max_positions, max_seq_memory=max_mem, seq_limit=seq_limit,
            max_micro_batch_clear=clear_b, max_seq_clear=clear_s,
            num_gpus=n_gpus, strategy=train.strategy, nodes=train.nodes, layout_options=layout_opts,
            usd_per_mtok=(price * n_gpus / (te.tokens_per_s * 3600) * 1e6
                          if price is not None and te.tokens_per_s else None),
            step_s_host_range=getattr(te, "step_s_host_range", None),
            step_s_fp16=getattr(te, "step_s_fp16", None), fp16_option=getattr(te, "fp16_option", ""),
        ))
        if fits and n_gpus == 1:
            one_fits.add(gpu.id)
    if searching:  # a GPU type none of whose layouts it can take: listed with its first refusal
        for gpu in gpus:
            if gpu.id not in planned and gpu.id in gpu_why:
                if len(gpus) == 1:
                    raise InputError(gpu_why[gpu.id])
                skipped.append((gpu.id, gpu_why[gpu.id]))
        rows.sort(key=_rank_key)
    whys = {why for _, why in skipped}
    if not rows and len(whys) == 1 and len({g for g, _ in skipped}) == len({g.id for g in gpus}):
        # every GPU refuses the case for the same reason (an --attention kernel this model cannot
        # take on any of them): the input is wrong, one line (exit 2), not an empty table
        raise InputError(whys.pop())
    fit_rows = [r for r in rows if r.fits and r.total_hours is not None]
    if fit_rows:  # every row that ties with the best is marked (host-bound steps tie across GPUs)
        best = min(r.total_hours for r in fit_rows)
        for r in fit_rows:
            r.fastest = math.isclose(r.total_hours, best, rel_tol=TIE_REL)
        priced = [r for r in fit_rows if r.total_usd is not None]
        if priced:
            low = min(r.total_usd for r in priced)
            for r in priced:
                r.cheapest = math.isclose(r.total_usd, low, rel_tol=TIE_REL)
    # the inputs: one layout -> that layout's case; a search -> the one-GPU case the layouts vary
    inputs = run_inputs(model, lora, train if rows and not searching else replace(base_train, **ONE_GPU))
    common = tuple(n for n in (notes[0] if notes else ()) if all(n in ns for ns in notes))
    said = job.assumption(base_train.seq, base_train.padding)  # how --tokens-per-example met --seq
    common = ((said,) if said else ()) + common
    return Plan(inputs=inputs, job=job, gpus=rows, notes=common, skipped=tuple(skipped))


def _rank_key(r: GpuPlan) -> tuple:
    """Fits first (best verdict first), then dollars (the job's, else per million tokens), hours,
    fewer GPUs."""
    from .estimate.result import VERDICTS

    inf = math.inf
    verdict = VERDICTS.index(r.verdict) if r.verdict in VERDICTS else (0 if r.fits else len(VERDICTS))
    usd = r.total_usd if r.total_usd is not None else (r.usd_per_mtok if r.usd_per_mtok is not None else inf)
    return (not r.fits, verdict, usd, r.total_hours if r.total_hours is not None else inf, r.num_gpus)
