"""The data layer on real files, a real HTTP server and real processes: reading, downloading,
splitting, synthetic data and both batch paths (per-sample Dataset and on-device loader)."""

from __future__ import annotations

import datetime
import hashlib
import io
import multiprocessing
import os
import pickle
import socket
import tarfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar_batches

from tune_cifar.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    LABEL_NAMES,
    CifarBatchDataset,
    DataError,
    DeviceLoader,
    default_data_dir,
    download_cifar10,
    load_splits,
    read_cifar_batches,
    stratified_split,
    synthetic_cifar,
)
from tune_cifar.errors import UsageError

FOLDER = "cifar-10-batches-py"
LOCK = ".cifar-10.lock"


def load_raw(path: Path) -> dict[bytes, object]:
    return pickle.loads(path.read_bytes(), encoding="bytes")


def rewrite(path: Path, **changes: object) -> None:
    """Replace entries of a batch file (keys given as str, written as bytes like the official files)."""
    entry = load_raw(path)
    entry.update({key.encode(): value for key, value in changes.items()})
    path.write_bytes(pickle.dumps(entry, protocol=2))


def assert_one_line(error: pytest.ExceptionInfo[BaseException], *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


# ---------------------------------------------------------------------------------------------
# Reading


def test_label_names_and_stats() -> None:
    assert LABEL_NAMES[0] == "airplane" and LABEL_NAMES[-1] == "truck" and len(LABEL_NAMES) == 10
    assert all(0.4 < m < 0.5 for m in CIFAR_MEAN) and all(0.24 < s < 0.27 for s in CIFAR_STD)


def test_read_round_trips_pixels_and_labels(cifar_dir: Path) -> None:
    train_x, train_y, test_x, test_y = read_cifar_batches(cifar_dir)
    assert train_x.shape == (100, 32, 32, 3) and test_x.shape == (20, 32, 32, 3)
    assert train_x.dtype == test_x.dtype == np.uint8 and train_y.dtype == test_y.dtype == np.int64
    assert train_x.flags.c_contiguous

    batches = [load_raw(cifar_dir / f"data_batch_{i}") for i in range(1, 6)]
    np.testing.assert_array_equal(train_y, np.concatenate([b[b"labels"] for b in batches]))
    np.testing.assert_array_equal(test_y, load_raw(cifar_dir / "test_batch")[b"labels"])
    # The official layout, spelled out: row = 1024 red, 1024 green, 1024 blue values, each row-major.
    rows = np.concatenate([b[b"data"] for b in batches])
    image, row, col, channel = np.meshgrid(np.arange(100), np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    np.testing.assert_array_equal(train_x, rows[image, channel * 1024 + row * 32 + col])
    test_rows = load_raw(cifar_dir / "test_batch")[b"data"]
    assert test_x[7, 5, 9, 2] == test_rows[7, 2 * 1024 + 5 * 32 + 9]


def test_read_accepts_python3_pickles_with_str_keys(cifar_dir: Path) -> None:
    """../shared/data/cifar10/build_batches.py writes protocol-4 pickles with str keys."""
    path = cifar_dir / "data_batch_2"
    entry = {key.decode(): value for key, value in load_raw(path).items()}
    path.write_bytes(pickle.dumps(entry, protocol=4))
    before = read_cifar_batches(cifar_dir)
    path.write_bytes(pickle.dumps(entry, protocol=5))
    for a, b in zip(before, read_cifar_batches(cifar_dir), strict=True):
        np.testing.assert_array_equal(a, b)


def _remove(folder: Path) -> str:
    (folder / "data_batch_3").unlink()
    return "data_batch_3"


def _truncate(folder: Path) -> str:
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    return "test_batch"


def _bad_shape(folder: Path) -> str:
    rewrite(folder / "data_batch_2", data=np.zeros((20, 3000), np.uint8))
    return "data_batch_2"


def _bad_label(folder: Path) -> str:
    rewrite(folder / "data_batch_4", labels=[12] + [0] * 19)
    return "data_batch_4"


def _too_few_labels(folder: Path) -> str:
    rewrite(folder / "data_batch_5", labels=[0] * 19)
    return "data_batch_5"


def _no_labels(folder: Path) -> str:
    entry = load_raw(folder / "data_batch_1")
    del entry[b"labels"]
    (folder / "data_batch_1").write_bytes(pickle.dumps(entry, protocol=2))
    return "data_batch_1"


def _not_a_dict(folder: Path) -> str:
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    return "test_batch"


def _foreign_object(folder: Path) -> str:
    """A pickle that imports something other than numpy: refused before anything runs."""
    rewrite(folder / "data_batch_1", labels=datetime.date(2020, 1, 1))
    return "data_batch_1"


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (_remove, "missing"),
        (_truncate, "truncated"),
        (_bad_shape, "(20, 3000)"),
        (_bad_label, "label 12"),
        (_too_few_labels, "19 labels for 20 images"),
        (_no_labels, "'labels'"),
        (_not_a_dict, "list"),
        (_foreign_object, "refusing to load datetime.date"),
    ],
)
def test_read_names_the_broken_file(cifar_dir: Path, corrupt: Callable[[Path], str], needle: str) -> None:
    name = corrupt(cifar_dir)
    with pytest.raises(DataError) as error:
        read_cifar_batches(cifar_dir)
    assert_one_line(error, str(cifar_dir / name), needle)


def test_read_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        read_cifar_batches(tmp_path / "nowhere")
    assert_one_line(error, str(tmp_path / "nowhere"), "--data-dir")
    assert isinstance(error.value, UsageError)  # so the CLIs print it on one line and exit 2


def test_default_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNE_CIFAR_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert default_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert default_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TUNE_CIFAR_DATA")
    assert default_data_dir(None) == tmp_path / "cache" / "tune-cifar"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir(None) == tmp_path / "home" / ".cache" / "tune-cifar"


# ---------------------------------------------------------------------------------------------
# Downloading


@dataclass
class Server:
    url: str  # of the tiny archive
    md5: str
    requests: list[str] = field(default_factory=list)
    delay: float = 0.0  # seconds each response waits, to make concurrent downloads overlap


@pytest.fixture
def server(cifar_tarball: tuple[Path, str]) -> Iterator[Server]:
    """The tiny archive served over HTTP from a thread, counting requests."""
    tarball, md5 = cifar_tarball
    info = Server(url="", md5=md5)

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            info.requests.append(self.path)
            time.sleep(info.delay)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tarball.parent)))
    info.url = f"http://127.0.0.1:{httpd.server_address[1]}/{tarball.name}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield info
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_extracts_once(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    folder = download_cifar10(root, server.url, server.md5)
    assert folder == root / FOLDER and len(server.requests) == 1
    assert sorted(os.listdir(root)) == [LOCK, FOLDER]  # no temporary files left
    source = read_cifar_batches(tmp_path / "source" / FOLDER)  # what the served archive was made from
    for got, want in zip(read_cifar_batches(folder), source, strict=True):
        np.testing.assert_array_equal(got, want)
    assert download_cifar10(root, server.url, server.md5) == folder
    assert len(server.requests) == 1  # a complete folder needs no network


def test_existing_folder_needs_no_network(cifar_dir: Path) -> None:
    assert download_cifar10(cifar_dir.parent, url="http://127.0.0.1:9/unreachable") == cifar_dir


def test_md5_mismatch_leaves_nothing(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        download_cifar10(root, server.url, md5="0" * 32)
    assert_one_line(error, server.url, "MD5", server.md5)
    assert os.listdir(root) == [LOCK]


def _download_in_child(root: str, url: str, md5: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()  # all four ask at once
    download_cifar10(Path(root), url, md5)
    read_cifar_batches(Path(root) / FOLDER)


def test_concurrent_processes_download_once(server: Server, tmp_path: Path) -> None:
    server.delay = 0.5  # longer than the processes take to all reach the lock
    context = multiprocessing.get_context("forkserver")  # fresh processes, not forks of this threaded one
    context.set_forkserver_preload(["tune_cifar.data"])  # import torch once, not four times
    barrier = context.Barrier(4)
    root = tmp_path / "cache"
    children = [
        context.Process(target=_download_in_child, args=(str(root), server.url, server.md5, barrier)) for _ in range(4)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0, 0, 0]
    assert len(server.requests) == 1
    assert sorted(os.listdir(root)) == [LOCK, FOLDER]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down_or_file_missing(server: Server, tmp_path: Path) -> None:
    for url in (f"http://127.0.0.1:{_free_port()}/cifar-10-python.tar.gz", server.url + ".missing"):
        with pytest.raises(DataError) as error:
            download_cifar10(tmp_path / "cache", url, server.md5, timeout=5)
        assert_one_line(error, "could not download", url, "--data-dir")
        assert os.listdir(tmp_path / "cache") == [LOCK]


def _evil_tarball(tmp_path: Path, member: tarfile.TarInfo) -> tuple[str, str]:
    """A valid tiny archive plus one hostile member, as a file:// URL and its MD5."""
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(write_cifar_batches(tmp_path / "source"), arcname=FOLDER)
        tar.addfile(member, io.BytesIO(b"gotcha") if member.isfile() else None)
    return tarball.as_uri(), hashlib.md5(tarball.read_bytes()).hexdigest()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 6 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("../escaped.txt"),
        _member("cifar-10-batches-py/../../escaped.txt"),
        _member("/tmp/tune-cifar-test-escaped.txt"),
        _member("cifar-10-batches-py/link", tarfile.SYMTYPE, "../../escaped.txt"),
        _member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "/etc/passwd"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink"],
)
def test_extraction_refuses_escaping_members(tmp_path: Path, member: tarfile.TarInfo) -> None:
    url, md5 = _evil_tarball(tmp_path, member)
    root = tmp_path / "deep" / "cache"
    with pytest.raises(DataError) as error:
        download_cifar10(root, url, md5)
    assert_one_line(error, "refusing archive member", member.name)
    assert os.listdir(root) == [LOCK]
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/tune-cifar-test-escaped.txt").exists()


# ---------------------------------------------------------------------------------------------
# Splits and synthetic data


def test_stratified_split_keeps_proportions() -> None:
    counts = np.array([300, 200, 100, 100, 50, 50, 40, 30, 20, 10])
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), counts))
    train, val = stratified_split(labels, 97, seed=1)
    assert len(val) == 97 and len(train) == len(labels) - 97
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no repeats
    assert np.intersect1d(train, val).size == 0
    share = np.bincount(labels[val], minlength=10)
    exact = counts * 97 / counts.sum()
    assert np.all(np.abs(share - exact) < 1)
    again = stratified_split(labels, 97, seed=1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 97, seed=2)[1], val)


@pytest.mark.parametrize("val_size", [-1, 1101, 1100, 1095])
def test_stratified_split_refuses_impossible_sizes(val_size: int) -> None:
    counts = np.array([300, 200, 100, 100, 50, 50, 40, 30, 20, 10])
    labels = np.repeat(np.arange(10), counts)  # 1100 images; 1095 leaves class 9 with none
    with pytest.raises(UsageError):
        stratified_split(labels, val_size, seed=0)


def test_load_splits_cifar10(cifar_dir: Path) -> None:
    splits = load_splits("cifar10", data_dir=cifar_dir.parent, val_size=10, download=False)
    assert splits.source == "cifar10"
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (90, 10, 20)
    assert np.array_equal(np.bincount(splits.val_y, minlength=10), np.ones(10))
    train_x, *_ = read_cifar_batches(cifar_dir)
    pooled = {image.tobytes() for image in train_x}
    assert {image.tobytes() for image in np.concatenate([splits.train_x, splits.val_x])} == pooled
    assert splits.train_x.dtype == np.uint8 and splits.train_y.dtype == np.int64


def test_load_splits_subset(cifar_dir: Path) -> None:
    splits = load_splits("cifar10", data_dir=cifar_dir.parent, val_size=10, subset=50, seed=3, download=False)
    # val_size is the validation count itself, taken out of the 50-image subset, never rescaled
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (40, 10, 10)
    assert np.array_equal(np.bincount(np.concatenate([splits.train_y, splits.val_y])), np.full(10, 5))
    assert np.array_equal(np.bincount(splits.test_y), np.ones(10))
    same = load_splits("cifar10", data_dir=cifar_dir.parent, val_size=10, subset=50, seed=3, download=False)
    assert np.array_equal(same.train_x, splits.train_x) and np.array_equal(same.test_x, splits.test_x)


def test_full_test_keeps_every_test_image_under_a_subset() -> None:
    splits = load_splits("synthetic", subset=100, full_test=True)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (90, 10, 2000)


def test_load_splits_synthetic_subset() -> None:
    splits = load_splits("synthetic", subset=100)  # the default: a tenth of the pool holds out 10 of 100
    assert splits.source == "synthetic"
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (90, 10, 20)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"source": "imagenet"}, "unknown data source 'imagenet'"),
        ({"subset": 19}, "subset must be between 20 and 100"),
        ({"subset": 101}, "subset must be between 20 and 100"),
        ({"val_size": 91}, "no training image of class"),  # 100 images, 10 per class
        ({"subset": 50, "val_size": 50}, "val_size 50 leaves no training image out of the 50-image subset"),
    ],
)
def test_load_splits_refuses(cifar_dir: Path, kwargs: dict[str, object], needle: str) -> None:
    options = {"source": "cifar10", "data_dir": cifar_dir.parent, "val_size": 10, "download": False, **kwargs}
    with pytest.raises(UsageError) as error:
        load_splits(**options)  # type: ignore[arg-type]
    assert_one_line(error, needle)


def test_load_splits_without_download_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_splits("cifar10", data_dir=tmp_path, download=False)
    assert_one_line(error, str(tmp_path / FOLDER), "--data-dir", "allow the download")
    assert os.listdir(tmp_path) == []


def test_synthetic_is_deterministic() -> None:
    first = synthetic_cifar(300, 50, seed=5)
    for a, b in zip(first, synthetic_cifar(300, 50, seed=5), strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], synthetic_cifar(300, 50, seed=6)[0])
    train_x, train_y, test_x, _ = first
    assert train_x.shape == (300, 32, 32, 3) and test_x.shape == (50, 32, 32, 3) and train_x.dtype == np.uint8
    assert train_y.dtype == np.int64 and np.array_equal(np.bincount(train_y), np.full(10, 30))
    assert 0.35 < train_x.mean() / 255 < 0.65 and 0.15 < train_x.std() / 255 < 0.35  # CIFAR-like statistics


def test_synthetic_is_learnable_but_not_trivial() -> None:
    """A nearest-class-mean classifier on raw pixels: well above 10 %, well below 100 %."""
    train_x, train_y, test_x, test_y = synthetic_cifar(2000, 500, seed=0)
    flat = train_x.reshape(len(train_x), -1).astype(np.float32)
    means = np.stack([flat[train_y == c].mean(0) for c in range(10)])
    queries = test_x.reshape(len(test_x), -1).astype(np.float32)
    distances = (queries**2).sum(1, keepdims=True) - 2 * queries @ means.T + (means**2).sum(1)
    accuracy = (distances.argmin(1) == test_y).mean()
    print(f"nearest class mean accuracy on synthetic data: {accuracy:.1%}")
    assert 0.3 < accuracy < 0.95


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    train_x, train_y, _, _ = synthetic_cifar(250, 0, seed=1)
    return train_x, train_y


def epoch(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_device_loader_batches(data: tuple[np.ndarray, np.ndarray]) -> None:
    train = DeviceLoader(*data, batch_size=64, device="cpu", train=True, augment=True, seed=0)
    assert train.num_images == 250 and len(train) == 3 and train.drop_last
    batches = epoch(train)
    assert len(batches) == 3
    for images, labels in batches:
        assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32 and images.is_contiguous()
        assert labels.shape == (64,) and labels.dtype == torch.int64
    evaluation = DeviceLoader(*data, batch_size=64, device="cpu", train=False, augment=True, seed=0)
    assert [len(labels) for _, labels in evaluation] == [64, 64, 64, 58] and len(evaluation) == 4
    kept = DeviceLoader(*data, batch_size=64, device="cpu", train=True, augment=False, seed=0, drop_last=False)
    labels = torch.cat([labels for _, labels in kept])
    assert sorted(labels.tolist()) == sorted(data[1].tolist())  # every image once per epoch
    assert not torch.equal(labels, torch.from_numpy(data[1]))  # ... in a shuffled order
    tiny = DeviceLoader(data[0][:10], data[1][:10], batch_size=64, device="cpu", train=True, augment=True, seed=0)
    assert len(tiny) == 1 and len(epoch(tiny)[0][1]) == 10  # drop_last never drops the only batch


def test_normalisation(data: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = next(iter(DeviceLoader(*data, batch_size=250, device="cpu", train=False, augment=False, seed=0)))
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    pixels = torch.from_numpy(data[0]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(images * std + mean, pixels)
    raw_mean, raw_std = pixels.mean((0, 2, 3)), pixels.std((0, 2, 3))
    torch.testing.assert_close(images.mean((0, 2, 3)), (raw_mean - mean.flatten()) / std.flatten())
    torch.testing.assert_close(images.std((0, 2, 3)), raw_std / std.flatten())
    assert images.mean().abs() < 0.5 and 0.6 < images.std() < 1.4  # near N(0, 1) on CIFAR-like pixels


def test_device_loader_is_seeded(data: tuple[np.ndarray, np.ndarray]) -> None:
    def two_epochs(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = DeviceLoader(*data, batch_size=50, device="cpu", train=True, augment=True, seed=seed)
        return epoch(loader) + epoch(loader)  # 5 batches each

    a, b, c = two_epochs(7), two_epochs(7), two_epochs(8)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][1], c[0][1])  # another seed, another order
    assert not torch.equal(a[0][1], a[5][1])  # another epoch, another order


def test_eval_matches_the_dataset_path(data: tuple[np.ndarray, np.ndarray]) -> None:
    """Eval batches are the images in order, unaugmented, bit-identical to the per-sample path."""
    loader = DeviceLoader(*data, batch_size=64, device="cpu", train=False, augment=True, seed=3)
    dataset = CifarBatchDataset(*data, augment=False)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert torch.equal(images, torch.stack([dataset[i][0] for i in range(len(dataset))]))
    assert labels.tolist() == data[1].tolist() == [dataset[i][1] for i in range(len(dataset))]


def _coded_image() -> np.ndarray:
    """Red = 7 x row, green = 7 x column, blue = 255: every pixel says where it came from, and
    black (blue 0) can only be padding."""
    row, col = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([7 * row, 7 * col, np.full((32, 32), 255)], axis=-1).astype(np.uint8)


def _decode(images: torch.Tensor) -> list[tuple[int, int, bool]]:
    """For each augmented coded image, its (row shift, column shift, flipped), checking that it is
    exactly a shifted window of the zero-padded original, mirrored or not."""
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    pixels = ((images * std + mean) * 255).round().to(torch.int64).numpy()
    found = []
    out_row, out_col = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    for red, green, blue in pixels:
        real = blue == 255
        assert np.all(blue[~real] == 0) and np.all(red[~real] == 0) and np.all(green[~real] == 0)
        row_shift = red[real] // 7 - out_row[real]
        assert len(set(row_shift)) == 1
        flipped = len(set(green[real] // 7 - out_col[real])) != 1
        col_shift = green[real] // 7 + out_col[real] - 31 if flipped else green[real] // 7 - out_col[real]
        assert len(set(col_shift)) == 1
        dy, dx = int(row_shift[0]), int(col_shift[0])
        assert -4 <= dy <= 4 and -4 <= dx <= 4
        assert real.sum() == (32 - abs(dy)) * (32 - abs(dx))  # the rest is zero padding
        found.append((dy, dx, flipped))
    return found


def _check_augmentation(found: list[tuple[int, int, bool]]) -> None:
    shifts = {(dy, dx) for dy, dx, _ in found}
    flips = sum(flipped for _, _, flipped in found)
    assert len(shifts) > 40  # of 81
    assert {dy for dy, _ in shifts} == set(range(-4, 5)) and {dx for _, dx in shifts} == set(range(-4, 5))
    assert 0.3 < flips / len(found) < 0.7


def test_device_loader_crops_and_flips() -> None:
    images, labels = np.repeat(_coded_image()[None], 400, axis=0), np.zeros(400, np.int64)
    loader = DeviceLoader(images, labels, batch_size=100, device="cpu", train=True, augment=True, seed=0)
    _check_augmentation(_decode(torch.cat([x for x, _ in loader])))


def test_dataset_crops_and_flips() -> None:
    images = np.repeat(_coded_image()[None], 400, axis=0)
    dataset = CifarBatchDataset(images, np.zeros(400, np.int64), augment=True, seed=0)
    _check_augmentation(_decode(torch.stack([dataset[i][0] for i in range(400)])))


def test_state_dict_resumes_the_sequence(data: tuple[np.ndarray, np.ndarray]) -> None:
    original = DeviceLoader(*data, batch_size=64, device="cpu", train=True, augment=True, seed=11)
    epoch(original)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # as a checkpoint does
    expected = epoch(original)
    resumed = DeviceLoader(*data, batch_size=64, device="cpu", train=True, augment=True, seed=0)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for (xa, ya), (xb, yb) in zip(expected, epoch(resumed), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_device_loader_accepts_read_only_arrays(data: tuple[np.ndarray, np.ndarray]) -> None:
    """Ray's object store hands out read-only arrays."""
    images, labels = data[0].copy(), data[1].copy()
    images.flags.writeable = labels.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        loader = DeviceLoader(images, labels, batch_size=64, device="cpu", train=False, augment=False, seed=0)
        CifarBatchDataset(images, labels, augment=True)[0]
    assert torch.equal(next(iter(loader))[1], torch.from_numpy(data[1][:64]))
    with pytest.raises(ValueError, match="uint8 NHWC"):
        DeviceLoader(images.astype(np.float32), labels, batch_size=64, device="cpu", train=False, augment=False, seed=0)


def test_dataset_in_a_dataloader_with_workers(cifar_dir: Path) -> None:
    dataset = CifarBatchDataset.from_folder(cifar_dir, train=True, augment=True)
    assert len(dataset) == 100 and len(CifarBatchDataset.from_folder(cifar_dir, train=False, augment=False)) == 20
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=25, num_workers=2, generator=generator)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(25, 3, 32, 32)] * 4
    assert torch.cat([y for _, y in batches]).tolist() == dataset.labels.tolist()
    # Workers 0 and 1 made batches 0 and 1 from the same generator seed unless each reseeded.
    same_images = CifarBatchDataset(np.repeat(_coded_image()[None], 50, axis=0), np.zeros(50, np.int64), augment=True)
    first, second = torch.utils.data.DataLoader(same_images, batch_size=25, num_workers=2)
    assert not torch.equal(first[0], second[0])
    _, _, test_x, test_y = read_cifar_batches(cifar_dir)
    image, label = CifarBatchDataset.from_folder(cifar_dir, train=False, augment=False)[3]
    expected, expected_label = CifarBatchDataset(test_x, test_y, augment=False)[3]
    assert torch.equal(image, expected) and label == expected_label == test_y[3]
