"""Input pipelines: CIFAR tarballs in the official format, downloads, ImageFolder trees, digits, and
the determinism, shuffling and padding of the grain streams. Nothing here touches the network."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import pathlib
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests import train_helpers as helpers
from train.data import cifar, create_dataset, dataset, digits, download, pipeline, read_picture, transforms

CIFAR_URL = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def pretend_official(monkeypatch, data_dir, name: str) -> pathlib.Path:
    """Make the synthetic tarball of ``name`` in ``data_dir`` pass the md5 check; its path."""
    archive = data_dir / CIFAR_URL[name].rsplit("/", 1)[1]
    monkeypatch.setitem(cifar.FILES[name], "md5", hashlib.md5(archive.read_bytes()).hexdigest())
    return archive


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_tarball_in_the_official_format_loads(tmp_path, monkeypatch, name):
    (train_x, train_y), (test_x, test_y) = helpers.write_cifar_tarball(
        tmp_path, name, np.random.default_rng(0)
    )
    pretend_official(monkeypatch, tmp_path, name)
    config = helpers.tiny_config({"dataset": name, "data_dir": str(tmp_path), "download": False})
    data = create_dataset(config)
    assert data.num_classes == (10 if name == "cifar10" else 100)
    assert data.class_names == tuple(f"class {i}" for i in range(data.num_classes))
    assert data.image_shape == (32, 32, 3)
    assert len(data.train) == len(train_y) and len(data.test) == len(test_y)
    for source, images, labels in ((data.train, train_x, train_y), (data.test, test_x, test_y)):
        for i in range(len(labels)):
            np.testing.assert_array_equal(source[i]["image"], images[i])
            assert source[i]["label"] == labels[i]
    # Test images are only normalised; training images are a shifted, maybe flipped, crop.
    image = test_x[0].astype(np.float32)
    record = data.test_transform(data.test[0])
    mean, std = np.float32(cifar.MEAN), np.float32(cifar.STD)
    np.testing.assert_allclose(record["image"] * std + mean, image, atol=1e-4)
    augmented = data.train_transform(data.test[0], np.random.default_rng(3))["image"] * std + mean
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    crops = [
        crop[:, ::-1] if flip else crop
        for top in range(9)
        for left in range(9)
        for crop in [padded[top : top + 32, left : left + 32]]
        for flip in (False, True)
    ]
    assert any(np.allclose(augmented, crop, atol=1e-3) for crop in crops)
    assert not np.allclose(augmented, image, atol=1e-3)  # this rng does move the image
    # A picture of a test image, prepared for prediction, is the test transform's image.
    Image.fromarray(test_x[0]).save(tmp_path / "picture.png")
    picture = read_picture(name, 224, str(tmp_path / "picture.png"))
    np.testing.assert_array_equal(picture, record["image"])


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_corrupt_cifar_tarball_is_named_with_its_md5(tmp_path, monkeypatch, damage):
    helpers.write_cifar_tarball(tmp_path, "cifar100", np.random.default_rng(0))
    archive = pretend_official(monkeypatch, tmp_path, "cifar100")
    payload = bytearray(archive.read_bytes())
    if damage == "truncated":
        del payload[len(payload) // 2 :]
    else:
        payload[100] ^= 1
    archive.write_bytes(payload)
    actual, expected = hashlib.md5(payload).hexdigest(), cifar.FILES["cifar100"]["md5"]
    config = helpers.tiny_config({"dataset": "cifar100", "data_dir": str(tmp_path), "download": False})
    with pytest.raises(
        ValueError,
        match=rf"{archive} is corrupt or truncated \(md5 {actual}, expected {expected}\): delete it",
    ):
        create_dataset(config)


@contextlib.contextmanager
def http_server(stall: threading.Event):
    """A local HTTP server: ``/payload`` is ``b"payload"``, ``/stall`` sends its headers and then nothing
    until ``stall`` is set, anything else is 404. Yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in ("/payload", "/stall"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", "7")
            self.end_headers()
            if self.path == "/stall":
                self.wfile.flush()
                stall.wait(10)
            self.wfile.write(b"payload")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stall.set()
        server.shutdown()
        server.server_close()


def test_download_checks_md5_and_names_file_url_and_cause_of_a_failure(tmp_path, monkeypatch):
    """A real transfer from a local server: a wrong md5, a 404 and a stalled server are each one clear
    error with nothing left behind; a good transfer lands under its own name."""
    monkeypatch.setattr(download, "STALL_SECONDS", 0.5)
    with http_server(threading.Event()) as base:
        with pytest.raises(ValueError, match=r"downloaded with md5 .*expected 0{32}"):
            download.fetch(str(tmp_path), f"{base}/payload", "0" * 32, download=True)
        assert list(tmp_path.iterdir()) == []
        missing = tmp_path / "missing"
        with pytest.raises(
            FileNotFoundError, match=rf"{missing} not found and downloading failed \(HTTP Error 404"
        ):
            download.fetch(str(tmp_path), f"{base}/missing", "0" * 32, download=True)
        stalled = tmp_path / "stall"
        with pytest.raises(
            FileNotFoundError, match=rf"{stalled} not found and downloading failed \(no data for 0.5 s\)"
        ):
            download.fetch(str(tmp_path), f"{base}/stall", "0" * 32, download=True)
        assert list(tmp_path.iterdir()) == []  # nothing half-downloaded is left behind
        md5 = hashlib.md5(b"payload").hexdigest()
        assert download.fetch(str(tmp_path), f"{base}/payload", md5, download=True) == str(
            tmp_path / "payload"
        )
    assert (tmp_path / "payload").read_bytes() == b"payload"


def _indexed_dataset(count: int) -> dataset.Dataset:
    """Records whose image and label are their index."""
    source = dataset.ArraySource(np.arange(count, dtype=np.uint8)[:, None, None, None], np.arange(count))
    identity = functools.partial(transforms.normalize, mean=(0.0,), std=(1.0,))
    return dataset.Dataset(
        source,
        source,
        num_classes=count,
        image_shape=(1, 1, 1),
        train_transform=functools.partial(transforms.without_augmentation, transform=identity),
        test_transform=identity,
    )


def test_training_stream_is_reshuffled_each_epoch_and_deterministic_given_the_seed():
    data = _indexed_dataset(10)

    def labels(seed, batches=10):
        iterator = pipeline.train_iterator(data, batch_size=2, seed=seed)
        return np.concatenate([next(iterator)["label"] for _ in range(batches)])

    first = labels(seed=0)
    assert sorted(first[:10]) == sorted(first[10:]) == list(range(10))  # each epoch sees every record once
    assert list(first[:10]) != list(first[10:])
    np.testing.assert_array_equal(labels(seed=0), first)
    assert list(labels(seed=1)) != list(first)


@dataclasses.dataclass(frozen=True)
class CountedSource(dataset.ArraySource):
    """An ArraySource that appends a byte to the file ``log`` at each read, from any process."""

    log: str

    def __getitem__(self, index: int) -> dataset.Record:
        with open(self.log, "ab") as file:
            file.write(b".")
        return super().__getitem__(index)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_training_stream_reads_a_few_batches_ahead_not_hundreds(tmp_path, workers):
    """grain's default read-ahead (500 elements, each a whole batch here) would hold hundreds of
    batches; the pipeline reads at most four beyond those taken in the training process, and one at
    a time in a worker process (which then waits for its queue)."""
    log = tmp_path / "reads"
    log.touch()
    data = _indexed_dataset(10)
    counted = CountedSource(data.train.images, data.train.labels, str(log))
    iterator = pipeline.train_iterator(
        dataclasses.replace(data, train=counted), batch_size=2, seed=0, workers=workers
    )
    for _ in range(3):
        next(iterator)
    limit = 2 * (3 + 4)  # records of the batches taken and of four more
    deadline = time.monotonic() + 1
    while log.stat().st_size <= limit and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 2 * 3 <= log.stat().st_size <= limit


def test_test_batches_cover_every_record_once_with_padding_masked():
    batches = list(pipeline.test_batches(_indexed_dataset(10), batch_size=4))
    assert [len(b["label"]) for b in batches] == [4, 4, 4]  # 10 records padded to 12
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels[mask == 1]) == list(range(10))
    assert mask.sum() == 10


def test_digits_split_is_fixed_and_stratified():
    data = digits.digits()
    assert (len(data.train), len(data.test), data.num_classes, data.image_shape) == (1437, 360, 10, (8, 8, 1))
    test_labels = [data.test[i]["label"] for i in range(len(data.test))]
    assert np.bincount(test_labels).min() >= 35  # about 36 of each class
    np.testing.assert_array_equal(digits.digits().test.images, data.test.images)


def test_imagenet_folder_tree_is_decoded_cropped_and_labelled(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, size in (("n01", (40, 30)), ("n02", (24, 50))):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.JPEG")
    config = helpers.tiny_config({"dataset": "imagenet", "data_dir": str(tmp_path), "image_size": 16})
    data = create_dataset(config)
    assert (data.num_classes, data.image_shape, len(data.train), len(data.test)) == (2, (16, 16, 3), 4, 4)
    assert [data.train[i]["label"] for i in range(4)] == [0, 0, 1, 1]
    assert data.class_names == ("n01", "n02")
    picture = read_picture("imagenet", 16, data.test[0]["image"])
    np.testing.assert_array_equal(picture, data.test_transform(data.test[0])["image"])
    batch = next(pipeline.train_iterator(data, batch_size=4, seed=0))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
    assert sorted(batch["label"]) == [0, 0, 1, 1]
    again = next(pipeline.train_iterator(data, batch_size=4, seed=0))
    np.testing.assert_array_equal(batch["image"], again["image"])
    (test_batch,) = list(pipeline.test_batches(data, batch_size=4))
    assert test_batch["image"].shape == (4, 16, 16, 3) and list(test_batch["mask"]) == [1, 1, 1, 1]
