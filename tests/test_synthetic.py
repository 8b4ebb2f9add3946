"""kdray.synthetic: determinism, exact sizes, sampling without replacement, time order, long tail, taste."""

from __future__ import annotations

import numpy as np
import pytest

from kdray.data.synthetic import Taste, allocate_activity, generate

SMALL = dict(n_users=300, n_items=200, n_interactions=9000, n_clusters=8, latent_dim=8, popularity_exponent=1.0)


def test_deterministic_under_seed_and_seeds_differ():
    a, b, c = generate(**SMALL, seed=0), generate(**SMALL, seed=0), generate(**SMALL, seed=1)
    for field in ("users", "items", "timestamps", "item_topics"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.items, c.items)


@pytest.mark.parametrize("n_users, n_items, n_interactions", [
    (300, 200, 9000),  # the usual case
    (50, 20, 900),  # a dense one: the cap of n_items per user binds and the others absorb the excess
    (100, 50, 60),  # fewer interactions than users: some users get none
    (10, 5, 50),  # every user takes the whole catalog
])
def test_exact_size_no_duplicates_and_time_order(n_users, n_items, n_interactions):
    g = generate(**{**SMALL, "n_users": n_users, "n_items": n_items, "n_interactions": n_interactions}, seed=3,
                 chunk_entries=4096)  # many chunks
    assert g.users.size == g.items.size == g.timestamps.size == n_interactions
    assert g.users.min() >= 0 and g.users.max() < n_users and g.items.min() >= 0 and g.items.max() < n_items
    assert np.unique(g.users * n_items + g.items).size == n_interactions  # sampled without replacement
    assert (np.diff(g.users) >= 0).all()  # sorted by user ...
    same_user = np.diff(g.users) == 0
    assert (np.diff(g.timestamps)[same_user] > 0).all()  # ... then strictly increasing in time
    counts = np.bincount(g.users, minlength=n_users)
    assert counts.max() <= n_items and (counts.min() >= 1 or n_interactions < n_users)


def test_allocate_activity_is_exact_and_bounded():
    rng = np.random.default_rng(0)
    for total, cap in ((1000, 40), (5000, 60), (30, 10)):
        w = rng.lognormal(0, 1.5, 100)
        k = allocate_activity(w, total, cap)
        assert k.sum() == total and k.max() <= cap and k.min() >= (1 if total >= 100 else 0)
    assert allocate_activity(np.ones(4), 8, 5).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError):
        allocate_activity(np.ones(4), 21, 5)


def test_long_tail_and_varied_activity():
    g = generate(n_users=3000, n_items=2000, n_interactions=150_000, n_clusters=16, latent_dim=8,
                 popularity_exponent=1.0, seed=0)
    pop = np.sort(np.bincount(g.items, minlength=2000))[::-1]
    assert pop[:200].sum() / pop.sum() > 0.2  # top 10% of items: far more than 10% of interactions
    activity = np.bincount(g.users)
    assert activity.max() > 5 * np.median(activity)  # lognormal activity: heavy users exist
    flat = generate(**SMALL, seed=0)
    flat0 = generate(**{**SMALL, "popularity_exponent": 0.0}, seed=0)
    share = lambda items: np.sort(np.bincount(items))[::-1][:20].sum() / items.size  # noqa: E731
    assert share(flat.items) > share(flat0.items)  # the exponent controls the tail


def test_users_follow_their_taste():
    g = generate(**SMALL, seed=5)
    rng = np.random.default_rng(np.random.SeedSequence([5, 0x5EED]))  # generate draws the taste first
    taste = Taste.draw(rng, n_users=300, n_items=200, n_clusters=8, latent_dim=8, popularity_exponent=1.0)
    np.testing.assert_array_equal(taste.item_topics, g.item_topics)
    logits = taste.logits(0, 300)
    chosen = logits[g.users, g.items].mean()
    assert chosen > logits.mean() + 5  # the sample favours what the user likes
