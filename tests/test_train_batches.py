"""Batch sampling (seeded, resumable, shardable) and validation windows."""

import json

import numpy as np
import pytest
import torch

from hgf.errors import HGFError
from hgf.train.batches import BatchSampler, eval_batches, window_starts

TOKENS = np.arange(1000, dtype=np.uint16)

pytest_plugins = ["train_fixtures"]  # the dataset and one_thread fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def test_windows_shift_targets_by_one_and_stay_in_range():
    s = BatchSampler(TOKENS, batch_size=8, seq_len=16, seed=0)
    for _ in range(50):
        x, y = s.next()
        assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:, -1], x[:, -1] + 1)  # consecutive tokens of the array
        assert int(y.max()) <= 999


def test_same_seed_same_batches_and_state_resumes_exactly():
    a, b = BatchSampler(TOKENS, 4, 8, seed=3), BatchSampler(TOKENS, 4, 8, seed=3)
    for _ in range(3):
        assert torch.equal(a.next()[0], b.next()[0])
    state = json.loads(json.dumps(a.state_dict()))  # goes through state.json
    expected = [a.next()[0] for _ in range(3)]
    c = BatchSampler(TOKENS, 4, 8, seed=999)
    c.load_state_dict(state)
    assert all(torch.equal(e, c.next()[0]) for e in expected)
    assert not torch.equal(BatchSampler(TOKENS, 4, 8, seed=4).next()[0],
                           BatchSampler(TOKENS, 4, 8, seed=3).next()[0])


def test_ranks_take_disjoint_slices_of_one_global_batch():
    whole = BatchSampler(TOKENS, 6, 8, seed=1).next()[0]
    parts = [BatchSampler(TOKENS, 3, 8, seed=1, rank=r, world_size=2).next()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_eval_windows_non_overlapping_and_subset_is_a_prefix():
    starts = window_starts(100, 16)
    assert starts.tolist() == [0, 16, 32, 48, 64, 80]  # 80 + 17 <= 100, 96 + 17 > 100
    full = list(eval_batches(TOKENS[:100], batch_size=4, seq_len=16))
    assert [x.shape[0] for x, _ in full] == [4, 2]
    targets = torch.cat([y for _, y in full]).flatten()
    assert targets.tolist() == list(range(1, 97))  # every token after the first, once
    sub = list(eval_batches(TOKENS[:100], 4, 16, max_windows=3))
    assert torch.equal(sub[0][0], full[0][0][:3])


def test_too_little_data_is_a_clear_error():
    with pytest.raises(HGFError, match="train split has 10 tokens"):
        BatchSampler(np.arange(10), 2, 16, seed=0)
    with pytest.raises(HGFError, match="valid split"):
        list(eval_batches(np.arange(10), 2, 16))
