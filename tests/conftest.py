"""Shared fixtures: tiny CIFAR-10 folders and archives in the official layout, written from scratch.

The names and the pickle layout are spelled out here rather than imported from
``tune_cifar.data`` so that a mistake there cannot hide behind the same mistake here.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# precision: auto caches its measurements in $XDG_CACHE_HOME; the suite (and every process it starts,
# which inherit the environment) keeps them in a folder of its own, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="tune-cifar-test-cache-")

BATCH_NAMES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar_batches(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` as the official archive has it, with random images.

    Like the official (Python 2) files: a pickled dict per batch with bytes keys, ``b"data"``
    uint8 ``(N, 3072)`` rows of 1024 red, 1024 green and 1024 blue values, row-major, and
    ``b"labels"`` a list of ints. Every batch holds each class equally often (when
    ``per_batch`` is a multiple of 10), as CIFAR-10's test batch does.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number, name in enumerate(BATCH_NAMES, start=1):
        entry = {
            b"batch_label": f"batch {number} of 6".encode(),
            b"labels": rng.permutation(np.arange(per_batch) % 10).tolist(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"image_{number}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in LABEL_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def make_cifar_tarball(folder: Path, out_dir: Path) -> tuple[Path, str]:
    """Pack ``folder`` as ``out_dir/cifar-10-python.tar.gz`` (members under ``cifar-10-batches-py/``)
    and return the archive and its MD5."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tarball = out_dir / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return tarball, hashlib.md5(tarball.read_bytes()).hexdigest()


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 folder: 5 x 20 training images and 20 test images."""
    return write_cifar_batches(tmp_path / "data")


@pytest.fixture
def cifar_tarball(tmp_path: Path) -> tuple[Path, str]:
    """``(path, md5)`` of a tiny ``cifar-10-python.tar.gz``, alone in its folder."""
    return make_cifar_tarball(write_cifar_batches(tmp_path / "source"), tmp_path / "www")


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[Path]:
    """A private Ray temp dir for the studies of one test module. Short: Ray's Unix socket paths
    under the session folder must stay below ~107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="tcr-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
