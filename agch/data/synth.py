"""Synthetic MIRFlickr-like datasets: fully synthetic, or real labels + real tags + synthetic image features.

How each part is drawn, and how the image signal level was calibrated against published baselines, is in
docs/synthetic-data.md. Every draw comes from `np.random.default_rng` on a `SeedSequence(seed, spawn_key=...)`
stream of its own (labels, tags, image model, each image row block), so one seed fixes every array, and a part
does not change when another part's generator changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtri

from agch.data.dataset import write_dataset
from agch.errors import UserError
from agch.data.importers import file_sha256, read_mat_array
from agch.data.splits import make_split, recorded_seed

SYNTH_VERSION = 2
"""Bumped whenever a generator's output for a given seed changes."""

# ---- MIRFlickr-25K statistics (docs/data.md), the targets of the fully synthetic generator ----
MIRFLICKR_N = 20015
MIRFLICKR_TAG_DIM = 1386
MIRFLICKR_LABEL_NAMES = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake", "male",
    "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures", "sunset", "transport",
    "tree", "water")
MIRFLICKR_LABEL_COUNTS = (
    2647, 179, 644, 986, 3230, 581, 4614, 1554, 813, 6320, 704, 4743, 2243, 7848, 7413, 2740, 811, 1133, 6818,
    8463, 1840, 2450, 3981, 2885)
MIRFLICKR_LABELS_PER_ITEM = (2476, 3341, 3882, 3896, 2772, 1671, 1022, 564, 260, 91, 32, 7, 0, 1)
"""Number of items with 1, 2, ..., 14 labels."""
MIRFLICKR_SHARED_LABEL_RATE = 0.555
MIRFLICKR_TAGS_PER_ITEM = 4.64

# The annotations are hierarchical: in the real LAll every item with a child label also has the parent
# (P(parent | child) >= 0.998 for each pair below), which is what keeps the shared-label rate at 55.5%.
LABEL_PARENT = {"bird": "animals", "dog": "animals", "baby": "people", "female": "people", "male": "people",
                "portrait": "people", "flower": "plant_life", "tree": "plant_life", "lake": "water",
                "river": "water", "sea": "water", "clouds": "sky", "car": "transport"}
# Indoor photos carry few labels and almost never the outdoor ones (real lift indoor/sky 0.08); this scene
# setting is the other structure the shared-label rate needs.
INDOOR_LABELS = ("indoor", "food")
OUTDOOR_LABELS = ("clouds", "sky", "sunset", "water", "lake", "river", "sea", "plant_life", "tree", "structures",
                  "transport", "car")

DEFAULT_IMAGE_SIGNAL = 0.8
"""Label share of the image latent variance; with 4 visual modes per label and 9% active units, calibrated so that
AGCH's S on the stand-ins tracks the labels as the debugging log measured on real MIRFlickr-25K features (corr 0.29,
positive pairs -0.73, negative -0.81; docs/synthetic-data.md)."""

_LABEL_STREAM, _TAG_STREAM, _IMAGE_STREAM = 0, 1, 2
_IMAGE_BLOCK_ROWS = 1024  # image rows are drawn per fixed block, so any slicing gives the same values
_TAG_BLOCK_ROWS = 2048  # bounds the (rows, vocabulary) race matrix
_NOISE_POOL = 1 << 18  # lognormal factors the multiplicative image noise is read from


@dataclass(frozen=True)
class LabelModel:
    """Fully synthetic labels: count from the histogram, then a parent-closed Gumbel top-k over the labels."""

    family_coupling: float = 3.0
    """Std of an item's shared key boost for a label family (parent + children): siblings co-occur."""
    setting_strength: float = 3.25
    """Key boost of the item's indoor/outdoor setting score on the indoor (+) and outdoor (-) labels."""
    setting_count_correlation: float = 0.9
    """Correlation of the setting score with minus the standardised label count (indoor items: few labels)."""
    max_fit_iterations: int = 60
    """Iterations of the per-label weight fit that matches the label frequencies on the drawn sample."""


@dataclass(frozen=True)
class TagModel:
    """Binary tags: long-tailed popularity, each tag tied to one label or label-independent."""

    dim: int = MIRFLICKR_TAG_DIM
    """Vocabulary size."""
    label_affinity: float = 2.8
    """Log-weight boost of a tag when the item has the tag's label (the text signal)."""
    free_tag_fraction: float = 0.15
    """Expected fraction of label-independent tags, drawn in proportion to popularity (popular tags: camera
    brands, 'explore')."""
    popularity_floor: float = 17.0
    """Popularity = floor + lognormal; the cleaned vocabulary keeps tags used >= ~17 times."""
    popularity_log_mean: float = 2.9
    """Mean of log(popularity - floor); with the sd, fits the real tag-frequency percentiles."""
    popularity_log_sd: float = 1.33
    """Std of log(popularity - floor)."""
    extra_tags_mean: float = 3.64
    """Tags per item = 1 + negative binomial with this mean (no empty rows): 4.64 in all, as in MIRFlickr-25K."""
    extra_tags_dispersion: float = 1.22
    """Negative binomial shape; fits the real variance of tags per item (14.5)."""


@dataclass(frozen=True)
class ImageModel:
    """fc7-like features: latent = label prototypes + nuisance, random map, offset + ReLU, multiplicative noise."""

    dim: int = 4096
    """Feature dimension."""
    signal: float = DEFAULT_IMAGE_SIGNAL
    """Fraction of the latent variance carried by the labels (0 = no label information, 1 = no nuisance)."""
    latent_dim: int = 128
    """Dimension of the latent space of prototypes and nuisance."""
    n_styles: int = 64
    """Label-independent nuisance clusters (photographer, lighting): images also group by these."""
    n_modes: int = 4
    """Visual modes per label (a dog indoors, a dog on a beach): which one an image shows is set by its style
    cluster, so label information is non-linear in the features (an interaction of label and nuisance)."""
    style_share: float = 0.5
    """Fraction of the nuisance variance from the item's style cluster; the rest is per-image."""
    active_fraction: float = 0.09
    """Mean fraction of non-zero features after the ReLU."""
    offset_spread: float = 0.25
    """Std of the per-unit ReLU threshold around its mean: some units fire rarely, some often."""
    gain_spread: float = 0.5
    """Log-std of the per-unit gain: a long tail of large activations."""
    noise: float = 0.3
    """Log-std of the multiplicative (mean-one lognormal) noise on every active unit."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.signal <= 1.0:
            raise UserError(f"image signal must be in [0, 1], got {self.signal}")
        if self.dim < 1:
            raise UserError(f"image_dim must be at least 1, got {self.dim}")


def _describe(generator: str, seed: int, model: object, summary: str) -> str:
    """One line for meta["synthetic"]: generator, version, seed, what it does and every parameter."""
    params = ", ".join(f"{key}={value}" for key, value in asdict(model).items())
    return f"{generator} v{SYNTH_VERSION} (seed {seed}): {summary}; {params}"


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def _scaled_histogram(histogram: tuple[int, ...], n: int) -> np.ndarray:
    """Scale bin counts to sum to n (largest remainder), so small test sets keep the shape."""
    exact = np.asarray(histogram, dtype=np.float64) * n / sum(histogram)
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[:n - counts.sum()]] += 1
    return counts


def _closed_top_k(keys: np.ndarray, counts: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Per row, take labels in decreasing key order until `counts` are reached; a child brings its parent.

    keys (n, L), counts (n,), parent (L,) index or -1. Returns (n, L) bool with exactly `counts` per row
    (the second pass fills rows whose last free slot met a child needing its parent too).
    """
    n, n_labels = keys.shape
    order = np.argsort(-keys, axis=1, kind="stable")
    taken = np.zeros(keys.shape, dtype=bool)
    filled = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    for _ in range(2):
        for position in range(n_labels):
            label = order[:, position]
            par = parent[label]
            has_parent = par >= 0
            parent_missing = has_parent & ~taken[rows, np.where(has_parent, par, 0)]
            need = (~taken[rows, label]).astype(np.int64) + parent_missing
            take = (need > 0) & (filled + need <= counts)
            taken[rows[take], label[take]] = True
            with_parent = take & parent_missing
            taken[rows[with_parent], par[with_parent]] = True
            filled += np.where(take, need, 0)
        if np.array_equal(filled, counts):
            break
    return taken


def draw_labels(n: int, seed: int, model: LabelModel = LabelModel()) -> np.ndarray:
    """(n, 24) uint8 MIRFlickr-like labels matching the label-count histogram and per-label frequencies.

    The histogram is matched exactly (scaled to n); label weights are fitted (Rprop on log-frequency error)
    on this very sample, so the frequencies match to about one item.

    Example:
        >>> labels = draw_labels(600, seed=0)
        >>> labels.shape, int(labels.sum(axis=1).min())
        ((600, 24), 1)
    """
    rng = _rng(seed, _LABEL_STREAM)
    names = MIRFLICKR_LABEL_NAMES
    parent = np.array([names.index(LABEL_PARENT[name]) if name in LABEL_PARENT else -1 for name in names])
    family = np.where(parent >= 0, parent, np.arange(len(names)))
    setting_loading = np.array([1.0 if x in INDOOR_LABELS else -1.0 if x in OUTDOOR_LABELS else 0.0 for x in names])
    target = np.asarray(MIRFLICKR_LABEL_COUNTS, dtype=np.float64) * n / MIRFLICKR_N

    counts = np.repeat(np.arange(1, len(MIRFLICKR_LABELS_PER_ITEM) + 1),
                       _scaled_histogram(MIRFLICKR_LABELS_PER_ITEM, n))
    rng.shuffle(counts)
    gumbel = rng.gumbel(size=(n, len(names)))
    family_boost = model.family_coupling * rng.standard_normal((n, len(names)))[:, family]
    z_count = (counts - counts.mean()) / max(counts.std(), 1e-12)
    rho = model.setting_count_correlation
    setting = -rho * z_count + np.sqrt(1 - rho**2) * rng.standard_normal(n)
    item_effects = gumbel + family_boost + model.setting_strength * setting[:, None] * setting_loading

    # Rprop: labels tied by the hierarchy converge slowly under plain steps (a parent's weight must go far
    # down when its children already bring it in); growing a label's step while its error keeps its sign
    # converges in ~25 iterations.
    weight, step, last_sign = np.log(target / n), np.ones(len(names)), np.zeros(len(names))
    for _ in range(model.max_fit_iterations):
        taken = _closed_top_k(weight + item_effects, counts, parent)
        observed = taken.sum(axis=0)
        if np.abs(observed - target).max() <= 1:
            break
        error = np.log((target + 0.5) / (observed + 0.5))
        sign = np.sign(error)
        step = np.where(sign * last_sign > 0, step * 1.5, np.where(sign * last_sign < 0, step * 0.5, step))
        weight, last_sign = weight + step * error, sign
    return taken.astype(np.uint8)


def draw_tags(labels: np.ndarray, seed: int, model: TagModel = TagModel()) -> np.ndarray:
    """(n, model.dim) uint8 binary tags drawn from the labels: Gumbel top-k over popularity + label affinity.

    Each tag is tied to one label (drawn in proportion to the label's frequency) or, with probability
    proportional to its popularity, to none. Tags per item = 1 + negative binomial.
    """
    rng = _rng(seed, _TAG_STREAM)
    n, n_labels = labels.shape
    popularity = model.popularity_floor + np.exp(rng.normal(model.popularity_log_mean, model.popularity_log_sd,
                                                            model.dim))
    frequency = labels.sum(axis=0) + 1.0  # + 1: a label absent from a tiny sample still gets tags
    home = rng.choice(n_labels, size=model.dim, p=frequency / frequency.sum())
    free = rng.random(model.dim) < model.free_tag_fraction * model.dim * popularity / popularity.sum()
    tied = np.zeros((n_labels, model.dim), dtype=np.float32)
    tied[home[~free], np.flatnonzero(~free)] = 1.0
    r = model.extra_tags_dispersion
    per_item = np.minimum(1 + rng.negative_binomial(r, r / (r + model.extra_tags_mean), size=n), model.dim)

    # Gumbel top-k as an exponential race: the k smallest Exp(1) / weight are a draw without replacement
    # in proportion to weight = popularity * exp(label_affinity * [item has the tag's label]).
    inverse_popularity = (1.0 / popularity).astype(np.float32)
    affinity_damping = np.float32(np.exp(-model.label_affinity) - 1.0)
    tags = np.zeros((n, model.dim), dtype=np.uint8)
    for start in range(0, n, _TAG_BLOCK_ROWS):
        stop = min(start + _TAG_BLOCK_ROWS, n)
        has_label = (labels[start:stop].astype(np.float32) @ tied) > 0  # (rows, dim)
        race = rng.standard_exponential((stop - start, model.dim), dtype=np.float32)
        race *= inverse_popularity
        race *= 1.0 + affinity_damping * has_label
        k = per_item[start:stop]
        kmax = int(k.max())
        top = np.argpartition(race, kmax - 1, axis=1)[:, :kmax]
        top = np.take_along_axis(top, np.argsort(np.take_along_axis(race, top, 1), axis=1, kind="stable"), 1)
        keep = np.arange(kmax) < k[:, None]
        tags[start + np.nonzero(keep)[0], top[keep]] = 1
    return tags


class SyntheticImageFeatures:
    """fc7-like image features drawn from labels, as a lazy row source (write_dataset copies it in blocks).

    Per item: latent z = sqrt(signal) * (sum of its labels' prototypes) / sqrt(#labels)
    + sqrt(1 - signal) * nuisance, nuisance = style cluster + per-image noise, where each label has n_modes
    prototypes and the item's style cluster picks which one it shows (label x nuisance interaction); features =
    ReLU(z W - offset) * gain * lognormal noise, float16. Rows are drawn per fixed block from their own stream,
    so `self[a:b]` does not depend on how the rows are sliced.

    Example:
        >>> feats = SyntheticImageFeatures(draw_labels(600, seed=0), seed=0, model=ImageModel(dim=256))
        >>> feats.shape, feats.dtype, bool((feats[:10] >= 0).all())
        ((600, 256), dtype('float16'), True)
    """

    def __init__(self, labels: np.ndarray, seed: int, model: ImageModel = ImageModel()):
        self.labels, self.seed, self.model = np.asarray(labels, dtype=np.float32), seed, model
        self.shape, self.dtype = (labels.shape[0], model.dim), np.dtype(np.float16)
        rng = _rng(seed, _IMAGE_STREAM, 0)
        m = model
        self._prototypes = rng.standard_normal((labels.shape[1], m.n_modes, m.latent_dim)).astype(np.float32)
        self._styles = rng.standard_normal((m.n_styles, m.latent_dim)).astype(np.float32)
        self._projection = (rng.standard_normal((m.latent_dim, m.dim)) / np.sqrt(m.latent_dim)).astype(np.float32)
        # threshold at the (1 - active_fraction) quantile of the unit-variance pre-activation
        self._offset = (ndtri(1 - m.active_fraction) + m.offset_spread * rng.standard_normal(m.dim)).astype(np.float32)
        self._gain = np.exp(m.gain_spread * rng.standard_normal(m.dim)).astype(np.float32)
        pool = np.exp(m.noise * rng.standard_normal(_NOISE_POOL + m.dim) - m.noise**2 / 2).astype(np.float32)
        self._noise_windows = np.lib.stride_tricks.sliding_window_view(pool, m.dim)  # (_NOISE_POOL + 1, dim)
        self._mode_of = rng.integers(m.n_modes, size=(m.n_styles, labels.shape[1]))  # style x label -> its mode
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise UserError("SyntheticImageFeatures supports contiguous row slices only")
        out = np.empty((max(stop - start, 0), self.shape[1]), dtype=np.float16)
        for block in range(start // _IMAGE_BLOCK_ROWS, -(-stop // _IMAGE_BLOCK_ROWS)):
            first = block * _IMAGE_BLOCK_ROWS
            lo, hi = max(start, first), min(stop, first + _IMAGE_BLOCK_ROWS)
            out[lo - start:hi - start] = self._block(block)[lo - first:hi - first]
        return out

    def _block(self, block: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == block:
            return self._cached[1]
        m = self.model
        rng = _rng(self.seed, _IMAGE_STREAM, 1 + block)
        labels = self.labels[block * _IMAGE_BLOCK_ROWS:(block + 1) * _IMAGE_BLOCK_ROWS]
        rows = labels.shape[0]
        style_of = rng.integers(m.n_styles, size=rows)
        shown = self._prototypes[np.arange(labels.shape[1]), self._mode_of[style_of]]  # (rows, L, latent_dim)
        label_part = np.einsum("rl,rld->rd", labels, shown) / np.sqrt(
            np.maximum(labels.sum(axis=1, keepdims=True), 1.0))
        style = self._styles[style_of]
        nuisance = (np.sqrt(m.style_share) * style
                    + np.sqrt(1 - m.style_share) * rng.standard_normal((rows, m.latent_dim), dtype=np.float32))
        latent = np.sqrt(m.signal) * label_part + np.sqrt(1 - m.signal) * nuisance  # (rows, latent_dim)
        features = latent @ self._projection  # (rows, dim)
        features -= self._offset
        np.maximum(features, 0.0, out=features)
        features *= self._gain
        # Multiplicative noise: each row reads a random window of a fixed pool of lognormal factors (iid
        # within a row; across rows only when two offsets coincide). Fresh draws per entry took most of the
        # generation time.
        features *= self._noise_windows[rng.integers(len(self._noise_windows), size=rows)]
        self._cached = (block, features.astype(np.float16))
        return self._cached[1]


def build_synthetic_dataset(out: Path, *, seed: int = 0, labels_path: Path | None = None,
                            tags_path: Path | None = None, n: int | None = None,
                            image: ImageModel = ImageModel(), split: str = "standard", split_seed: int = 0,
                            n_query: int = 2000, n_train: int = 5000) -> Path:
    """Write a synthetic dataset file; returns its path.

    Without labels_path/tags_path: the fully synthetic MIRFlickr-like set (n items, default 20,015; 24
    labels; 1,386-d tags; image.dim-d fc7-like features). With both (.mat files, keys LAll / YAll): the real
    labels and tags, unchanged, plus synthetic image features drawn from the real labels. Same arguments ->
    byte-identical arrays and content_sha256.

    Example:
        >>> path = build_synthetic_dataset(Path("tiny.h5"), n=600, image=ImageModel(dim=256), n_query=100,
        ...                                n_train=300)  # doctest: +SKIP
    """
    if (labels_path is None) != (tags_path is None):
        raise UserError("give both labels_path and tags_path (real labels + real tags + synthetic images), "
                        "or neither (fully synthetic)")
    if labels_path is not None:
        if n is not None:
            raise UserError(f"n = {n} applies to the fully synthetic set only; the real files fix n")
        labels, text, meta = _real_parts(Path(labels_path), Path(tags_path), seed)
    else:
        labels, text, meta = _synthetic_parts(MIRFLICKR_N if n is None else n, seed)
    meta["synthetic"]["image"] = _describe(
        "agch.data.synth.SyntheticImageFeatures", seed, image,
        "fc7-like features from the labels: per-label prototypes (one of several modes, picked by the style) + "
        "style/per-image nuisance in a latent space, "
        "fixed random linear map, per-unit offset + ReLU, gain, multiplicative lognormal noise, float16")
    meta["name"] += "".join(f"-{key}{value:g}" for key, value in asdict(image).items()
                            if key != "dim" and value != getattr(ImageModel, key))
    row_split = make_split(split, labels.shape[0], seed=split_seed, n_query=n_query, n_train=n_train)
    meta.update(feature_extractor="synthetic (see synthetic)", split_protocol=split,
                split_seed=recorded_seed(split, split_seed))
    return write_dataset(out, image=SyntheticImageFeatures(labels, seed, image), text=text, labels=labels,
                         split=row_split, meta=meta)


def _real_parts(labels_path: Path, tags_path: Path, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The real labels and tags, unchanged, and their provenance (meta without the image description)."""
    sources = [(labels_path, "LAll"), (tags_path, "YAll")]
    labels, text = (read_mat_array(path, key) for path, key in sources)
    if labels.shape[0] != text.shape[0]:
        raise UserError(f"{labels_path} has {labels.shape[0]} rows but {tags_path} has {text.shape[0]}; "
                        f"row i of both must be the same pair")
    source_files = [{"path": str(path.resolve()), "sha256": file_sha256(path), "key": key} for path, key in sources]
    return labels.astype(np.uint8), text, {"name": f"{labels_path.stem}+real-tags+synthetic-images-seed{seed}",
                                           "source_files": source_files, "synthetic": {}}


def _synthetic_parts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """MIRFlickr-like labels and tags and their descriptions (meta without the image description)."""
    if n < 2:
        raise UserError(f"n must be at least 2, got {n}")
    label_model, tag_model = LabelModel(), TagModel()
    labels = draw_labels(n, seed, label_model)
    synthetic = {
        "labels": _describe("agch.data.synth.draw_labels", seed, label_model,
                            "label count from the MIRFlickr-25K histogram, labels by a parent-closed Gumbel top-k "
                            "with family and indoor/outdoor couplings, weights fitted to the MIRFlickr-25K label "
                            "frequencies"),
        "text": _describe("agch.data.synth.draw_tags", seed, tag_model,
                          "binary tags by Gumbel top-k over lognormal popularity + label affinity, "
                          "1 + negative-binomial tags per item"),
    }
    name = f"mirflickr-like-synthetic-seed{seed}" + ("" if n == MIRFLICKR_N else f"-n{n}")
    return labels, draw_tags(labels, seed, tag_model), {"name": name, "source_files": [], "synthetic": synthetic}
