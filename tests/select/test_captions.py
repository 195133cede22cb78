"""caption-diversity and caption-typicality on constructed caption pools where the right choice is known."""

import numpy as np

from rsdist.select.captions import caption_information, caption_select, caption_typicality, normalize_caption


def test_normalisation_merges_case_spacing_and_trailing_punctuation():
    assert normalize_caption("  Many  buildings are in an industrial area . ") == "many buildings are in an industrial area"
    assert normalize_caption("A bridge!") == normalize_caption("a bridge")
    assert normalize_caption("a bridge") != normalize_caption("a bridge over a river")


def test_information_counts_rare_distinct_captions():
    captions = [
        ["a generic scene .", "A generic scene", "a generic scene ."],  # one sentence, shared by 2 images
        ["a generic scene"],
        ["a red roof", "a blue pool", "a white boat"],  # three unique sentences
        ["a red roof", "a long pier"],  # one shared with image 2, one unique
    ]
    info, distinct = caption_information(captions)
    assert distinct.tolist() == [1, 1, 3, 2]
    np.testing.assert_allclose(info, [0.5, 0.5, 0.5 + 1 + 1, 0.5 + 1])


def test_each_cluster_keeps_its_most_informative_images_within_its_quota():
    groups = np.array([0] * 6 + [1] * 4)
    info = np.array([3.0, 0.1, 2.0, 0.1, 1.0, 0.1, 0.2, 5.0, 0.2, 0.2])
    sel = caption_select(2, groups, info, budget=5, quota="proportional", seed=0)
    assert sel.quotas.tolist() == [3, 2]
    kept = set(np.flatnonzero(sel.selected).tolist())
    assert {0, 2, 4, 7} <= kept and len(kept) == 5  # cluster 1's second place is a tie among 6, 8, 9
    assert all(r.startswith("kept:") for r in sel.reason[sel.selected])


def test_seed_only_reorders_ties():
    groups = np.zeros(8, dtype=np.int64)
    info = np.array([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    picks = {tuple(np.flatnonzero(caption_select(1, groups, info, 2, "proportional", seed).selected)) for seed in range(20)}
    assert all(set(p) <= {0, 1, 2, 3} for p in picks) and len(picks) > 1
    again = caption_select(1, groups, info, 2, "proportional", 7)
    assert np.array_equal(again.selected, caption_select(1, groups, info, 2, "proportional", 7).selected)


def test_keep_lowest_takes_the_most_repeated_captions():
    groups = np.zeros(6, dtype=np.int64)
    info = np.array([3.0, 0.1, 2.0, 0.2, 1.0, 0.3])
    sel = caption_select(1, groups, info, 3, "proportional", 0, keep="lowest")
    assert np.flatnonzero(sel.selected).tolist() == [1, 3, 5]


def test_keep_both_takes_the_two_ends_in_turn():
    groups = np.array([0] * 6 + [1] * 2)
    info = np.array([3.0, 0.1, 2.0, 0.2, 1.0, 0.3, 5.0, 0.5])
    sel = caption_select(2, groups, info, 4, "proportional", 0, keep="both")
    assert sel.quotas.tolist() == [3, 1]
    # cluster 0 (quota 3): lowest 0.1, highest 3.0, second lowest 0.2; cluster 1 (quota 1): its lowest.
    assert np.flatnonzero(sel.selected).tolist() == [0, 1, 3, 7]


def test_keep_both_is_refused_for_other_methods():
    import pytest

    from rsdist.config import ConfigError, SelectConfig

    assert SelectConfig(method="caption-diversity", keep="both").keep == "both"
    with pytest.raises(ConfigError, match="select.keep: 'both' is for method caption-diversity only"):
        SelectConfig(method="shift", keep="both")


def test_typicality_ranks_images_whose_words_their_cluster_uses():
    stadium = [["a stadium with a red track"], ["a green stadium and a track"], ["the track of a stadium"], ["a stadium near houses"]]
    harbour = [["boats in a harbour"], ["many boats moored in the harbour"], ["a harbour with boats"], ["a harbour and a stadium"]]
    groups = np.array([0] * 4 + [1] * 4)
    score = caption_typicality(stadium + harbour, groups, 2)
    assert np.argmin(score[4:]) == 3  # the harbour image described with "stadium"
    assert score[:3].min() > score[3]  # "houses" is in no other caption: left out; "near" neither
    sel = caption_select(2, groups, score, 4, "proportional", 0, what="caption typicality")
    assert not sel.selected[7] and sel.selected[4:7].sum() == 2
    assert "caption typicality" in sel.reason[0]


def test_typicality_leaves_out_words_no_other_image_uses():
    groups = np.array([0, 0, 1, 1])
    base = caption_typicality([["red roof"], ["red roof"], ["blue pool"], ["blue pool"]], groups, 2)
    with_unique = caption_typicality([["red roof zyzzyva"], ["red roof"], ["blue pool"], ["blue pool"]], groups, 2)
    np.testing.assert_allclose(with_unique, base)
    assert caption_typicality([[], ["a b"], ["a b"], ["c"]], groups, 2)[0] == 0.0
    # Every word specific to its cluster: log((2 / 3) / (2 / 5)) each.
    np.testing.assert_allclose(base, np.log((2 / 3) / (2 / 5)))
