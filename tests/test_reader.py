"""The safetensors reader: accepts what the safetensors library writes, refuses what breaks
the format (and at least everything the library itself refuses), never unpickles."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from ddiscan.errors import HeaderError, InputError, NotSafetensors, PickleRefused, UnsupportedDtype
from ddiscan.io.index import TensorIndex
from ddiscan.io.reader import MAX_HEADER_SIZE, SafetensorsFile

from reader_helpers import refused
from safetensors_builders import contiguous_header, entry, raw_safetensors, rng, safetensors_accepts, save

FLOAT_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
INT_DTYPES = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}


# ---------------------------------------------------------------------------------------
# Acceptance


@pytest.mark.parametrize("name", sorted(FLOAT_DTYPES))
def test_reads_every_float_dtype_the_library_writes(tmp_path, name):
    dtype = FLOAT_DTYPES[name]
    g = rng(3)
    tensors = {
        "w": g.uniform(-4, 4, (5, 7)).astype(np.float32).astype(dtype),
        "v": g.uniform(-4, 4, (3,)).astype(np.float32).astype(dtype),
        "c": g.uniform(-4, 4, (2, 3, 1, 2)).astype(np.float32).astype(dtype),
    }
    path = save(tmp_path / "t.safetensors", tensors, metadata={"format": "pt", "note": "x"})
    f = SafetensorsFile(path)
    assert set(f.keys()) == set(tensors)
    assert f.metadata == {"format": "pt", "note": "x"}
    for key, expected in tensors.items():
        assert f.tensors[key].dtype == name
        assert f.tensors[key].shape == expected.shape
        arr = f.mapped(key)
        assert isinstance(arr, np.memmap) and arr.shape == expected.shape
        # bit-for-bit what was saved (bfloat16 and float8 as their bits), and the values
        assert arr.tobytes() == expected.tobytes()
        values = f.array(key)
        assert values.dtype in (expected.dtype, np.float32)
        np.testing.assert_array_equal(values.astype(np.float64), expected.astype(np.float64))
        assert f.raw_bytes(key) == expected.tobytes()
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[(0,) * arr.ndim] = 0


@pytest.mark.parametrize("name", sorted(INT_DTYPES))
def test_reads_integer_and_bool_dtypes(tmp_path, name):
    dtype = INT_DTYPES[name]
    values = (np.arange(12) % 2 if dtype is np.bool_ else np.arange(12) - (0 if name.startswith("U") else 6)).astype(dtype)
    path = save(tmp_path / "t.safetensors", {"x": values.reshape(3, 4)})
    arr = SafetensorsFile(path).array("x")
    assert arr.dtype == values.dtype
    np.testing.assert_array_equal(arr, values.reshape(3, 4))


def test_reads_scalars_and_empty_tensors(tmp_path):
    tensors = {
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "after": np.arange(3, dtype=np.float64),
    }
    path = save(tmp_path / "t.safetensors", tensors)
    assert safetensors_accepts(path)
    f = SafetensorsFile(path)
    assert f.array("scalar").shape == () and float(f.array("scalar")) == 2.5
    assert f.array("empty").shape == (0, 4)
    np.testing.assert_array_equal(f.array("after"), tensors["after"])


def test_reads_a_file_with_no_tensors(tmp_path):
    path = save(tmp_path / "t.safetensors", {}, metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert list(f.keys()) == [] and f.metadata == {"format": "pt"}


def test_unaligned_data_region_reads_correctly(tmp_path):
    # the format does not require the data to be aligned; the header here is 41 bytes long
    values = np.array([1.5, -2.0, 3.25], np.float32)
    header = {"x": entry("F32", [3], 0, 12)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, values.tobytes(), pad=False)
    assert (os.path.getsize(path) - 8 - 12) % 4 != 0
    assert safetensors_accepts(path)
    np.testing.assert_array_equal(SafetensorsFile(path).array("x"), values)


def test_tensors_in_an_order_other_than_their_offsets(tmp_path):
    a, b = np.arange(4, dtype=np.float32), np.arange(6, dtype=np.int16)
    header = {"b": entry("I16", [6], 16, 28), "a": entry("F32", [4], 0, 16)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, a.tobytes() + b.tobytes())
    assert safetensors_accepts(path)
    f = SafetensorsFile(path)
    np.testing.assert_array_equal(f.array("a"), a)
    np.testing.assert_array_equal(f.array("b"), b)


@pytest.mark.parametrize("header_len", [640, 896, 1152, 1408, 19280])
def test_valid_file_whose_length_prefix_looks_like_pickle_magic(tmp_path, header_len):
    """A safetensors header of 640 bytes starts the file with b'\\x80\\x02' (pickle protocol 2),
    one of 19280 bytes with b'PK' (zip): the library writes such files, the reader must read them."""
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for fill in range(header_len):
        data = safetensors.numpy.save(tensors, metadata={"pad": "x" * fill})
        if struct.unpack("<Q", data[:8])[0] >= header_len:
            break
    assert struct.unpack("<Q", data[:8])[0] == header_len, "could not build the header length"
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    assert safetensors_accepts(path)
    np.testing.assert_array_equal(SafetensorsFile(path).array("w"), tensors["w"])


# ---------------------------------------------------------------------------------------
# Refusals: each malformed file is refused by ddiscan with a message naming the file (and
# the key, where one key is at fault); where the library refuses it too, we check that.


def test_header_length_over_100_mb(tmp_path):
    # the file is (sparsely) larger than the header length, so only the 100 MB limit applies
    path = raw_safetensors(tmp_path / "t.safetensors", {}, header_len=MAX_HEADER_SIZE + 8)
    with open(path, "r+b") as f:
        f.truncate(MAX_HEADER_SIZE + 1024)
    message = refused(path, (NotSafetensors, HeaderError))
    assert str(MAX_HEADER_SIZE) in message


def test_absurd_header_length(tmp_path):
    path = raw_safetensors(tmp_path / "t.safetensors", {}, header_len=2**64 - 1)
    refused(path, (NotSafetensors, HeaderError))


def test_header_length_beyond_file_size(tmp_path):
    header, size = contiguous_header([("a", "F32", [2], 8)])
    path = raw_safetensors(tmp_path / "t.safetensors", header, size, header_len=4096)
    message = refused(path, (NotSafetensors, HeaderError))
    # the length read from the file is not echoed (its first 8 bytes, perhaps of a secret)
    assert "exceeds the file size" in message and "4096" not in message


def test_truncated_data(tmp_path):
    path = save(tmp_path / "t.safetensors", {"a": np.ones((4, 4), np.float32), "b": np.ones(8, np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    refused(path, HeaderError)


def test_trailing_bytes_after_the_data(tmp_path):
    path = save(tmp_path / "t.safetensors", {"a": np.ones((4, 4), np.float32)})
    path.write_bytes(path.read_bytes() + b"\x00" * 8)
    refused(path, HeaderError)


def test_known_dtype_numpy_cannot_map(tmp_path):
    # F4 is in the format, and the header is valid, but no numpy dtype reads it
    header = {"packed": entry("F4", [4], 0, 2)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 2)
    f = SafetensorsFile(path)
    with pytest.raises(UnsupportedDtype) as info:
        f.array("packed")
    assert "packed" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\x01", b"\x00" * 7])
def test_empty_or_tiny_file(tmp_path, content):
    path = tmp_path / "t.safetensors"
    path.write_bytes(content)
    refused(path, NotSafetensors)


def test_zero_header_length(tmp_path):
    path = raw_safetensors(tmp_path / "t.safetensors", b"", b"\x00" * 16)
    refused(path, (NotSafetensors, HeaderError))


def test_text_file(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_text("this is not a safetensors file at all, just some text\n" * 4)
    refused(path, (NotSafetensors, HeaderError))


# ---------------------------------------------------------------------------------------
# Pickles are never opened


def test_torch_zip_checkpoint_isrefused(tmp_path):
    path = tmp_path / "adapter_model.safetensors"  # a misnamed torch.save zip archive
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    message = refused(path, PickleRefused)
    assert "pickle" in message.lower()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_raw_pickle_isrefused(tmp_path, protocol):
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weight": list(range(100))}, protocol=protocol))
    refused(path, PickleRefused)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_pickle_suffix_is_refused_even_with_safetensors_content(tmp_path, suffix):
    good = save(tmp_path / "good.safetensors", {"a": np.ones(3, np.float32)})
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(good.read_bytes())
    refused(path, PickleRefused, library_refuses=False)


def test_pickle_base_refused_through_the_index(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(PickleRefused) as info:
        TensorIndex(tmp_path)
    assert "pytorch_model.bin" in str(info.value)
    with pytest.raises(PickleRefused):
        TensorIndex(tmp_path / "pytorch_model.bin")


# ---------------------------------------------------------------------------------------
# Paths that are not files


def test_missing_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(InputError) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError) as info:
        TensorIndex(path)
    assert str(path) in str(info.value)


def test_directory_given_as_file(tmp_path):
    directory = tmp_path / "dir.safetensors"
    directory.mkdir()
    with pytest.raises(InputError) as info:
        SafetensorsFile(directory)
    assert str(directory) in str(info.value)


def test_empty_directory_as_base(tmp_path):
    with pytest.raises(InputError) as info:
        TensorIndex(tmp_path)
    assert str(tmp_path) in str(info.value)
