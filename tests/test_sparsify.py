import numpy as np
import pytest

from napari_sparseseg.core.sparsify import sparsify, sparsify_many


def _dense(n=20):
    lab = np.zeros((max(40, (n + 4) // 5 * 10), 50), np.int32)
    for i in range(n):
        lab[(i // 5) * 10 : (i // 5) * 10 + 8, (i % 5) * 10 : (i % 5) * 10 + 8] = i + 1
    return lab


def test_fraction_rounding_and_at_least_one():
    lab = _dense(20)
    assert len(np.unique(sparsify(lab, 0.1, 0))) - 1 == 2
    assert len(np.unique(sparsify(lab, 0.4, 0))) - 1 == 8
    assert len(np.unique(sparsify(lab, 0.01, 0))) - 1 == 1  # at least one object


@pytest.mark.parametrize(
    "n, fraction, kept",
    [(25, 0.1, 3), (15, 0.1, 2), (5, 0.1, 1), (35, 0.1, 4), (45, 0.1, 5), (10, 0.25, 3), (20, 0.125, 3), (45, 0.7, 32)],
)
def test_round_half_up(n, fraction, kept):
    """SPEC 1: round(p * n) rounds half up (2.5 -> 3, 1.5 -> 2, 0.5 -> 1), not half to even;
    0.7 * 45 is 31.499999999999996 in floating point but 31.5 as the user wrote it."""
    assert len(np.unique(_dense(n))) - 1 == n
    assert len(np.unique(sparsify(_dense(n), fraction, 0))) - 1 == kept


def test_kept_objects_are_complete_and_rest_is_zero():
    lab = _dense(20)
    sp = sparsify(lab, 0.25, 3)
    for i in np.unique(sp[sp > 0]):
        assert np.array_equal(sp == i, lab == i)
    assert np.all(sp[~np.isin(lab, np.unique(sp[sp > 0]))] == 0)


def test_background_never_kept():
    lab = _dense(3)
    sp = sparsify(lab, 1.0, 0)
    assert np.array_equal(sp, lab)  # all objects, and background stays 0
    assert sp[lab == 0].max() == 0


def test_seeded_and_uniform():
    lab = _dense(20)
    assert np.array_equal(sparsify(lab, 0.2, 7), sparsify(lab, 0.2, 7))
    kept = np.zeros(21)
    for s in range(2000):
        kept[np.unique(sparsify(lab, 0.1, s))] += 1
    freq = kept[1:] / 2000
    assert np.allclose(freq, 0.1, atol=0.03)  # each object kept with probability 2/20


def test_many_is_per_image_and_stable():
    labs = [_dense(10), _dense(20)]
    a = sparsify_many(labs, 0.3, seed=1)
    b = sparsify_many(labs + [_dense(5)], 0.3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bad_fraction():
    with pytest.raises(ValueError, match="fraction must be in"):
        sparsify(_dense(2), 0.0)
