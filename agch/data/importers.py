"""Import MIRFlickr-25K / NUS-WIDE style MATLAB files (v5 via scipy, v7.3 = HDF5 via h5py) into an agch dataset.

Items are rows in MATLAB's view (LAll is N x L). MATLAB stores arrays column-major, so h5py sees a v7.3
array transposed (L x N); `MatFile.rows` undoes that and reads large v7.3 feature matrices lazily, in row blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
import scipy.sparse

from agch.data.dataset import RowSource, write_dataset
from agch.errors import DatasetError, UserError
from agch.data.splits import Split, make_split, recorded_seed

ROLES = ("image", "text", "labels")
DEFAULT_KEYS = {"image": "XAll", "text": "YAll", "labels": "LAll"}
RAW_IMAGE_KEYS = ("IAll",)
_MAT_READ_ERRORS = (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError, NotImplementedError)
FEATURES_REQUIRED = ("features required: this file holds raw images; extract CNN features first (agch-data extract "
                     "FILE --backbone alexnet|vgg16|vgg19 --out FEATURES.mat) and import those (key XAll)")
EXTRACTOR_ATTR = "agch_feature_extractor"
"""Attribute of a v7.3 features variable: what made it, as `agch-data extract` records it; import carries it over."""


class _TransposedRows:
    """A v7.3 array seen as MATLAB sees it: h5py's (d, N) dataset as (N, d), read in row blocks."""

    def __init__(self, dset: h5py.Dataset):
        self._dset, self.dtype = dset, dset.dtype
        self.shape = tuple(reversed(dset.shape))

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.ascontiguousarray(self._dset[:, rows].T)


class _StackedRows:
    """Row sources stacked vertically (a file's train part above its test part)."""

    def __init__(self, parts: Sequence[RowSource]):
        self._parts, self.dtype = list(parts), np.result_type(*(p.dtype for p in parts))
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        blocks, offset = [], 0
        for part in self._parts:
            lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
            if lo < hi:
                blocks.append(np.asarray(part[lo:hi], dtype=self.dtype))
            offset += part.shape[0]
        return np.concatenate(blocks) if blocks else np.empty((0, self.shape[1]), self.dtype)


class MatFile:
    """One open .mat file, MATLAB v7.3 (HDF5, via h5py) or v5 (via scipy.io.loadmat)."""

    def __init__(self, path: str | os.PathLike):
        """Open `path`; DatasetError if it is missing or not a MATLAB file."""
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(self.path, None, "no such file")
        # Decide by content, not by the MATLAB header text: v7.3 files are HDF5 (with a 512-byte userblock).
        self._h5 = None
        try:
            if h5py.is_hdf5(self.path):
                self._h5 = h5py.File(self.path, "r")
                self._keys = self._h5_keys(self._h5)
            else:
                self._keys = {name: (tuple(shape), cls) for name, shape, cls in scipy.io.whosmat(self.path)}
        except _MAT_READ_ERRORS as err:
            self.close()
            raise DatasetError(self.path, None, f"not a readable MATLAB .mat file (v7.3/HDF5 or v5): {err}") from None

    @property
    def version(self) -> str:
        """'v7.3' or 'v5'."""
        return "v7.3" if self._h5 is not None else "v5"

    def keys(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """{key: (shape as MATLAB sees it, MATLAB class or dtype)} of the top-level variables."""
        return dict(self._keys)

    def describe(self) -> str:
        """'LAll 20015x24 uint8, YAll ...' for error messages."""
        return ", ".join(f"{k} {'x'.join(map(str, shape)) or '?'} {cls}" for k, (shape, cls) in self.keys().items())

    def rows(self, key: str) -> RowSource:
        """The variable `key` as an (items, features) array; v7.3 dense arrays stay on disk, read lazily."""
        shape, cls = self._keys[key]
        if looks_like_raw_images(key, shape, cls):
            raise DatasetError(self.path, key, f"{'x'.join(map(str, shape))} {cls}: {FEATURES_REQUIRED}")
        if len(shape) != 2:
            raise DatasetError(self.path, key, f"MATLAB shape {shape} ({cls}); expected a 2-D numeric matrix "
                                               "(items x features)")
        if cls.startswith("sparse") or self._h5 is None:
            value = self._load_v5(key) if self._h5 is None else _sparse_from_h5(self._h5[key])
            return _numeric(self.path, key, value)
        dset = self._h5[key]
        numeric = isinstance(dset, h5py.Dataset) and (np.issubdtype(dset.dtype, np.number) or dset.dtype == np.bool_)
        if not numeric or cls in ("char", "cell", "struct"):
            raise DatasetError(self.path, key, f"MATLAB class {cls}; expected a numeric matrix")
        return _TransposedRows(dset)

    def attribute(self, key: str, name: str) -> str | None:
        """The text attribute `name` of the v7.3 variable `key` (e.g. the extractor `agch-data extract` records on
        XAll), else None."""
        if self._h5 is None or name not in self._h5[key].attrs:
            return None
        return _attr_str(self._h5[key].attrs[name])

    def close(self) -> None:
        """Close the file (v7.3)."""
        if self._h5 is not None:
            self._h5.close()

    @staticmethod
    def _h5_keys(file: h5py.File) -> dict[str, tuple[tuple[int, ...], str]]:
        found = {}
        for name, obj in file.items():
            if name.startswith("#"):  # MATLAB's #refs# / #subsystem# bookkeeping groups
                continue
            is_array = isinstance(obj, h5py.Dataset)
            cls = _attr_str(obj.attrs.get("MATLAB_class", b"")) or (obj.dtype.name if is_array else "group")
            if "MATLAB_sparse" in obj.attrs:
                found[name] = ((int(obj.attrs["MATLAB_sparse"]), len(obj["jc"]) - 1), f"sparse {cls}")
            else:
                found[name] = (tuple(reversed(obj.shape)) if is_array else (), cls)
        return found

    def _load_v5(self, key: str) -> Any:
        try:
            return scipy.io.loadmat(self.path, variable_names=[key])[key]
        except _MAT_READ_ERRORS as err:
            raise DatasetError(self.path, key, f"scipy.io.loadmat cannot read it: {err}") from None


def looks_like_raw_images(key: str, shape: tuple[int, ...], cls: str) -> bool:
    """IAll, any array of 3+ dimensions, or a uint8 matrix of flattened k x k x 3 images."""
    side = int(np.sqrt(shape[1] / 3)) if len(shape) == 2 else 0
    return (key in RAW_IMAGE_KEYS or len(shape) >= 3
            or (cls == "uint8" and side >= 32 and 3 * side * side == shape[1]))


def read_mat_array(path: str | os.PathLike, key: str) -> np.ndarray:
    """The whole variable `key` of a v5 or v7.3 .mat file as an (items, features) numpy array.

    Example:
        >>> labels = read_mat_array("mirflickr25k-lall.mat", "LAll")  # doctest: +SKIP
        >>> labels.shape
        (20015, 24)
    """
    with contextlib.closing(MatFile(path)) as mat:
        if key not in mat.keys():
            raise DatasetError(mat.path, key, f"not in this file; it has: {mat.describe() or 'no variables'}")
        source = mat.rows(key)
        return np.asarray(source[:])


def import_mat(files: Sequence[str | os.PathLike], out: str | os.PathLike, *, image_key: str | None = None,
               text_key: str | None = None, label_key: str | None = None, train_keys: Sequence[str] | None = None,
               test_keys: Sequence[str] | None = None, split: str | None = None, split_seed: int = 0,
               n_query: int = 2000, n_train: int = 5000, name: str | None = None,
               feature_extractor: str | None = None) -> Path:
    """Import image features, text features and labels from one or more .mat files into a dataset at `out`.

    Keys (default XAll / YAll / LAll) are looked up across all `files`. With `train_keys` and `test_keys`
    (image, text, labels key of each part) the file's own split is kept as protocol "given" (test = queries,
    database = train = the train part) unless `split` names another protocol for the pooled rows.
    """
    if (train_keys is None) != (test_keys is None):
        raise UserError("--train-keys and --test-keys go together (image,text,labels keys of each part)")
    if train_keys is not None and (image_key or text_key or label_key):
        raise UserError("give either --image-key/--text-key/--label-key or --train-keys/--test-keys, not both")
    split = split or ("given" if train_keys else "standard")
    with contextlib.ExitStack() as stack:
        mats = [stack.enter_context(contextlib.closing(MatFile(f))) for f in files]
        if train_keys is None:
            keys = [image_key or DEFAULT_KEYS["image"], text_key or DEFAULT_KEYS["text"],
                    label_key or DEFAULT_KEYS["labels"]]
            parts = [_find_parts(mats, keys)]
        else:
            parts = [_find_parts(mats, _three_keys(given, option))
                     for given, option in ((train_keys, "--train-keys"), (test_keys, "--test-keys"))]
        parts = [_labels_as_column(part) for part in parts]
        for part in parts:
            _check_rows_agree(part)
        _check_widths_agree(parts)
        image, text, labels = (_StackedRows([part[role][2] for part in parts]) for role in range(3))
        labels, labels_transform = class_ids_to_multi_hot(np.asarray(labels[:]), parts)
        n = image.shape[0]
        given = None
        if len(parts) == 2:
            n_tr = parts[0][0][2].shape[0]
            train = np.arange(n_tr)
            given = Split(query=np.arange(n_tr, n), retrieval=train, train=train)
        chosen = make_split(split, n, seed=split_seed, n_query=n_query, n_train=n_train, given=given)
        digests = {mat.path: file_sha256(mat.path) for part in parts for mat, _, _ in part}
        image_mat, image_key_used = parts[0][0][:2]
        meta = {
            "name": name or _default_name([mat.path for mat in mats]),
            "source_files": [{"path": str(mat.path.resolve()), "sha256": digests[mat.path], "key": key,
                              **({"transform": labels_transform} if labels_transform and role == "labels" else {})}
                             for part in parts for role, (mat, key, _) in zip(ROLES, part)],
            "feature_extractor": (feature_extractor or image_mat.attribute(image_key_used, EXTRACTOR_ATTR)
                                  or f"unspecified (key {image_key_used} of {image_mat.path.name})"),
            "synthetic": {},
            "split_protocol": split,
            "split_seed": recorded_seed(split, split_seed),
        }
        try:
            return write_dataset(out, image=image, text=text, labels=labels, split=chosen, meta=meta)
        except DatasetError as err:
            if err.key not in ROLES:
                raise
            # A problem in the content: name the source file and key it came from, not the output file.
            chosen_keys = [part[ROLES.index(err.key)] for part in parts]
            order = " (rows numbered train part first, then test part)" if len(parts) == 2 else ""
            raise DatasetError(", ".join(sorted({str(mat.path) for mat, _, _ in chosen_keys})),
                               "/".join(key for _, key, _ in chosen_keys), err.problem + order) from None


def _labels_as_column(part: list[tuple[MatFile, str, RowSource]]) -> list[tuple[MatFile, str, RowSource]]:
    """A 1 x N labels row vector (what scipy.io.savemat writes for a 1-D array) as the N x 1 column it means,
    when N is the image key's row count."""
    mat, key, rows = part[2]
    if rows.shape[0] == 1 and rows.shape[1] == part[0][2].shape[0] > 1:
        return [*part[:2], (mat, key, np.asarray(rows[:]).reshape(-1, 1))]
    return part


def class_ids_to_multi_hot(labels: np.ndarray, parts: Sequence[Sequence[tuple[MatFile, str, RowSource]]]
                           ) -> tuple[np.ndarray, str | None]:
    """N x 1 integer class ids (Wiki's L_tr) as one-hot rows, and the provenance line saying so.

    Column j of the result is the j-th smallest class id present. Labels with more than one column are multi-hot
    already and returned as they are (with None). Non-integer or negative ids raise DatasetError.
    """
    if labels.ndim != 2 or labels.shape[1] != 1:
        return labels, None
    where = ", ".join(sorted({str(part[2][0].path) for part in parts}))
    key = "/".join(part[2][1] for part in parts)
    ids = labels[:, 0]
    integral = np.isfinite(ids) & (ids == np.round(ids)) if np.issubdtype(ids.dtype, np.floating) else \
        np.ones(len(ids), dtype=bool)
    if not (np.issubdtype(ids.dtype, np.number) and integral.all() and (ids >= 0).all()):
        bad = int(np.argmax(~integral | (ids < 0))) if np.issubdtype(ids.dtype, np.number) else 0
        raise DatasetError(where, key, f"one column of labels is read as class ids, but row {bad} holds "
                                       f"{ids[bad].item()!r}; expected non-negative integer class ids")
    classes, column = np.unique(ids.astype(np.int64), return_inverse=True)
    one_hot = np.zeros((len(ids), len(classes)), dtype=np.uint8)
    one_hot[np.arange(len(ids)), column] = 1
    listed = f"{classes[0]}..{classes[-1]}" if np.array_equal(classes, np.arange(classes[0], classes[-1] + 1)) \
        else ",".join(map(str, classes))
    return one_hot, (f"class ids {listed} ({len(classes)} classes, one per item) one-hot encoded: column j is the "
                     f"j-th smallest id")


def _three_keys(keys: Sequence[str], option: str) -> list[str]:
    keys = [k.strip() for k in keys]
    if len(keys) != 3 or not all(keys):
        raise UserError(f"{option} needs three keys, image,text,labels (e.g. I_tr,T_tr,L_tr); got {','.join(keys)}")
    return keys


def _find_parts(mats: Sequence[MatFile], keys: Sequence[str]) -> list[tuple[MatFile, str, RowSource]]:
    """(file, key, rows) for the image, text and labels keys, each found in exactly one file."""
    found = []
    for role, key in zip(ROLES, keys):
        holders = [mat for mat in mats if key in mat.keys()]
        where = ", ".join(str(mat.path) for mat in mats)
        if len(holders) > 1:
            names = ", ".join(mat.path.name for mat in holders)
            raise DatasetError(where, key, f"found in {len(holders)} files ({names}); pass only one of them")
        if not holders:
            raw = [(mat, k) for mat in mats for k, (shape, cls) in mat.keys().items()
                   if looks_like_raw_images(k, shape, cls)]
            if role == "image" and raw:
                raise DatasetError(raw[0][0].path, raw[0][1], f"no {key} key; {FEATURES_REQUIRED}")
            listing = "; ".join(f"{mat.path.name}: {mat.describe() or 'no variables'}" for mat in mats)
            raise DatasetError(where, key, f"{role} key not found (set it with --{role.rstrip('s')}-key); "
                                           f"the files have {listing}")
        found.append((holders[0], key, holders[0].rows(key)))
    return found


def _check_rows_agree(part: Sequence[tuple[MatFile, str, RowSource]]) -> None:
    """Explain a row-count mismatch, pointing at a key that looks stored the wrong way round."""
    counts = [rows.shape[0] for _, _, rows in part]
    if len(set(counts)) == 1:
        return
    common = max(set(counts), key=counts.count)
    lines = []
    for mat, key, rows in part:
        h5_note = f", h5py shape {tuple(reversed(rows.shape))}" if mat.version == "v7.3" else ""
        lines.append(f"{key} in {mat.path.name}: {rows.shape[0]} x {rows.shape[1]} (MATLAB view{h5_note})")
        if rows.shape[0] != common and rows.shape[1] == common:
            lines[-1] += (f" -- looks transposed: its {common} columns match the other keys' rows; store it as "
                          "items x features (in MATLAB: transpose and save again)")
    raise DatasetError(", ".join(sorted({str(m.path) for m, _, _ in part})), "/".join(k for _, k, _ in part),
                       "row counts differ; row i of every key must be item i: " + "; ".join(lines))


def _check_widths_agree(parts: Sequence[Sequence[tuple[MatFile, str, RowSource]]]) -> None:
    """The train and test parts of a role must have the same number of columns."""
    for role in range(3):
        chosen = [part[role] for part in parts]
        if len({rows.shape[1] for _, _, rows in chosen}) > 1:
            found = ", ".join(f"{key} {rows.shape[1]}" for _, key, rows in chosen)
            raise DatasetError(", ".join(sorted({str(mat.path) for mat, _, _ in chosen})),
                               "/".join(key for _, key, _ in chosen),
                               f"train and test parts differ in width ({found} columns); they must match")


def _numeric(path: Path, key: str, value: Any) -> np.ndarray:
    value = value.toarray() if scipy.sparse.issparse(value) else np.asarray(value)
    if value.ndim != 2 or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
        raise DatasetError(path, key, f"shape {value.shape}, dtype {value.dtype}; expected a 2-D numeric matrix")
    return value


def _sparse_from_h5(group: h5py.Group) -> scipy.sparse.csc_matrix:
    # MATLAB v7.3 sparse: compressed columns (jc pointers, ir row indices, data), MATLAB_sparse = row count.
    jc, ir = group["jc"][()], group["ir"][()]
    data = group["data"][()] if "data" in group else np.ones(len(ir), dtype=np.uint8)
    return scipy.sparse.csc_matrix((data, ir, jc), shape=(int(group.attrs["MATLAB_sparse"]), len(jc) - 1))


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as recorded in a dataset's source_files."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _default_name(paths: Sequence[Path]) -> str:
    """The file names' common stem ('mirflickr25k' for mirflickr25k-lall.mat, mirflickr25k-yall.mat, ...)."""
    common = os.path.commonprefix([p.stem for p in paths]).strip("-_. ")
    return common or paths[0].stem
