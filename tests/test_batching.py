"""Prompt pairs -> padded tensors: shapes, targets, and clear errors for bad pairs."""

import pytest
import torch

from kcircuits.batching import make_batch, make_batches
from kcircuits.errors import KcircuitsError
from tests.helpers import Pair, random_pairs


def test_right_padding_and_targets():
    pairs = random_pairs(3, lengths=(4, 6, 5))
    b = make_batch(pairs, pad_id=0)
    assert b.clean.shape == (3, 6) and b.real.sum(1).tolist() == [4, 6, 5]
    assert b.target_pos[:, 0].tolist() == [3, 5, 4]  # last real token predicts the answer
    assert b.target_ids[:, 0].tolist() == [p.answer_ids[0] for p in pairs]
    assert torch.equal(b.clean[b.real.logical_not()], torch.zeros(3 * 6 - 15, dtype=torch.long))


def test_full_answer_scoring_teacher_forces_the_answer():
    pairs = [Pair([5, 6, 7], [5, 8, 7], [10, 11, 12], [13])]
    b = make_batch(pairs, pad_id=0, answer_scoring="full")
    assert b.clean[0].tolist() == [5, 6, 7, 10, 11]
    assert b.corrupt[0].tolist() == [5, 8, 7, 10, 11]  # the clean answer follows the corrupt prompt too
    assert b.target_pos[0].tolist() == [2, 3, 4] and b.target_ids[0].tolist() == [10, 11, 12]


def test_bad_pairs_are_clear_errors():
    with pytest.raises(KcircuitsError, match="differ in token length"):
        make_batch([Pair([1, 2, 3], [1, 2], [4], [5])], pad_id=0)
    with pytest.raises(KcircuitsError, match="empty"):
        make_batch([], pad_id=0)
    with pytest.raises(KcircuitsError, match="empty answer"):
        make_batch([Pair([1, 2], [1, 3], [], [5])], pad_id=0)
    with pytest.raises(KcircuitsError, match="answer scoring"):
        make_batch(random_pairs(1), pad_id=0, answer_scoring="last")
    with pytest.raises(KcircuitsError, match="batch size"):
        make_batches(random_pairs(2), pad_id=0, batch_size=0)


def test_split_keeps_every_prompt_in_order():
    b = make_batch(random_pairs(5), pad_id=0)
    parts = b.split(2)
    assert [len(x) for x in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([x.clean for x in parts]), b.clean)
    assert torch.equal(torch.cat([x.target_ids for x in parts]), b.target_ids)
