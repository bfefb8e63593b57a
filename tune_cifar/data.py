"""CIFAR-10 on disk, in memory and in batches.

Three layers, each usable on its own:

* files: :func:`download_cifar10` fetches the official archive once per node (MD5-checked,
  extracted atomically, under a file lock) and :func:`read_cifar_batches` reads the official
  python batches into uint8 NHWC arrays, turning every way they can be broken into a one-line
  :class:`DataError`;
* splits: :func:`load_splits` gives the train / validation / test arrays of a study, real or
  :func:`synthetic_cifar`, optionally a stratified subset, as plain numpy (Ray's object store
  shares numpy arrays between trials without copying);
* batches: :class:`DeviceLoader` keeps a whole split on the training device and augments a
  batch at a time with tensor ops (the fast path, after airbench); :class:`CifarBatchDataset`
  does the same one image at a time for ``torch.utils.data.DataLoader`` (the reference path).
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tune_cifar import config as cfg
from tune_cifar.errors import UsageError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
LABEL_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
NUM_CLASSES = len(LABEL_NAMES)
# Per-channel mean and standard deviation of the 50,000 training images, pixels in [0, 1].
CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

FOLDER = "cifar-10-batches-py"  # what the official archive unpacks to
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
PAD = 4  # random-crop padding, in pixels

_LOCK = ".cifar-10.lock"
_TEMP_PREFIX = ".cifar-10-tmp-"  # half-downloaded archives and half-extracted folders


class DataError(UsageError):
    """Data that is missing, truncated or corrupt: the message names the file and the problem."""


def default_data_dir(data_dir: str | Path | None) -> Path:
    """Where CIFAR-10 lives: ``--data-dir``, else ``$TUNE_CIFAR_DATA``, else the user's cache.

    The directory holds (or receives) ``cifar-10-batches-py/``, as torchvision's ``root`` does,
    so one download serves every run of every study on the machine.
    """
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("TUNE_CIFAR_DATA"):
        return Path(os.environ["TUNE_CIFAR_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "tune-cifar"


# ---------------------------------------------------------------------------------------------
# Files


def download_cifar10(root: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout: float = 60) -> Path:
    """Make sure ``root/cifar-10-batches-py`` exists and return it, downloading at most once.

    Trials start many processes on one node at the same moment; an exclusive lock on
    ``root/.cifar-10.lock`` lets one of them download while the others wait and then find the
    folder. The archive is checked against ``md5`` and unpacked into a temporary folder that is
    renamed into place, so a killed download never leaves a folder that looks valid.
    """
    root = Path(root)
    folder = root / FOLDER
    if not _missing_batches(folder):
        return folder  # the common case: no lock, no network
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / _LOCK, "a")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise DataError(f"{root}: cannot create the data folder ({exc.strerror})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not folder.exists():
            _remove_stale_temporaries(root)
            _fetch(url, md5, timeout, root)
    missing = _missing_batches(folder)
    if missing:
        raise DataError(f"{folder / missing[0]}: missing (delete {folder} to download CIFAR-10 again)")
    return folder


def _missing_batches(folder: Path) -> list[str]:
    return [name for name in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / name).is_file()]


def _remove_stale_temporaries(root: Path) -> None:
    """Clear what a killed download left behind; safe because we hold the lock."""
    for stale in root.glob(_TEMP_PREFIX + "*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _fetch(url: str, md5: str, timeout: float, root: Path) -> None:
    """Download, verify and unpack the archive into ``root``; no temporary file survives."""
    handle, name = tempfile.mkstemp(dir=root, prefix=_TEMP_PREFIX, suffix=".tar.gz")
    archive = Path(name)
    try:
        with os.fdopen(handle, "wb") as out:
            digest = _download(url, out, timeout)
        if digest != md5:
            raise DataError(f"{url}: MD5 {digest} does not match the expected {md5} (corrupt or truncated download)")
        _extract(archive, root, url)
    finally:
        archive.unlink(missing_ok=True)


def _download(url: str, out: BinaryIO, timeout: float) -> str:
    """Stream ``url`` into ``out`` and return its MD5 hex digest."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts, short reads
        raise DataError(
            f"could not download {url} ({_one_line(exc)}); pass --data-dir DIR with {FOLDER}/ in it"
        ) from None
    return digest.hexdigest()


def _extract(archive: Path, root: Path, url: str) -> None:
    """Unpack into a temporary folder, then rename its ``cifar-10-batches-py`` into ``root``."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=_TEMP_PREFIX))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                _unpack_member(tar, member, staging, url)
        if not (staging / FOLDER).is_dir():
            raise DataError(f"{url}: the archive has no {FOLDER}/ folder")
        os.replace(staging / FOLDER, root / FOLDER)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{url}: cannot unpack the archive ({_one_line(exc)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, url: str) -> None:
    """Write one plain file or folder under ``staging``; anything else is refused.

    A hostile archive could otherwise write outside the folder through absolute paths, ``..``
    or links. Done by hand rather than with ``extractall(filter="data")``, which older Python
    3.10 and 3.11 releases lack.
    """
    parts = Path(member.name).parts
    if not (member.isfile() or member.isdir()) or Path(member.name).is_absolute() or ".." in parts:
        raise DataError(f"{url}: refusing archive member {member.name!r} (not a plain file inside the folder)")
    target = staging.joinpath(*parts)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tar.extractfile(member) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# All a CIFAR batch pickle may import: numpy arrays and, in a protocol-2 pickle written by Python 3, bytes.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # numpy 1, including the official files
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, numpy arrays): a data file runs no code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batches(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``train_x, train_y, test_x, test_y`` from the official python batches in ``folder``.

    Images are uint8 NHWC ``(N, 32, 32, 3)``, labels int64. Batches may hold any number of
    images (the tests write tiny ones).
    """
    return (*_read_batches(Path(folder), TRAIN_BATCHES), *_read_batches(Path(folder), (TEST_BATCH,)))


def _read_batches(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The named batches, concatenated, as NHWC images and labels."""
    if not folder.is_dir():
        raise DataError(f"{folder}: CIFAR-10 folder not found (pass --data-dir DIR with {FOLDER}/ in it)")
    batches = [_read_batch(folder / name) for name in names]
    data = np.concatenate([data for data, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are CHW
    return images, labels


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's ``(N, 3072)`` uint8 rows and ``(N,)`` int64 labels, checked."""
    if not path.is_file():
        raise DataError(f"{path}: batch file missing")
    try:
        with open(path, "rb") as file:
            entry = _BatchUnpickler(file, encoding="bytes").load()  # official files are Python 2 pickles
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    except Exception as exc:  # a damaged pickle can raise almost anything
        raise DataError(f"{path}: truncated or not a CIFAR-10 batch ({_one_line(exc)})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (holds a {type(entry).__name__}, expected a dict)")
    entry = {key.decode() if isinstance(key, bytes) else key: value for key, value in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DataError(f"{path}: not a CIFAR-10 batch (no 'data' and 'labels' entries)")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' is {getattr(data, 'dtype', '')} {shape}, expected uint8 (N, 3072)")
    try:
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.size} labels for {len(data)} images")
    outside = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if outside.size:
        raise DataError(f"{path}: label {outside[0]} is outside 0..{NUM_CLASSES - 1}")
    return data, labels


# ---------------------------------------------------------------------------------------------
# Synthetic data

_SHIFT = 6  # templates are this much larger than an image on each side
_DISTRACTORS = 40  # class-free templates blended into every image


TRAIN_IMAGES = {"cifar10": 50_000, "synthetic": 10_000}  # each source's training images (train + validation)


def synthetic_cifar(
    n_train: int = TRAIN_IMAGES["synthetic"], n_test: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-shaped data with ten learnable classes, for tests and machines without CIFAR-10.

    Each class is a smooth random colour field; an image is a randomly shifted window of its
    class's field blended with a shifted window of a random class-free field, with per-channel
    brightness jitter and pixel noise. A small CNN learns it well above chance in an epoch or
    two, yet not perfectly, so hyperparameters still matter. Classes are balanced.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(NUM_CLASSES + _DISTRACTORS, 3, 4, 4, generator=generator)
    templates = F.interpolate(coarse, size=32 + 2 * _SHIFT, mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=generator)]
        distractors = torch.randint(NUM_CLASSES, len(templates), (n,), generator=generator)
        top, left, top2, left2 = torch.randint(0, 2 * _SHIFT + 1, (4, n), generator=generator)
        weight = torch.empty(n, 1, 1, 1).uniform_(0.3, 0.6, generator=generator)  # of the class template
        images = torch.lerp(
            _crop(templates, distractors, top2, left2, 32, 32), _crop(templates, labels, top, left, 32, 32), weight
        )
        images.mul_(torch.empty(n, 3, 1, 1).uniform_(0.8, 1.2, generator=generator))
        images.add_(torch.randn(images.shape, generator=generator), alpha=0.2)
        pixels = images.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy()

    return (*draw(n_train), *draw(n_test))


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class Splits:
    """A study's data: uint8 NHWC images and int64 labels, as numpy arrays."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str  # "cifar10" or "synthetic"


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train_indices, val_indices)`` with exactly ``val_size`` validation images.

    Every class gives the validation set its share of ``val_size`` in proportion to its
    frequency, so validation accuracy is measured on the training distribution.
    """
    labels = np.asarray(labels)
    if not 0 <= val_size <= len(labels):
        raise UsageError(f"val_size must be between 0 and {len(labels)}, got {val_size}")
    val = _stratified_sample(labels, val_size, np.random.default_rng(seed))
    train = np.setdiff1d(np.arange(len(labels)), val)
    emptied = np.setdiff1d(labels, labels[train])
    if emptied.size:
        raise UsageError(f"val_size {val_size} of {len(labels)} images leaves no training image of class {emptied[0]}")
    return train, val


def _stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``size`` images, each class contributing in proportion to its count."""
    classes, counts = np.unique(labels, return_counts=True)
    picks = [
        rng.permutation(np.flatnonzero(labels == label))[:quota]
        for label, quota in zip(classes, _apportion(counts, size), strict=True)
    ]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def _apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``counts`` that sum to it (largest remainder)."""
    quota, remainder = np.divmod(counts * total, counts.sum())
    quota[np.argsort(-remainder, kind="stable")[: total - quota.sum()]] += 1
    return quota


def check_sizes(train_images: int, val_size: int | None, subset: int | None) -> None:
    """The subset and validation sizes a source of ``train_images`` training images allows, one
    line naming the bad value otherwise: checked by :func:`load_splits`, and by a study before it
    starts Ray (``TRAIN_IMAGES``), so that a bad size is refused in a second, not after Ray's start
    and stop."""
    if subset is not None and not 20 <= subset <= train_images:
        raise UsageError(f"subset must be between 20 and {train_images} (the training images), got {subset}")
    pool = train_images if subset is None else subset
    if val_size is not None and val_size >= pool:
        where = f"the {pool:,}-image subset" if subset is not None else f"{pool:,} training images"
        raise UsageError(f"val_size {val_size:,} leaves no training image out of {where}; pass a smaller --val-size")


def load_splits(
    source: str = "synthetic",
    data_dir: str | Path | None = None,
    val_size: int | None = None,
    subset: int | None = None,
    seed: int = 0,
    download: bool = True,
    full_test: bool = False,
) -> Splits:
    """The train / validation / test arrays of a study.

    ``subset=N`` keeps a stratified sample of N of the training images (the pool that is then
    split into train and validation) and a stratified ``max(N // 5, 10)`` test images, so a
    quick run sees the same class balance as a full one (``full_test`` keeps every test image:
    a retrain's one test evaluation is cheap and its precision matters). ``val_size`` is the exact number of
    validation images taken out of that pool, never rescaled; ``None`` holds out a tenth of it
    (45,000 / 5,000 on CIFAR-10, 9,000 / 1,000 on the synthetic set, 576 / 64 of a 640 subset).
    """
    if source == "cifar10":
        folder = default_data_dir(data_dir) / FOLDER
        if download:
            download_cifar10(folder.parent)
        elif not folder.exists():
            raise DataError(f"{folder}: not found; pass --data-dir DIR with {FOLDER}/ in it, or allow the download")
        train_x, train_y, test_x, test_y = read_cifar_batches(folder)
    elif source == "synthetic":
        train_x, train_y, test_x, test_y = synthetic_cifar(seed=seed)
    else:
        raise UsageError(f"unknown data source {source!r} (choose from {', '.join(cfg.DATA_SOURCES)})")

    check_sizes(len(train_y), val_size, subset)
    if subset is not None:
        keep = _stratified_sample(train_y, subset, np.random.default_rng((seed, 1)))
        train_x, train_y = train_x[keep], train_y[keep]
        if not full_test:
            keep = _stratified_sample(test_y, min(max(subset // 5, 10), len(test_y)), np.random.default_rng((seed, 2)))
            test_x, test_y = test_x[keep], test_y[keep]

    if val_size is None:
        val_size = len(train_y) // 10
    train, val = stratified_split(train_y, val_size, seed)
    return Splits(train_x[train], train_y[train], train_x[val], train_y[val], test_x, test_y, source)


# ---------------------------------------------------------------------------------------------
# Batches


def _normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 pixels to float32 ``(x / 255 - mean) / std``; shared so both loaders agree bit for bit."""
    return (images.float() / 255 - mean) / std


def _crop(images: Tensor, index: Tensor, top: Tensor, left: Tensor, height: int, width: int) -> Tensor:
    """``images[index[i], :, top[i]:top[i] + height, left[i]:left[i] + width]`` for every i, as one gather."""
    windows = images.unfold(2, height, 1).unfold(3, width, 1)  # (N, C, rows, cols, height, width), a view
    return windows[index, :, top, left]


_MEAN = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
_STD = torch.tensor(CIFAR_STD).view(3, 1, 1)


class CifarBatchDataset(torch.utils.data.Dataset):
    """One image at a time, as in the source reports: the per-sample reference for :class:`DeviceLoader`.

    Items are ``(float32 CHW tensor normalised with CIFAR_MEAN / CIFAR_STD, int label)``; with
    ``augment``, a random crop of the zero-padded image and a random horizontal flip.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool, seed: int = 0) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.augment = augment
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._generator_seed: int | None = None

    @classmethod
    def from_folder(cls, folder: Path, train: bool, augment: bool, seed: int = 0) -> CifarBatchDataset:
        """The training or test images of the official batches in ``folder``."""
        images, labels = _read_batches(Path(folder), TRAIN_BATCHES if train else (TEST_BATCH,))
        return cls(images, labels, augment, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = torch.tensor(self.images[index]).permute(2, 0, 1)  # a copy: the array may be read-only
        if self.augment:
            generator = self._random()
            height, width = image.shape[1:]
            top, left = torch.randint(0, 2 * PAD + 1, (2,), generator=generator).tolist()
            image = F.pad(image, (PAD, PAD, PAD, PAD))[:, top : top + height, left : left + width]
            if torch.rand((), generator=generator) < 0.5:
                image = image.flip(2)
        return _normalise(image, _MEAN, _STD), int(self.labels[index])

    def _random(self) -> torch.Generator:
        """This process's generator. DataLoader workers each reseed from their worker seed, or
        every worker would repeat the same crops; that seed comes from the DataLoader's RNG."""
        info = torch.utils.data.get_worker_info()
        seed = self.seed if info is None else (self.seed + info.seed) % 2**64
        if self._generator is None or self._generator_seed != seed:
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_seed = seed
        return self._generator


class DeviceLoader:
    """Batches of one split, kept whole on ``device`` and augmented a batch at a time.

    The images live in one uint8 NCHW tensor (zero-padded by 4 when augmenting, channels-last
    on CUDA), so an epoch costs no host-to-device copies and no per-image Python: a batch's
    random crops are one gather with per-image offsets and its flips one ``torch.where``.
    Randomness comes from the loader's own seeded generator and is drawn a whole epoch at a
    time, so equal seeds give equal batches and :meth:`state_dict` between epochs resumes
    the same sequence.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device | str,
        train: bool,
        augment: bool,
        seed: int,
        drop_last: bool | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.augment = train and augment
        self.drop_last = train if drop_last is None else drop_last
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.generator = torch.Generator().manual_seed(seed)
        # np.require copies only arrays torch cannot wrap (read-only ones from Ray's object store).
        pixels = torch.from_numpy(np.require(images, requirements="CW")).permute(0, 3, 1, 2)
        self.height, self.width = pixels.shape[2:]
        pad = PAD if self.augment else 0
        shape = (*pixels.shape[:2], self.height + 2 * pad, self.width + 2 * pad)
        self.images = torch.empty(shape, dtype=torch.uint8, device=self.device, memory_format=self.memory_format)
        self.images.zero_()  # the padding
        self.images[:, :, pad : pad + self.height, pad : pad + self.width] = pixels.to(self.device)
        self.labels = torch.from_numpy(np.require(labels, np.int64, "CW")).to(self.device)
        self.mean = _MEAN.to(self.device)
        self.std = _STD.to(self.device)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        """Batches per epoch. ``drop_last`` drops a ragged last batch, but never the only one."""
        full, rest = divmod(self.num_images, self.batch_size)
        return full if self.drop_last and full else full + (rest > 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of ``(float32 normalised NCHW images, int64 labels)`` on the device."""
        n = self.num_images
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        crops = None
        if self.augment:
            top, left = torch.randint(0, 2 * PAD + 1, (2, n), generator=self.generator).to(self.device)
            flips = (torch.rand(n, generator=self.generator) < 0.5).to(self.device)
            crops = (top, left, flips)
        return self._batches(order.to(self.device), crops)

    def _batches(self, order: Tensor, crops: tuple[Tensor, Tensor, Tensor] | None) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = slice(start, start + self.batch_size)
            index = order[batch]
            if crops is None:
                images = self.images[index]
            else:
                top, left, flips = (values[batch] for values in crops)
                images = _crop(self.images, index, top, left, self.height, self.width)
                images = torch.where(flips[:, None, None, None], images.flip(3), images)
            images = images.contiguous(memory_format=self.memory_format)
            yield _normalise(images, self.mean, self.std), self.labels[index]

    def state_dict(self) -> dict[str, Tensor]:
        """The generator's state: saved between epochs, it makes a resumed run draw the same batches."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
