"""StepSampler: distinct per-rank batches, world-size invariance, resumability."""

from __future__ import annotations

import pytest

from dist_unlearn.data.sampling import StepSampler


def test_ranks_draw_disjoint_slices_of_one_global_batch():
    samplers = [StepSampler(50, 8, r, 4, seed=3, stream="retain") for r in range(4)]
    for step in range(5):
        parts = [s.indices(step) for s in samplers]
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == 8, "ranks repeated an example within a step"
        assert flat == samplers[0].global_indices(step)


def test_union_is_independent_of_world_size():
    one = StepSampler(37, 12, 0, 1, seed=7, stream="forget")
    for world in (2, 3, 4, 6):
        ranks = [StepSampler(37, 12, r, world, seed=7, stream="forget") for r in range(world)]
        for step in range(10):  # crosses several epoch boundaries
            assert [i for s in ranks for i in s.indices(step)] == one.indices(step)


def test_each_epoch_visits_every_example_once():
    sampler = StepSampler(20, 5, 0, 1, seed=0, stream="forget")
    seen = [i for step in range(4) for i in sampler.indices(step)]
    assert sorted(seen) == list(range(20))


def test_streams_and_seeds_differ_and_are_reproducible():
    a = StepSampler(100, 10, 0, 1, seed=0, stream="forget").indices(0)
    assert a == StepSampler(100, 10, 0, 1, seed=0, stream="forget").indices(0)
    assert a != StepSampler(100, 10, 0, 1, seed=0, stream="retain").indices(0)
    assert a != StepSampler(100, 10, 0, 1, seed=1, stream="forget").indices(0)


def test_bad_sizes():
    with pytest.raises(ValueError, match="does not divide over 3 workers"):
        StepSampler(10, 8, 0, 3, seed=0, stream="forget")
    with pytest.raises(ValueError, match="stream 'forget' is empty"):
        StepSampler(0, 8, 0, 1, seed=0, stream="forget")
