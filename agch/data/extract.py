"""`agch-data extract`: fc7 features of raw images, written as the field's MATLAB v7.3 `XAll` file.

Images come from the field's v7.3 file (h5py sees `IAll` as N x 3 x W x H uint8, MATLAB's H x W x 3 x N) or from a
folder of image files with a list giving the item order. They are read in batches by a DataLoader (workers, pinned
memory on a GPU), pushed through the backbone (agch.data.backbones; bf16 autocast on a GPU by default) and written
batch by batch into `OUT.partial`, which records how many rows are done: an interrupted run continues where it
stopped when the same command runs again, and the file is renamed to OUT only when complete. Provenance (backbone,
weights file sha256 or "random", preprocessing, the images' file and sha256) is stored in the file; `agch-data
import` carries it into the dataset's feature_extractor. Layout and rules: docs/data-format.md ("Raw images").
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from agch import __version__
from agch.data.backbones import FC7_DIM, build_backbone, cached_weights, describe_weights
from agch.errors import DatasetError, UserError, need, unknown
from agch.data.extract_options import DTYPES, PRECISIONS, RAW_KEY, WEIGHT_FILES
from agch.data.importers import EXTRACTOR_ATTR, MatFile, file_sha256

FEATURES_KEY = "XAll"
CROP, RESIZE = 224, 256
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREPROCESSING = (f"ImageNet evaluation transform (torchvision's ImageClassification for AlexNet/VGG, on uint8 "
                 f"tensors): images of {CROP} x {CROP} are used as they are (the field's IAll, as DJSRH feeds them); "
                 f"others have the shorter side resized to {RESIZE} (bilinear, antialiased, rounded to uint8) and are "
                 f"centre-cropped to {CROP} x {CROP}; then scaled to [0, 1] and normalised with mean {MEAN}, std {STD}")
JOB_ATTR, DONE_ATTR = "agch_extraction", "agch_rows_done"
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CHUNK_BYTES = 1 << 20


def preprocess(image: torch.Tensor) -> torch.Tensor:
    """A uint8 (3, H, W) image -> the float32 (3, 224, 224) input of the backbone (see PREPROCESSING)."""
    _, h, w = image.shape
    if (h, w) != (CROP, CROP):
        short, long = min(h, w), max(h, w)
        size = (RESIZE, int(RESIZE * long / short)) if h <= w else (int(RESIZE * long / short), RESIZE)
        if (h, w) != size:
            image = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear",
                                                    align_corners=False, antialias=True)[0].round().to(torch.uint8)
        top, left = int(round((size[0] - CROP) / 2.0)), int(round((size[1] - CROP) / 2.0))
        image = image[:, top:top + CROP, left:left + CROP]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (image.float() / 255 - mean) / std


class MatImages(torch.utils.data.Dataset):
    """Raw images of a v7.3 .mat file (h5py: N x 3 x W x H uint8); each worker opens the file itself."""

    def __init__(self, path: Path, key: str = RAW_KEY):
        """Check that `key` of `path` holds raw images; DatasetError naming the file and what was expected."""
        expected = (f"expected raw images, h5py shape N x 3 x W x H uint8 (MATLAB: H x W x 3 x N, saved with -v7.3), "
                    f"as {RAW_KEY} of the field's mirflickr25k-iall.mat")
        with contextlib.closing(MatFile(path)) as mat:
            if key not in mat.keys():
                hint = "" if key != RAW_KEY else " (another key: --key)"
                raise DatasetError(path, key, f"not in this file; it has: {mat.describe() or 'no variables'}; "
                                              f"{expected}{hint}")
            if mat.version != "v7.3":
                raise DatasetError(path, key, f"a MATLAB v5 file; {expected}")
            shape, cls = mat.keys()[key]
        h5_shape = tuple(reversed(shape))
        if len(h5_shape) != 4 or h5_shape[1] != 3 or 0 in h5_shape or cls != "uint8":
            raise DatasetError(path, key, f"h5py shape {h5_shape}, {cls}; {expected}")
        self.path, self.key, self.n = Path(path), key, h5_shape[0]
        self._dset: h5py.Dataset | None = None

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> list[tuple[int, torch.Tensor, str]]:
        if self._dset is None:
            self._dset = h5py.File(self.path, "r")[self.key]
        lo, hi = min(indices), max(indices) + 1
        block = self._dset[lo:hi]  # one read for the batch: (b, 3, W, H)
        return [(i, preprocess(torch.from_numpy(np.ascontiguousarray(block[i - lo].transpose(0, 2, 1)))), "")
                for i in indices]

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        return self.__getitems__([index])[0]

    def provenance(self) -> dict[str, str]:
        """The images' file, its sha256 and the key."""
        return {"path": str(self.path.resolve()), "sha256": file_sha256(self.path), "key": self.key}

    def close(self) -> None:
        """Close the file if this process opened it."""
        if self._dset is not None:
            self._dset.file.close()
            self._dset = None


class FolderImages(torch.utils.data.Dataset):
    """Image files of a folder, in the order a list file gives (one name, relative to the folder, a line)."""

    def __init__(self, folder: Path, image_list: Path):
        """Check that the list is readable, non-empty and names files that exist."""
        need(image_list.is_file(), str(image_list), "no such file; expected the list of image files, one a line")
        self.folder, self.image_list = Path(folder), Path(image_list)
        self.names = [line.strip() for line in image_list.read_text().splitlines() if line.strip()]
        need(bool(self.names), str(image_list), "no file names; expected the images in item order, one a line")
        missing = [(k + 1, name) for k, name in enumerate(self.names) if not (self.folder / name).is_file()]
        need(not missing, str(image_list), f"{len(missing)} listed images are not in {self.folder} (first: line "
                                           f"{missing[0][0] if missing else 0}: {missing[0][1] if missing else ''})")
        self.n = len(self.names)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        from PIL import Image

        path = self.folder / self.names[index]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            return index, torch.zeros(3, CROP, CROP), (f"{path} (line {index + 1} of {self.image_list}): cannot "
                                                       f"read the image ({err}); expected an image file Pillow "
                                                       "reads (JPEG, PNG, ...)")
        return index, preprocess(torch.from_numpy(pixels.transpose(2, 0, 1).copy())), ""

    def provenance(self) -> dict[str, str]:
        """The folder, the list file and the list's sha256 (the images themselves are not hashed)."""
        return {"path": str(self.folder.resolve()), "sha256": file_sha256(self.image_list),
                "key": f"list {self.image_list.resolve()}"}

    def close(self) -> None:
        """Nothing to close."""


def open_images(path: Path, key: str = RAW_KEY, image_list: Path | None = None) -> MatImages | FolderImages:
    """A v7.3 .mat file of raw images, or (with `image_list`) a folder of image files."""
    if Path(path).is_dir():
        need(image_list is not None, str(path), "a folder of images needs --list FILE (the image files in item "
                                                "order, one a line: row i of XAll is line i)")
        return FolderImages(Path(path), Path(image_list))
    need(image_list is None, str(path), "--list goes with a folder of images; this is a file")
    return MatImages(Path(path), key)


@dataclass
class ExtractResult:
    """What `extract_features` did: `done` of `n` rows are in the file (OUT when complete, else OUT.partial)."""

    path: Path
    n: int
    done: int
    complete: bool
    images: int
    """images extracted by this call."""
    seconds: float
    job: dict[str, Any]

    @property
    def images_per_s(self) -> float:
        """Throughput of this call (reading, preprocessing, forward pass and writing)."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def extract_features(images: Path, out: Path, *, backbone: str, weights: Path | None = None,
                     random_weights: bool = False, seed: int = 0, key: str = RAW_KEY, image_list: Path | None = None,
                     batch_size: int = 64, workers: int = 0, device: str = "auto", precision: str = "auto",
                     dtype: str = "float32", max_images: int | None = None, progress: bool = True) -> ExtractResult:
    """fc7 features of `images` (a v7.3 IAll file, or a folder with `image_list`) into the v7.3 file `out`.

    Weights: `weights` (torchvision's state dict file), else torchvision's cache, else an error; `random_weights`
    initialises from `seed` instead. A run stops after `max_images` images when given; running again continues.
    """
    from agch.method.device import resolve_device

    need(not (weights and random_weights), "", "--weights and --random-weights exclude each other")
    need(batch_size >= 1 and workers >= 0, "", "--batch-size must be >= 1 and --workers >= 0")
    need(precision in PRECISIONS and dtype in DTYPES, "", f"precision one of {PRECISIONS}, dtype one of {DTYPES}")
    if backbone not in WEIGHT_FILES:
        raise unknown("backbone", backbone, WEIGHT_FILES)
    if weights is None and not random_weights:
        weights = cached_weights(backbone)
        need(weights is not None, "",
             f"no {backbone} weights: pass --weights FILE (torchvision's {WEIGHT_FILES[backbone]}), put that file "
             f"in torchvision's cache ({Path(torch.hub.get_dir()) / 'checkpoints'}) or use --random-weights; "
             "nothing is downloaded")
    dev = resolve_device(device)
    precision = ("bf16" if dev.type == "cuda" else "fp32") if precision == "auto" else precision
    source = open_images(Path(images), key, image_list)
    job = {"backbone": backbone, "layer": "fc7: the second 4096-unit Linear layer after its ReLU, eval mode",
           "weights": describe_weights(weights, seed), "precision": precision, "dtype": dtype,
           "preprocessing": PREPROCESSING, "images": source.provenance(), "n": source.n,
           "created_by": f"agch {__version__}"}
    file = FeatureFile(Path(out), job)
    try:
        start, todo = file.done, source.n - file.done
        todo = todo if max_images is None else min(todo, max_images)
        layout = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        model = build_backbone(backbone, weights=weights, seed=seed).to(dev, memory_format=layout)
        loader = DataLoader(Subset(source, range(start, start + todo)), batch_size=batch_size, num_workers=workers,
                            pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None)
        t0 = time.perf_counter()
        with (torch.inference_mode(), tqdm(total=source.n, initial=start, unit="img", disable=not progress,
                                           desc=f"{backbone} fc7", dynamic_ncols=True) as bar):
            for index, batch, errors in loader:
                bad = next((e for e in errors if e), None)
                if bad:
                    raise UserError(bad)
                x = batch.to(dev, non_blocking=True, memory_format=layout)
                with torch.autocast(dev.type, dtype=_AUTOCAST.get(precision), enabled=precision != "fp32"):
                    fc7 = model(x)
                file.write(int(index[0]), fc7.float().cpu().numpy())
                bar.update(len(index))
        seconds = time.perf_counter() - t0
        complete = file.done == source.n
        path = file.finish(describe(job)) if complete else file.partial
        return ExtractResult(path, source.n, file.done, complete, todo, seconds, job)
    except BaseException:
        if file.done == 0:  # nothing to continue from: leave no file behind
            file.close()
            file.partial.unlink(missing_ok=True)
        raise
    finally:
        file.close()
        source.close()


def describe(job: dict[str, Any]) -> str:
    """The one-line feature_extractor a dataset imported from these features records."""
    images = job["images"]
    return (f"{job['backbone']} fc7 (4096-d, after ReLU) by agch-data extract; weights {job['weights']}; "
            f"{job['precision']}, stored {job['dtype']}; images {images['path']} [{images['key']}] sha256 "
            f"{images['sha256']}; preprocessing: {job['preprocessing']}")


class FeatureFile:
    """The MATLAB v7.3 output: XAll (MATLAB view N x 4096, h5py 4096 x N), written into OUT.partial batch by batch.

    The partial file records its job (JSON) and the rows done; a partial file of another job is refused.
    """

    def __init__(self, out: Path, job: dict[str, Any]):
        """Open OUT.partial to continue it, or create it."""
        self.out, self.partial, n = out, out.with_name(out.name + ".partial"), job["n"]
        if self.partial.exists():
            try:
                with h5py.File(self.partial, "r") as f:
                    found = json.loads(f.attrs[JOB_ATTR])
            except (OSError, KeyError, ValueError) as err:
                raise UserError(f"{self.partial}: an unfinished extraction that cannot be read ({err}); delete it "
                                "to start over") from None
            differ = sorted(k for k in set(found) | set(job) if k != "created_by" and found.get(k) != job.get(k))
            if differ:
                raise UserError(f"{self.partial}: an unfinished extraction of another job (it differs in "
                                f"{', '.join(differ)}); run the command that made it to finish it, or delete it "
                                "to start over")
            self._file = h5py.File(self.partial, "r+")
            self.done = int(self._file.attrs[DONE_ATTR])
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.dtype(job["dtype"])
        with h5py.File(self.partial, "w", userblock_size=512) as f:
            cols = max(1, min(n, _CHUNK_BYTES // (FC7_DIM * dtype.itemsize)))
            dset = f.create_dataset(FEATURES_KEY, shape=(FC7_DIM, n), dtype=dtype, chunks=(FC7_DIM, cols))
            if dtype == np.float32:  # MATLAB has no half-precision class; float16 is for h5py readers
                dset.attrs["MATLAB_class"] = np.bytes_("single")
            f.attrs[JOB_ATTR], f.attrs[DONE_ATTR] = json.dumps(job, sort_keys=True), 0
        header = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {time.strftime('%c')} HDF5 schema 1.00 ."
        with open(self.partial, "r+b") as f:
            f.write(header.encode().ljust(116) + bytes(8) + b"\x00\x02IM")
        self._file = h5py.File(self.partial, "r+")
        self.done = 0
        """Rows written so far (rows [0, done) of XAll)."""

    def write(self, start: int, features: np.ndarray) -> None:
        """Rows [start, start + len(features)); must continue where the file stopped."""
        if start != self.done:
            raise RuntimeError(f"rows written out of order: {start} after {self.done}")
        self._file[FEATURES_KEY][:, start:start + len(features)] = features.T
        self._file.flush()  # the rows reach the file before the count says they are there
        self._file.attrs[DONE_ATTR] = self.done = start + len(features)
        self._file.flush()

    def finish(self, description: str) -> Path:
        """Record the description on XAll, close, rename OUT.partial onto OUT; returns OUT."""
        self._file[FEATURES_KEY].attrs[EXTRACTOR_ATTR] = description
        self._file.close()
        os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        """Close the file (a no-op when finished)."""
        if self._file.id.valid:
            self._file.close()
