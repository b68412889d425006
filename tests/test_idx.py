"""IDX reader and MNIST loader: round trips through files written here, and every error."""

import gzip
import struct

import numpy as np
import pytest

from vanishing.experiments.idx import MNIST_FILES, load_mnist, read_idx

CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path, array, *, gz=False, code=None):
    """An IDX file written by hand from the format's definition (big-endian header and data)."""
    array = np.asarray(array)
    code = CODES[array.dtype.type] if code is None else code
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_every_dtype(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=(3, 4, 5), endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal((3, 4, 5)).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 0  # a writable copy, not a view of the file's bytes


def test_byte_order_is_big_endian(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE]))
    assert read_idx(path).tolist() == [0x0102, -2]


def test_one_and_zero_length_dimensions(tmp_path):
    assert read_idx(write_idx(tmp_path / "l", np.arange(7, dtype=np.uint8))).tolist() == list(
        range(7)
    )
    assert read_idx(write_idx(tmp_path / "e", np.zeros((0, 28, 28), np.uint8))).shape == (0, 28, 28)


def test_gzip_is_detected_by_content_not_name(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "plain.gz", array)), array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "zipped", array, gz=True)), array)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "bad magic number 0x01000801"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "bad magic number 0x00000701"),
        (b"\x00\x00", "shorter than the header"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX file (header promises 3 dimensions"),
        (
            b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03" + bytes(5),
            "need 6 data bytes, found 5",
        ),
        (
            b"\x00\x00\x0c\x01\x00\x00\x00\x02" + bytes(12),
            "trailing bytes: dimensions [2] need 8 data bytes, found 12",
        ),
    ],
)
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, raw, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(ValueError) as err:
        read_idx(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_truncated_gzip_and_missing_file(tmp_path):
    path = write_idx(tmp_path / "t.gz", np.zeros((10, 28, 28), np.uint8), gz=True)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(ValueError, match="corrupt gzip data"):
        read_idx(path)
    with pytest.raises(ValueError, match="no such file"):
        read_idx(tmp_path / "nope")
    with pytest.raises(ValueError, match="is a directory"):
        read_idx(tmp_path)


def write_mnist(
    directory, n_train=5, n_test=3, *, gz=False, dotted=False, rows=28, cols=28, seed=0
):
    """Four MNIST-named IDX files of random images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in zip(MNIST_FILES, arrays):
        if dotted:  # train-images.idx3-ubyte
            stem, idx, kind = name.rsplit("-", 2)
            name = f"{stem}.{idx}-{kind}"
        write_idx(directory / (name + (".gz" if gz else "")), array, gz=gz)
    return arrays


@pytest.mark.parametrize("gz, dotted", [(False, False), (True, False), (False, True), (True, True)])
def test_load_mnist_round_trip(tmp_path, gz, dotted):
    written = write_mnist(tmp_path / "mnist", gz=gz, dotted=dotted)
    loaded = load_mnist(tmp_path / "mnist")
    assert [a.shape for a in loaded] == [(5, 28, 28), (5,), (3, 28, 28), (3,)]
    assert loaded[0].dtype == np.uint8 and loaded[1].dtype == np.int64
    for got, want in zip(loaded, written):
        np.testing.assert_array_equal(got, want)


def test_load_mnist_mixes_plain_and_gzipped_files(tmp_path):
    written = write_mnist(tmp_path, gz=False)
    gz = tmp_path / (MNIST_FILES[2] + ".gz")
    gz.write_bytes(gzip.compress((tmp_path / MNIST_FILES[2]).read_bytes()))
    (tmp_path / MNIST_FILES[2]).unlink()
    np.testing.assert_array_equal(load_mnist(str(tmp_path))[2], written[2])


def test_load_mnist_errors(tmp_path):
    with pytest.raises(ValueError, match=r"MNIST directory .*nope does not exist"):
        load_mnist(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_mnist(tmp_path / "file")

    write_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError) as err:
        load_mnist(tmp_path / "m")
    text = str(err.value)
    assert text.startswith(f"MNIST file t10k-labels-idx1-ubyte not found in {tmp_path / 'm'}")
    assert "t10k-labels-idx1-ubyte.gz" in text and "t10k-labels.idx1-ubyte" in text
    assert "\n" not in text


def test_load_mnist_count_mismatch_and_shapes(tmp_path):
    write_mnist(tmp_path / "a", n_train=5)
    write_idx(tmp_path / "a" / MNIST_FILES[1], np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="training set .*: 5 images .* but 4 labels"):
        load_mnist(tmp_path / "a")

    write_mnist(tmp_path / "b")
    write_idx(tmp_path / "b" / MNIST_FILES[2], np.zeros((3, 784), np.uint8))
    with pytest.raises(
        ValueError, match=r"expected images of shape \(N, rows, cols\), got \(3, 784\)"
    ):
        load_mnist(tmp_path / "b")

    write_mnist(tmp_path / "c")
    labels = tmp_path / "c" / MNIST_FILES[1]
    labels.write_bytes(labels.read_bytes()[:-1])  # one label byte short of the header's count
    with pytest.raises(ValueError, match="truncated IDX file"):
        load_mnist(tmp_path / "c")
