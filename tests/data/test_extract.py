"""`agch-data extract`: fc7 of raw images (v7.3 IAll or a folder), resume, provenance on import, bad input.

Random 224 x 224 images through randomly initialised networks: nothing is downloaded, nothing needs a GPU.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from agch import config as cfg
from agch.data.backbones import build_backbone
from agch.cli.data import main
from agch.data.dataset import open_dataset
from agch.errors import DatasetError, UserError
from agch.data.extract import extract_features
from agch.data.importers import file_sha256, import_mat, read_mat_array
from agch.method.train import train
from tests.conftest import TINY
from tests.data.test_importers import save_v73

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
FC7_LINEARS = {"alexnet": ("classifier.1", "classifier.4"), "vgg16": ("classifier.0", "classifier.3")}


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """n random RGB images, N x H x W x 3 uint8 (MATLAB's IAll after DJSRH's transpose)."""
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def save_iall(path: Path, images: np.ndarray, key: str = "IAll") -> Path:
    """As MATLAB -v7.3 stores H x W x 3 x N: h5py sees N x 3 x W x H (DJSRH transposes back with [0, 3, 2, 1])."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset(key, data=images.transpose(0, 3, 2, 1)).attrs["MATLAB_class"] = np.bytes_("uint8")
    return path


def expected_fc7(name: str, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """fc7 computed independently: ImageNet normalisation in numpy, then features -> pool -> the two 4096-unit
    Linear layers with their ReLUs written out from the state dict."""
    x = torch.from_numpy(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32))
    model = build_backbone(name, seed=seed)
    state = model.state_dict()
    first, second = FC7_LINEARS[name]
    with torch.inference_mode():
        h = torch.flatten(model.avgpool(model.features(x)), 1)
        h = torch.relu(h @ state[f"{first}.weight"].T + state[f"{first}.bias"])
        return torch.relu(h @ state[f"{second}.weight"].T + state[f"{second}.bias"]).numpy()


def _extract(images, out, **kwargs):
    return extract_features(images, out, **{"backbone": "alexnet", "random_weights": True, "batch_size": 2,
                                            "progress": False, "device": "cpu", **kwargs})


@pytest.mark.parametrize("backbone", ["alexnet", "vgg16"])
def test_extract_import_train(tmp_path, backbone, capsys):
    n = 10 if backbone == "alexnet" else 6
    images = random_images(n)
    iall = save_iall(tmp_path / "toy-iall.mat", images)
    rng = np.random.default_rng(1)
    labels = (rng.random((n, 4)) < 0.4).astype(np.uint8)
    labels[:, 0] = 1
    save_v73(tmp_path / "toy-ly.mat", {"LAll": labels, "YAll": (rng.random((n, 12)) < 0.3).astype(np.uint8)})
    features = tmp_path / "toy-xall.mat"
    assert main(["extract", str(iall), "--backbone", backbone, "--random-weights", "--out", str(features),
                 "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    assert f"XAll {n} x 4096 float32, {backbone} fc7" in capsys.readouterr().out
    assert features.read_bytes()[:10] == b"MATLAB 7.3" and not (tmp_path / "toy-xall.mat.partial").exists()
    xall = read_mat_array(features, "XAll")  # MATLAB's view: N x 4096
    assert xall.shape == (n, 4096) and xall.dtype == np.float32
    assert (xall >= 0).all() and (xall > 0).mean() > 0.05  # after the ReLU, and not dead
    assert np.allclose(xall, expected_fc7(backbone, images), rtol=1e-4, atol=1e-5)

    out = import_mat([features, tmp_path / "toy-ly.mat"], tmp_path / "toy.h5", n_query=2, n_train=4)
    with open_dataset(out) as ds:
        extractor = ds.meta["feature_extractor"]
        assert np.array_equal(ds.rows("image", np.arange(n)), xall)
        result = train(cfg.apply(cfg.preset("paper"), {**TINY, "epochs": 1}), ds, device="cpu")
    assert extractor.startswith(f"{backbone} fc7 (4096-d, after ReLU) by agch-data extract; weights random (seed 0)")
    assert f"images {iall.resolve()} [IAll] sha256 {file_sha256(iall)}" in extractor and "normalised" in extractor
    assert result.status == "finished" and result.epochs_run == 1
    # an explicit --feature-extractor still wins over the recorded one
    with open_dataset(import_mat([features, tmp_path / "toy-ly.mat"], tmp_path / "t2.h5", n_query=2, n_train=4,
                                 feature_extractor="mine")) as ds:
        assert ds.meta["feature_extractor"] == "mine"


def test_folder_of_images_matches_the_mat_file_and_is_cropped_like_torchvision(tmp_path):
    images = random_images(3, seed=2)
    large = random_images(1, seed=3, size=(256, 300))[0]  # shorter side already 256: only the centre crop
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"im{i}.png")
    Image.fromarray(large).save(folder / "large.png")
    Image.fromarray(random_images(1, seed=4, size=(30, 40))[0]).save(folder / "tiny.png")
    (tmp_path / "list.txt").write_text("im2.png\nim0.png\nlarge.png\nim1.png\ntiny.png\n")
    result = _extract(folder, tmp_path / "f.mat", image_list=tmp_path / "list.txt", workers=1)
    assert result.complete and result.job["images"]["sha256"] == file_sha256(tmp_path / "list.txt")
    from_folder = read_mat_array(tmp_path / "f.mat", "XAll")
    _extract(save_iall(tmp_path / "i.mat", images), tmp_path / "m.mat")
    from_mat = read_mat_array(tmp_path / "m.mat", "XAll")
    assert np.allclose(from_folder[[1, 3, 0]], from_mat, rtol=1e-5, atol=1e-6)  # rows follow the list
    crop = large[16:240, 38:262]  # torchvision's centre crop: round((256-224)/2), round((300-224)/2)
    assert np.allclose(from_folder[2], expected_fc7("alexnet", crop[None])[0], rtol=1e-4, atol=1e-5)
    assert from_folder.shape == (5, 4096) and (from_folder[4] > 0).any()


def test_interrupted_run_continues_to_the_same_output(tmp_path):
    iall = save_iall(tmp_path / "i.mat", random_images(7, seed=5))
    whole = _extract(iall, tmp_path / "whole.mat", workers=2)
    assert whole.complete and whole.images == 7
    first = _extract(iall, tmp_path / "x.mat", max_images=4)
    partial = tmp_path / "x.mat.partial"
    assert not first.complete and first.done == 4 and first.path == partial and not (tmp_path / "x.mat").exists()
    with pytest.raises(UserError, match=r"x.mat.partial: an unfinished extraction of another job \(it differs in "
                                        r"backbone, weights\)"):
        _extract(iall, tmp_path / "x.mat", backbone="vgg16", seed=1)
    second = _extract(iall, tmp_path / "x.mat")
    assert second.complete and second.images == 3 and not partial.exists()
    assert np.array_equal(read_mat_array(tmp_path / "x.mat", "XAll"), read_mat_array(tmp_path / "whole.mat", "XAll"))
    # an unreadable image stops the run; the rows before it are kept and the next run continues after the fix
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(random_images(5, seed=6)):
        Image.fromarray(image).save(folder / f"{i}.png")
    good = (folder / "3.png").read_bytes()
    (folder / "3.png").write_bytes(good[:200])  # truncated
    (tmp_path / "list.txt").write_text("".join(f"{i}.png\n" for i in range(5)))
    with pytest.raises(UserError, match=r"3.png \(line 4 of .*list.txt\): cannot read the image"):
        _extract(folder, tmp_path / "f.mat", image_list=tmp_path / "list.txt")
    with h5py.File(tmp_path / "f.mat.partial") as f:
        assert f.attrs["agch_rows_done"] == 2
    (folder / "3.png").write_bytes(good)
    assert _extract(folder, tmp_path / "f.mat", image_list=tmp_path / "list.txt").images == 3
    _extract(folder, tmp_path / "g.mat", image_list=tmp_path / "list.txt")
    assert np.array_equal(read_mat_array(tmp_path / "f.mat", "XAll"), read_mat_array(tmp_path / "g.mat", "XAll"))


def test_weights_from_a_file_or_torchvisions_cache_with_their_sha256(tmp_path, monkeypatch):
    iall = save_iall(tmp_path / "i.mat", random_images(2, seed=7))
    weights = tmp_path / "my-alexnet.pth"
    torch.save(build_backbone("alexnet", seed=3).state_dict(), weights)
    result = _extract(iall, tmp_path / "a.mat", weights=weights, random_weights=False)
    assert result.job["weights"] == f"my-alexnet.pth sha256 {file_sha256(weights)}"
    assert np.allclose(read_mat_array(tmp_path / "a.mat", "XAll"), expected_fc7("alexnet", random_images(2, seed=7),
                                                                                seed=3), rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(UserError, match=r"no alexnet weights: pass --weights FILE \(torchvision's "
                                        r"alexnet-owt-7be5be79.pth\), put that file in torchvision's cache "
                                        rf"\({tmp_path}/torch-home/hub/checkpoints\) .*nothing is downloaded"):
        _extract(iall, tmp_path / "b.mat", random_weights=False)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    assert _extract(iall, tmp_path / "b.mat", random_weights=False).job["weights"].startswith(
        f"alexnet-owt-7be5be79.pth sha256 {file_sha256(weights)}")
    assert np.array_equal(read_mat_array(tmp_path / "a.mat", "XAll"), read_mat_array(tmp_path / "b.mat", "XAll"))


def test_float16_output(tmp_path):
    iall = save_iall(tmp_path / "i.mat", random_images(3, seed=8))
    _extract(iall, tmp_path / "a.mat")
    _extract(iall, tmp_path / "h.mat", dtype="float16")
    half = read_mat_array(tmp_path / "h.mat", "XAll")
    assert half.dtype == np.float16
    assert np.array_equal(half, read_mat_array(tmp_path / "a.mat", "XAll").astype(np.float16))


def test_bad_image_files_name_the_file_and_what_was_expected(tmp_path):
    expected = "expected raw images, h5py shape N x 3 x W x H uint8"
    save_v73(tmp_path / "x.mat", {"XAll": np.zeros((4, 8))})
    with pytest.raises(DatasetError, match=rf"x.mat \[IAll\]: not in this file; it has: XAll 4x8 double; {expected}"):
        _extract(tmp_path / "x.mat", tmp_path / "o.mat")
    with h5py.File(tmp_path / "gray.mat", "w", userblock_size=512) as f:
        f["IAll"] = np.zeros((4, 32, 32), dtype=np.uint8)
    with pytest.raises(DatasetError, match=rf"gray.mat \[IAll\]: h5py shape \(4, 32, 32\), uint8; {expected}"):
        _extract(tmp_path / "gray.mat", tmp_path / "o.mat")
    with h5py.File(tmp_path / "float.mat", "w", userblock_size=512) as f:
        f["IAll"] = np.zeros((4, 3, 32, 32), dtype=np.float32)
    with pytest.raises(DatasetError, match=rf"float.mat \[IAll\]: h5py shape \(4, 3, 32, 32\), float32; {expected}"):
        _extract(tmp_path / "float.mat", tmp_path / "o.mat")
    scipy.io.savemat(tmp_path / "v5.mat", {"IAll": np.zeros((32, 32, 3, 2), dtype=np.uint8)})
    with pytest.raises(DatasetError, match=rf"v5.mat \[IAll\]: a MATLAB v5 file; {expected}"):
        _extract(tmp_path / "v5.mat", tmp_path / "o.mat")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(random_images(1, size=(40, 40))[0]).save(folder / "a.png")
    (folder / "b.jpg").write_text("not an image")
    (tmp_path / "list.txt").write_text("a.png\nb.jpg\n")
    with pytest.raises(UserError, match=r"b.jpg \(line 2 of .*list.txt\): cannot read the image .*; expected an image "
                                        r"file Pillow reads"):
        _extract(folder, tmp_path / "o.mat", image_list=tmp_path / "list.txt")
    (tmp_path / "list.txt").write_text("a.png\nc.png\nd.png\n")
    with pytest.raises(UserError, match=r"list.txt: 2 listed images are not in .*images \(first: line 2: c.png\)"):
        _extract(folder, tmp_path / "o.mat", image_list=tmp_path / "list.txt")
    with pytest.raises(UserError, match="a folder of images needs --list FILE"):
        _extract(folder, tmp_path / "o.mat")
    assert not list(tmp_path.glob("o.mat*"))


def test_weights_of_another_architecture_are_refused(tmp_path):
    iall = save_iall(tmp_path / "i.mat", random_images(1))
    alexnet = tmp_path / "alexnet.pth"
    torch.save(build_backbone("alexnet").state_dict(), alexnet)
    with pytest.raises(UserError, match=r"alexnet.pth: these are alexnet weights; expected vgg16 weights \(use "
                                        r"--backbone alexnet, or vgg16's file, e.g. vgg16-397923af.pth\)"):
        _extract(iall, tmp_path / "o.mat", backbone="vgg16", weights=alexnet, random_weights=False)
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"other.pth: not alexnet weights in torchvision's layout \(1 tensors; missing "
                                        r"features.0.weight \(16 missing\)\); expected 16 tensors"):
        _extract(iall, tmp_path / "o.mat", weights=tmp_path / "other.pth", random_weights=False)
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="junk.pth: not a readable torch state dict"):
        _extract(iall, tmp_path / "o.mat", weights=tmp_path / "junk.pth", random_weights=False)


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    iall = save_iall(tmp_path / "i.mat", random_images(1))
    assert main(["extract", str(iall), "--backbone", "alexnet", "--out", str(tmp_path / "o.mat"), "--random-weights",
                 "--weights", "w.pth"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["extract", str(iall), "--backbone", "resnet", "--out", "o.mat"]) == 2
    assert "invalid choice: 'resnet'" in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "absent.mat"), "--backbone", "alexnet", "--random-weights",
                 "--out", str(tmp_path / "o.mat")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agch-data: error: dataset ") and "absent.mat: no such file" in err and "Traceback" not in err
