"""First-fit packing and padding into the batch contract, DPO alignment, and packer checkpointing."""

import grain
import numpy as np

from vlmjax.data.errors import Skipped
from vlmjax.data.packing import BatchBuilder, BatchShape, PackedBatchIterDataset, Unit, fill_counts


def unit(ids, trained, tiles=0, value=0.0, name=None):
    seq = (np.asarray(ids, np.int32), np.asarray(trained, bool))
    return Unit((seq,), np.full((tiles, 2, 2, 3), value, np.uint8), name)


def pair(chosen, rejected, tiles=0, value=0.0, name=None):
    seqs = tuple((np.asarray(s, np.int32), np.asarray([0] + [1] * (len(s) - 1), bool)) for s in (chosen, rejected))
    return Unit(seqs, np.full((tiles, 2, 2, 3), value, np.uint8), name)


U1 = unit([10, 11, 12, 13, 14], [0, 0, 1, 1, 1], tiles=1, value=1, name="u1")
U2 = unit([20, 21, 22], [0, 1, 1], name="u2")
U3 = unit([30, 31, 32, 33], [0, 0, 0, 1], tiles=2, value=3, name="u3")
U4 = unit([40, 41, 42, 43, 44, 45, 46], [0, 1, 1, 1, 1, 1, 1], name="u4")
SHAPE = BatchShape(rows=2, seq_len=8, max_images=3, image_size=2)


def test_first_fit_layout():
    b = BatchBuilder(SHAPE)
    assert b.add(U1) and b.add(U2) and b.add(U3)  # u1,u2 fill row 0 (5+3=8); u3 goes to row 1
    assert not b.add(U4)  # 7 tokens fit no row
    out = b.finalize()
    np.testing.assert_array_equal(out["input_ids"], [[10, 11, 12, 13, 14, 20, 21, 22], [30, 31, 32, 33, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["targets"], [[11, 12, 13, 14, 0, 21, 22, 0], [31, 32, 33, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["image_rows"], [0, 1, 1])
    np.testing.assert_array_equal(out["pixel_values"][:, 0, 0, 0], [1.0, 3.0, 3.0])
    assert out["input_ids"].dtype == np.int32 and out["loss_mask"].dtype == np.float32
    assert out["_meta"] == {"samples": 3, "skipped": [], "ids": ["u1", "u2", "u3"]}


def test_image_ids_are_never_targets():
    b = BatchBuilder(BatchShape(rows=1, seq_len=6, max_images=1, image_size=2, image_token_id=99))
    assert b.add(unit([5, 99, 99, 7, 8], [0, 0, 0, 1, 1], tiles=1))
    out = b.finalize()
    np.testing.assert_array_equal(out["targets"], [[0, 0, 7, 8, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1, 0, 0]])  # the last image token predicts 7


def test_image_slots_limit_the_batch():
    b = BatchBuilder(BatchShape(rows=4, seq_len=64, max_images=2, image_size=2))
    assert b.add(U3) and not b.add(U1)  # tokens fit, but 2 + 1 tiles > 2 slots
    assert b.add(U2)


def test_padding_mode_one_sample_per_row():
    b = BatchBuilder(BatchShape(rows=2, seq_len=8, max_images=3, image_size=2, pack=False))
    assert b.add(U2) and not b.full() and b.add(U2) and b.full()
    out = b.finalize()
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 0, 0, 0, 0, 0]] * 2)
    np.testing.assert_array_equal(out["image_rows"], [-1, -1, -1])
    assert not out["pixel_values"].any()


def test_dpo_pairs_stay_aligned():
    b = BatchBuilder(BatchShape(rows=2, seq_len=6, max_images=2, image_size=2, parts=2))
    assert b.add(pair([1, 2, 3], [1, 2, 4, 5], tiles=1, value=7))  # row 0: used (3, 4)
    assert b.add(pair([6, 7, 8], [6, 9]))  # row 0: (6, 6)
    assert b.add(pair([10, 11, 12, 13], [10, 14]))  # row 1
    assert not b.add(pair([15, 16], [15, 17], tiles=1))  # needs 2 more slots
    out = b.finalize()
    np.testing.assert_array_equal(out["input_ids"], [[1, 2, 3, 6, 7, 8], [10, 11, 12, 13, 0, 0],
                                                     [1, 2, 4, 5, 6, 9], [10, 14, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0],
                                                       [1, 1, 1, 1, 2, 2], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["image_rows"], [0, 2])  # the pair's image, once per half
    np.testing.assert_array_equal(out["pixel_values"][:, 0, 0, 0], [7.0, 7.0])
    np.testing.assert_array_equal(out["loss_mask"][2], [1, 1, 1, 0, 1, 0])


def _packed(elements, shape=SHAPE):
    return PackedBatchIterDataset(grain.MapDataset.source(elements).to_iter_dataset(), shape)


def test_packer_iterates_counts_skips_and_restores_state():
    skip = Skipped("missing_image", "s1", "f.json", "gone")
    elements = [U1, skip, U2, U3, U4, U2, U3, U1]
    batches = list(_packed(elements))
    # Batch 2: u4 (7 tokens) takes row 0; u2 (3) fits only row 1, u3 (4) joins it (3+4 <= 8, 2 of 3 slots);
    # u1 (5 tokens) then fits no row, so the batch is emitted and u1 starts batch 3.
    assert [b["_meta"]["ids"] for b in batches] == [["u1", "u2", "u3"], ["u4", "u2", "u3"], ["u1"]]
    assert batches[0]["_meta"]["skipped"] == [("missing_image", "s1", "f.json", "gone")]
    np.testing.assert_array_equal(batches[1]["input_ids"], [[40, 41, 42, 43, 44, 45, 46, 0],
                                                            [20, 21, 22, 30, 31, 32, 33, 0]])
    np.testing.assert_array_equal(batches[1]["image_rows"], [1, 1, -1])
    it = iter(_packed(elements))
    next(it)
    state = it.get_state()
    rest = list(it)
    resumed = iter(_packed(elements))
    resumed.set_state(state)
    again = list(resumed)
    assert len(again) == len(rest) == 2
    for a, b in zip(rest, again):
        for key in a:
            if key != "_meta":
                np.testing.assert_array_equal(a[key], b[key])
        assert a["_meta"] == b["_meta"]


def test_fill_counts_hand_built():
    """A hand-written 3 x 6 batch (image token 99): 9 of 18 slots used, 4 of them image tokens, 2 of 4 image slots."""
    batch = {"segment_ids": np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]),
             "input_ids": np.array([[99, 99, 5, 99, 6, 99], [7, 99, 8, 9, 0, 0], [0, 0, 0, 0, 0, 0]]),
             "image_rows": np.array([0, 1, -1, -1])}
    # the 99 in a padding slot (row 0, last) is not counted
    assert fill_counts(batch, 99) == {"slots": 18, "tokens": 9, "image_tokens": 4, "text_tokens": 5, "rows": 3,
                                      "rows_used": 2, "images": 2, "image_slots": 4}
    assert fill_counts(batch)["image_tokens"] == 0 and fill_counts(batch)["text_tokens"] == 9


def test_fill_counts_of_a_packed_batch():
    """On the packer's own output: u1 (5 tokens, 1 tile) + u2 (3) in row 0, u3 (4 tokens, 2 tiles) in row 1."""
    b = BatchBuilder(SHAPE)
    assert b.add(U1) and b.add(U2) and b.add(U3)
    c = fill_counts(b.finalize(), image_token_id=10)  # u1's first token stands in for an image token
    assert c == {"slots": 16, "tokens": 12, "image_tokens": 1, "text_tokens": 11, "rows": 2, "rows_used": 2,
                 "images": 3, "image_slots": 3}
