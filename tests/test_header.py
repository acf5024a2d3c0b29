"""ddiscan.io.header: the safetensors header rules, each broken once (the file opened by ddiscan.io.reader)."""

from __future__ import annotations

import pytest

from ddiscan.errors import HeaderError, NotSafetensors

from reader_helpers import refused
from safetensors_builders import entry, raw_safetensors


@pytest.mark.parametrize("text", ['{"a": {"dtype": "F32",', '{"a" 1}', "{\xff}", "{}}"])
def test_invalid_json(tmp_path, text):
    raw = text.encode("latin-1") if "\xff" in text else text.encode()
    path = raw_safetensors(tmp_path / "t.safetensors", raw)
    refused(path, (HeaderError, NotSafetensors))


@pytest.mark.parametrize("text", ["[]", '"x"', "1", "null"])
def test_header_not_an_object(tmp_path, text):
    path = raw_safetensors(tmp_path / "t.safetensors", text)
    refused(path, (HeaderError, NotSafetensors))


def test_tensor_entry_not_an_object(tmp_path):
    path = raw_safetensors(tmp_path / "t.safetensors", {"a": [1, 2]})
    refused(path, HeaderError, key="a")


def test_duplicate_keys(tmp_path):
    # the library keeps the last one silently; ddiscan refuses: which one is meant?
    one = '"dup": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    path = raw_safetensors(tmp_path / "t.safetensors", "{" + one + ", " + one + "}", 4)
    refused(path, HeaderError, key="dup", library_refuses=False)


def test_offsets_with_a_gap(tmp_path):
    header = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 12)
    refused(path, HeaderError, key="b")


def test_offsets_not_starting_at_zero(tmp_path):
    header = {"a": entry("F32", [1], 4, 8)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 8)
    refused(path, HeaderError, key="a")


def test_overlapping_offsets(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 12)
    refused(path, HeaderError, key="b")


def test_offsets_beyond_the_data(tmp_path):
    header = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [4], 4, 20)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 8)
    refused(path, HeaderError)


def test_offsets_reversed(tmp_path):
    header = {"a": entry("F32", [0], 4, 0)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 4)
    refused(path, HeaderError, key="a")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], ["0", "4"], [0.0, 4.0], [-4, 0], None])
def test_malformed_offsets(tmp_path, offsets):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 4)
    refused(path, HeaderError, key="a")


@pytest.mark.parametrize("shape", [[-1], [2.0], ["2"], [True], 2, None])
def test_malformed_shapes(tmp_path, shape):
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 8)
    refused(path, HeaderError, key="a")


@pytest.mark.parametrize("dtype,shape,nbytes", [("F32", [2, 2], 12), ("F16", [3], 8), ("BF16", [4], 4), ("F64", [1], 4)])
def test_byte_size_not_numel_times_dtype_size(tmp_path, dtype, shape, nbytes):
    header = {"a": entry(dtype, shape, 0, nbytes)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, nbytes)
    refused(path, HeaderError, key="a")


@pytest.mark.parametrize("dtype", ["F17", "float32", "f32", "", None, 4])
def test_unknown_dtype(tmp_path, dtype):
    header = {"weird": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 4)
    message = refused(path, HeaderError, key="weird")
    assert "dtype" in message


@pytest.mark.parametrize("metadata", [{"x": 1}, {"x": None}, {"x": ["a"]}, {"x": {"y": "z"}}, ["a"], "text"])
def test_metadata_values_not_strings(tmp_path, metadata):
    header = {"__metadata__": metadata, "a": entry("F32", [1], 0, 4)}
    path = raw_safetensors(tmp_path / "t.safetensors", header, 4)
    message = refused(path, HeaderError)
    assert "__metadata__" in message
