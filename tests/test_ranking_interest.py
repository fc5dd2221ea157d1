"""Feed ranking and interest vectors (pure functions)."""

import numpy as np
import pytest

from cipherfeed.client.interest import Engagement, interest_vector
from cipherfeed.client.ranking import rank_feed


def test_feed_drops_seen_and_caps_creators():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    creators = np.array([0, 0, 0, 1, 2, 1])
    assert rank_feed(scores, 4, creators, seen=[1], per_creator_cap=1) == [0, 3, 4]
    assert rank_feed(scores, 4, creators, seen=[], per_creator_cap=2) == [0, 1, 3, 4]


def test_feed_ties_break_by_index_and_k_zero_is_empty():
    scores = np.array([0.5, 0.5, 0.5])
    assert rank_feed(scores, 2, np.arange(3)) == [0, 1]
    assert rank_feed(scores, 0, np.arange(3)) == []


def test_feed_rejects_bad_arguments():
    with pytest.raises(ValueError):
        rank_feed(np.ones(3), 2, np.arange(2))
    with pytest.raises(ValueError):
        rank_feed(np.ones(3), 2, np.arange(3), per_creator_cap=0)


def test_engagement_weights_order_comment_like_watch_and_decay_with_age():
    watch = Engagement("a", watched=1.0)
    like = Engagement("a", watched=1.0, liked=True)
    comment = Engagement("a", watched=1.0, liked=True, commented=True)
    assert watch.weight < like.weight < comment.weight
    assert Engagement("a", liked=True, recency_rank=5).weight < Engagement("a", liked=True).weight
    assert Engagement("a", watched=7.0).weight == 1.0  # clamped


def test_interest_vector_is_unit_weighted_mean():
    e = np.array([[1.0, 0.0], [0.0, 1.0]])
    u = interest_vector(e, [Engagement("a", liked=True, commented=True), Engagement("b", watched=0.5)])
    assert np.isclose(np.linalg.norm(u), 1.0)
    assert u[0] > u[1] > 0


def test_interest_vector_errors():
    with pytest.raises(ValueError, match="at least one"):
        interest_vector(np.zeros((0, 2)), [])
    with pytest.raises(ValueError, match="zero weight"):
        interest_vector(np.ones((1, 2)), [Engagement("a", watched=0.0)])
    with pytest.raises(ValueError, match="cancel"):
        interest_vector(np.array([[1.0, 0.0], [-1.0, 0.0]]), [Engagement("a"), Engagement("b")])
