"""Partial participation: which sites a round trains, for 100+ site federations."""

from __future__ import annotations

import math

import pytest

from server.directory import SiteInfo, sample_sites

SITES = [SiteInfo(i, f"site-{i:03d}", i, 10, {}, {}) for i in range(120)]


@pytest.mark.parametrize(("fraction", "at_least"), [(0.1, 1), (0.25, 2), (0.01, 5)])
def test_a_round_samples_the_fraction_rounded_up_and_at_least_min_sites(
    fraction: float, at_least: int
) -> None:
    picked = sample_sites(SITES, fraction, seed=3, at_least=at_least)
    assert len(picked) == max(at_least, math.ceil(fraction * len(SITES)))
    assert len({s.node_id for s in picked}) == len(picked)
    assert [s.name for s in picked] == sorted(s.name for s in picked)


def test_the_sample_is_fixed_by_the_seed_and_changes_with_it() -> None:
    """A retried or resumed round draws with the same seed, so it asks the same sites again."""
    first = sample_sites(SITES, 0.1, seed=11)
    assert sample_sites(SITES, 0.1, seed=11) == first
    assert sample_sites(SITES, 0.1, seed=12) != first


def test_full_participation_is_every_site() -> None:
    assert sample_sites(SITES, 1.0, seed=0) == SITES
