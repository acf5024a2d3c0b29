"""ddiscan.io.writer: an existing file is replaced only with force; the refusal names the
parameter, and a path's braces stay as they are."""

import pytest

from ddiscan.io.writer import write_atomic
from ddiscan.options import OptionError


def test_an_existing_file_needs_force(tmp_path):
    path = tmp_path / "out{force}.json"
    path.write_bytes(b"old")
    with pytest.raises(OptionError) as info:
        write_atomic(path, b"new", force=False)
    assert str(info.value) == f"{path}: exists (use force to replace it)"
    assert info.value.render({"force": "--force"}) == f"{path}: exists (use --force to replace it)"
    assert path.read_bytes() == b"old"
    write_atomic(path, b"new", force=True)
    assert path.read_bytes() == b"new"
