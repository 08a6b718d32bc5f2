"""Tests for kit.data: every format is written by hand in its real on-disk layout, loaded back, and compared with
the arrays the test wrote."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kit.data import Dataset, dataset_kinds, fingerprint_arrays, load_dataset, parse_spec
from kit.errors import UserError

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# --------------------------------------------------------------------------------------------------------------------
# writers for the real formats
# --------------------------------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, exactly as MNIST distributes them."""
    assert arr.dtype == np.uint8
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    data = idx_bytes(arr)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx_dir(
    root: Path, n_train: int = 12, n_test: int = 7, h: int = 5, w: int = 6, gz: bool = False, seed: int = 1
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    suffix = ".gz" if gz else ""
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[split] = (images, labels)
    return out


def cifar_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 32, 32) uint8; image 0 has a distinct constant per channel so CHW order is checkable."""
    img = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    img[0, 0], img[0, 1], img[0, 2] = 10, 120, 250
    return img


def dump_pickle(path: Path, obj: object, protocol: int | None = None) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root: Path, per_batch: int = 3, seed: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump_pickle(root / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    train_x, train_y = [], []
    for i in range(1, 6):
        img = cifar_images(per_batch, rng)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        dump_pickle(
            root / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": labels,
                b"data": img.reshape(per_batch, 3072),
                b"filenames": [f"f{i}_{j}.png".encode() for j in range(per_batch)],
            },
        )
        train_x.append(img)
        train_y.extend(labels)
    img = cifar_images(per_batch + 1, rng)
    labels = [int(v) for v in rng.integers(0, 10, size=per_batch + 1)]
    dump_pickle(root / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                                      b"data": img.reshape(-1, 3072), b"filenames": []})
    return {"train": (np.concatenate(train_x), np.array(train_y)), "test": (img, np.array(labels))}


def make_cifar100(root: Path, seed: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    fine = [f"class{i:02d}".encode() for i in range(100)]
    dump_pickle(root / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20})
    out = {}
    for split, n in (("train", 5), ("test", 4)):
        img = cifar_images(n, rng)
        fine_labels = [int(v) for v in rng.integers(0, 100, size=n)]
        fine_labels[0] = 99
        dump_pickle(root / split, {b"filenames": [], b"batch_label": b"x", b"fine_labels": fine_labels,
                                   b"coarse_labels": [v // 5 for v in fine_labels], b"data": img.reshape(n, 3072)})
        out[split] = (img, np.array(fine_labels))
    return out


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def row_keys(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """Multiset of (image bytes, label) pairs."""
    xa = x.numpy()
    return Counter((hashlib.sha1(xa[i].tobytes()).hexdigest(), int(y[i])) for i in range(len(y)))


def assert_user_error_names(exc: pytest.ExceptionInfo, path: Path | str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg, msg


def check_dataset_invariants(ds: Dataset) -> None:
    assert ds.x.dtype == torch.float32 and ds.x.ndim == 4 and ds.x.is_contiguous() and ds.x.device.type == "cpu"
    assert ds.y.dtype == torch.int64 and ds.y.shape == (len(ds),)
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    assert ds.input_shape == tuple(ds.x.shape[1:])
    assert ds.num_classes == len(ds.class_names)


# --------------------------------------------------------------------------------------------------------------------
# spec parsing
# --------------------------------------------------------------------------------------------------------------------


def test_dataset_kinds() -> None:
    assert dataset_kinds() == ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "folder"]


def test_parse_spec() -> None:
    assert parse_spec("digits") == ("digits", None)
    assert parse_spec("digits:16") == ("digits", "16")
    assert parse_spec("mnist:/data/m") == ("mnist", "/data/m")
    assert parse_spec("npz:C:/data/x.npz") == ("npz", "C:/data/x.npz")
    assert parse_spec("Fashion-MNIST:d") == ("fashion-mnist", "d")


def test_unknown_kind_lists_known_kinds() -> None:
    with pytest.raises(UserError) as e:
        parse_spec("imagenet:/data")
    assert "imagenet" in str(e.value)
    for kind in dataset_kinds():
        assert kind in str(e.value)
    with pytest.raises(UserError, match="imagenet"):
        load_dataset("imagenet:/data")


@pytest.mark.parametrize("spec", ["", "mnist", "npz", "folder:", "digits:"])
def test_incomplete_spec(spec: str) -> None:
    with pytest.raises(UserError):
        load_dataset(spec)


@pytest.mark.parametrize("spec", ["digits:abc", "digits:2", "digits:-8", "digits:3.5"])
def test_bad_digits_size(spec: str) -> None:
    with pytest.raises(UserError) as e:
        load_dataset(spec)
    assert spec in str(e.value)


def test_bad_split_and_seed() -> None:
    with pytest.raises(UserError, match="validation"):
        load_dataset("digits", split="validation")
    with pytest.raises(UserError, match="seed"):
        load_dataset("digits", seed=-1)


# --------------------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------------------


def test_digits_shapes_values_and_split() -> None:
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    for ds in (train, test):
        check_dataset_invariants(ds)
        assert ds.input_shape == (1, 8, 8)
        assert ds.class_names == tuple(str(i) for i in range(10))
        assert ds.spec == "digits"
    assert (train.split, test.split) == ("train", "test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.25 * 1797) <= 1
    # The two splits together are exactly sklearn's images / 16 with their labels (values and pairing).
    ref = load_digits()
    ref_x = torch.from_numpy((ref.images / 16.0).astype(np.float32)).unsqueeze(1)
    ref_y = torch.from_numpy(ref.target.astype(np.int64))
    # Multiset equality: the splits partition sklearn's set (disjoint, nothing lost) with each label kept.
    assert row_keys(train.x, train.y) + row_keys(test.x, test.y) == row_keys(ref_x, ref_y)
    # Each split keeps sklearn's index order: rows with a unique match map to increasing sklearn indices.
    ref_index: dict[bytes, list[int]] = {}
    for i in range(len(ref_y)):
        ref_index.setdefault(ref_x[i].numpy().tobytes(), []).append(i)
    for ds in (train, test):
        matched = [ref_index[r.numpy().tobytes()] for r in ds.x]
        unique = [m[0] for m in matched if len(m) == 1]
        assert len(unique) > 0.9 * len(ds)
        assert unique == sorted(unique)


def test_digits_split_determinism() -> None:
    a, b = load_dataset("digits", "train", seed=0), load_dataset("digits", "train", seed=0)
    c = load_dataset("digits", "train", seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.startswith("sha256:") and len(a.fingerprint) == 7 + 64
    assert not torch.equal(a.x, c.x)
    assert a.fingerprint != c.fingerprint
    assert a.fingerprint != load_dataset("digits", "test", seed=0).fingerprint


def test_digits_resized() -> None:
    small = load_dataset("digits", "test")
    big = load_dataset("digits:16", "test")
    check_dataset_invariants(big)
    assert big.input_shape == (1, 16, 16)
    assert big.spec == "digits:16"
    assert torch.equal(big.y, small.y)
    expected = torch.nn.functional.interpolate(
        small.x, size=(16, 16), mode="bilinear", align_corners=False, antialias=False
    ).clamp(0, 1)
    torch.testing.assert_close(big.x, expected, rtol=0, atol=0)
    assert load_dataset("digits:5").input_shape == (1, 5, 5)
    assert torch.equal(load_dataset("digits:8", "test").x, small.x)


# --------------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_idx_roundtrip(tmp_path: Path, kind: str, gz: bool) -> None:
    written = make_idx_dir(tmp_path / "d", gz=gz)
    for split in ("train", "test"):
        ds = load_dataset(f"{kind}:{tmp_path / 'd'}", split)
        check_dataset_invariants(ds)
        images, labels = written[split]
        assert ds.input_shape == (1, 5, 6)
        expected = torch.from_numpy(images.astype(np.float32) / np.float32(255)).unsqueeze(1)
        assert torch.equal(ds.x, expected)
        assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))
    expected_names = FASHION if kind == "fashion-mnist" else tuple(str(i) for i in range(10))
    assert ds.class_names == expected_names


def test_idx_torchvision_raw_layout(tmp_path: Path) -> None:
    written = make_idx_dir(tmp_path / "MNIST" / "raw")
    ds = load_dataset(f"mnist:{tmp_path}", "test")
    assert torch.equal(ds.y, torch.from_numpy(written["test"][1].astype(np.int64)))


def test_idx_wrong_magic(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    data = bytearray(bad.read_bytes())
    data[0:4] = b"\x12\x34\x08\x03"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="magic") as e:
        load_dataset(f"mnist:{tmp_path}")
    assert_user_error_names(e, bad)


def test_idx_wrong_dtype_and_ndim(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 7) + b"\0" * 28)  # float32 code
    with pytest.raises(UserError) as e:
        load_dataset(f"mnist:{tmp_path}", "test")
    assert_user_error_names(e, bad)
    write_idx(bad, np.zeros((7, 1), dtype=np.uint8))  # 2-D labels
    with pytest.raises(UserError, match="dimension") as e:
        load_dataset(f"mnist:{tmp_path}", "test")
    assert_user_error_names(e, bad)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    make_idx_dir(tmp_path, gz=gz)
    bad = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    images = np.zeros((12, 5, 6), dtype=np.uint8)
    data = idx_bytes(images)[:-7]
    if gz:
        with gzip.open(bad, "wb") as f:
            f.write(data)
    else:
        bad.write_bytes(data)
    with pytest.raises(UserError, match="truncated") as e:
        load_dataset(f"fashion-mnist:{tmp_path}")
    assert_user_error_names(e, bad)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(11, dtype=np.uint8))
    with pytest.raises(UserError) as e:
        load_dataset(f"mnist:{tmp_path}")
    assert_user_error_names(e, labels)
    assert "train-images-idx3-ubyte" in str(e.value)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    lab = np.zeros(7, dtype=np.uint8)
    lab[3] = 10
    write_idx(labels, lab)
    with pytest.raises(UserError, match="10") as e:
        load_dataset(f"mnist:{tmp_path}", "test")
    assert_user_error_names(e, labels)


def test_idx_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_dataset(f"mnist:{tmp_path / 'nope'}")
    assert_user_error_names(e, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train-images-idx3-ubyte") as e:
        load_dataset(f"mnist:{tmp_path / 'empty'}")
    assert_user_error_names(e, tmp_path / "empty")


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=True)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(UserError) as e:
        load_dataset(f"mnist:{tmp_path}")
    assert_user_error_names(e, bad)


# --------------------------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parent", [False, True])
def test_cifar10_roundtrip(tmp_path: Path, parent: bool) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    written = make_cifar10(batches)
    root = tmp_path if parent else batches
    for split in ("train", "test"):
        ds = load_dataset(f"cifar10:{root}", split)
        check_dataset_invariants(ds)
        img, labels = written[split]
        assert ds.input_shape == (3, 32, 32)
        assert len(ds) == (15 if split == "train" else 4)
        assert torch.equal(ds.x, torch.from_numpy(img.astype(np.float32) / np.float32(255)))
        assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))
        # CHW order: image 0 has a distinct constant per channel.
        for c, v in enumerate((10, 120, 250)):
            assert bool((ds.x[0, c] == float(np.float32(v) / np.float32(255))).all())
    assert ds.class_names[:3] == ("airplane", "automobile", "bird") and ds.num_classes == 10


@pytest.mark.parametrize("parent", [False, True])
def test_cifar100_roundtrip(tmp_path: Path, parent: bool) -> None:
    folder = tmp_path / "cifar-100-python"
    written = make_cifar100(folder)
    root = tmp_path if parent else folder
    for split in ("train", "test"):
        ds = load_dataset(f"cifar100:{root}", split)
        check_dataset_invariants(ds)
        img, labels = written[split]
        assert torch.equal(ds.x, torch.from_numpy(img.astype(np.float32) / np.float32(255)))
        assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))
        assert int(ds.y[0]) == 99
    assert ds.num_classes == 100 and ds.class_names[99] == "class99"


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_other_protocols_and_str_keys(tmp_path: Path, protocol: int) -> None:
    written = make_cifar10(tmp_path)
    img, labels = written["test"]
    names = [b"n%d" % i for i in range(10)]
    dump_pickle(tmp_path / "batches.meta", {b"label_names": names}, protocol=protocol)
    batch = {"data": img.reshape(-1, 3072), "labels": labels.tolist(), "batch_label": b"bytes"}
    dump_pickle(tmp_path / "test_batch", batch, protocol=protocol)
    ds = load_dataset(f"cifar10:{tmp_path}", "test")
    assert torch.equal(ds.x, torch.from_numpy(img.astype(np.float32) / np.float32(255)))
    assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))
    assert ds.class_names[3] == "n3"


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"echo pwned > {self.target}",))


class _Foreign:
    """A harmless class that a CIFAR batch never holds."""


def test_cifar_refuses_code_execution(tmp_path: Path) -> None:
    root = tmp_path / "c"
    make_cifar10(root)
    pwned = tmp_path / "pwned"
    bad = root / "data_batch_1"
    dump_pickle(bad, {b"data": _Evil(pwned), b"labels": [0]})
    with pytest.raises(UserError, match="refusing to unpickle") as e:
        load_dataset(f"cifar10:{root}")
    assert_user_error_names(e, bad)
    assert "system" in str(e.value)
    assert not pwned.exists()
    # The payload is live: a plain unpickler would have run it (proves the test can fail).
    with open(bad, "rb") as f:
        pickle.load(f, encoding="bytes")
    assert pwned.exists()


@pytest.mark.parametrize("payload", ["foreign", "eval"])
def test_cifar_refuses_other_globals(tmp_path: Path, payload: str) -> None:
    make_cifar10(tmp_path)
    bad = tmp_path / "batches.meta"
    obj = _Foreign() if payload == "foreign" else {b"label_names": eval}
    dump_pickle(bad, obj)
    with pytest.raises(UserError, match="refusing to unpickle") as e:
        load_dataset(f"cifar10:{tmp_path}", "test")
    assert_user_error_names(e, bad)
    assert ("_Foreign" if payload == "foreign" else "builtins.eval") in str(e.value)


def test_cifar_numpy1_spelling_is_accepted(tmp_path: Path) -> None:
    # The real batches were written by NumPy 1 and reference numpy.core.multiarray._reconstruct.
    written = make_cifar10(tmp_path)
    img, labels = written["test"]
    raw = pickle.dumps({b"data": img.reshape(-1, 3072), b"labels": labels.tolist()}, protocol=2)
    old_raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert old_raw != raw and b"numpy._core" not in old_raw
    (tmp_path / "test_batch").write_bytes(old_raw)
    ds = load_dataset(f"cifar10:{tmp_path}", "test")
    assert torch.equal(ds.x, torch.from_numpy(img.astype(np.float32) / np.float32(255)))


class _Rot13:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import codecs

        return (codecs.encode, ("text", "rot13"))


def test_cifar_codecs_only_latin1(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    bad = tmp_path / "test_batch"
    dump_pickle(bad, {b"data": _Rot13(), b"labels": []})
    with pytest.raises(UserError) as e:
        load_dataset(f"cifar10:{tmp_path}", "test")
    assert_user_error_names(e, bad)
    assert "rot13" in str(e.value)


def test_cifar_missing_key_and_bad_files(tmp_path: Path) -> None:
    written = make_cifar100(tmp_path)
    img, labels = written["test"]
    bad = tmp_path / "test"
    dump_pickle(bad, {b"data": img.reshape(-1, 3072), b"labels": labels.tolist()})  # cifar-10 key in cifar-100
    with pytest.raises(UserError, match="fine_labels") as e:
        load_dataset(f"cifar100:{tmp_path}", "test")
    assert_user_error_names(e, bad)
    bad.write_bytes(b"not a pickle")
    with pytest.raises(UserError) as e:
        load_dataset(f"cifar100:{tmp_path}", "test")
    assert_user_error_names(e, bad)
    (tmp_path / "meta").unlink()
    with pytest.raises(UserError) as e:
        load_dataset(f"cifar100:{tmp_path}", "test")
    assert_user_error_names(e, tmp_path / "meta")


def test_cifar_label_out_of_range(tmp_path: Path) -> None:
    written = make_cifar10(tmp_path)
    img, labels = written["test"]
    labels = labels.tolist()
    labels[1] = 10
    bad = tmp_path / "test_batch"
    dump_pickle(bad, {b"data": img.reshape(-1, 3072), b"labels": labels})
    with pytest.raises(UserError, match="label 10") as e:
        load_dataset(f"cifar10:{tmp_path}", "test")
    assert_user_error_names(e, bad)


# --------------------------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------------------------


def test_npz_nchw_uint8_seeded_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(20, 3, 4, 5), dtype=np.uint8)
    y = np.arange(20) % 4
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y, class_names=np.array(["a", "b", "c", "d", "e"]))
    train, test = load_dataset(f"npz:{path}", "train"), load_dataset(f"npz:{path}", "test")
    for ds in (train, test):
        check_dataset_invariants(ds)
        assert ds.input_shape == (3, 4, 5)
        assert ds.class_names == ("a", "b", "c", "d", "e")
    assert (len(train), len(test)) == (15, 5)
    full = row_keys(torch.from_numpy(x.astype(np.float32) / np.float32(255)), torch.from_numpy(y))
    assert row_keys(train.x, train.y) + row_keys(test.x, test.y) == full
    other = load_dataset(f"npz:{path}", "test", seed=5)
    assert not torch.equal(other.x, test.x)
    assert torch.equal(load_dataset(f"npz:{path}", "test").x, test.x)


def test_npz_nhwc_and_nchw_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(6, 3, 7, 8), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nchw.npz", x_train=x, x_test=x[:2], y_train=y, y_test=y[:2])
    nhwc = x.transpose(0, 2, 3, 1)
    np.savez(tmp_path / "nhwc.npz", x_train=nhwc, x_test=nhwc[:2], y_train=y, y_test=y[:2])
    a = load_dataset(f"npz:{tmp_path / 'nchw.npz'}")
    b = load_dataset(f"npz:{tmp_path / 'nhwc.npz'}")
    assert a.input_shape == b.input_shape == (3, 7, 8)
    assert torch.equal(a.x, torch.from_numpy(x.astype(np.float32) / np.float32(255)))
    assert torch.equal(a.x, b.x)
    assert a.fingerprint == b.fingerprint
    assert a.class_names == ("0", "1", "2")
    assert len(load_dataset(f"npz:{tmp_path / 'nhwc.npz'}", "test")) == 2


def test_npz_nhw_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x = rng.random((8, 5, 5))
    x[0, 0, 0], x[0, 0, 1] = 0.0, 1.0
    np.savez(tmp_path / "f.npz", x_train=x, y_train=np.arange(8) % 3, x_test=x[:3], y_test=np.array([0, 1, 4]))
    ds = load_dataset(f"npz:{tmp_path / 'f.npz'}")
    check_dataset_invariants(ds)
    assert ds.input_shape == (1, 5, 5)
    assert torch.equal(ds.x, torch.from_numpy(x.astype(np.float32)).unsqueeze(1))
    assert ds.class_names == ("0", "1", "2", "3", "4")  # max label over both splits


def test_npz_fingerprint_matches_idx(tmp_path: Path) -> None:
    written = make_idx_dir(tmp_path / "idx")
    (xtr, ytr), (xte, yte) = written["train"], written["test"]
    np.savez(tmp_path / "same.npz", x_train=xtr, y_train=ytr.astype(np.int64), x_test=xte, y_test=yte)
    for split in ("train", "test"):
        a = load_dataset(f"mnist:{tmp_path / 'idx'}", split)
        b = load_dataset(f"npz:{tmp_path / 'same.npz'}", split)
        assert a.fingerprint == b.fingerprint
        assert a.fingerprint == fingerprint_arrays(a.x, a.y)
    np.savez(tmp_path / "diff.npz", x_train=xtr[::-1], y_train=ytr[::-1], x_test=xte, y_test=yte)
    reordered = load_dataset(f"npz:{tmp_path / 'diff.npz'}")
    assert reordered.fingerprint != load_dataset(f"mnist:{tmp_path / 'idx'}").fingerprint


def test_npz_negative_label(tmp_path: Path) -> None:
    path = tmp_path / "neg.npz"
    np.savez(path, x=np.zeros((4, 2, 2), dtype=np.uint8), y=np.array([0, 1, -1, 0]))
    with pytest.raises(UserError, match="-1") as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)


def test_npz_label_beyond_class_names(tmp_path: Path) -> None:
    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((4, 2, 2), dtype=np.uint8), y=np.array([0, 1, 2, 0]), class_names=np.array(["a", "b"]))
    with pytest.raises(UserError, match="label 2") as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)


def test_npz_object_array(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    x = np.empty(4, dtype=object)
    for i in range(4):
        x[i] = np.zeros((2, 2))
    np.savez(path, x=x, y=np.zeros(4, dtype=np.int64))
    with pytest.raises(UserError, match="object") as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)


@pytest.mark.parametrize("bad_value", [1.5, -0.1, float("nan")])
def test_npz_float_out_of_range(tmp_path: Path, bad_value: float) -> None:
    path = tmp_path / "f.npz"
    x = np.full((4, 1, 2, 2), 0.5, dtype=np.float32)
    x[2, 0, 1, 1] = bad_value
    np.savez(path, x=x, y=np.zeros(4, dtype=np.int64))
    with pytest.raises(UserError) as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)


def test_npz_malformed(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    with pytest.raises(UserError) as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)
    np.savez(path, images=np.zeros((4, 2, 2), dtype=np.uint8))
    with pytest.raises(UserError, match="images") as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)
    np.savez(path, x=np.zeros((4, 2, 2), dtype=np.uint8), y=np.zeros(3, dtype=np.int64))
    with pytest.raises(UserError) as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)
    np.savez(path, x=np.zeros((4, 2, 2), dtype=np.int32), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(UserError, match="int32") as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)
    np.save(tmp_path / "single.npy", np.zeros((4, 2, 2), dtype=np.uint8))
    with pytest.raises(UserError, match="npz") as e:
        load_dataset(f"npz:{tmp_path / 'single.npy'}")
    assert_user_error_names(e, tmp_path / "single.npy")
    path.write_bytes(b"garbage")
    with pytest.raises(UserError) as e:
        load_dataset(f"npz:{path}")
    assert_user_error_names(e, path)


# --------------------------------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------------------------------


def test_folder_grey_train_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    written: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for split, n in (("train", 3), ("test", 2)):
        for label, cls in enumerate(("cat", "dog")):
            for i in range(n):
                arr = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)  # H=4, W=6
                write_png(tmp_path / split / cls / f"img{i}.PNG", arr)
                written[split].append((arr, label))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    for split in ("train", "test"):
        ds = load_dataset(f"folder:{tmp_path}", split)
        check_dataset_invariants(ds)
        assert ds.class_names == ("cat", "dog")
        assert ds.input_shape == (1, 4, 6)
        exp_x = torch.from_numpy(np.stack([a for a, _ in written[split]]).astype(np.float32) / np.float32(255))
        assert torch.equal(ds.x, exp_x.unsqueeze(1))
        assert ds.y.tolist() == [lab for _, lab in written[split]]


def test_folder_rgb_seeded_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    all_x, all_y = [], []
    for label, cls in enumerate(("a", "b", "c")):
        for i in range(4):
            arr = rng.integers(0, 256, size=(3, 5, 3), dtype=np.uint8)  # H, W, RGB
            arr[0, 0] = (11, 22, 33)
            write_png(tmp_path / cls / f"{i}.png", arr)
            all_x.append(arr.transpose(2, 0, 1))
            all_y.append(label)
    train, test = load_dataset(f"folder:{tmp_path}", "train"), load_dataset(f"folder:{tmp_path}", "test")
    assert (len(train), len(test)) == (9, 3)
    assert train.input_shape == (3, 3, 5) and train.class_names == ("a", "b", "c")
    assert [round(float(v) * 255) for v in train.x[0, :, 0, 0]] == [11, 22, 33]
    full = row_keys(torch.from_numpy(np.stack(all_x).astype(np.float32) / np.float32(255)), torch.tensor(all_y))
    assert row_keys(train.x, train.y) + row_keys(test.x, test.y) == full
    assert torch.equal(load_dataset(f"folder:{tmp_path}", "test").x, test.x)


def test_folder_mixed_modes_promote_to_rgb(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    write_png(tmp_path / "a" / "g.png", grey)
    write_png(tmp_path / "b" / "c.png", np.full((3, 4, 3), 7, dtype=np.uint8))
    ds = load_dataset(f"folder:{tmp_path}", "train", seed=0)
    test = load_dataset(f"folder:{tmp_path}", "test", seed=0)
    both = torch.cat([ds.x, test.x])
    assert both.shape == (2, 3, 3, 4)
    g = both[torch.cat([ds.y, test.y]) == 0][0]
    for c in range(3):
        assert torch.equal(g[c], torch.from_numpy(grey.astype(np.float32) / np.float32(255)))


def test_folder_mismatched_sizes(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "1.png", np.zeros((4, 4), dtype=np.uint8))
    write_png(tmp_path / "a" / "2.png", np.zeros((4, 4), dtype=np.uint8))
    write_png(tmp_path / "b" / "3.png", np.zeros((5, 4), dtype=np.uint8))
    with pytest.raises(UserError) as e:
        load_dataset(f"folder:{tmp_path}")
    assert_user_error_names(e, tmp_path / "b" / "3.png")


def test_folder_unreadable_image(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "1.png", np.zeros((4, 4), dtype=np.uint8))
    bad = tmp_path / "b" / "2.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as e:
        load_dataset(f"folder:{tmp_path}")
    assert_user_error_names(e, bad)


def test_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_dataset(f"folder:{tmp_path / 'none'}")
    assert_user_error_names(e, tmp_path / "none")
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError) as e:
        load_dataset(f"folder:{tmp_path}")
    assert_user_error_names(e, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Dataset methods and fingerprint
# --------------------------------------------------------------------------------------------------------------------


def _small_dataset(n: int = 10) -> Dataset:
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2) / (n * 4)
    return Dataset(x=x, y=torch.arange(n) % 3, class_names=("a", "b", "c"), spec="test", split="train")


def test_subset() -> None:
    ds = _small_dataset()
    s1, s2, s3 = ds.subset(4, seed=0), ds.subset(4, seed=0), ds.subset(4, seed=1)
    assert len(s1) == 4 and s1.input_shape == ds.input_shape and s1.class_names == ds.class_names
    assert torch.equal(s1.x, s2.x) and torch.equal(s1.y, s2.y)
    assert not torch.equal(s1.x, s3.x)
    rows = {ds.x[i].numpy().tobytes(): int(ds.y[i]) for i in range(len(ds))}
    for i in range(4):
        assert rows[s1.x[i].numpy().tobytes()] == int(s1.y[i])  # pairs preserved
    assert len({s1.x[i].numpy().tobytes() for i in range(4)}) == 4  # no repeats
    assert ds.subset(10) is ds and ds.subset(99) is ds
    for bad in (0, -3):
        with pytest.raises(UserError):
            ds.subset(bad)


def test_loader() -> None:
    ds = _small_dataset(10)
    batches = list(ds.loader(batch_size=4, shuffle=False))
    assert [b[0].shape for b in batches] == [(4, 1, 2, 2), (4, 1, 2, 2), (2, 1, 2, 2)]
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.y)
    assert len(list(ds.loader(batch_size=4, shuffle=False, drop_last=True))) == 2

    def order(seed: int) -> list[float]:
        return torch.cat([bx[:, 0, 0, 0] for bx, _ in ds.loader(3, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(ds.x[:, 0, 0, 0].tolist())
    with pytest.raises(UserError):
        ds.loader(batch_size=0, shuffle=False)


def test_fingerprint_arrays() -> None:
    ds = _small_dataset()
    fp = fingerprint_arrays(ds.x, ds.y)
    assert fp == ds.fingerprint == fingerprint_arrays(ds.x.clone(), ds.y.clone())
    assert fp.startswith("sha256:") and len(fp) == 71
    y2 = ds.y.clone()
    y2[0] += 1
    assert fingerprint_arrays(ds.x, y2) != fp
    x2 = ds.x.clone()
    x2[3, 0, 1, 1] += 1e-6
    assert fingerprint_arrays(x2, ds.y) != fp
    assert fingerprint_arrays(ds.x.reshape(10, 1, 4, 1), ds.y) != fp  # same bytes, other shape
    assert fingerprint_arrays(ds.x.double(), ds.y.int()) == fp  # dtype-normalised


def test_stratified_subset_keeps_class_proportions():
    """Dataset.stratified against counts computed here: floor of each class's share, remainders to the largest
    fractional parts, every pick a member of its class, the seeded permutation's order kept, deterministic."""
    import numpy as np
    import torch

    from kit.data import Dataset

    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    x = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1).contiguous()
    ds = Dataset(x=x, y=y, class_names=["a", "b", "c", "d"], spec="t", split="train")
    sub = ds.stratified(13, seed=4)
    counts = np.bincount(sub.y.numpy(), minlength=4)
    # shares 6.5, 3.9, 1.95, 0.65 -> floors 6, 3, 1, 0 (10); the 3 left go to 0.95, 0.9, 0.65: classes 2, 1, 3
    assert counts.tolist() == [6, 4, 2, 1] and len(sub) == 13
    perm = np.random.default_rng(4).permutation(100)
    picked = sub.x.view(-1).long().numpy()
    pos = [int(np.flatnonzero(perm == i)[0]) for i in picked]
    assert pos == sorted(pos)  # permutation order
    for c in range(4):  # each class's picks are its first members in the permutation
        members = [i for i in perm if y[i] == c]
        assert sorted(i for i in picked if y[i] == c) == sorted(members[: counts[c]])
    assert torch.equal(ds.stratified(13, seed=4).x, sub.x) and ds.stratified(200) is ds
