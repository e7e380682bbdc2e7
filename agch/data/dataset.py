"""The agch dataset file: image and text features, labels, the split and provenance in one HDF5 file.

Layout and rules: docs/data-format.md. `write_dataset` and `open_dataset` apply the same validation, and
both work in row blocks, so a NUS-WIDE-size feature matrix (187k x 4096) is never held in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Protocol

import h5py
import numpy as np

from agch import __version__
from agch.errors import DatasetError, unknown
from agch.data.splits import SPLIT_PROTOCOLS, Split

FORMAT = "agch-dataset"
FORMAT_VERSION = 1
MODALITIES = ("image", "text")
SYNTHETIC_PARTS = ("image", "text", "labels")
SPLIT_PARTS = ("query", "retrieval", "train")
META_KEYS = ("name", "source_files", "feature_extractor", "synthetic", "split_protocol", "split_seed")
"""The keys `write_dataset`'s `meta` must have; format, created_by and content_sha256 are added by the writer."""

_STORED_DTYPES = {"image": ("float16", "float32"), "text": ("uint8", "float32"), "labels": ("uint8",)}
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: a random row read touches little beyond the row
_BLOCK_BYTES = 32 << 20  # rows per block when copying or scanning
_CACHE_BYTES = 64 << 20  # h5py chunk cache of an open dataset


class RowSource(Protocol):
    """What `write_dataset` accepts for features: a numpy array, or anything with shape, dtype and row slicing."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, rows: slice) -> np.ndarray: ...


class Dataset:
    """An open dataset file (read-only). Features stay on disk; labels and the split are in memory."""

    def __init__(self, path: Path, file: h5py.File, meta: dict[str, Any], labels: np.ndarray, split: Split):
        """Use `open_dataset`, which validates the file first."""
        self.path, self._file, self.meta, self.labels, self.split = path, file, meta, labels, split

    @property
    def n(self) -> int:
        """Number of items (image-text pairs)."""
        return self.labels.shape[0]

    @property
    def n_labels(self) -> int:
        """Number of label columns."""
        return self.labels.shape[1]

    @property
    def image_dim(self) -> int:
        """Image feature dimension."""
        return self._file["image"].shape[1]

    @property
    def text_dim(self) -> int:
        """Text feature dimension."""
        return self._file["text"].shape[1]

    @property
    def name(self) -> str:
        """Dataset name."""
        return self.meta["name"]

    @property
    def synthetic(self) -> dict[str, str]:
        """{part: description} of the synthetic parts ({} when all parts are real)."""
        return self.meta["synthetic"]

    @property
    def identity(self) -> str:
        """content_sha256: sha256 over the arrays, computed when the file was written."""
        return self.meta["content_sha256"]

    def stored_dtype(self, modality: str) -> np.dtype:
        """The on-disk dtype of a modality's features (rows() always returns float32)."""
        return self._features(modality).dtype

    def rows(self, modality: str, idx: np.ndarray) -> np.ndarray:
        """Float32 features of the rows `idx` (any order, repeats allowed), shape (len(idx), d).

        Reads only the chunks that hold the requested rows, never the whole matrix.
        """
        dset = self._features(modality)
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{self.path}: row index out of range [0, {self.n}) in rows({modality!r}, ...)")
        # h5py wants increasing indices: sort, read chunk by chunk, then undo the sort.
        wanted, inverse = np.unique(idx, return_inverse=True)
        out = np.empty((len(wanted), dset.shape[1]), dtype=np.float32)
        chunk_rows = dset.chunks[0] if dset.chunks else 64
        chunk_of = wanted // chunk_rows
        starts = np.flatnonzero(np.diff(chunk_of, prepend=-1))
        for lo, hi in zip(starts, np.r_[starts[1:], len(wanted)]):
            first, last = int(wanted[lo]), int(wanted[hi - 1])
            out[lo:hi] = dset[first:last + 1][wanted[lo:hi] - first]
        return out[inverse]

    def iter_rows(self, modality: str, idx: np.ndarray, chunk_rows: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (offset into idx, float32 rows of idx[offset:offset + chunk_rows]) with bounded memory."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        for offset in range(0, len(idx), chunk_rows):
            yield offset, self.rows(modality, idx[offset:offset + chunk_rows])

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, n={self.n}, image_dim={self.image_dim}, text_dim={self.text_dim})"

    def _features(self, modality: str) -> h5py.Dataset:
        if modality not in MODALITIES:
            raise unknown("modality", modality, MODALITIES, str(self.path))
        return self._file[modality]


_SCANNED: set[tuple] = set()
"""Versions (_file_version) of the files whose feature blocks this process has checked already: a search's trials
reopen the same file in one reused worker, and the driver reopens it for the protocol, references and the test."""


def _file_version(path: Path) -> tuple:
    """What changes whenever the file is rewritten (write_dataset replaces the file: a new inode and mtime)."""
    stat = path.stat()
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open and validate a dataset file; every problem raises DatasetError(path, key, what was found/expected).

    Example:
        >>> with open_dataset("mirflickr.h5") as ds:  # doctest: +SKIP
        ...     x = ds.rows("image", ds.split.query[:8])
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, "no such file")
    if not h5py.is_hdf5(path):
        raise DatasetError(path, None, "not an HDF5 file; expected an agch dataset (write one with agch-data)")
    file = h5py.File(path, "r", rdcc_nbytes=_CACHE_BYTES)
    try:
        if "format" not in file.attrs:
            raise DatasetError(path, "attribute format", f"missing: not an agch dataset (expected format = {FORMAT!r})")
        meta = _decode_attrs(path, file.attrs, tuple(_ATTRS))
        for key in ("image", "text", "labels", *(f"split/{part}" for part in SPLIT_PARTS)):
            if not isinstance(file.get(key), h5py.Dataset):
                raise DatasetError(path, key, f"missing; the file has: {', '.join(_list_keys(file)) or 'nothing'}")
        for key in ("image", "text", "labels"):
            _check_matrix(path, key, file[key].shape, file[key].dtype, stored=True)
        n = _check_row_counts(path, {key: file[key].shape for key in ("image", "text", "labels")})
        labels = file["labels"][()]
        _check_block(path, "labels", labels, 0)
        split = _check_split(path, Split(*(file[f"split/{part}"][()] for part in SPLIT_PARTS)), n)
        version = _file_version(path)
        if version not in _SCANNED:  # the features' block scan reads the whole file: once per file version
            for key in MODALITIES:
                step = _block_rows(file[key].shape[1], file[key].dtype)
                for start in range(0, n, step):
                    _check_block(path, key, file[key][start:start + step], start)
            _SCANNED.add(version)
        return Dataset(path, file, meta, labels, split)
    except BaseException:
        file.close()
        raise


def write_dataset(path: str | os.PathLike, *, image: RowSource, text: RowSource, labels: np.ndarray, split: Split,
                  meta: Mapping[str, Any]) -> Path:
    """Validate and write a dataset file atomically (temp file + rename); returns its path.

    image: (N, d_img) features, stored float16 if given float16, else float32.
    text: (N, d_txt) features, stored uint8 if every value is 0 or 1, else float32.
    labels: (N, L) 0/1 values, stored uint8. meta: the keys in META_KEYS.
    Features are copied in row blocks, so `image` may be a lazy source far larger than memory.
    """
    path = Path(path)
    missing, extra = set(META_KEYS) - set(meta), set(meta) - set(META_KEYS)
    if missing or extra:
        raise DatasetError(path, "meta", f"missing {sorted(missing)}, unexpected {sorted(extra)}; "
                                         f"write_dataset needs exactly {', '.join(META_KEYS)}")
    attrs = {key: _encode_attr(meta[key]) for key in META_KEYS}
    _decode_attrs(path, attrs, META_KEYS)
    labels = np.asarray(labels)
    for key, source in (("image", image), ("text", text), ("labels", labels)):
        _check_matrix(path, key, source.shape, np.dtype(source.dtype), stored=False)
    n = _check_row_counts(path, {"image": image.shape, "text": text.shape, "labels": labels.shape})
    _check_block(path, "labels", labels, 0)
    split = _check_split(path, split, n)
    dtypes = {"image": np.dtype(np.float16 if image.dtype == np.float16 else np.float32),
              "text": _text_dtype(text), "labels": np.dtype(np.uint8)}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        digest = hashlib.sha256()
        with h5py.File(tmp, "w") as file:
            for key, source in (("image", image), ("text", text)):
                d, dtype = source.shape[1], dtypes[key]
                chunk_rows = max(1, min(1024, n, _CHUNK_BYTES // (d * dtype.itemsize)))
                dset = file.create_dataset(key, shape=(n, d), dtype=dtype, chunks=(chunk_rows, d))
                _digest_header(digest, dtype, (n, d))
                step = _block_rows(d, dtype)
                for start in range(0, n, step):
                    block = np.ascontiguousarray(np.asarray(source[start:start + step]), dtype=dtype)
                    _check_block(path, key, block, start)
                    dset[start:start + len(block)] = block
                    digest.update(block)
            arrays = {"labels": labels.astype(np.uint8),
                      **{f"split/{part}": getattr(split, part) for part in SPLIT_PARTS}}
            for key, array in arrays.items():
                file.create_dataset(key, data=array)
                _digest_header(digest, array.dtype, array.shape)
                digest.update(np.ascontiguousarray(array))
            file.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": _created_by(),
                               **attrs, "content_sha256": digest.hexdigest()})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _check_matrix(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, *, stored: bool) -> None:
    """2-D, non-empty, and of a stored dtype (stored=True, an open file) or numeric (stored=False, input)."""
    if len(shape) != 2 or 0 in shape:
        raise DatasetError(path, key, f"shape {tuple(shape)}; expected a non-empty 2-D array (items x features)")
    if stored and dtype.name not in _STORED_DTYPES[key]:
        raise DatasetError(path, key, f"dtype {dtype}; expected {' or '.join(_STORED_DTYPES[key])}")
    if not stored and not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise DatasetError(path, key, f"dtype {dtype}; expected numbers")


def _check_row_counts(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> int:
    counts = {key: shape[0] for key, shape in shapes.items()}
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{key} {count}" for key, count in counts.items())
        raise DatasetError(path, "/".join(counts), f"row counts differ ({found}); row i of each must be the same item")
    return counts["labels"]


def _check_block(path: Path, key: str, block: np.ndarray, first_row: int) -> None:
    """Labels and uint8 text must be 0/1; float features must be finite. Names the first bad row."""
    if key == "labels" or block.dtype == np.uint8:
        ok, expected = _is_binary(block), "only 0/1 values (multi-hot)"
    elif np.issubdtype(block.dtype, np.floating):
        ok, expected = np.isfinite(block), "finite values (no NaN or inf)"
    else:
        return
    bad_rows = ~ok.all(axis=1)
    if bad_rows.any():
        row = int(np.argmax(bad_rows))
        found = np.unique(block[row][~ok[row]])[:5].tolist()
        raise DatasetError(path, key, f"row {first_row + row} holds {found}; expected {expected}")


def _check_split(path: Path, split: Split, n: int) -> Split:
    parts = {}
    for part in SPLIT_PARTS:
        key, idx = f"split/{part}", np.asarray(getattr(split, part))
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DatasetError(path, key, f"shape {idx.shape}, dtype {idx.dtype}; expected a 1-D int64 index array")
        if len(idx) == 0:
            raise DatasetError(path, key, "empty; every split part needs at least one row")
        if idx.min() < 0 or idx.max() >= n:
            raise DatasetError(path, key, f"indices span [{idx.min()}, {idx.max()}]; expected rows in [0, {n})")
        if np.any(np.diff(idx) <= 0):
            raise DatasetError(path, key, "indices not strictly increasing; expected sorted, unique row indices")
        parts[part] = idx.astype(np.int64)
    for other in ("retrieval", "train"):
        shared = np.intersect1d(parts["query"], parts[other], assume_unique=True)
        if len(shared):
            raise DatasetError(path, "split/query", f"{len(shared)} rows (first {shared[0]}) are also in split/{other}; "
                                                    f"query and {other} must be disjoint (a query must be unseen)")
    return Split(**parts)


def _text_dtype(text: RowSource) -> np.dtype:
    """uint8 when every value is 0 or 1 (binary tags), else float32; scanned in blocks."""
    step = _block_rows(text.shape[1], text.dtype)
    binary = all(_is_binary(np.asarray(text[start:start + step])).all() for start in range(0, text.shape[0], step))
    return np.dtype(np.uint8 if binary else np.float32)


def _is_binary(block: np.ndarray) -> np.ndarray:
    return block <= 1 if block.dtype in (np.uint8, np.bool_) else (block == 0) | (block == 1)


def _block_rows(d: int, dtype: np.dtype) -> int:
    return max(1, _BLOCK_BYTES // (d * max(4, np.dtype(dtype).itemsize)))


def _digest_header(digest: Any, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    # content_sha256 = sha256 over, per array: dtype.str and shape as text, then its C-order bytes.
    digest.update(f"{np.dtype(dtype).str}{tuple(int(s) for s in shape)}".encode())


def _created_by() -> str:
    return f"agch {__version__}"


def _list_keys(file: h5py.File) -> list[str]:
    keys: list[str] = []
    file.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
    return keys


# ---- root attributes: stored as str, int or JSON text; each read back with a check and what it expects ----

def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_source_file(entry: Any) -> bool:
    return (isinstance(entry, dict) and {"path", "sha256", "key"} <= set(entry) <= {"path", "sha256", "key", "transform"}
            and _is_sha256(entry["sha256"]) and isinstance(entry["path"], str) and isinstance(entry["key"], str)
            and isinstance(entry.get("transform", ""), str))


_ATTRS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "format": ("str", lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": ("int", lambda v: v == FORMAT_VERSION, f"{FORMAT_VERSION} (this agch reads only that)"),
    "name": ("str", bool, "a non-empty string"),
    "created_by": ("str", lambda v: True, "a string"),
    "source_files": ("json", lambda v: isinstance(v, list) and all(map(_is_source_file, v)),
                     'a JSON list of {"path", "sha256", "key"[, "transform"]} objects'),
    "feature_extractor": ("str", lambda v: True, "a string"),
    "synthetic": ("json", lambda v: isinstance(v, dict) and set(v) <= set(SYNTHETIC_PARTS)
                  and all(isinstance(d, str) for d in v.values()),
                  f"a JSON object {{part: description}} with parts among {', '.join(SYNTHETIC_PARTS)}"),
    "split_protocol": ("str", lambda v: v in SPLIT_PROTOCOLS, f"one of {', '.join(SPLIT_PROTOCOLS)}"),
    "split_seed": ("int", lambda v: v >= -1, "an integer >= -1 (-1 = not seeded)"),
    "content_sha256": ("str", _is_sha256, "64 lowercase hex digits (a sha256)"),
}


def _encode_attr(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _decode_attr(kind: str, value: Any) -> Any:
    """The attribute as str / int / parsed JSON; ValueError if it is not of that kind."""
    value = value.item() if isinstance(value, np.generic) else value
    value = value.decode() if isinstance(value, bytes) else value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        return value
    if not isinstance(value, str):
        raise ValueError
    return json.loads(value) if kind == "json" else value  # json.JSONDecodeError is a ValueError


def _decode_attrs(path: Path, attrs: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    meta = {}
    for key in keys:
        if key not in attrs:
            raise DatasetError(path, f"attribute {key}", "missing")
        kind, check, expected = _ATTRS[key]
        try:
            meta[key] = _decode_attr(kind, attrs[key])
            ok = check(meta[key])
        except ValueError:
            ok = False
        if not ok:
            found = attrs[key].item() if isinstance(attrs[key], np.generic) else attrs[key]
            raise DatasetError(path, f"attribute {key}", f"found {found!r}; expected {expected}")
    return meta
