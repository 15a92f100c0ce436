"""Sequence handling: what the model is handed for a batch (rows × row length, mask, position ids)
under ``TrainSpec.padding`` / ``lengths``, and the attention implementation's rules for it.

Pure Python (no torch); the analytic ledger, the meta-device trace and the time model all read
``batch_layout`` so the three views agree on the batch.

Padding modes (b = ``train.batch``, s = ``train.seq``, ``lengths`` the dataset's token counts,
every row's count or (p50, p99, max); a count above s is truncated to s). The worst batch reads
only max(lengths) and min(lengths); the expected batch (time) treats the given counts as equally
likely draws, so a (p50, p99, max) triple is a coarse stand-in for the distribution (it weighs the
tail at 2/3): pass every row's count for a faithful expectation.

- ``max-length``: b rows of s tokens, no mask (today's protocol).
- ``longest`` (``DataCollatorWithPadding(padding="longest")``): b rows padded to the longest row
  of the batch. The **worst batch** (it sets the peak) is taken to be b rows of
  L = min(max(lengths), s), with padding in it whenever some length is below L (then the
  collator passes a 2-D ``attention_mask``). The time model uses the **expected** batch length,
  E[max of b draws] from ``lengths`` (each count equally likely), and counts only real tokens.
- ``packing``: b rows filled to s with several documents, ``position_ids`` restarting at every
  document and no ``attention_mask``. transformers 5 finds the documents from the position ids
  (masking_utils.py::find_packed_sequence_indices) and builds a block-causal mask for
  sdpa/eager (create_causal_mask: ``packed_sequence_mask_function``); flash_attention_2 builds no
  mask (masking_utils.py::flash_attention_mask) and runs varlen per document.
- ``padding-free`` (TRL ``padding_free``, transformers ``DataCollatorWithFlattening``): the batch
  flattened into one row of Σ lengths with ``position_ids``; the worst batch is the b longest
  documents, one row of b·L tokens. transformers 5.24 keeps the documents apart for sdpa and
  eager too (the same packed-sequence mask over the one row, [1, 1, b·L, b·L]), so it is not
  refused there; flash_attention_2 takes the varlen path (modeling_flash_attention_utils.py::
  _flash_attention_forward, ``_is_packed_sequence`` holds for one row).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class BatchLayout:
    """The worst batch as the model sees it.

    rows × row_len token ids; ``padded``: a 2-D attention mask with at least one pad token is
    passed (longest); ``packed``: position ids restart inside a row (packing, padding-free);
    ``real_tokens``: non-pad tokens of that batch."""

    rows: int
    row_len: int
    padded: bool
    packed: bool
    real_tokens: int

    @property
    def masked(self) -> bool:
        """transformers builds an explicit [rows, 1, row_len, row_len] mask for sdpa/eager."""
        return self.padded or self.packed


#: decoder-only families whose forward builds the mask without position ids, so packed rows get
#: no block-causal mask (sdpa keeps is_causal and flash; documents attend across their
#: boundaries): modeling_opt.py::OPTDecoder.forward calls create_causal_mask(config,
#: inputs_embeds, attention_mask, cache) (transformers 5.24; every other catalog family passes
#: position_ids)
NO_PACKED_MASK = frozenset({"opt"})


def explicit_mask(layout: BatchLayout, model_type: str) -> bool:
    """Whether sdpa/eager get an explicit mask for this batch: padding, or packed rows of a family
    that reads position ids for its mask (``NO_PACKED_MASK``)."""
    return layout.padded or (layout.packed and model_type not in NO_PACKED_MASK)


def _longest(train) -> int:
    if not train.lengths:
        raise InputError(f"--padding {train.padding} needs --lengths (the dataset's token counts, e.g. "
                         f"412,1830,4096 as p50,p99,max); or use --padding max-length")
    return min(max(train.lengths), train.seq)


def batch_layout(train) -> BatchLayout:
    """The worst batch of ``train`` (see the module docstring). ``train.batch``/``seq`` must be ints."""
    b, s = train.batch, train.seq
    mode = train.padding
    if mode == "max-length":
        return BatchLayout(b, s, False, False, b * s)
    if mode == "packing":
        return BatchLayout(b, s, False, True, b * s)
    L = _longest(train)
    if mode == "longest":
        padded = min(min(train.lengths), s) < L
        return BatchLayout(b, L, padded, False, b * L)
    if mode == "padding-free":
        return BatchLayout(1, b * L, False, True, b * L)
    raise InputError(f"--padding {mode!r} is not one of max-length, longest, packing, padding-free")


def expected_longest(lengths: tuple[int, ...], b: int, cap: int, power: int = 1) -> float:
    """E[(max of b draws)^power] from ``lengths`` (with replacement, each equally likely), counts
    capped at ``cap``: Σ_k v_k^power·(F(v_k)^b − F(v_{k−1})^b) over the sorted distinct values
    (power 2: the attention pairs of a padded row)."""
    vals = sorted(min(v, cap) for v in lengths)
    n = len(vals)
    out, prev = 0.0, 0.0
    for i, v in enumerate(vals):
        if i + 1 < n and vals[i + 1] == v:
            continue
        F = ((i + 1) / n) ** b
        out += v ** power * (F - prev)
        prev = F
    return out


def expected_tokens(train) -> tuple[float, float]:
    """(tokens the model processes per step, real tokens per step) for the time model: max-length
    and packing b·s both; longest b·E[max of b] processed, b·E[length] real; padding-free
    b·E[length] both (lengths capped at s)."""
    b, s = train.batch, train.seq
    if train.padding in ("max-length", "packing"):
        return b * s, b * s
    _longest(train)
    mean = sum(min(v, s) for v in train.lengths) / len(train.lengths)
    if train.padding == "longest":
        return b * expected_longest(train.lengths, b, s), b * mean
    return b * mean, b * mean


def expected_document_length(train) -> float:
    """Mean document length (tokens, capped at s): what causal attention spans within a packed or
    flattened row under a varlen kernel. Without ``lengths`` a packed row is one document of s."""
    if not train.lengths:
        return float(train.seq)
    s = train.seq
    return sum(min(v, s) for v in train.lengths) / len(train.lengths)


def check_attention(train, compute_capability: str | None, stream_bytes: int) -> None:
    """flash_attention_2's hard requirements, as one-line InputErrors (exit 2):

    - compute capability >= 8.0 (flash-attn csrc/flash_attn/flash_api.cpp: "FlashAttention only
      supports Ampere GPUs or newer"); no GPU (CPU runs) cannot run it at all;
    - fp16/bf16 inputs (flash_api.cpp: "FlashAttention only support fp16 and bf16 data type"):
      transformers casts fp32 q/k/v to the autocast dtype, or a quantized model's dtype
      (integrations/flash_attention.py::get_target_dtype), but an fp32 model without autocast
      stays fp32.
    """
    if train.attn_implementation != "flash_attention_2":
        return
    if train.device == "cpu" or compute_capability is None:
        raise InputError("--attn-implementation flash_attention_2 needs an NVIDIA GPU (compute capability >= 8.0); "
                         "use --attn-implementation sdpa on CPU")
    if float(compute_capability) < 8.0:
        raise InputError(f"--attn-implementation flash_attention_2 needs compute capability >= 8.0 (Ampere or newer), "
                         f"the GPU has {compute_capability}; use --attn-implementation sdpa")
    check_attention_dtype(train, stream_bytes)


def check_attention_dtype(train, stream_bytes: int) -> None:
    """The part of :func:`check_attention` that holds on every GPU: flash_attention_2 with fp32
    inputs (an fp32 model without autocast), a one-line InputError. ``plan`` runs it once before
    the GPUs, so a setup no GPU can run is an input error (exit 2), not a table of refusals."""
    if train.attn_implementation != "flash_attention_2":
        return
    if stream_bytes == 4 and train.quant == "fp32" and (train.mixed_precision or "no") == "no":
        raise InputError("--attn-implementation flash_attention_2 takes fp16/bf16 only, and --quant fp32 without "
                         "autocast gives it fp32; use --mixed-precision bf16, --quant bf16 or --attn-implementation sdpa")


@dataclass(frozen=True)
class AttentionSpan:
    """What attention computes per layer forward for the expected batch (the time model):
    ``pairs`` = Σ over attended units (rows or documents) of len_q · len_kv, and ``causal``:
    whether the kernel skips the masked upper triangle (is_causal; not with an explicit mask)."""

    pairs: float
    causal: bool


def attention_span(train, kind: str, packed_mask: bool = True) -> AttentionSpan:
    """Query-key pairs per layer for ``train``'s expected batch under attention ``kind``
    (``activations.choose_attention``: flash, efficient, math, eager, fa2); not called for
    max-length (``time.attention_work`` keeps its own formula there).

    - longest: sdpa/eager take the padded rows with a mask: b·E[L_max²], no causal skipping
      (an explicit mask; mem-efficient computes every block); fa2 unpads
      (``_upad_input``) and runs varlen over each row's real tokens: b·E[ℓ²], causal.
    - packing: sdpa/eager: the block-causal mask over b rows of s: b·s², no skipping; fa2 with
      b = 1 row: varlen per document (b·s/E[ℓ])·E[ℓ²], causal. With b > 1 rows and position
      ids only, transformers 5.24 does not take the varlen path (``_is_packed_sequence``
      needs batch 1) and runs causal flash over whole rows: b·s², causal.
    - padding-free: one row of T = b·E[ℓ] tokens: sdpa/eager T² with the packed mask, no
      skipping; fa2 varlen per document b·E[ℓ²], causal.
    ``packed_mask`` False (``NO_PACKED_MASK`` families): packed rows keep causal sdpa over whole rows.
    Lengths are capped at s; E over ``lengths`` with equal weights (no lengths: one document of s).
    """
    b, s = train.batch, train.seq
    lengths = train.lengths or (s,)
    capped = [min(v, s) for v in lengths]
    mean = sum(capped) / len(capped)
    mean_sq = sum(v * v for v in capped) / len(capped)
    fa2 = kind == "fa2"
    if train.padding == "longest":
        if fa2:
            return AttentionSpan(b * mean_sq, True)
        return AttentionSpan(b * expected_longest(lengths, b, s, power=2), False)
    if train.padding == "packing":
        if fa2:
            if b == 1:
                return AttentionSpan(s / mean * mean_sq, True)
            return AttentionSpan(b * s * s, True)
        return AttentionSpan(b * s * s, not packed_mask)
    if train.padding == "padding-free":
        if fa2:
            return AttentionSpan(b * mean_sq, True)
        return AttentionSpan((b * mean) ** 2, not packed_mask)
    return AttentionSpan(b * s * s, True)


def sequence_notes(model_type: str, train) -> list[str]:
    """Lines an estimate prints about what the padding mode does in transformers 5.24 beyond memory:

    - packing with flash_attention_2 and more than one row: the varlen path is taken for one row
      only (modeling_flash_attention_utils.py::_is_packed_sequence) or with cu_seq_lens kwargs
      (DataCollatorWithFlattening(return_flash_attn_kwargs=True)); with position ids alone the
      documents of a row attend to each other (same memory);
    - packed rows of a ``NO_PACKED_MASK`` family: no block-causal mask, documents attend across;
    - padding-free with sdpa/eager: the packed mask spans the whole flattened batch."""
    from ..trainers import resolve_recipe

    if train.padding in ("max-length", "longest"):
        return []
    impl = resolve_recipe(train).attn_implementation
    out = []
    if train.padding == "packing" and impl == "flash_attention_2" and train.batch > 1:
        out.append("packing with flash_attention_2 and batch > 1: transformers runs varlen per document only for "
                   "one row or with cu_seq_lens kwargs (DataCollatorWithFlattening(return_flash_attn_kwargs=True)); "
                   "with position ids alone the documents of a row attend to each other (memory is the same)")
    if model_type in NO_PACKED_MASK and impl != "flash_attention_2":
        out.append(f"{model_type} builds its mask without position ids: packed documents attend to each other "
                   f"(no block-causal mask)")
    elif train.padding == "padding-free" and impl != "flash_attention_2":
        L = batch_layout(train).row_len
        out.append(f"padding-free with {impl}: transformers keeps the documents apart with a [1, 1, {L}, {L}] mask over "
                   f"the flattened batch (mem-efficient/eager attention over every pair); flash_attention_2 runs "
                   f"varlen per document without it")
    return out
