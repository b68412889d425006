"""Read MNIST-style IDX files from local disk (plain or gzipped); nothing is downloaded.

The IDX format (LeCun's MNIST page): two zero bytes, a dtype code, the number of dimensions,
then each dimension as a big-endian unsigned 32-bit integer, then the data in C order, big-endian.

| code | type |
| --- | --- |
| 0x08 | unsigned byte |
| 0x09 | signed byte |
| 0x0B | short (2 bytes) |
| 0x0C | int (4 bytes) |
| 0x0D | float (4 bytes) |
| 0x0E | double (8 bytes) |
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "MNIST_FILES", "read_idx", "load_mnist"]

# dtype code -> big-endian numpy dtype of the stored values
IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

# the four standard MNIST files, in the order load_mnist returns them
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an IDX file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == _GZIP_MAGIC:  # by content, not by name: a .gz name on plain bytes also works
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e}); download the file again") from None
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its shape, in native byte order.

    Raises ``ValueError`` (one line, naming the file) for a missing file, a bad magic number, an
    unknown dtype code, or data whose size does not match the dimensions in the header.

    Example:
        >>> import struct, tempfile, numpy as np
        >>> from vanishing.experiments.idx import read_idx
        >>> path = tempfile.mkdtemp() + "/tiny-idx2-ubyte"
        >>> with open(path, "wb") as f:
        ...     _ = f.write(struct.pack(">BBBBII", 0, 0, 0x08, 2, 2, 3) + bytes(range(6)))
        >>> read_idx(path)
        array([[0, 1, 2],
               [3, 4, 5]], dtype=uint8)
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file ({len(raw)} bytes, shorter than the header)")
    zero1, zero2, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero1 != 0 or zero2 != 0 or code not in IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (bad magic number 0x{raw[:4].hex()}; expected 0x0000 then "
            "a dtype code 08, 09, 0b, 0c, 0d or 0e and the number of dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX file (header promises {ndim} dimensions, "
            f"file has {len(raw)} bytes)"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        what = "truncated IDX file" if actual < expected else "IDX file with trailing bytes"
        raise ValueError(
            f"{path}: {what}: dimensions {list(dims)} need {expected} data bytes, found {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # a native-order, writable copy


def _find(directory: Path, name: str) -> Path:
    stem, _, kind = name.rpartition("-")  # "train-images", "idx3-ubyte"
    stem, _, idx = stem.rpartition("-")  # "train", "images", "idx3"
    dotted = f"{stem}.{idx}-{kind}"  # train-images.idx3-ubyte
    candidates = [name, name + ".gz", dotted, dotted + ".gz"]
    for candidate in candidates:
        path = directory / candidate
        if path.is_file():
            return path
    raise ValueError(
        f"MNIST file {name} not found in {directory} (looked for {', '.join(candidates)}); "
        "put the four MNIST IDX files there, gzipped or not"
    )


def load_mnist(
    data_dir: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST from the four standard IDX files in ``data_dir``: ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 arrays ``(N, rows, cols)`` (28 x 28 for MNIST), labels int64 arrays ``(N,)``.
    Each file may be plain or gzipped (``.gz``), under its standard name
    (``train-images-idx3-ubyte``) or the dotted variant (``train-images.idx3-ubyte``). Nothing
    is downloaded. Raises ``ValueError`` with a one-line message for a missing directory or
    file, a file that is not IDX or is truncated, or image and label counts that differ.

    Example:
        >>> from vanishing.experiments.idx import load_mnist
        >>> x, y, xt, yt = load_mnist("~/data/mnist")   # doctest: +SKIP
        >>> x.shape, x.dtype, y.shape, y.dtype          # doctest: +SKIP
        ((60000, 28, 28), dtype('uint8'), (60000,), dtype('int64'))
        >>> load_mnist("/no/such/dir")
        Traceback (most recent call last):
        ...
        ValueError: MNIST directory /no/such/dir does not exist; pass the directory that holds the MNIST IDX files
    """
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ValueError(
            f"MNIST directory {directory} {what}; pass the directory that holds the MNIST IDX files"
        )
    paths = [_find(directory, name) for name in MNIST_FILES]
    arrays = [read_idx(p) for p in paths]
    out = []
    for split, (images, labels), (img_path, lbl_path) in zip(
        ("training", "test"), (arrays[:2], arrays[2:]), (paths[:2], paths[2:])
    ):
        if images.ndim != 3:
            raise ValueError(
                f"{img_path}: expected images of shape (N, rows, cols), got {images.shape}"
            )
        if labels.ndim != 1:
            raise ValueError(f"{lbl_path}: expected labels of shape (N,), got {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(
                f"MNIST {split} set in {directory}: {len(images)} images ({img_path.name}) but "
                f"{len(labels)} labels ({lbl_path.name}); the files do not belong together"
            )
        out += [images, labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]
