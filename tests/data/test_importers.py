"""Importing .mat files (MATLAB v5 and v7.3), the real MIRFlickr-25K labels and tags, and `agch-data import`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse

from tests.conftest import SHARED_DATA
from agch.cli.data import main
from agch.data.dataset import open_dataset
from agch.data.summary import shared_label_rate
from agch.errors import DatasetError, UserError
from agch.data.importers import FEATURES_REQUIRED, MatFile, import_mat, read_mat_array

REAL = SHARED_DATA
N = 120
_MATLAB_CLASS = {"float64": "double", "float32": "single", "uint8": "uint8", "bool": "logical"}


def save_v73(path: Path, arrays: dict) -> Path:
    """Write `arrays` (MATLAB view, items x features) the way MATLAB's -v7.3 does: HDF5 after a 512-byte
    userblock holding the MATLAB header, each array stored column-major (h5py sees it transposed)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for key, value in arrays.items():
            if scipy.sparse.issparse(value):
                csc = scipy.sparse.csc_matrix(value)
                group = f.create_group(key)
                group["jc"], group["ir"], group["data"] = csc.indptr.astype(np.uint64), csc.indices.astype(
                    np.uint64), csc.data
                group.attrs["MATLAB_sparse"] = np.uint64(csc.shape[0])
                group.attrs["MATLAB_class"] = np.bytes_(_MATLAB_CLASS[csc.dtype.name])
            else:
                dset = f.create_dataset(key, data=np.ascontiguousarray(np.asarray(value).T))
                dset.attrs["MATLAB_class"] = np.bytes_(_MATLAB_CLASS[np.asarray(value).dtype.name])
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    return path


def _parts(seed: int = 0, n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 5)) < 0.3).astype(np.uint8)
    labels[labels.sum(1) == 0, 0] = 1
    return {"XAll": rng.random((n, 32)), "YAll": (rng.random((n, 20)) < 0.2).astype(np.uint8), "LAll": labels}


def _import(files, out, **kwargs) -> Path:
    return import_mat(files, out, split="standard", n_query=20, n_train=50, **kwargs)


def _check_content(path: Path, parts: dict, rows: np.ndarray | None = None) -> None:
    rows = np.arange(len(parts["LAll"])) if rows is None else rows
    with open_dataset(path) as ds:
        assert np.array_equal(ds.labels, parts["LAll"][rows])
        assert np.array_equal(ds.rows("text", np.arange(ds.n)), parts["YAll"][rows])
        assert np.allclose(ds.rows("image", np.arange(ds.n)), parts["XAll"][rows].astype(np.float32))


def test_v5_keys_spread_over_files(tmp_path):
    parts = _parts()
    files = []
    for key, stem in (("LAll", "lall"), ("YAll", "yall"), ("XAll", "xall-vgg")):
        files.append(tmp_path / f"toy-{stem}.mat")
        scipy.io.savemat(files[-1], {key: parts[key]})
    out = _import(files, tmp_path / "toy.h5", feature_extractor="VGG-19 fc7")
    _check_content(out, parts)
    with open_dataset(out) as ds:
        assert ds.name == "toy" and ds.meta["feature_extractor"] == "VGG-19 fc7" and ds.synthetic == {}
        assert ds.meta["split_protocol"] == "standard" and ds.meta["split_seed"] == 0
        recorded = {entry["key"]: entry for entry in ds.meta["source_files"]}
    for key, path in zip(("LAll", "YAll", "XAll"), files):
        assert recorded[key]["path"] == str(path.resolve())
        assert recorded[key]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_v73_one_file_is_transposed_back(tmp_path):
    parts = _parts(1)
    path = save_v73(tmp_path / "FLICKR-25K.mat", parts)
    assert h5py.is_hdf5(path) and path.read_bytes()[:10] == b"MATLAB 7.3"
    with h5py.File(path) as f:
        assert f["LAll"].shape == (5, N)  # what h5py sees: column-major
    mat = MatFile(path)
    assert mat.version == "v7.3" and mat.keys()["LAll"] == ((N, 5), "uint8")
    mat.close()
    out = _import([path], tmp_path / "f.h5")
    _check_content(out, parts)
    with open_dataset(out) as ds:
        assert ds.name == "FLICKR-25K" and ds.meta["feature_extractor"] == "unspecified (key XAll of FLICKR-25K.mat)"


def test_overridden_keys_and_sparse_tags(tmp_path):
    parts = _parts(2)
    sparse_tags = scipy.sparse.csc_matrix(parts["YAll"].astype(np.float64))
    v5 = tmp_path / "a.mat"
    scipy.io.savemat(v5, {"feat": parts["XAll"], "tags": sparse_tags, "lab": parts["LAll"]})
    v73 = save_v73(tmp_path / "b.mat", {"feat": parts["XAll"], "tags": sparse_tags, "lab": parts["LAll"]})
    for path in (v5, v73):
        out = _import([path], tmp_path / f"{path.stem}.h5", image_key="feat", text_key="tags", label_key="lab")
        _check_content(out, parts)


def test_given_split_from_train_and_test_keys(tmp_path):
    train, test = _parts(3, n=80), _parts(4, n=30)
    arrays = {"I_tr": train["XAll"], "T_tr": train["YAll"], "L_tr": train["LAll"],
              "I_te": test["XAll"], "T_te": test["YAll"], "L_te": test["LAll"]}
    path = save_v73(tmp_path / "wiki.mat", arrays)
    assert main(["import", str(path), "--out", str(tmp_path / "w.h5"), "--train-keys", "I_tr,T_tr,L_tr",
                 "--test-keys", "I_te,T_te,L_te", "--n-query", "5"]) == 0
    with open_dataset(tmp_path / "w.h5") as ds:
        assert ds.meta["split_protocol"] == "given" and ds.meta["split_seed"] == -1
        assert np.array_equal(ds.split.query, np.arange(80, 110))
        assert np.array_equal(ds.split.retrieval, np.arange(80)) and np.array_equal(ds.split.train, np.arange(80))
        assert np.array_equal(ds.labels[ds.split.query], test["LAll"])
        assert np.allclose(ds.rows("image", ds.split.query), test["XAll"].astype(np.float32))


def test_given_split_parts_must_have_equal_widths(tmp_path):
    path = tmp_path / "w.mat"
    a, b = _parts(5), _parts(6)
    scipy.io.savemat(path, {"I_tr": a["XAll"], "T_tr": a["YAll"], "L_tr": a["LAll"],
                            "I_te": b["XAll"][:, :10], "T_te": b["YAll"], "L_te": b["LAll"]})
    with pytest.raises(DatasetError, match=r"\[I_tr/I_te\]: train and test parts differ in width \(I_tr 32, I_te 10"):
        import_mat([path], tmp_path / "w.h5", train_keys=["I_tr", "T_tr", "L_tr"], test_keys=["I_te", "T_te", "L_te"])


def test_raw_images_need_features_first(tmp_path):
    parts = _parts(7)
    images = np.zeros((32, 32, 3, N), np.uint8)  # MATLAB: H x W x 3 x N; h5py sees N x 3 x W x H
    path = save_v73(tmp_path / "FLICKR-25K.mat", {"IAll": images, "YAll": parts["YAll"], "LAll": parts["LAll"]})
    with pytest.raises(DatasetError) as err:
        _import([path], tmp_path / "f.h5")
    assert err.value.key == "IAll" and str(path) in str(err.value) and FEATURES_REQUIRED in str(err.value)
    v5 = tmp_path / "imgs.mat"
    scipy.io.savemat(v5, {"images": images, "YAll": parts["YAll"], "LAll": parts["LAll"]})
    with pytest.raises(DatasetError, match="32x32x3x120 uint8: features required: this file holds raw images"):
        _import([v5], tmp_path / "g.h5", image_key="images")


def test_missing_key_lists_the_keys_the_files_have(tmp_path):
    parts = _parts(8)
    scipy.io.savemat(tmp_path / "l.mat", {"LAll": parts["LAll"]})
    scipy.io.savemat(tmp_path / "y.mat", {"YAll": parts["YAll"], "XAll": parts["XAll"]})
    with pytest.raises(DatasetError) as err:
        _import([tmp_path / "l.mat", tmp_path / "y.mat"], tmp_path / "o.h5", label_key="labels")
    message = str(err.value)
    assert err.value.key == "labels" and "set it with --label-key" in message
    assert "l.mat: LAll 120x5" in message and "y.mat: YAll 120x20" in message and "XAll 120x32" in message
    with pytest.raises(DatasetError, match="not in this file; it has: LAll 120x5"):
        read_mat_array(tmp_path / "l.mat", "YAll")


def test_key_in_two_files_is_ambiguous(tmp_path):
    parts = _parts(9)
    scipy.io.savemat(tmp_path / "a.mat", parts)
    scipy.io.savemat(tmp_path / "b.mat", {"LAll": parts["LAll"]})
    with pytest.raises(DatasetError, match=r"\[LAll\]: found in 2 files \(a.mat, b.mat\)"):
        _import([tmp_path / "a.mat", tmp_path / "b.mat"], tmp_path / "o.h5")


def test_row_major_v73_array_is_explained(tmp_path):
    parts = _parts(10)
    path = save_v73(tmp_path / "t.mat", parts)
    with h5py.File(path, "r+") as f:  # LAll written the numpy way (N x L in h5py) instead of MATLAB's
        del f["LAll"]
        f["LAll"] = parts["LAll"]
    with pytest.raises(DatasetError) as err:
        _import([path], tmp_path / "o.h5")
    message = str(err.value)
    assert err.value.key == "XAll/YAll/LAll" and "row counts differ" in message
    assert f"LAll in t.mat: 5 x {N} (MATLAB view, h5py shape ({N}, 5)) -- looks transposed" in message


def test_bad_content_names_the_source_file_and_key(tmp_path):
    parts = _parts(11)
    parts["LAll"] = parts["LAll"] * 2  # class indices or counts, not multi-hot
    parts["XAll"][7, 3] = np.inf
    scipy.io.savemat(tmp_path / "l.mat", {"LAll": parts["LAll"]})
    scipy.io.savemat(tmp_path / "x.mat", {"XAll": parts["XAll"], "YAll": parts["YAll"]})
    with pytest.raises(DatasetError, match=r"l.mat \[LAll\]: row 0 holds \[2\]; expected only 0/1 values"):
        _import([tmp_path / "l.mat", tmp_path / "x.mat"], tmp_path / "o.h5")
    scipy.io.savemat(tmp_path / "l.mat", {"LAll": parts["LAll"] // 2})
    with pytest.raises(DatasetError, match=r"x.mat \[XAll\]: row 7 holds \[inf\]"):
        _import([tmp_path / "l.mat", tmp_path / "x.mat"], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


def test_not_a_mat_file(tmp_path):
    for text in ("short", "not a MATLAB file at all " * 20):
        (tmp_path / "x.mat").write_text(text)
        with pytest.raises(DatasetError, match="not a readable MATLAB .mat file"):
            MatFile(tmp_path / "x.mat")
    with pytest.raises(DatasetError, match="no such file"):
        MatFile(tmp_path / "absent.mat")
    truncated = save_v73(tmp_path / "t.mat", _parts())
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(DatasetError, match="not a readable MATLAB .mat file"):
        MatFile(truncated)


def test_option_combinations(tmp_path):
    with pytest.raises(UserError, match="go together"):
        import_mat([tmp_path / "a.mat"], tmp_path / "o.h5", train_keys=["a", "b", "c"])
    with pytest.raises(UserError, match="needs three keys"):
        import_mat([], tmp_path / "o.h5", train_keys=["a", "b"], test_keys=["c", "d", "e"])


def test_cli_import_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["import", str(tmp_path / "absent.mat"), "--out", str(tmp_path / "o.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agch-data: error: dataset ") and "no such file" in err and "Traceback" not in err
    assert main(["import", "--out", str(tmp_path / "o.h5")]) == 2
    assert "usage: agch-data import" in capsys.readouterr().err
    assert main(["import", "a.mat", "--out", "o.h5", "--split", "random"]) == 2
    assert "invalid choice: 'random'" in capsys.readouterr().err


# ---- the real MIRFlickr-25K labels and tags (statistics from docs/data.md) ----

real = pytest.mark.skipif(not (REAL / "mirflickr25k-lall.mat").is_file(), reason=f"real data not in {REAL}")


@real
def test_real_files_are_the_documented_ones():
    expected = {"mirflickr25k-lall.mat": "173eec1fb2603bb54c893467c127325556fbe5bc91dd7e647d136a8e4e9fd07d",
                "mirflickr25k-yall.mat": "a53d2ba6a5f3672b5e747aaa8b76d4af6be568d300715c6910d8c67bdef55f7e"}
    for name, digest in expected.items():
        assert hashlib.sha256((REAL / name).read_bytes()).hexdigest() == digest


@real
def test_real_labels_and_tags_statistics():
    labels = read_mat_array(REAL / "mirflickr25k-lall.mat", "LAll")
    tags = read_mat_array(REAL / "mirflickr25k-yall.mat", "YAll")
    assert labels.shape == (20015, 24) and tags.shape == (20015, 1386)
    assert set(np.unique(labels)) == {0, 1} and set(np.unique(tags)) == {0, 1}
    per_item = labels.sum(1)
    assert per_item.min() >= 1 and round(per_item.mean(), 2) == 3.78
    assert np.bincount(per_item, minlength=15)[1:].tolist() == [
        2476, 3341, 3882, 3896, 2772, 1671, 1022, 564, 260, 91, 32, 7, 0, 1]
    assert labels.sum(0).tolist() == [2647, 179, 644, 986, 3230, 581, 4614, 1554, 813, 6320, 704, 4743, 2243, 7848,
                                      7413, 2740, 811, 1133, 6818, 8463, 1840, 2450, 3981, 2885]
    tags_per_item = tags.sum(1)
    assert tags_per_item.min() >= 1 and round(tags_per_item.mean(), 2) == 4.64
    assert round(100 * tags_per_item.mean() / 1386, 3) == 0.335
    assert round(shared_label_rate(labels)["value"], 3) == 0.555


@real
def test_real_labels_and_tags_import_with_small_image_file(tmp_path, capsys):
    # A dataset needs image features and the real ones are not here: a small stand-in XAll file (16-d) completes it.
    xall = tmp_path / "mirflickr25k-xall-test.mat"
    scipy.io.savemat(xall, {"XAll": np.random.default_rng(0).random((20015, 16), dtype=np.float32)})
    out = tmp_path / "m.h5"
    args = ["import", str(REAL / "mirflickr25k-lall.mat"), str(REAL / "mirflickr25k-yall.mat"), str(xall),
            "--out", str(out), "--n-query", "200", "--n-train", "500", "--split-seed", "1",
            "--feature-extractor", "random 16-d (test stand-in)"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tags       4.64 nonzeros per row (mean), density 0.335%; 0 empty rows" in printed
    assert "55.5% of item pairs share >= 1 label (exact over all 200,290,105 pairs)" in printed
    assert "random ranking, mAP@ALL, query vs retrieval, standard split, mirflickr25k, labels real: " in printed
    with open_dataset(out) as ds:
        assert ds.n == 20015 and ds.name == "mirflickr25k" and ds.stored_dtype("text") == np.uint8
        assert ds.split.sizes() == {"query": 200, "retrieval": 19815, "train": 500}
        digests = {entry["key"]: entry["sha256"] for entry in ds.meta["source_files"]}
    assert digests["LAll"].startswith("173eec1f") and digests["YAll"].startswith("a53d2ba6")


# ---- single-label class ids (Wiki's L_tr: N x 1 integers) ----

def _class_parts(n: int = N) -> dict[str, np.ndarray]:
    parts = _parts(n=n)
    parts["LAll"] = (np.arange(n) % 4 + 1).astype(np.float64).reshape(-1, 1)  # MATLAB doubles 1..4
    return parts


@pytest.mark.parametrize("writer", ["v5 column", "v5 row vector", "v7.3 column"])
def test_class_id_labels_are_one_hot_encoded_with_provenance(tmp_path, writer):
    parts = _class_parts()
    if writer == "v7.3 column":
        files = [save_v73(tmp_path / "c.mat", parts)]
    else:
        stored = dict(parts, LAll=parts["LAll"].ravel()) if writer == "v5 row vector" else parts
        scipy.io.savemat(tmp_path / "c.mat", stored)  # a 1-D array is saved as a 1 x N row vector
        files = [tmp_path / "c.mat"]
    out = _import(files, tmp_path / "o.h5")
    with open_dataset(out) as ds:
        assert ds.labels.shape == (N, 4) and np.array_equal(ds.labels.argmax(1), np.arange(N) % 4)
        assert (ds.labels.sum(1) == 1).all()
        entry = next(e for e in ds.meta["source_files"] if e["key"] == "LAll")
    assert entry["transform"].startswith("class ids 1..4 (4 classes, one per item) one-hot encoded")


def test_class_ids_must_be_non_negative_integers(tmp_path):
    parts = _class_parts()
    parts["LAll"][17, 0] = 2.5
    scipy.io.savemat(tmp_path / "c.mat", parts)
    with pytest.raises(DatasetError, match=r"\[LAll\]: one column of labels is read as class ids, but row 17 holds "
                                           r"2\.5; expected non-negative integer class ids"):
        _import([tmp_path / "c.mat"], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()


WIKI = REAL / "wiki-train.mat"


@pytest.mark.skipif(not WIKI.is_file(), reason=f"{WIKI} not here")
def test_real_wiki_training_portion_imports_with_its_class_ids(tmp_path):
    assert hashlib.sha256(WIKI.read_bytes()).hexdigest().startswith("b415dbce423c1177")
    out = import_mat([WIKI], tmp_path / "wiki.h5", image_key="I_tr", text_key="T_tr", label_key="L_tr",
                     split="standard", n_query=500, n_train=1673)
    with open_dataset(out) as ds:
        assert (ds.n, ds.image_dim, ds.text_dim, ds.n_labels) == (2173, 128, 10, 10)
        assert ds.labels.sum(0).tolist() == [138, 272, 244, 248, 202, 178, 186, 144, 214, 347]
        assert ds.split.sizes() == {"query": 500, "retrieval": 1673, "train": 1673}
        image = ds.rows("image", np.arange(ds.n))
        assert np.allclose(image.sum(1), 1, atol=1e-5)  # SIFT histograms, as the README beside the file says
