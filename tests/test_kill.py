"""Nothing lost: ``ddiscan prune`` killed at random points, and writes onto a full disk.

``prune`` is run in real processes on an adapter holding 24 MB of tensors (one scored LoRA
pair and a ``modules_to_save`` weight that is copied byte for byte, so the write takes tens
of milliseconds), and SIGKILLed at random moments: most while its temporary output exists
(the write itself), the rest anywhere in its life. After each kill the output path holds
nothing or the complete output, byte for byte the reference prune's; the inputs are
unchanged; and the temporaries a killed writer leaves (``.NAME.PID.*.ddiscan-tmp``) are
removed by the next run, which then writes the reference output.

A full disk (a 64 KiB tmpfs when this process may mount one, otherwise a file write
patched to raise ENOSPC) gives exit 4, one ``Error:`` line, and no output or temporary.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddiscan.cli import cli
from ddiscan.io import writer
from ddiscan.io.writer import remove_stale_temps

from safetensors_builders import llama_base_tensors, llama_peft_tensors, peft_config, save, write_peft_dir

TRIALS_FILE = 30
TRIALS_DIR = 10
BIG = (3072, 2048)  # float32: 24 MiB copied unchanged into the output

try:
    RUNNER = CliRunner(mix_stderr=False)
except TypeError:
    RUNNER = CliRunner()

ENV = {k: v for k, v in os.environ.items() if k != "DDISCAN_DEBUG"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(path: Path) -> dict[str, str]:
    """File name → sha256 of a file, or of each file in a directory."""
    if path.is_dir():
        return {p.name: sha(p) for p in sorted(path.iterdir())}
    return {path.name: sha(path)}


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".ddiscan-tmp", ".ddiscan-old")))


def adapter_tensors() -> dict:
    tensors = llama_peft_tensors(1, 4)
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = (
        np.random.default_rng(3).standard_normal(BIG).astype(np.float32))
    return tensors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    base = save(root / "base.safetensors", llama_base_tensors(1))
    adapter_file = save(root / "adapter.safetensors", adapter_tensors())
    adapter_dir = write_peft_dir(root / "adapter", adapter_tensors(), peft_config(4, 8))
    (adapter_dir / "README.md").write_text("an adapter\n")
    return root, base, adapter_file, adapter_dir


def prune_args(base, adapter, output, *extra):
    return [sys.executable, "-m", "ddiscan.cli", "prune", str(base), str(adapter), "--top", "2", "-o", str(output),
            "-q", *extra]


def run_prune(base, adapter, output, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(prune_args(base, adapter, output, *extra), capture_output=True, text=True, env=ENV,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def kill_trials(base, adapter, out_dir: Path, name: str, trials: int, reference: dict, rng: random.Random) -> dict:
    """Run ``trials`` prunes into ``out_dir/name``, each SIGKILLed at a random moment."""
    output = out_dir / name
    # how long a run takes, and how long its temporary lives
    start = time.monotonic()
    proc = subprocess.Popen(prune_args(base, adapter, output), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    seen = None
    while proc.poll() is None:
        if seen is None and temps(out_dir):
            seen = time.monotonic()
        time.sleep(0.0005)
    total, write = time.monotonic() - start, time.monotonic() - (seen or start)
    assert proc.returncode == 0 and tree(output) == reference
    stats = {"trials": 0, "complete": 0, "nothing": 0, "left_temps": 0, "killed_while_writing": 0}
    for trial in range(trials):
        if output.is_dir():
            for p in output.iterdir():
                p.unlink()
            output.rmdir()
        elif output.exists():
            output.unlink()
        proc = subprocess.Popen(prune_args(base, adapter, output), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        if trial % 4 == 3:  # anywhere in the process's life
            time.sleep(rng.uniform(0, total))
        else:  # during the write: once the temporary exists
            deadline = time.monotonic() + 30
            while not temps(out_dir) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)
            stats["killed_while_writing"] += proc.poll() is None
            time.sleep(rng.uniform(0, write) if trial % 4 else rng.uniform(0.8 * write, 1.5 * write))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stats["trials"] += 1
        if os.path.lexists(output):
            assert tree(output) == reference, f"trial {trial}: a partial output"
            stats["complete"] += 1
        else:
            stats["nothing"] += 1
        stats["left_temps"] += bool(temps(out_dir))
    return stats


def test_sigkill_never_leaves_a_partial_output(inputs, tmp_path):
    root, base, adapter_file, adapter_dir = inputs
    before = {p: sha(p) for p in (base, adapter_file, *adapter_dir.iterdir())}
    rng = random.Random(7)
    summary = {}
    for adapter, name, trials in ((adapter_file, "pruned.safetensors", TRIALS_FILE), (adapter_dir, "pruned", TRIALS_DIR)):
        out_dir = tmp_path / name.replace(".", "-")
        out_dir.mkdir()
        ref_dir = tmp_path / f"ref-{name}"
        ref_dir.mkdir()
        run_prune(base, adapter, ref_dir / name)
        reference = tree(ref_dir / name)
        stats = kill_trials(base, adapter, out_dir, name, trials, reference, rng)
        summary[name] = stats
        # the kills did land inside writes (most do; a loaded machine may shift a few)
        assert stats["killed_while_writing"] >= 1 and stats["left_temps"] >= 1, stats
        # the next run removes the dead writers' temporaries and writes the reference
        run_prune(base, adapter, out_dir / name, "--force")
        assert temps(out_dir) == []
        assert tree(out_dir / name) == reference
        assert {p: sha(p) for p in before} == before
    print(f"\nkills: {summary}")
    assert sum(s["trials"] for s in summary.values()) == TRIALS_FILE + TRIALS_DIR


def test_temporaries_of_a_live_writer_are_kept(tmp_path):
    """Only dead writers' temporaries are removed: a live pid's, and names without a pid, stay."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        out = tmp_path / "out.safetensors"
        live_tmp = tmp_path / f".out.safetensors.{sleeper.pid}.abc.ddiscan-tmp"
        dead_tmp = tmp_path / f".out.safetensors.{dead.pid}.abc.ddiscan-tmp"
        dead_dir = tmp_path / f".out.safetensors.{dead.pid}.def.ddiscan-tmp"
        old_style = tmp_path / ".out.safetensors.k2j3h4.ddiscan-tmp"
        other = tmp_path / f".other.safetensors.{dead.pid}.abc.ddiscan-tmp"
        dead_old = tmp_path / f".out.safetensors.{dead.pid}.ghi.ddiscan-old"
        for p in (live_tmp, dead_tmp, old_style, other):
            p.write_bytes(b"x")
        dead_dir.mkdir()
        (dead_dir / "adapter_model.safetensors").write_bytes(b"x")
        dead_old.mkdir()
        (dead_old / "out.safetensors").write_bytes(b"the previous output")
        # the output is missing: the -old copy may be the only one, so it stays
        assert sorted(remove_stale_temps(out)) == sorted([dead_tmp, dead_dir])
        assert live_tmp.exists() and old_style.exists() and other.exists() and dead_old.exists()
        out.write_bytes(b"new")
        assert remove_stale_temps(out) == [dead_old]
        assert live_tmp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------
# Full disk


def _try_tmpfs(directory: Path) -> bool:
    directory.mkdir()
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)],
                          capture_output=True, timeout=30)
    return proc.returncode == 0


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A directory where writes fail with ENOSPC: a 64 KiB tmpfs, or a patched write."""
    directory = tmp_path / "full"
    mounted = _try_tmpfs(directory)
    limit = {"bytes": 64 * 1024}
    if not mounted:
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, f):
                self.f, self.written = f, 0

            def write(self, data):
                self.written += len(data)
                if self.written > limit["bytes"]:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        monkeypatch.setattr(writer.os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    try:
        yield directory, mounted, limit
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True, timeout=30)


def _assert_full_disk_error(code, stdout, stderr, directory):
    assert code == 4, (code, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "No space left on device" in lines[0], lines
    assert "Traceback" not in stdout + stderr
    assert os.listdir(directory) == []


@pytest.mark.parametrize("what", ["prune file", "prune directory", "report -o"])
def test_full_disk_is_exit_4_with_nothing_written(inputs, full_disk, what, monkeypatch):
    monkeypatch.delenv("DDISCAN_DEBUG", raising=False)
    root, base, adapter_file, adapter_dir = inputs
    directory, mounted, limit = full_disk
    before = {p: sha(p) for p in (base, adapter_file, *adapter_dir.iterdir())}
    args = {
        "prune file": ["prune", str(base), str(adapter_file), "--top", "1", "-o", str(directory / "p.safetensors"), "-q"],
        "prune directory": ["prune", str(base), str(adapter_dir), "--top", "1", "-o", str(directory / "p"), "-q"],
        "report -o": ["report", str(base), str(adapter_file), "-o", str(directory / "r.json"), "-q"],
    }[what]
    filler = directory / "filler"
    if what == "report -o":  # a report is smaller than 64 KiB: the disk is full already
        if mounted:
            with open(filler, "wb", buffering=0) as f:
                with pytest.raises(OSError) as exc:
                    while True:
                        f.write(bytes(4096))
                assert exc.value.errno == errno.ENOSPC
        else:
            limit["bytes"] = 0
    if mounted:
        proc = subprocess.run([sys.executable, "-m", "ddiscan.cli", *args], capture_output=True, text=True,
                              env=ENV, timeout=120, stdin=subprocess.DEVNULL)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        result = RUNNER.invoke(cli, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    if filler.exists():
        filler.unlink()
    _assert_full_disk_error(code, "" if what.startswith("prune") else stdout, stderr, directory)
    assert {p: sha(p) for p in before} == before
