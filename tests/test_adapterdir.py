"""ddiscan.io.adapterdir: an existing output directory is replaced only with force, and only
when ddiscan wrote it; the refusals name the parameter, and a path's braces stay as they are."""

import shutil
from pathlib import Path

import pytest

from ddiscan.lora import load_adapter
from ddiscan.options import OptionError
from ddiscan.rewrite import rewrite_adapter

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "fixtures" / "tiny-lora"
PRUNED = ["model.layers.0.self_attn.q_proj"]


def _refusal(output, force) -> OptionError:
    with pytest.raises(OptionError) as info:
        rewrite_adapter(load_adapter(ADAPTER), PRUNED, output, force=force)
    return info.value


def test_an_existing_output_needs_force(tmp_path):
    out = tmp_path / "out{mode}"
    out.mkdir()
    error = _refusal(out, force=False)
    assert str(error) == f"{out}: exists (use force to replace it)"
    assert error.render({"force": "--force"}) == f"{out}: exists (use --force to replace it)"


def test_force_replaces_only_what_ddiscan_wrote(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ADAPTER, out)
    error = _refusal(out, force=True)
    assert str(error) == (
        f"{out}: exists and is not an output of ddiscan prune (no adapter_model.safetensors with ddiscan's list "
        "of the files it wrote); force replaces only an adapter directory ddiscan wrote (choose another output)"
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ADAPTER.iterdir())


def test_a_snapshot_in_the_hub_cache_is_copied_through_its_blob_links(tmp_path):
    """The Hugging Face cache keeps a snapshot's files as links into the repository's blobs/:
    those are the adapter's own files; a link anywhere else is still not followed."""
    repo = tmp_path / "hub" / "models--org--lora"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("token\n")
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        source = ADAPTER / name if name != "README.md" else None
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_bytes(source.read_bytes() if source else b"an adapter\n")
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (snapshot / "notes.txt").symlink_to(secret)
    out = tmp_path / "pruned"
    result = rewrite_adapter(load_adapter(snapshot), PRUNED, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "README.md").read_bytes() == b"an adapter\n"
    assert (out / "adapter_config.json").read_bytes() == (ADAPTER / "adapter_config.json").read_bytes()
    assert result["warnings"] == [f"{snapshot / 'notes.txt'}: a symbolic link out of the adapter directory; not copied"]
