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


# ---------------------------------------------------------------------------------------------- mixtures
@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    a = str(tmp_path_factory.mktemp("mix_a"))
    b = str(tmp_path_factory.mktemp("mix_b"))
    ka = write_token_output(a, (40, 35, 25, 50), row_group_size=10, formats=("parquet",))       # 150 samples
    kb = write_token_output(b, (20, 23, 17), row_group_size=8, formats=("parquet",), unit_offset=50)  # 60
    return a, b, set(ka), set(kb)


def mixture(two_sets, rank=0, world=1, **kw):
    from gq_pipeline.mixture import TokenMixture

    a, b = two_sets[:2]
    return TokenMixture([TokenDataset(a, seed=1, shuffle_window=32, block_rows=5),
                         TokenDataset(b, seed=2, shuffle_window=16)], weights=[0.7, 0.3], seed=3,
                        rank=rank, world_size=world, batch_size=kw.pop("batch_size", 8), **kw)


def test_mixture_proportions_and_exactly_once_per_pass(two_sets):
    _, _, ka, kb = two_sets
    mix = mixture(two_sets)
    assert mix.epoch_samples == 200 and mix.per_epoch == [140, 60]  # one pass over B (60 / 0.3)
    stream = []
    for epoch in range(3):
        mix.set_epoch(epoch)
        batches = list(TokenLoader(mix, num_workers=2))
        keys = [k for b in batches for k in b["key"]]
        dsets = [d for b in batches for d in b["dataset"].tolist()]
        assert len(keys) == 200
        n_a = sum(1 for d in dsets if d == 0)
        assert abs(n_a - 0.7 * 200) <= 3 * (200 * 0.7 * 0.3) ** 0.5  # binomial tolerance
        for half in (slice(0, 100), slice(100, 200)):  # prefixes keep the weights too
            assert abs(sum(1 for d in dsets[half] if d == 0) - 70) <= 3 * (100 * 0.21) ** 0.5
        assert all((k in ka) == (d == 0) and (k in kb) == (d == 1) for k, d in zip(keys, dsets))
        stream += keys
    b_stream = [k for k in stream if k in kb]
    a_stream = [k for k in stream if k in ka]
    for i in range(0, len(b_stream), 60):  # every pass over B: each sample exactly once
        assert sorted(b_stream[i:i + 60]) == sorted(kb)
    assert sorted(a_stream[:150]) == sorted(ka) and len(set(a_stream[150:300])) == 150


@pytest.mark.parametrize("new_world,workers", [(1, 0), (3, 2)])
def test_mixture_resumes_elastically_exactly_once(two_sets, new_world, workers):
    whole = sorted(k for b in TokenLoader(mixture(two_sets)) for k in b["key"])
    before, states = [], []
    for rank in range(2):
        loader = TokenLoader(mixture(two_sets, rank, 2), num_workers=2)
        for i, batch in enumerate(loader):
            before += batch["key"]
            if i == 4:
                break
        states.append(json.loads(json.dumps(loader.state_dict())))
    assert states[0]["position"] == states[1]["position"] == 80
    after = []
    for rank in range(new_world):
        mix = mixture(two_sets, rank, new_world)
        mix.load_state_dict(states)
        after += [k for b in TokenLoader(mix, num_workers=workers) for k in b["key"]]
    assert sorted(before + after) == whole


def test_mixture_refuses_other_codebooks_unless_told(two_sets, tmp_path):
    from gq_pipeline.mixture import TokenMixture
    from gq_pipeline.shards import FingerprintMismatchError

    write_token_output(str(tmp_path), (5, 5), codebook_fp="c" * 16, model_fp="3" * 16, formats=("parquet",))
    a, other = TokenDataset(two_sets[0]), TokenDataset(str(tmp_path))
    with pytest.raises(FingerprintMismatchError, match="different codebooks"):
        TokenMixture([a, other], weights=[0.5, 0.5])
    mix = TokenMixture([a, other], weights=[0.5, 0.5], allow_mixed_codebooks=True, batch_size=4)
    assert sum(len(b["key"]) for b in mix) == mix.epoch_samples == 20
    with pytest.raises(ValueError, match="one weight per dataset"):
        TokenMixture([a], weights=[0.5, 0.5])
