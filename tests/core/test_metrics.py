"""Metric math against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from rsdist.core.metrics import (
    class_prompts,
    classification_accuracy,
    image_to_text_ranks,
    label_words,
    recall_at_k,
    retrieval_metrics,
    text_to_image_ranks,
)

# 3 images, 5 texts: image 0 owns texts 0,1; image 1 owns text 2; image 2 owns texts 3,4.
TEXT_IMAGE = np.array([0, 0, 1, 2, 2])
SIM = np.array([
    #  t0   t1   t2   t3   t4
    [0.9, 0.1, 0.5, 0.3, 0.2],   # image 0: own best t0 (0.9) is first        -> rank 0
    [0.8, 0.7, 0.6, 0.1, 0.0],   # image 1: own t2 (0.6) behind t0, t1         -> rank 2
    [0.4, 0.2, 0.9, 0.1, 0.3],   # image 2: own best t4 (0.3) behind t0, t2    -> rank 2
])


def test_image_to_text_counts_the_best_ranked_own_caption():
    assert image_to_text_ranks(SIM, TEXT_IMAGE).tolist() == [0, 2, 2]


def test_text_to_image_ranks_the_own_image_among_images():
    # columns: t0 own img0 0.9 best -> 0; t1 own img0 0.1 < 0.7, 0.2 -> 2; t2 own img1 0.6 < 0.9 -> 1;
    # t3 own img2 0.1 < 0.3 -> 1 (tie with img1 does not count); t4 own img2 0.3 > 0.2, 0.0 -> 0
    assert text_to_image_ranks(SIM, TEXT_IMAGE).tolist() == [0, 2, 1, 1, 0]


def test_recall_and_mean_recall_by_hand():
    m = retrieval_metrics(SIM, TEXT_IMAGE, ks=(1, 2, 3))
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r2"] == pytest.approx(100 / 3)
    assert m["i2t_r3"] == pytest.approx(100.0)
    assert m["t2i_r1"] == pytest.approx(40.0)
    assert m["t2i_r2"] == pytest.approx(80.0)
    assert m["t2i_r3"] == pytest.approx(100.0)
    assert m["mR"] == pytest.approx((100 / 3 + 100 / 3 + 100 + 40 + 80 + 100) / 6)


def test_perfect_and_reversed_similarity():
    n = 6
    eye = np.eye(n)
    assert retrieval_metrics(eye, np.arange(n), ks=(1,))["mR"] == 100.0
    worst = -np.eye(n)
    assert recall_at_k(image_to_text_ranks(worst, np.arange(n)), [1, 5, 6]) == {1: 0.0, 5: 0.0, 6: 100.0}


def test_ties_favour_the_ground_truth():
    sim = np.zeros((2, 2))
    assert image_to_text_ranks(sim, np.array([0, 1])).tolist() == [0, 0]


def test_shape_mismatch_is_one_clear_error():
    with pytest.raises(ValueError, match="need \\[images, texts\\]"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))


def test_classification_accuracy_overall_and_per_class():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.1, 0.2, 0.7]])
    out = classification_accuracy(scores, np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert out["accuracy"] == pytest.approx(75.0)
    assert out["per_class"] == {"a": 100.0, "b": 50.0, "c": 100.0}
    assert out["count"] == 4


def test_labels_become_prompt_words():
    assert label_words("DenseResidential") == "dense residential"
    assert label_words("BareLand") == "bare land"
    assert label_words("storage_tanks") == "storage tanks"
    assert label_words("Forest") == "forest"
    assert class_prompts(["RailwayStation"], "an aerial photograph of {label}") == ["an aerial photograph of railway station"]
