"""Synthetic token batches for a burst, shaped by the recipe's padding and ``lengths``.

The peak of a run follows its worst batch, so a burst trains on that batch every step:

- ``max-length``: ``batch`` rows of ``seq`` random tokens, no attention mask (the H100
  protocol: ``model(input_ids=ids, labels=ids)``; a plain loop's fixed-length batch);
- ``longest``: rows of the ``batch`` largest ``lengths`` (each capped at ``seq``), right-padded to
  the longest of them, with an attention mask and ``-100`` labels on the pads, as
  ``transformers.DataCollatorWithPadding`` / trl's ``DataCollatorForLanguageModeling`` build them;
- ``packing``: ``batch`` rows of exactly ``seq`` tokens (documents concatenated and cut), no mask;
- ``padding-free``: ``batch`` rows of the longest length (the worst batch the estimate takes,
  ``estimate.sequences.batch_layout``: lengths are draws, so every row may be the longest)
  flattened into one row [1, batch x longest] with ``position_ids`` restarting at every row and ``-100`` labels at
  every row start (trl ``trainer/sft_trainer.py::DataCollatorForLanguageModeling.torch_call``
  with ``padding_free=True``; transformers ``DataCollatorWithFlattening``).

Without ``lengths`` every row is ``seq`` tokens long.
"""

from __future__ import annotations

from typing import Any


def row_lengths(padding: str, lengths, batch: int, seq: int) -> list[int]:
    """Token counts of the rows of the worst micro-batch (each <= seq): longest: the ``batch``
    largest ``lengths`` (cycled when there are fewer; padded to the first); padding-free: every
    row the longest (as ``estimate.sequences.batch_layout``); ``seq`` each for max-length/packing
    or no lengths."""
    if padding in ("max-length", "packing") or not lengths:
        return [int(seq)] * int(batch)
    ordered = sorted((min(int(x), int(seq)) for x in lengths), reverse=True)
    if padding == "padding-free":
        return [ordered[0]] * int(batch)
    return [ordered[i % len(ordered)] for i in range(int(batch))]


def token_rows(padding: str, lengths, batch: int, seq: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """The worst micro-batch's rows as lists of random token ids (lengths: :func:`row_lengths`)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in row_lengths(padding, lengths, batch, seq)]


def collate(rows: list[list[int]], padding: str, pad_id: int = 0) -> dict[str, Any]:
    """One micro-batch (dict of CPU tensors) for ``model(**batch)`` of a decoder-only model."""
    import torch

    if padding in ("max-length", "packing"):
        ids = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": ids, "labels": ids}
    if padding == "padding-free":
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long)[None]
        pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
        labels = ids.clone()
        labels[pos == 0] = -100
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    # longest: right padding to the batch's longest row
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def positions(batch: dict) -> int:
    """Token positions the model processes in ``batch`` (pads included)."""
    return int(batch["input_ids"].numel())
