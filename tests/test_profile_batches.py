"""The burst's synthetic batches: the worst batch of ``lengths`` under each padding mode."""

import pytest

torch = pytest.importorskip("torch")

from loraplan.profile.batches import collate, row_lengths, token_rows  # noqa: E402


def test_row_lengths_take_the_worst_batch():
    assert row_lengths("longest", (40, 90, 300), 2, 128) == [128, 90]  # capped at seq, largest first
    assert row_lengths("padding-free", (40,), 3, 128) == [40, 40, 40]
    assert row_lengths("padding-free", (40, 90), 2, 128) == [90, 90]  # every row may be the longest draw
    assert row_lengths("max-length", (40, 90), 2, 128) == [128, 128]
    assert row_lengths("packing", (40, 90), 2, 128) == [128, 128]
    assert row_lengths("longest", None, 2, 64) == [64, 64]


def test_collate_per_padding():
    rows = token_rows("longest", (3, 5), 2, 8, vocab=50)
    b = collate(rows, "longest")
    assert b["input_ids"].shape == (2, 5) and b["attention_mask"].sum().item() == 8
    assert (b["labels"] == -100).sum().item() == 2 and b["labels"][0, :5].ne(-100).all()

    f = collate(rows, "padding-free")
    assert f["input_ids"].shape == (1, 8) and "attention_mask" not in f
    assert f["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert (f["labels"] == -100).nonzero()[:, 1].tolist() == [0, 5]  # every row start

    m = collate(token_rows("max-length", None, 2, 8, vocab=50), "max-length")
    assert m["input_ids"].shape == (2, 8) and m["labels"] is m["input_ids"]  # the protocol's labels=ids
