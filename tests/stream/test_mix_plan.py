import numpy as np
import pytest

from m2m.errors import ConfigError
from m2m.stream import mixing


def test_counts_sum_exactly_and_follow_weights():
    w = mixing.check_weights(["a", "b", "c"], {"a": 1, "b": 1, "c": 1})
    c = mixing.counts(w, 1000)
    assert c.sum() == 1000 and sorted(c.tolist()) == [333, 333, 334]
    c = mixing.counts(mixing.check_weights(["a", "b"], {"a": 0.8, "b": 0.2}), 2500)
    assert c.tolist() == [2000, 500]


@pytest.mark.parametrize("weights", [{"a": -1, "b": 1}, {"a": 0, "b": 0}, {"a": 1, "b": 1, "z": 1}, {"a": 1}])
def test_bad_weights_are_one_line_errors(weights):
    with pytest.raises(ConfigError) as e:
        mixing.check_weights(["a", "b"], weights)
    assert "\n" not in str(e.value)


def test_draws_down_and_up_sample_deterministically():
    per = mixing.counts(mixing.check_weights(["a", "b"], {"a": 0.8, "b": 0.2}), 2500)
    src, rows = mixing.epoch_draws([5000, 200], per, seed=3, epoch=0)
    assert (src == 0).sum() == 2000 and (src == 1).sum() == 500
    down = rows[src == 0]
    assert len(set(down.tolist())) == 2000  # no row twice in one epoch when down-sampled
    up = np.bincount(rows[src == 1], minlength=200)
    assert up.min() == 2 and up.max() == 3  # whole passes plus a remainder
    again = mixing.epoch_draws([5000, 200], per, seed=3, epoch=0)
    assert np.array_equal(again[0], src) and np.array_equal(again[1], rows)
    other = mixing.epoch_draws([5000, 200], per, seed=3, epoch=1)
    assert not np.array_equal(other[1], rows)
