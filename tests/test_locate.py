"""Offline base lookup (ddiscan.locate): local path, then the Hugging Face cache, then profiles.

The hub cache is laid out exactly as ``huggingface_hub.file_download`` lays it out —
``models--ORG--NAME/blobs/<sha256>``, ``snapshots/<commit>/<file>`` as *relative* symlinks
to ``../../blobs/<sha256>``, ``refs/main`` holding the commit — and every layout is checked
against the hub client's own reader (``scan_cache_dir``, ``snapshot_download`` with
``local_files_only``, ``huggingface_hub.constants`` in a fresh interpreter), so the tests
agree with the real client, not with our idea of it. ddiscan resolves revisions with
``snapshot_download(..., local_files_only=True)`` itself, and imports huggingface_hub only
then, never when it is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import ddiscan
from ddiscan.errors import InputError
from ddiscan.io.index import TensorIndex, resolve_checkpoint
from ddiscan.locate import Located, find_base, hub_cache_dir

REPO = "org/tiny"
BASE_KEY = "model.layers.0.self_attn.q_proj.weight"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
C1, C2, C3 = ("1" * 40, "2" * 40, "3" * 40)
HF_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "DDISCAN_PROFILES",
           "HF_HUB_OFFLINE", "HF_ENDPOINT")


# ---------------------------------------------------------------------------------------
# Builders


def base_tensors(seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    return {BASE_KEY: g.standard_normal((16, 16)).astype(np.float32)}


def base_bytes(seed: int = 0) -> bytes:
    return safetensors.numpy.save(base_tensors(seed))


CONFIG_JSON = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 16}).encode()


def write_adapter(directory: Path, base_name=REPO, *, config=True, revision=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(1)
    safetensors.numpy.save_file(
        {A_KEY: g.standard_normal((2, 16)).astype(np.float32), B_KEY: g.standard_normal((16, 2)).astype(np.float32)},
        str(directory / "adapter_model.safetensors"),
    )
    if config:
        cfg = {"r": 2, "lora_alpha": 4, "peft_type": "LORA", "target_modules": ["q_proj"]}
        if base_name is not None:
            cfg["base_model_name_or_path"] = base_name
        cfg["revision"] = revision  # PEFT writes it, null unless the base was loaded at a revision
        (directory / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return directory


def add_snapshot(cache: Path, commit: str, files: dict[str, bytes], *, repo=REPO, ref: bool | str = True,
                 mtime: float | None = None) -> Path:
    """One revision in the hub cache, as huggingface_hub writes it; ``ref`` True writes
    ``refs/main``, a string ``refs/<that branch>``."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)  # relative, as _create_symlink makes it
    snapshot.mkdir(parents=True, exist_ok=True)
    if ref:
        ref_file = repo_dir / "refs" / ("main" if ref is True else ref)
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)  # no newline, as the client writes it
    if mtime is not None:
        os.utime(snapshot, (mtime, mtime))
    return snapshot


def weights(seed: int = 0) -> dict[str, bytes]:
    return {"config.json": CONFIG_JSON, "model.safetensors": base_bytes(seed)}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean environment: HOME in tmp, no HF_* settings, cwd in an empty directory."""
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt or name lookup fails the test."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


def hub_constant(env: dict) -> Path:
    """huggingface_hub's own HF_HUB_CACHE under ``env``, read in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
        env=env, capture_output=True, text=True, check=True,
    )
    return Path(out.stdout.strip())


# ---------------------------------------------------------------------------------------
# The cache layout is the hub client's


def test_layout_is_what_the_hub_client_reads(env, no_network):
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    cache = env / "hf" / "hub"
    add_snapshot(cache, C1, {"config.json": CONFIG_JSON}, ref=False)
    snapshot = add_snapshot(cache, C2, weights())
    info = scan_cache_dir(cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model")
    assert {r.commit_hash for r in repo.revisions} == {C1, C2}
    (main,) = [r for r in repo.revisions if r.refs]
    assert main.commit_hash == C2 and main.refs == frozenset({"main"})
    assert {f.file_name for f in main.files} == {"config.json", "model.safetensors"}
    assert Path(snapshot_download(REPO, cache_dir=cache, local_files_only=True)) == snapshot
    linked = Path(try_to_load_from_cache(REPO, "model.safetensors", cache_dir=cache))
    assert linked == snapshot / "model.safetensors" and linked.is_symlink()
    assert not os.path.isabs(os.readlink(linked))


def test_found_in_hf_home_and_scanned(env, monkeypatch, no_network):
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    snapshot = add_snapshot(env / "hf" / "hub", C1, weights())
    adapter = write_adapter(env / "adapter")

    found = find_base(adapter)
    assert isinstance(found, Located)
    assert found.source == "hf-cache" and found.name == REPO
    assert found.path == snapshot
    assert found.path == Path(snapshot_download(REPO, cache_dir=env / "hf" / "hub", local_files_only=True))
    assert found.warnings == ()
    assert "refs/main" in found.detail and "HF_HOME" in found.detail and C1[:12] in found.detail

    # the snapshot (symlinks into blobs/) is accepted as a base, and reads as the plain file does
    assert (snapshot / "model.safetensors").is_symlink()
    assert resolve_checkpoint(found.path) == (None, [snapshot / "model.safetensors"])
    np.testing.assert_array_equal(np.asarray(TensorIndex(found.path).array(BASE_KEY)), base_tensors()[BASE_KEY])
    report = ddiscan.scan(found.path, adapter)
    plain = env / "plain.safetensors"
    safetensors.numpy.save_file(base_tensors(), str(plain))
    reference = ddiscan.scan(plain, adapter)
    assert [m.base_key for m in report.modules] == [BASE_KEY]
    assert report.modules[0].ddi > 0
    assert report.modules[0].ddi == reference.modules[0].ddi
    assert report.modules[0].base_norm == reference.modules[0].base_norm
    # a Located is path-like: it can be handed to scan as is
    assert ddiscan.scan(found, adapter).modules[0].ddi == reference.modules[0].ddi
    assert not no_network


# ---------------------------------------------------------------------------------------
# Which cache directory: the hub client's precedence


CACHE_CASES = {
    "HF_HUB_CACHE": {"HF_HUB_CACHE": "a/hub", "HUGGINGFACE_HUB_CACHE": "b/hub", "HF_HOME": "c", "XDG_CACHE_HOME": "d"},
    "HUGGINGFACE_HUB_CACHE": {"HUGGINGFACE_HUB_CACHE": "b/hub", "HF_HOME": "c", "XDG_CACHE_HOME": "d"},
    "HF_HOME": {"HF_HOME": "c", "XDG_CACHE_HOME": "d"},
    "XDG_CACHE_HOME": {"XDG_CACHE_HOME": "d"},
    "default": {},
}


@pytest.mark.parametrize("winner", list(CACHE_CASES))
def test_cache_precedence_matches_the_hub_client(env, monkeypatch, winner):
    settings = {var: str(env / value) for var, value in CACHE_CASES[winner].items()}
    for var, value in settings.items():
        monkeypatch.setenv(var, value)
    expected = {
        "HF_HUB_CACHE": env / "a" / "hub",
        "HUGGINGFACE_HUB_CACHE": env / "b" / "hub",
        "HF_HOME": env / "c" / "hub",
        "XDG_CACHE_HOME": env / "d" / "huggingface" / "hub",
        "default": env / "home" / ".cache" / "huggingface" / "hub",
    }[winner]
    assert hub_cache_dir() == (expected, winner)
    assert hub_constant(dict(os.environ)) == expected
    # a different revision in every candidate cache: the lookup takes the winner's
    commits = {}
    for i, (name, cache) in enumerate(
        [("HF_HUB_CACHE", env / "a" / "hub"), ("HUGGINGFACE_HUB_CACHE", env / "b" / "hub"),
         ("HF_HOME", env / "c" / "hub"), ("XDG_CACHE_HOME", env / "d" / "huggingface" / "hub"),
         ("default", env / "home" / ".cache" / "huggingface" / "hub")]):
        commits[name] = f"{i + 1:x}" * 40
        add_snapshot(cache, commits[name], weights(seed=i))
    found = find_base(write_adapter(env / "adapter"))
    assert found.path == expected / "models--org--tiny" / "snapshots" / commits[winner]


def test_env_argument_and_tilde(env, monkeypatch):
    other_home = env / "other"
    snapshot = add_snapshot(other_home / "cache" / "hub", C1, weights())
    adapter = write_adapter(env / "adapter")
    found = find_base(adapter, env={"HOME": str(other_home), "HF_HUB_CACHE": "~/cache/hub"})
    assert found.path == snapshot
    assert hub_constant({**os.environ, "HOME": str(other_home), "HF_HUB_CACHE": "~/cache/hub"}) == snapshot.parents[2]
    # os.environ (whose caches are empty) is not consulted when env is given, nor the reverse
    with pytest.raises(InputError):
        find_base(adapter)


# ---------------------------------------------------------------------------------------
# Choosing the snapshot


def test_refs_main_wins_over_newer_snapshot(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    main = add_snapshot(cache, C1, weights(0), mtime=1_000_000)
    add_snapshot(cache, C2, weights(1), ref=False, mtime=2_000_000)
    found = find_base(write_adapter(env / "adapter"))
    assert found.path == main
    assert found.warnings == ()


def test_single_snapshot_without_ref(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    only = add_snapshot(env / "hf" / "hub", C1, weights(), ref=False)
    found = find_base(write_adapter(env / "adapter"))
    assert found.path == only
    assert found.warnings == ()


def test_several_snapshots_without_ref_take_newest_with_warning(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    add_snapshot(cache, C1, weights(0), ref=False, mtime=3_000_000)
    newest = add_snapshot(cache, C2, weights(1), ref=False, mtime=4_000_000)
    add_snapshot(cache, C3, weights(2), ref=False, mtime=1_000_000)
    found = find_base(write_adapter(env / "adapter"))
    assert found.path == newest
    (warning,) = found.warnings
    assert "3 snapshots" in warning and "no refs/main" in warning and C2[:12] in warning
    assert "most recently modified" in found.detail


def test_dangling_ref_falls_back_to_snapshots_with_warning(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    only = add_snapshot(cache, C1, weights())
    (cache / "models--org--tiny" / "refs" / "main").write_text(C3)
    found = find_base(write_adapter(env / "adapter"))
    assert found.path == only
    assert any(C3[:12] in w and "not in" in w for w in found.warnings)


@pytest.mark.parametrize("files, reason", [
    ({"config.json": CONFIG_JSON}, "only config.json"),
    ({"config.json": CONFIG_JSON, "pytorch_model.bin": b"PK\x03\x04 pickled zip"}, "only pytorch_model.bin"),
])
def test_snapshot_without_safetensors_is_skipped(env, monkeypatch, files, reason):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    add_snapshot(env / "hf" / "hub", C1, files)
    adapter = write_adapter(env / "adapter")
    with pytest.raises(InputError) as exc:
        find_base(adapter)
    message = str(exc.value)
    assert "\n" not in message
    assert str(env / "hf" / "hub" / "models--org--tiny") in message
    assert "no .safetensors weights" in message and reason in message and C1[:12] in message
    # with a profile further down the order, that is found, and the skip is a warning
    profiles = env / "profiles"
    profiles.mkdir()
    (profiles / "org--tiny.ddiprofile").write_bytes(base_bytes())
    found = find_base(adapter, profiles=[profiles])
    assert found.source == "profile"
    assert any("no .safetensors weights" in w for w in found.warnings)


def test_refs_main_snapshot_without_weights_is_not_replaced_by_another_revision(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    add_snapshot(cache, C1, weights(), ref=False)
    add_snapshot(cache, C2, {"config.json": CONFIG_JSON})  # refs/main → config only
    with pytest.raises(InputError, match=rf"snapshot {C2[:12]} \(refs/main\): no \.safetensors weights"):
        find_base(write_adapter(env / "adapter"))


def test_without_ref_a_weightless_snapshot_is_passed_over(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    good = add_snapshot(cache, C1, weights(), ref=False, mtime=1_000_000)
    add_snapshot(cache, C2, {"config.json": CONFIG_JSON}, ref=False, mtime=2_000_000)
    found = find_base(write_adapter(env / "adapter"))
    assert found.path == good
    assert any("skipped" in w and C2[:12] in w for w in found.warnings)
    assert not any("most recently modified" in w for w in found.warnings)


def test_missing_blob_is_skipped(env, monkeypatch):
    from huggingface_hub import scan_cache_dir

    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    snapshot = add_snapshot(cache, C1, weights())
    os.remove(os.path.realpath(snapshot / "model.safetensors"))
    assert scan_cache_dir(cache).warnings  # the client sees the broken link too
    with pytest.raises(InputError, match=r"models--org--tiny \(snapshot 111111111111 \(refs/main\):.*model\.safetensors"):
        find_base(write_adapter(env / "adapter"))


def test_sharded_snapshot(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    tensors = base_tensors()
    shard = safetensors.numpy.save(tensors)
    index = json.dumps({"metadata": {}, "weight_map": {BASE_KEY: "model-00001-of-00001.safetensors"}}).encode()
    snapshot = add_snapshot(env / "hf" / "hub", C1, {
        "model.safetensors.index.json": index, "model-00001-of-00001.safetensors": shard})
    adapter = write_adapter(env / "adapter")
    found = find_base(adapter)
    assert found.path == snapshot
    assert ddiscan.scan(found, adapter).modules[0].ddi > 0


def test_the_adapters_revision_is_honoured(env, monkeypatch, no_network):
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    main = add_snapshot(cache, C1, weights(0), mtime=3_000_000)
    v2 = add_snapshot(cache, C2, weights(1), ref="v2", mtime=1_000_000)
    pr = add_snapshot(cache, C3, weights(2), ref="pr/1", mtime=2_000_000)
    scores = {}
    for revision, expected in ((None, main), ("main", main), ("v2", v2), ("pr/1", pr), (C2, v2)):
        adapter = write_adapter(env / f"adapter-{revision}".replace("/", "-"), revision=revision)
        found = find_base(adapter)
        assert found.path == expected, revision
        assert found.path == Path(snapshot_download(REPO, revision=revision, cache_dir=cache, local_files_only=True))
        assert found.warnings == ()
        assert expected.name[:12] in found.detail
        assert (repr(revision) in found.detail) if revision else ("refs/main" in found.detail)
        scores[revision] = ddiscan.scan(found, adapter).modules[0].ddi
    # each revision is scored against its own weights, not refs/main's
    plain = env / "v2.safetensors"
    safetensors.numpy.save_file(base_tensors(1), str(plain))
    reference = ddiscan.scan(plain, write_adapter(env / "adapter-plain")).modules[0].ddi
    assert scores["v2"] == pytest.approx(reference, rel=1e-9) == scores[C2]
    assert abs(scores["v2"] - scores[None]) > 1e-3 * scores[None]
    assert not no_network


def test_a_named_revision_not_in_the_cache_is_not_replaced(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    add_snapshot(cache, C1, weights(0))
    add_snapshot(cache, C2, weights(1), ref="v2")
    for revision in ("v3", C3):
        adapter = write_adapter(env / f"adapter-{revision[:4]}", revision=revision)
        with pytest.raises(InputError) as exc:
            find_base(adapter)
        message = str(exc.value)
        assert "\n" not in message and message.startswith("no base found for 'org/tiny'")
        assert f"revision {revision!r}" in message and "not in this cache" in message
        assert C1[:12] in message and C2[:12] in message  # the snapshots that were there
    # further down the order, a profile is still found, and the skip is a warning
    (env / "p").mkdir()
    (env / "p" / "org--tiny.ddiprofile").write_bytes(base_bytes())
    found = find_base(adapter, profiles=[env / "p"])
    assert found.source == "profile" and any("'" + C3 + "'" in w for w in found.warnings)


def test_a_quantized_snapshot_is_passed_over_naming_the_scheme(env, monkeypatch):
    import transformers

    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    # EETQ: a scheme ddiscan does not decode (GPTQ, AWQ, bitsandbytes, ... are read: test_intquant_scan, test_bnb)
    config = transformers.LlamaConfig(quantization_config=transformers.EetqConfig().to_dict()).to_json_string()
    add_snapshot(env / "hf" / "hub", C1, {"config.json": config.encode(), "model.safetensors": base_bytes()})
    with pytest.raises(InputError) as exc:
        find_base(write_adapter(env / "adapter"))
    assert f"snapshot {C1[:12]} (refs/main): " in str(exc.value) and "quantized with eetq" in str(exc.value)


@pytest.mark.parametrize("revision", ["../../../elsewhere", "/abs", "a b", "x/../../y", 3])
def test_a_revision_that_is_no_ref_name_is_bad_input(env, revision):
    with pytest.raises(InputError) as exc:
        find_base(write_adapter(env / "adapter", revision=revision))
    assert "is not a branch, tag or commit name" in str(exc.value) and "\n" not in str(exc.value)


def test_a_ref_pointing_outside_the_snapshots_is_not_followed(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    cache = env / "hf" / "hub"
    add_snapshot(cache, C1, weights(0))
    outside = write_plain_base(env / "elsewhere")
    (cache / "models--org--tiny" / "refs" / "evil").write_text(os.path.relpath(outside, cache / "models--org--tiny" / "snapshots"))
    with pytest.raises(InputError, match=r"refs/evil points outside"):
        find_base(write_adapter(env / "adapter", revision="evil"))


# ---------------------------------------------------------------------------------------
# Local paths


def write_plain_base(directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(base_tensors(seed), str(directory / "model.safetensors"))
    return directory


def test_local_path_relative_to_cwd_beats_the_cache(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    add_snapshot(env / "hf" / "hub", C1, weights())
    local = write_plain_base(env / "work" / "org" / "tiny")
    adapter = write_adapter(env / "adapter")
    found = find_base(adapter)
    assert found.source == "path" and found.path == local
    monkeypatch.chdir(env)  # from elsewhere, ./org/tiny is not there: the cache
    assert find_base(adapter).source == "hf-cache"


def test_local_path_relative_to_the_adapter(env):
    base = write_plain_base(env / "models" / "base")
    adapter = write_adapter(env / "models" / "adapter", base_name="../base")
    found = find_base(adapter)
    assert found.source == "path" and found.path == base
    # a .safetensors adapter file: relative to the file's directory (sibling config read)
    found = find_base(adapter / "adapter_model.safetensors", env={"HOME": str(env / "home")})
    assert found.path == env / "models" / "base"
    # cwd is tried before the adapter's directory
    cwd_base = write_plain_base(env / "work" / "base", seed=3)
    found = find_base(adapter, cwd=env / "work" / "sub")
    assert found.path == cwd_base
    assert ddiscan.scan(found, adapter).modules[0].ddi > 0


def test_absolute_local_path_and_file(env):
    base = write_plain_base(env / "abs" / "base")
    found = find_base(write_adapter(env / "a1", base_name=str(base)))
    assert found.path == base and found.source == "path"
    found = find_base(write_adapter(env / "a2", base_name=str(base / "model.safetensors")))
    assert found.path == base / "model.safetensors"


def test_local_directory_without_weights_falls_through(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    snapshot = add_snapshot(env / "hf" / "hub", C1, weights())
    (env / "work" / "org" / "tiny").mkdir(parents=True)
    (env / "work" / "org" / "tiny" / "config.json").write_bytes(CONFIG_JSON)
    found = find_base(write_adapter(env / "adapter"))
    assert found.path == snapshot
    assert any(str(env / "work" / "org" / "tiny") in w and "no .safetensors" in w for w in found.warnings)


# ---------------------------------------------------------------------------------------
# Profiles


def test_profiles_option_then_environment(env, monkeypatch):
    opt, envdir = env / "opt", env / "envp"
    opt.mkdir()
    envdir.mkdir()
    (envdir / "org--tiny.ddiprofile").write_bytes(base_bytes())
    monkeypatch.setenv("DDISCAN_PROFILES", os.pathsep.join([str(env / "missing"), str(envdir)]))
    adapter = write_adapter(env / "adapter")
    found = find_base(adapter)
    assert found.source == "profile" and found.path == envdir / "org--tiny.ddiprofile"
    assert "DDISCAN_PROFILES" in found.detail
    (opt / "org--tiny.ddiprofile").write_bytes(base_bytes())
    found = find_base(adapter, profiles=[opt])
    assert found.path == opt / "org--tiny.ddiprofile" and "--profiles" in found.detail


def test_full_profile_name_beats_bare_name(env):
    p1, p2 = env / "p1", env / "p2"
    p1.mkdir()
    p2.mkdir()
    (p1 / "tiny.ddiprofile").write_bytes(base_bytes())
    adapter = write_adapter(env / "adapter")
    assert find_base(adapter, profiles=[p1, p2]).path == p1 / "tiny.ddiprofile"
    (p2 / "org--tiny.ddiprofile").write_bytes(base_bytes())
    assert find_base(adapter, profiles=[p1, p2]).path == p2 / "org--tiny.ddiprofile"


def test_cache_beats_profiles(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    snapshot = add_snapshot(env / "hf" / "hub", C1, weights())
    (env / "p").mkdir()
    (env / "p" / "org--tiny.ddiprofile").write_bytes(base_bytes())
    assert find_base(write_adapter(env / "adapter"), profiles=[env / "p"]).path == snapshot


def test_path_name_not_on_disk_finds_profile_by_basename(env):
    (env / "p").mkdir()
    (env / "p" / "Llama-3.2-1B.ddiprofile").write_bytes(base_bytes())
    adapter = write_adapter(env / "adapter", base_name="/nonexistent/models/Llama-3.2-1B")
    found = find_base(adapter, profiles=[env / "p"])
    assert found.path == env / "p" / "Llama-3.2-1B.ddiprofile"
    with pytest.raises(InputError, match="not a Hub repo id"):
        find_base(adapter)


# ---------------------------------------------------------------------------------------
# Failures


def test_not_found_names_every_place_on_one_line(env, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(env / "cache"))
    monkeypatch.setenv("DDISCAN_PROFILES", str(env / "envp"))
    adapter = write_adapter(env / "adapter")
    with pytest.raises(InputError) as exc:
        find_base(adapter, profiles=[env / "opt"])
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("no base found for 'org/tiny' (looked in: ")
    assert message.endswith("; pass BASE")
    for place in (env / "work" / "org" / "tiny", env / "adapter" / "org" / "tiny",
                  env / "cache" / "models--org--tiny", env / "opt", env / "envp"):
        assert str(place) in message
    assert "org--tiny.ddiprofile" in message and "tiny.ddiprofile" in message
    assert exc.value.exit_code == 3
    assert not no_network


def test_not_found_without_profiles_says_so(env):
    with pytest.raises(InputError) as exc:
        find_base(write_adapter(env / "adapter"))
    message = str(exc.value)
    assert "profiles: none given" in message
    assert str(env / "home" / ".cache" / "huggingface" / "hub" / "models--org--tiny") in message


def test_adapter_without_base_name(env):
    with pytest.raises(InputError, match=r"adapter_config\.json has no base_model_name_or_path; pass BASE"):
        find_base(write_adapter(env / "a1", base_name=None))
    with pytest.raises(InputError, match=r"no adapter_config\.json .* names the base model"):
        find_base(write_adapter(env / "a2", config=False))


def test_diffusers_metadata_names_the_base(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf"))
    snapshot = add_snapshot(env / "hf" / "hub", C1, weights())
    g = np.random.default_rng(1)
    file = env / "lora" / "pytorch_lora_weights.safetensors"
    file.parent.mkdir()
    meta = {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 4, "base_model_name_or_path": REPO})}
    safetensors.numpy.save_file(
        {A_KEY: g.standard_normal((2, 16)).astype(np.float32), B_KEY: g.standard_normal((16, 2)).astype(np.float32)},
        str(file), metadata=meta)
    found = find_base(file)
    assert found.path == snapshot
    assert ddiscan.scan(found, file).modules[0].ddi > 0


def test_ddiscan_does_not_import_huggingface_hub():
    code = ("import sys, ddiscan, ddiscan.locate, ddiscan.cli; "
            "assert 'huggingface_hub' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_repo_id_without_namespace(env, monkeypatch):
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_HUB_CACHE", str(env / "cache"))
    snapshot = add_snapshot(env / "cache", C1, weights(), repo="tiny")
    assert snapshot.parents[1].name == "models--tiny"
    adapter = write_adapter(env / "adapter", base_name="tiny")
    found = find_base(adapter)
    assert found.path == snapshot == Path(snapshot_download("tiny", cache_dir=env / "cache", local_files_only=True))
    (env / "p").mkdir()
    with pytest.raises(InputError) as exc:
        find_base(write_adapter(env / "a2", base_name="gpt2"), profiles=[env / "p"])
    assert str(env / "cache" / "models--gpt2") in str(exc.value) and "gpt2.ddiprofile" in str(exc.value)


def test_relative_path_name_is_not_a_repo_id(env):
    with pytest.raises(InputError, match=r"'\./base' is not a Hub repo id"):
        find_base(write_adapter(env / "adapter", base_name="./base"))
