"""Elastic resume: a state saved on 2 ranks continues on 1 or 3 ranks, with any worker count, exactly once."""
from __future__ import annotations

import json

import pytest

from gq_pipeline.dataset import TokenDataset, TokenLoader
from tests.shard_writer import write_token_output

SIZES = (9, 4, 11, 6, 7, 5)  # 42 samples in unequal shards, row groups of 3
pytestmark = pytest.mark.filterwarnings("ignore:.*do not split evenly", "ignore:This DataLoader will create")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("elastic"))
    return root, write_token_output(root, SIZES, row_group_size=3, formats=("parquet", "webdataset"))


def make(root, rank, world, fmt="parquet", **kw):
    return TokenDataset(root, format=fmt, seed=11, shuffle_window=8, batch_size=4, rank=rank, world_size=world, **kw)


def run_steps(root, world, steps, workers, fmt="parquet"):
    """Every rank takes ``steps`` batches (as DDP ranks do); returns the keys consumed and each rank's state."""
    seen, states = [], []
    for rank in range(world):
        loader = TokenLoader(make(root, rank, world, fmt), num_workers=workers)
        n = 0
        for batch in loader:
            seen += batch["key"]
            n += 1
            if n == steps:
                break
        states.append(json.loads(json.dumps(loader.state_dict())))
    return seen, states


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
@pytest.mark.parametrize("new_world", [1, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_two_rank_state_resumes_on_another_world_size_exactly_once(out, fmt, new_world, workers):
    root, expected = out
    before, states = run_steps(root, 2, 3, workers=2, fmt=fmt)  # 3 steps x 2 ranks x 4 = 24 samples
    assert len({(s["epoch"], s["position"]) for s in states}) == 1 and states[0]["position"] == 24
    after = []
    for rank in range(new_world):
        ds = make(root, rank, new_world, fmt)
        ds.load_state_dict(states)  # every rank's state: checked to agree
        after += [k for b in TokenLoader(ds, num_workers=workers) for k in b["key"]]
    assert len(before) + len(after) == len(expected)
    assert sorted(before + after) == sorted(expected)  # every sample of the epoch exactly once


@pytest.mark.parametrize("workers", [0, 2])
def test_global_order_does_not_depend_on_world_size(out, workers):
    """Resumed on one rank, the rest of the epoch is exactly the tail of the single-rank order: the order is global
    and the state is a position in it."""
    root, _ = out
    single = [k for b in TokenLoader(make(root, 0, 1), num_workers=workers) for k in b["key"]]
    before, states = run_steps(root, 2, 2, workers=workers)
    rounds = [k for r in range(2) for k in before[r * 8:(r + 1) * 8]]
    assert sorted(rounds) == sorted(single[:16])
    ds = make(root, 0, 1)
    ds.load_state_dict(states[0])
    assert [k for b in TokenLoader(ds, num_workers=workers) for k in b["key"]] == single[16:]


def test_resume_on_three_ranks_with_drop_last_and_pad_keeps_equal_counts(out):
    root, expected = out
    before, states = run_steps(root, 2, 2, workers=0)  # 16 consumed, 26 left
    for mode, total in (("drop_last", 16 + 24), ("pad", 16 + 27)):
        per_rank = []
        for rank in range(3):
            ds = make(root, rank, 3, **{mode: True})
            ds.load_state_dict(states[1])
            per_rank.append([k for b in TokenLoader(ds, num_workers=2) for k in b["key"]])
        assert len({len(k) for k in per_rank}) == 1
        flat = before + [k for ks in per_rank for k in ks]
        assert len(flat) == total
        if mode == "drop_last":
            assert len(set(flat)) == 40
        else:
            assert set(flat) == set(expected)


def test_disagreeing_rank_states_are_refused(out):
    root, _ = out
    _, states = run_steps(root, 2, 2, workers=0)
    ahead = TokenLoader(make(root, 1, 2))
    for i, _b in enumerate(ahead):
        if i == 2:
            break
    bad = [states[0], ahead.state_dict()]
    with pytest.raises(ValueError, match="states disagree.*same number of batches"):
        make(root, 0, 3).load_state_dict(bad)
    with pytest.raises(ValueError, match="seed was 11, now 12"):
        TokenDataset(root, seed=12, shuffle_window=8).load_state_dict(states[0])
