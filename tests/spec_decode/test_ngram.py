"""Prompt lookup and predicted-output lookup on hand-made token lists."""

from tokenmill.spec_decode.ngram import lookup, lookup_in


def test_lookup_continues_the_latest_earlier_match_of_the_longest_tail():
    # The tail [1, 2] occurs at 0 (followed by 3) and at 4 (followed by 9): the latest wins.
    assert lookup([1, 2, 3, 4, 1, 2, 9, 8, 1, 2], k=3, min_n=1, max_n=3) == [9, 8, 1]
    # A 3-token tail [7, 1, 2] matches only at 0, though [1, 2] alone matches later: the longest tail wins.
    assert lookup([7, 1, 2, 5, 1, 2, 6, 7, 1, 2], k=2, min_n=2, max_n=3) == [5, 1]


def test_lookup_finds_nothing_below_the_minimum_tail_or_without_a_match():
    assert lookup([1, 2, 3, 4, 5], k=3, min_n=1, max_n=3) == []
    assert lookup([1, 2, 3, 4, 2], k=3, min_n=2, max_n=3) == []  # only a 1-token tail matches
    assert lookup([1, 2, 3, 4, 2], k=3, min_n=1, max_n=3) == [3, 4, 2]
    assert lookup([1, 2, 1], k=0, min_n=1, max_n=3) == []


def test_lookup_in_a_prediction_takes_the_match_nearest_the_output_position():
    prediction = [10, 11, 12, 10, 11, 13, 14]
    assert lookup_in(prediction, [10, 11], k=2, max_n=4) == [12, 10]  # at the start, the first [10, 11]
    assert lookup_in(prediction, [20, 21, 22, 10, 11], k=2, max_n=4) == [13, 14]  # further on, the second
    assert lookup_in(prediction, [99], k=2, max_n=4) == []
    assert lookup_in([], [10], k=2, max_n=4) == []
