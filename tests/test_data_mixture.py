"""MixtureSampler: determinism, proportions, epochs, caps, resume, sharding, streaming sources, validation."""

import json
from collections import Counter
from itertools import islice

import pytest

from vpit.data.mixture import BLOCK_SIZE, MixtureSampler

SIZES = [1000, 700, None]
WEIGHTS = [0.5, 0.3, 0.2]


def take(sampler: MixtureSampler, n: int) -> list[tuple[int, int]]:
    return list(islice(sampler, n))


def records_of(draws: list[tuple[int, int]], source: int) -> list[int]:
    return [record for s, record in draws if s == source]


def test_same_seed_same_stream_other_seed_another():
    first = take(MixtureSampler(SIZES, WEIGHTS, seed=3), 10_000)
    assert take(MixtureSampler(SIZES, WEIGHTS, seed=3), 10_000) == first
    other = take(MixtureSampler(SIZES, WEIGHTS, seed=4), 10_000)
    # Independent streams pick the same source with probability 0.5² + 0.3² + 0.2² = 0.38.
    differing_sources = sum(a[0] != b[0] for a, b in zip(first, other, strict=True))
    assert differing_sources > 5_000
    assert all(isinstance(s, int) and isinstance(r, int) for s, r in first[:100])


def test_proportions_match_weights_and_zero_weight_is_never_drawn():
    draws = take(MixtureSampler([1000, 1000, None, 1000], [5, 3, 2, 0], seed=0), 20_000)
    counts = Counter(s for s, _ in draws)
    for source, expected in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[source] / 20_000 - expected) < 0.02  # binomial sd <= 0.0036
    assert counts[3] == 0
    # A zero-weight source in the middle, and an empty one, are never drawn either.
    middle = take(MixtureSampler([10, 0, 10], [1, 0, 1], seed=1), 20_000)
    assert {s for s, _ in middle} == {0, 2}


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = MixtureSampler([50, 1000], [1, 1], caps=[None, 30], seed=5)
    draws = take(sampler, 400)
    full = records_of(draws, 0)
    assert len(full) >= 100
    assert sorted(full[:50]) == list(range(50)) and sorted(full[50:100]) == list(range(50))
    assert full[:50] != full[50:100]
    capped = records_of(draws, 1)
    assert len(capped) >= 60
    subset = sorted(capped[:30])
    assert len(set(subset)) == 30 and sorted(capped[30:60]) == subset
    assert capped[:30] != capped[30:60]
    assert set(capped) == set(subset)
    assert sampler.epoch_of(0) == len(full) // 50 and sampler.epoch_of(1) == len(capped) // 30


def test_epoch_of_counts_completed_passes():
    sampler = MixtureSampler([50], [1])
    take(sampler, 49)
    assert sampler.epoch_of(0) == 0
    take(sampler, 1)
    assert sampler.epoch_of(0) == 1
    stream = MixtureSampler([None, None], [1, 1], caps=[None, 7])
    draws = take(stream, 100)
    assert stream.epoch_of(0) == 0
    assert stream.epoch_of(1) == len(records_of(draws, 1)) // 7
    assert MixtureSampler([10, 0], [1, 0]).epoch_of(1) == 0  # an empty, zero-weight source


def test_caps_use_a_fixed_subset_nested_across_caps():
    small = MixtureSampler([200, 1000], [1, 1], caps=[None, 100], seed=7)
    large = MixtureSampler([50, 1000, None], [0.2, 0.8, 0.5], caps=[None, 300, None], seed=7)
    small_set = set(records_of(take(small, 3_000), 1))
    large_set = set(records_of(take(large, 3_000), 1))
    assert len(small_set) == 100 and len(large_set) == 300
    assert small_set < large_set
    assert all(0 <= r < 1000 for r in large_set)
    other_seed = set(records_of(take(MixtureSampler([200, 1000], [1, 1], caps=[None, 100], seed=8), 3_000), 1))
    assert len(other_seed) == 100 and other_seed != small_set


def test_resume_after_12345_draws_continues_identically():
    uninterrupted = take(MixtureSampler(SIZES, WEIGHTS, caps=[None, 300, None], seed=11), 17_345)
    sampler = MixtureSampler(SIZES, WEIGHTS, caps=[None, 300, None], seed=11)
    assert take(sampler, 12_345) == uninterrupted[:12_345]
    state = json.loads(json.dumps(sampler.state_dict()))  # plain Python, survives JSON
    assert state["position"] == 12_345
    fresh = MixtureSampler(SIZES, WEIGHTS, caps=[None, 300, None], seed=11)
    fresh.load_state_dict(state)
    assert take(fresh, 5_000) == uninterrupted[12_345:]


def test_resume_at_block_boundaries():
    checkpoints = [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE + 7]
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=2)
    draws, states = [], {}
    for position in range(checkpoints[-1] + 200):
        if position in checkpoints:
            states[position] = sampler.state_dict()
        draws.append(next(sampler))
    for position, state in states.items():
        fresh = MixtureSampler(SIZES, WEIGHTS, seed=2)
        fresh.load_state_dict(state)
        assert take(fresh, 200) == draws[position : position + 200], position


def test_restore_at_five_million_needs_no_replay():
    # Two uncapped streams serve their cursors as records, so the first record each serves after the restore is the
    # number of times it was drawn before: the two must add up to the position exactly.
    position = 5_000_000
    streams = MixtureSampler([None, None], [0.7, 0.3], seed=9)
    streams.load_state_dict({**streams.state_dict(), "position": position})
    draws = take(streams, 2_000)
    first = [records_of(draws, 0)[0], records_of(draws, 1)[0]]
    assert first[0] + first[1] == position
    assert abs(first[0] - 0.7 * position) < 5_000  # binomial sd ~1,025
    assert records_of(draws, 0) == list(range(first[0], first[0] + len(records_of(draws, 0))))
    # Finite, capped sources: restoring 3,000 steps earlier and stepping through gives the same draws.
    config = {"sizes": SIZES, "weights": WEIGHTS, "caps": [None, 300, None], "seed": 9}
    direct, earlier = MixtureSampler(**config), MixtureSampler(**config)
    direct.load_state_dict({**direct.state_dict(), "position": position})
    earlier.load_state_dict({**earlier.state_dict(), "position": position - 3_000})
    assert take(earlier, 5_000)[3_000:] == take(direct, 2_000)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 1}, r"saved with seed=0 but this sampler has seed=1"),
        ({"sizes": [1000, 701, None]}, r"saved with sizes=\[1000, 700, None\]"),
        ({"weights": [0.5, 0.3, 0.3]}, r"saved with weights="),
        ({"caps": [None, 300, None]}, r"saved with caps=\[None, None, None\]"),
        ({"rank": 1, "world_size": 2}, r"saved by rank 0 of world_size 1 but this sampler is rank 1 of 2"),
    ],
)
def test_loading_a_state_from_another_stream_raises(change, match):
    source = MixtureSampler(SIZES, WEIGHTS, seed=0)
    take(source, 10)
    config = {"sizes": SIZES, "weights": WEIGHTS, "seed": 0, **change}
    with pytest.raises(ValueError, match=match):
        MixtureSampler(**config).load_state_dict(source.state_dict())


def test_loading_a_malformed_state_raises():
    sampler = MixtureSampler(SIZES, WEIGHTS, rank=1, world_size=2)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match=r"state is missing \['position'\]"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != "position"})
    with pytest.raises(ValueError, match=r"state uses scheme 'other/v0'"):
        sampler.load_state_dict({**state, "scheme": "other/v0"})
    with pytest.raises(ValueError, match=r"state position 10 is not a position of rank 1 of 2"):
        sampler.load_state_dict({**state, "position": 10})


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_interleave_into_the_single_process_stream(world_size):
    single = take(MixtureSampler(SIZES, WEIGHTS, seed=4), 3_000 * world_size)
    per_rank, positions = [], []
    for rank in range(world_size):
        sampler = MixtureSampler(SIZES, WEIGHTS, seed=4, rank=rank, world_size=world_size)
        draws, seen = [], []
        for _ in range(3_000):
            seen.append(sampler.position)
            draws.append(next(sampler))
        per_rank.append(draws)
        positions.append(set(seen))
    interleaved = [per_rank[i % world_size][i // world_size] for i in range(3_000 * world_size)]
    assert interleaved == single
    assert sum(len(p) for p in positions) == 3_000 * world_size
    assert set().union(*positions) == set(range(3_000 * world_size))  # disjoint and covering
    assert per_rank[0] != per_rank[1]


def test_resume_per_rank():
    uninterrupted = take(MixtureSampler(SIZES, WEIGHTS, seed=6, rank=1, world_size=2), 2_234)
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=6, rank=1, world_size=2)
    take(sampler, 1_234)
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["position"] == 1 + 2 * 1_234
    fresh = MixtureSampler(SIZES, WEIGHTS, seed=6, rank=1, world_size=2)
    fresh.load_state_dict(state)
    assert take(fresh, 1_000) == uninterrupted[1_234:]
    with pytest.raises(ValueError, match="load each rank's own state"):
        MixtureSampler(SIZES, WEIGHTS, seed=6, rank=0, world_size=2).load_state_dict(state)


def test_streaming_source_counts_up_and_wraps_at_its_cap():
    assert [r for _, r in take(MixtureSampler([None], [1]), 100)] == list(range(100))
    assert [r for _, r in take(MixtureSampler([None], [1], caps=[7]), 30)] == [i % 7 for i in range(30)]
    mixed = take(MixtureSampler([None, 100], [1, 1], seed=3), 1_000)
    stream = records_of(mixed, 0)
    assert stream == list(range(len(stream))) and len(stream) > 400


@pytest.mark.parametrize(("rank", "world_size", "skip"), [(0, 1, 0), (0, 1, 12_000), (1, 2, 100), (2, 3, 7_000)])
def test_peek_counts_matches_the_draws_and_does_not_advance(rank, world_size, skip):
    names = ["understanding", "generation", "editing"]
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=1, rank=rank, world_size=world_size, names=names)
    take(sampler, skip)
    position = sampler.position
    peeked = sampler.peek_counts(10_000)
    assert sampler.position == position
    counts = Counter(names[s] for s, _ in take(sampler, 10_000))
    assert peeked == {name: counts[name] for name in names}
    assert sum(peeked.values()) == 10_000
    assert sampler.peek_counts(0) == dict.fromkeys(names, 0)
    with pytest.raises(ValueError, match="num_draws must be >= 0, got -1"):
        sampler.peek_counts(-1)


NAMED = ["understanding", "edit", "generation"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sizes": [], "weights": []}, r"sizes must list at least one source"),
        ({"sizes": [10, 10], "weights": [1]}, r"weights has 1 entries but sizes has 2"),
        ({"sizes": [10, 10], "weights": [1, 1], "caps": [5]}, r"caps has 1 entries but sizes has 2"),
        ({"sizes": [10, 10], "weights": [1, 1], "names": ["a", "b", "c"]}, r"names has 3 entries but sizes has 2"),
        ({"sizes": [10, 10], "weights": [1, 1], "names": ["a", "a"]}, r"names must be unique"),
        ({"sizes": [10, 10], "weights": [1, 1], "names": ["a", ""]}, r"names\[1\] must be a non-empty string"),
        (
            {"sizes": [10, 10, 10], "weights": [1, 1, -1], "names": NAMED},
            r"weights\[2\] \(generation\) must be a finite number >= 0, got -1",
        ),
        ({"sizes": [10], "weights": [float("nan")]}, r"weights\[0\] must be a finite number >= 0, got nan"),
        ({"sizes": [10, None], "weights": [0, 0]}, r"weights must not all be zero"),
        ({"sizes": [10, -3], "weights": [1, 1]}, r"sizes\[1\] must be >= 0 or None \(streaming\), got -3"),
        (
            {"sizes": [10, 0, 10], "weights": [1, 0.5, 1], "names": NAMED},
            r"sizes\[1\] \(edit\) is 0 but its weight is 0.5: an empty source cannot be sampled",
        ),
        ({"sizes": [10], "weights": [1], "caps": [0]}, r"caps\[0\] must be >= 1 or None \(no cap\), got 0"),
        (
            {"sizes": [10, 10, 300], "weights": [1, 1, 1], "caps": [None, None, 500], "names": NAMED},
            r"caps\[2\] \(generation\) is 500 but the source has only 300 records",
        ),
        ({"sizes": [10], "weights": [1], "seed": -1}, r"seed must be a non-negative integer, got -1"),
        ({"sizes": [10], "weights": [1], "world_size": 0}, r"world_size must be >= 1, got 0"),
        (
            {"sizes": [10], "weights": [1], "rank": 2, "world_size": 2},
            r"rank must be in \[0, world_size\) = \[0, 2\), got 2",
        ),
        (
            {"sizes": [10], "weights": [1], "rank": -1, "world_size": 2},
            r"rank must be in \[0, world_size\) = \[0, 2\), got -1",
        ),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureSampler(**kwargs)
