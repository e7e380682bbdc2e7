"""The dataset file: round trip, row reads, identity, every validation rule, summarize and the agch-data CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from agch.cli.data import main
from agch.data.dataset import META_KEYS, open_dataset, write_dataset
from agch.data.summary import shared_label_rate, summarize
from agch.errors import DatasetError, UserError
from agch.data.splits import Split, make_split

N, D_IMG, D_TXT, L = 600, 3000, 40, 6  # D_IMG makes chunks of ~87 rows, so row reads span several chunks


def _arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = (rng.random((N, L)) < 0.3).astype(np.uint8)
    return {
        "image": rng.random((N, D_IMG)).astype(np.float32),
        "text": (rng.random((N, D_TXT)) < 0.1).astype(np.uint8),
        "labels": labels,
        "split": make_split("standard", N, seed=seed, n_query=60, n_train=200),
    }


def _meta(**changes) -> dict:
    meta = {"name": "tiny", "source_files": [], "feature_extractor": "random", "synthetic": {"image": "uniform noise"},
            "split_protocol": "standard", "split_seed": 0}
    return {**meta, **changes}


def _write(path: Path, meta: dict | None = None, **changes) -> Path:
    return write_dataset(path, **{**_arrays(), **changes}, meta=meta or _meta())


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("valid") / "tiny.h5")


@pytest.fixture
def copy(valid_file, tmp_path) -> Path:
    return Path(shutil.copy(valid_file, tmp_path / "copy.h5"))


def test_round_trip(valid_file):
    arrays = _arrays()
    with open_dataset(valid_file) as ds:
        assert (ds.n, ds.image_dim, ds.text_dim, ds.n_labels) == (N, D_IMG, D_TXT, L)
        assert ds.name == "tiny" and ds.synthetic == {"image": "uniform noise"}
        assert ds.meta["format"] == "agch-dataset" and ds.meta["format_version"] == 1
        assert ds.meta["created_by"].startswith("agch ")
        assert np.array_equal(ds.labels, arrays["labels"]) and ds.labels.dtype == np.uint8
        assert ds.split == arrays["split"]
        assert ds.stored_dtype("image") == np.float32 and ds.stored_dtype("text") == np.uint8


def test_rows_any_order_with_repeats(valid_file):
    arrays = _arrays()
    idx = np.random.default_rng(1).integers(0, N, 400)  # unsorted, with repeats, across all chunks
    with open_dataset(valid_file) as ds:
        for modality in ("image", "text"):
            got = ds.rows(modality, idx)
            assert got.dtype == np.float32 and got.shape == (400, arrays[modality].shape[1])
            assert np.array_equal(got, arrays[modality][idx].astype(np.float32))
        assert ds.rows("image", np.array([], dtype=np.int64)).shape == (0, D_IMG)
        with pytest.raises(IndexError):
            ds.rows("image", np.array([N]))


def test_iter_rows_covers_idx_in_bounded_blocks(valid_file):
    idx = np.arange(N)[::-1]
    with open_dataset(valid_file) as ds:
        blocks = list(ds.iter_rows("text", idx, chunk_rows=128))
    assert [offset for offset, _ in blocks] == list(range(0, N, 128))
    assert max(len(block) for _, block in blocks) == 128
    assert np.array_equal(np.concatenate([b for _, b in blocks]), _arrays()["text"][idx])


def test_unknown_modality(valid_file):
    with open_dataset(valid_file) as ds, pytest.raises(UserError, match="unknown modality 'imag'.*did you mean"):
        ds.rows("imag", np.arange(3))


def test_identity_is_sha256_over_dtype_shape_and_bytes(valid_file):
    arrays = _arrays()
    digest = hashlib.sha256()
    split = arrays["split"]
    for array in (arrays["image"], arrays["text"], arrays["labels"], split.query, split.retrieval, split.train):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    with open_dataset(valid_file) as ds:
        assert ds.identity == digest.hexdigest()


def test_identity_is_deterministic_and_content_sensitive(tmp_path, valid_file):
    again = _write(tmp_path / "again.h5", meta=_meta(name="renamed"))
    image = _arrays()["image"].copy()
    image[17, 3] += 1.0
    changed = _write(tmp_path / "changed.h5", image=image)
    with open_dataset(valid_file) as a, open_dataset(again) as b, open_dataset(changed) as c:
        assert a.identity == b.identity != c.identity


def test_storage_dtypes(tmp_path):
    arrays = _arrays()
    path = _write(tmp_path / "d.h5", image=arrays["image"].astype(np.float16), text=arrays["text"].astype(np.float64))
    with open_dataset(path) as ds:
        assert ds.stored_dtype("image") == np.float16  # kept
        assert ds.stored_dtype("text") == np.uint8  # only 0/1 values: binary tags
    counts = arrays["text"].astype(np.int64) * 3
    path = _write(tmp_path / "e.h5", image=arrays["image"].astype(np.float64), text=counts)
    with open_dataset(path) as ds:
        assert ds.stored_dtype("image") == np.float32 and ds.stored_dtype("text") == np.float32
        assert np.array_equal(ds.rows("text", np.arange(5)), counts[:5])


def test_write_refuses_bad_input_and_leaves_no_file(tmp_path):
    image = _arrays()["image"].copy()
    image[250, 7] = np.nan
    target = tmp_path / "bad.h5"
    with pytest.raises(DatasetError, match=r"bad.h5 \[image\]: row 250 holds \[nan\]; expected finite values"):
        _write(target, image=image)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp file


@pytest.mark.parametrize("changes, key, fragment", [
    ({"labels": np.full((N, L), 2, np.uint8)}, "labels", "expected only 0/1 values"),
    ({"text": np.zeros((N - 1, D_TXT))}, "image/text/labels", "row counts differ (image 600, text 599, labels 600)"),
    ({"image": np.zeros(N)}, "image", "expected a non-empty 2-D array"),
    ({"image": np.full((N, 2), "x")}, "image", "expected numbers"),
    ({"split": Split(np.arange(10), np.arange(5, 20), np.arange(5, 20))}, "split/query", "must be disjoint"),
])
def test_write_validates_like_open(tmp_path, changes, key, fragment):
    with pytest.raises(DatasetError) as err:
        _write(tmp_path / "w.h5", **changes)
    assert err.value.key == key and fragment in str(err.value)


def test_write_checks_meta(tmp_path):
    with pytest.raises(DatasetError, match=r"missing \['split_seed'\], unexpected \['seed'\]"):
        _write(tmp_path / "m.h5", meta={**{k: v for k, v in _meta().items() if k != "split_seed"}, "seed": 1})
    with pytest.raises(DatasetError, match=r"\[attribute synthetic\].*parts among image, text, labels"):
        _write(tmp_path / "m.h5", meta=_meta(synthetic={"images": "x"}))
    assert set(META_KEYS) == set(_meta())


def _set_attr(key, value):
    return lambda f: f.attrs.__setitem__(key, value)


def _replace(key, value):
    def corrupt(f):
        del f[key]
        f[key] = value
    return corrupt


def _poke(key, index, value):
    return lambda f: f[key].__setitem__(index, value)


CORRUPTIONS = {
    "format missing": (lambda f: f.attrs.__delitem__("format"), "attribute format", "not an agch dataset"),
    "format wrong": (_set_attr("format", "other"), "attribute format", "expected 'agch-dataset'"),
    "newer version": (_set_attr("format_version", 2), "attribute format_version", "found 2; expected 1"),
    "name missing": (lambda f: f.attrs.__delitem__("name"), "attribute name", "missing"),
    "source_files not JSON": (_set_attr("source_files", "[{"), "attribute source_files",
                              "found '[{'; expected a JSON list"),
    "source_files bad entry": (_set_attr("source_files", '[{"path": "a"}]'), "attribute source_files",
                               '{"path", "sha256", "key"[, "transform"]}'),
    "synthetic unknown part": (_set_attr("synthetic", '{"audio": "x"}'), "attribute synthetic", "parts among"),
    "split protocol unknown": (_set_attr("split_protocol", "random"), "attribute split_protocol", "one of standard"),
    "split seed not int": (_set_attr("split_seed", "zero"), "attribute split_seed", "an integer"),
    "content sha malformed": (_set_attr("content_sha256", "abc"), "attribute content_sha256", "64 lowercase hex"),
    "text missing": (lambda f: f.__delitem__("text"), "text", "missing; the file has: image, labels, split/query"),
    "train split missing": (lambda f: f.__delitem__("split/train"), "split/train", "missing"),
    "image 1-D": (_replace("image", np.zeros(N, np.float32)), "image", "expected a non-empty 2-D array"),
    "image float64": (_replace("image", np.zeros((N, 4))), "image", "dtype float64; expected float16 or float32"),
    "text int16": (_replace("text", np.zeros((N, 4), np.int16)), "text", "expected uint8 or float32"),
    "labels short": (_replace("labels", np.zeros((N - 5, L), np.uint8)), "image/text/labels", "labels 595"),
    "labels not 0/1": (_poke("labels", (33, 2), 3), "labels", "row 33 holds [3]; expected only 0/1 values"),
    "NaN image": (_poke("image", (401, 5), np.nan), "image", "row 401 holds [nan]; expected finite values"),
    "inf text": (_replace("text", np.where(np.arange(N)[:, None] == 9, np.inf, 0).astype(np.float32)), "text",
                 "row 9 holds [inf]"),
    "uint8 text not 0/1": (_poke("text", (12, 0), 7), "text", "row 12 holds [7]"),
    "query out of range": (_replace("split/query", np.array([1, N])), "split/query", f"expected rows in [0, {N})"),
    "retrieval unsorted": (_replace("split/retrieval", np.array([5, 3])), "split/retrieval", "not strictly increasing"),
    "train repeats": (_replace("split/train", np.array([3, 3])), "split/train", "not strictly increasing"),
    "train empty": (_replace("split/train", np.array([], np.int64)), "split/train", "empty"),
    "query 2-D": (_replace("split/query", np.zeros((2, 2), np.int64)), "split/query", "1-D int64"),
    "query in retrieval": (_replace("split/query", np.array([0, 1, 2])), "split/query", "must be disjoint"),
}


def test_query_rows_that_are_training_rows_are_refused(tmp_path):
    # retrieval and query disjoint, but a query is also a training row: its test score would be on seen data
    split = Split(np.arange(0, 10), np.arange(10, N), np.arange(5, 200))
    with pytest.raises(DatasetError) as err:
        _write(tmp_path / "q.h5", split=split)
    assert err.value.key == "split/query" and "5 rows (first 5) are also in split/train" in str(err.value)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_every_validation_failure_names_file_and_key(copy, case):
    corrupt, key, fragment = CORRUPTIONS[case]
    with h5py.File(copy, "r+") as f:
        corrupt(f)
    with pytest.raises(DatasetError) as err:
        open_dataset(copy)
    assert err.value.key == key
    assert str(copy) in str(err.value) and fragment in str(err.value)


def test_feature_scan_runs_once_per_file_version(copy, monkeypatch):
    import agch.data.dataset

    scanned = []
    check = agch.data.dataset._check_block
    monkeypatch.setattr(agch.data.dataset, "_check_block", lambda path, key, *a: (scanned.append(key), check(path, key, *a)))
    open_dataset(copy).close()
    first = len(scanned)
    assert {"image", "text"} <= set(scanned)
    open_dataset(copy).close()  # unchanged: only the labels are checked again, not the feature blocks
    assert scanned[first:] == ["labels"]
    corrupt, key, fragment = CORRUPTIONS["inf text"]
    with h5py.File(copy, "r+") as f:  # rewritten in place: a new version, scanned again
        corrupt(f)
    with pytest.raises(DatasetError, match=fragment.replace("[", r"\[")):
        open_dataset(copy)


def test_not_a_dataset_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "absent.h5")
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(DatasetError, match="not an HDF5 file"):
        open_dataset(tmp_path / "x.h5")


def test_shared_label_rate_exact_and_sampled_against_brute_force():
    labels = (np.random.default_rng(2).random((300, 5)) < 0.2).astype(np.uint8)
    shares = (labels.astype(int) @ labels.T.astype(int)) > 0
    truth = shares[np.triu_indices(300, 1)].mean()
    exact = shared_label_rate(labels)
    assert exact["value"] == pytest.approx(truth, abs=1e-12) and exact["method"].startswith("exact")
    sampled = shared_label_rate(labels, exact_patterns=1, sample_pairs=200_000)
    assert sampled["method"].startswith("estimate from 200,000 random pairs")
    assert sampled["value"] == pytest.approx(truth, abs=0.01)


def test_summarize(valid_file):
    arrays = _arrays()
    with open_dataset(valid_file) as ds:
        s = summarize(ds)
    assert s["n"] == N and s["image"] == {"dim": D_IMG, "dtype": "float32"} and s["n_labels"] == L
    assert s["split"] == {"protocol": "standard", "seed": 0, "query": 60, "retrieval": 540, "train": 200}
    assert s["labels"]["per_item_mean"] == pytest.approx(arrays["labels"].sum(1).mean())
    nonzeros = arrays["text"].sum(1)
    assert s["tags"]["nonzeros_per_row_mean"] == pytest.approx(nonzeros.mean())
    assert s["tags"]["density"] == pytest.approx(nonzeros.mean() / D_TXT)
    assert s["tags"]["empty_rows"] == int((nonzeros == 0).sum())
    chance = s["random_ranking"]
    assert 0 < chance["map@all"] < 1 and 0 < chance["map@50"] < 1
    assert chance["protocol"] == "random ranking, query vs retrieval, standard split, tiny, labels real"
    for reading in ("debug-log", "paper"):
        assert set(s["s_statistics"][reading]) == {"s_label_corr", "s_mean_positive", "s_mean_negative"}
    assert s["cca_itq"]["protocol"].startswith("CCA+ITQ fitted on the training pairs, 16 bits, query vs retrieval")
    assert 0 < s["cca_itq"]["mapall_i2t"] < 1


def test_cli_info_text_and_json(valid_file, capsys):
    assert main(["info", str(valid_file)]) == 0
    out = capsys.readouterr().out
    assert "query 60, retrieval 540, train 200" in out and "synthetic  image: uniform noise" in out
    assert "random ranking, mAP@ALL, query vs retrieval, standard split, tiny, labels real: " in out
    assert "random ranking, mAP@50, query vs retrieval, standard split, tiny, labels real: " in out
    assert "CCA+ITQ, mAP@50 I->T " in out and "16 bits, query vs retrieval, standard split, tiny" in out
    assert "  debug-log reading: corr " in out and "  paper reading: corr " in out
    assert main(["info", str(valid_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    with open_dataset(valid_file) as ds:
        assert summary["identity"] == ds.identity


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agch-data: error: dataset ") and "no such file" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_usage_errors_print_the_subcommand_help(capsys):
    assert main([]) == 2
    assert "{synth,import,extract,info}" in capsys.readouterr().err
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "usage: agch-data info" in err and "--json" in err and "required: path" in err
    assert main(["synth", "--out", "x.h5", "--labels", "l.mat"]) == 2
    err = capsys.readouterr().err
    assert "usage: agch-data synth" in err and "--labels and --tags go together" in err
    assert main(["synth", "--out", "x.h5", "--split", "given"]) == 2
    assert main(["info", "--help"]) == 0


def test_cli_synth_writes_and_summarizes(tmp_path, capsys):
    out = tmp_path / "s.h5"
    args = ["synth", "--out", str(out), "--n", "600", "--image-dim", "64", "--n-query", "100", "--n-train", "300",
            "--seed", "3"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "query 100, retrieval 500, train 300" in text and "labels synthetic" in text
    with open_dataset(out) as ds:
        assert (ds.n, ds.image_dim) == (600, 64) and "labels" in ds.synthetic
