"""VLM evaluation metrics on constructed cases with hand-computed values."""

from __future__ import annotations

import pytest

from rsdist.eval.vlm_metrics import classification_metrics, match_class, normalize_answer, vqa_matches, vqa_metrics

CLASSES = ["airport", "dense residential", "residential", "baseball field", "forest"]


def test_normalize_answer():
    assert normalize_answer("The Dense_Residential area.") == "dense residential area"
    assert normalize_answer("DenseResidential") == "dense residential"
    assert normalize_answer("  An  airport!! ") == "airport"
    assert normalize_answer("Two") == "2"
    assert normalize_answer("storage-tanks") == "storage tanks"
    assert normalize_answer(None) == ""


def test_match_class_exact_then_longest_contained():
    assert match_class("Airport.", CLASSES) == "airport"
    assert match_class("baseballfield", CLASSES) == "baseball field"
    assert match_class("BaseballField", CLASSES) == "baseball field"
    assert match_class("it is a dense residential area", CLASSES) == "dense residential"  # longest wins over 'residential'
    assert match_class("residential", CLASSES) == "residential"
    assert match_class("forests", CLASSES) is None  # whole words only
    assert match_class("", CLASSES) is None


def test_classification_metrics_by_hand():
    answers = ["airport", "An airport.", "forest", "dense residential", "beach", "Residential"]
    targets = ["airport", "forest", "forest", "dense residential", "forest", "dense residential"]
    m = classification_metrics(answers, targets, CLASSES)
    # airport 1/1; forest: 'airport' wrong, 'forest' right, 'beach' unmatched -> 1/3; dense residential 1/2
    assert m["count"] == 6 and m["correct"] == 3 and m["accuracy"] == pytest.approx(0.5)
    assert m["unmatched"] == 1
    assert m["per_class"] == {"airport": {"accuracy": 1.0, "correct": 1, "count": 1}, "dense residential": {"accuracy": 0.5, "correct": 1, "count": 2},
                              "forest": {"accuracy": pytest.approx(1 / 3), "correct": 1, "count": 3}}
    assert m["mean_class_accuracy"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)
    with pytest.raises(ValueError, match="target class\\(es\\) desert not in the class list"):
        classification_metrics(["x"], ["desert"], CLASSES)


def test_vqa_metrics_by_hand():
    answers = ["Yes", "no", "two", "3", "rural.", "yes"]
    targets = ["yes", "yes", "2", "4", "Rural", "yes"]
    types = ["presence", "presence", "count", "count", "rural_urban", None]
    matches = vqa_matches(answers, targets)
    assert matches == [True, False, True, False, True, True]
    m = vqa_metrics(matches, types)
    # presence 1/2, count 1/2, rural_urban 1/1, all (no type) 1/1 -> overall 4/6, average (0.5 + 0.5 + 1 + 1) / 4
    assert m["correct"] == 4 and m["count"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_type"]["presence"] == {"accuracy": 0.5, "correct": 1, "count": 2}
    assert m["per_type"]["rural_urban"]["accuracy"] == 1.0 and m["per_type"]["all"]["count"] == 1
    assert m["average_over_types"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="must be as many"):
        vqa_matches(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="must be as many"):
        vqa_metrics([True], [None, None])


def test_caption_metrics_bleu4_and_rouge_l_by_hand():
    from rsdist.eval.vlm_metrics import caption_metrics, corpus_bleu, rouge_l

    refs = [["a dense forest with many green trees", "many trees in a forest"]]
    assert corpus_bleu(["A dense forest with many green trees."], refs) == pytest.approx(1.0)
    assert corpus_bleu(["forest"], refs) == 0.0  # no 4-gram in a one-word caption
    # articles dropped: 'many trees in forest of green' (6 words), the 6-word reference is the closest
    # length (no brevity penalty); clipped precisions 5/6, 3/5, 2/4, 1/3 ('many trees in forest')
    candidate = "many trees in a forest of green"
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu([candidate], refs) == pytest.approx(expected)
    # LCS with the second reference: 'many trees in forest', 4 of the candidate's 6 words and all 4 of the reference's
    p, r = 4 / 6, 4 / 4
    assert rouge_l(candidate, refs[0]) == pytest.approx((1 + 1.2 ** 2) * p * r / (r + 1.2 ** 2 * p))
    m = caption_metrics([candidate, ""], refs + [["a lake"]])
    assert m["count"] == 2 and m["rouge_l"] == pytest.approx(rouge_l(candidate, refs[0]) / 2)
