"""The seeded digits protocol and the optional text set (m2m_bench.datasets)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from m2m_bench.datasets import DIGITS_IMAGES, digits_embeddings  # noqa: E402

from m2m.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return digits_embeddings(rows=3000, dim=128, seed=3)


def test_shapes_dtypes_and_unit_rows(digits):
    tx, ty, sx, sy, ti, si = digits
    assert tx.shape == (len(ty), 128) and sx.shape == (len(sy), 128)
    assert len(ty) + len(sy) == 3000
    assert tx.dtype == sx.dtype == np.float32 and ty.dtype == sy.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([tx, sx]), axis=1), 1.0, atol=1e-5)
    assert set(np.unique(np.concatenate([ty, sy]))) == set(range(10))


def test_split_is_by_source_image(digits):
    _, ty, _, sy, ti, si = digits
    assert not set(ti.tolist()) & set(si.tolist())
    assert ti.min() >= 0 and max(ti.max(), si.max()) < DIGITS_IMAGES
    # about test_fraction of the images are held out, so about that share of rows
    assert 0.15 < len(sy) / 3000 < 0.25


def test_labels_are_the_source_images_digits(digits):
    from sklearn.datasets import load_digits

    target = load_digits().target
    assert (digits.train_y == target[digits.train_image]).all()
    assert (digits.test_y == target[digits.test_image]).all()


def test_resampled_rows_of_one_image_are_near_duplicates(digits):
    x, img = digits.train_x, digits.train_image
    order = np.argsort(img, kind="stable")
    x, img = x[order], img[order]
    same = img[1:] == img[:-1]
    cos_adjacent = (x[1:] * x[:-1]).sum(1)
    assert same.sum() > 100
    assert cos_adjacent[same].mean() > 0.9            # same image: noise only (~0.95 at noise=1)
    g = np.random.default_rng(0)
    a, b = g.integers(0, len(x), (2, 2000))
    other = img[a] != img[b]
    assert (x[a] * x[b]).sum(1)[other].mean() < 0.3    # different images: far apart


def test_seed_fixes_everything():
    a = digits_embeddings(rows=500, dim=64, seed=1)
    b = digits_embeddings(rows=500, dim=64, seed=1)
    c = digits_embeddings(rows=500, dim=64, seed=2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.train_image, c.train_image)


def test_noise_zero_gives_exact_duplicates():
    d = digits_embeddings(rows=2000, dim=32, seed=0, noise=0.0)
    first = {}
    for row, img in zip(d.train_x, d.train_image):
        if img in first:
            np.testing.assert_allclose(row, first[img], atol=1e-6)
        else:
            first[img] = row


@pytest.mark.parametrize("kwargs, name", [
    ({"rows": 1}, "rows"), ({"dim": 1}, "dim"), ({"seed": -1}, "seed"), ({"test_fraction": 1.0}, "test_fraction"),
    ({"noise": -0.5}, "noise"), ({"rows": 2.5}, "rows"),
])
def test_bad_arguments_name_the_field(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        digits_embeddings(**kwargs)


def test_vader_lexicon_when_installed():
    pytest.importorskip("vaderSentiment")
    from m2m_bench.datasets import vader_lexicon

    tokens, ratings = vader_lexicon()
    assert len(tokens) > 7000 and len(tokens) == len(ratings)
    lookup = dict(zip(tokens, ratings))
    assert lookup["good"] > 0 > lookup["bad"]


def test_text_set_missing_packages_raise_importerror_with_the_fix(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("vaderSentiment") is not None:
        pytest.skip("vaderSentiment is installed")
    from m2m_bench.datasets import word_sentiment_embeddings

    with pytest.raises(ImportError, match="pip install vaderSentiment"):
        word_sentiment_embeddings()
