"""Nothing lost: ``ddiscan prune`` killed at every step of its write, and writes onto a full disk.

``prune`` is run in real processes on an adapter holding 24 MB of tensors (one scored LoRA
pair and a ``modules_to_save`` weight that is copied byte for byte). Each run is SIGKILLed
at a chosen point of its write, deterministically, whatever the machine's load: the
process kills itself at the n-th call of ``os.fsync`` or ``os.replace`` (for every n the
write makes), or once n bytes of output have been written (a small driver patches those
functions before it runs the CLI). A few more runs are killed at random moments. After
each kill the output path holds nothing or the complete output, byte for byte the
reference prune's; the inputs are unchanged; and the temporaries a killed writer leaves
(``.NAME.PID.*.ddiscan-tmp``) are removed by the next run, which then writes the
reference output.

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

RANDOM_KILLS = 4
BIG = (3072, 2048)  # float32: 24 MiB copied unchanged into the output
WRITE_POINTS = (0, 1 << 20, 12 << 20, 24 << 20)  # bytes of output written before the kill

try:
    RUNNER = CliRunner(mix_stderr=False)
except TypeError:
    RUNNER = CliRunner()

ENV = {k: v for k, v in os.environ.items() if k != "DDISCAN_DEBUG"}

# Runs the CLI with one of os.fsync / os.replace / the output's writes patched to SIGKILL
# the process at the n-th call (n = 0: never; the counts are then printed to fd 3).
DRIVER = r"""
import os, signal, sys
point, n = sys.argv[1], int(sys.argv[2])
counts = {"fsync": 0, "replace": 0, "write": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counting(name, real):
    def call(*args, **kwargs):
        counts[name] += 1
        if point == name and counts[name] == n:
            die()
        return real(*args, **kwargs)
    return call

os.fsync = counting("fsync", os.fsync)
os.replace = counting("replace", os.replace)
real_fdopen = os.fdopen

class Dying:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        if point == "write" and counts["write"] + len(data) > n:
            self.f.write(data[: max(n - counts["write"], 0)])
            self.f.flush()
            die()
        counts["write"] += len(data)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

os.fdopen = lambda fd, *a, **k: Dying(real_fdopen(fd, *a, **k))
from ddiscan.cli import cli
try:
    cli.main(sys.argv[3:], prog_name="ddiscan")
finally:
    if n == 0:
        print(counts["fsync"], counts["replace"], counts["write"], file=sys.stderr)
"""


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


def cli_args(base, adapter, output, *extra):
    return ["prune", str(base), str(adapter), "--top", "2", "-o", str(output), "-q", *extra]


def run_prune(base, adapter, output, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ddiscan.cli", *cli_args(base, adapter, output, *extra)],
                          capture_output=True, text=True, env=ENV, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def driven(point: str, n: int, base, adapter, output) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, point, str(n), *cli_args(base, adapter, output)],
                          capture_output=True, text=True, env=ENV, timeout=120, stdin=subprocess.DEVNULL)


def remove(output: Path) -> None:
    if output.is_dir():
        for p in output.iterdir():
            p.unlink()
        output.rmdir()
    elif output.exists():
        output.unlink()


def check_after_kill(output: Path, reference: dict, what: str) -> bool:
    """Nothing or the whole output at ``output``; whether it is there."""
    if os.path.lexists(output):
        assert tree(output) == reference, f"{what}: a partial output"
        return True
    return False


def kill_points(base, adapter, out_dir: Path, name: str, reference: dict) -> list[tuple[str, int]]:
    """Every fsync and rename of one prune, and four points inside its write."""
    counted = driven("none", 0, base, adapter, out_dir / name)
    assert counted.returncode == 0, counted.stderr
    fsyncs, replaces, written = map(int, counted.stderr.split()[-3:])
    assert tree(out_dir / name) == reference and fsyncs >= 2 and replaces >= 1 and written > WRITE_POINTS[-1]
    remove(out_dir / name)
    return ([("fsync", n) for n in range(1, fsyncs + 1)] + [("replace", n) for n in range(1, replaces + 1)]
            + [("write", n) for n in WRITE_POINTS])


def test_sigkill_never_leaves_a_partial_output(inputs, tmp_path):
    root, base, adapter_file, adapter_dir = inputs
    before = {p: sha(p) for p in (base, adapter_file, *adapter_dir.iterdir())}
    rng = random.Random(7)
    summary = {}
    for adapter, name in ((adapter_file, "pruned.safetensors"), (adapter_dir, "pruned")):
        out_dir = tmp_path / name.replace(".", "-")
        out_dir.mkdir()
        ref_dir = tmp_path / f"ref-{name}"
        ref_dir.mkdir()
        run_prune(base, adapter, ref_dir / name)
        reference = tree(ref_dir / name)
        output = out_dir / name
        points = kill_points(base, adapter, out_dir, name, reference)
        stats = {"kills": 0, "complete": 0, "left_temps": 0}
        for point, n in points:
            remove(output)
            proc = driven(point, n, base, adapter, output)
            assert proc.returncode == -signal.SIGKILL, (point, n, proc.returncode, proc.stderr)
            stats["kills"] += 1
            stats["complete"] += check_after_kill(output, reference, f"killed at {point} #{n}")
            if point == "write":  # inside the write: the temporary is there, the output is not
                assert temps(out_dir) and not os.path.lexists(output), (point, n)
            stats["left_temps"] += bool(temps(out_dir))
            # the next run (here in-process) removes the dead writer's temporaries, writes the reference
            result = RUNNER.invoke(cli, cli_args(base, adapter, output, "--force"))
            assert result.exit_code == 0, result.output
            assert temps(out_dir) == [] and tree(output) == reference, (point, n)
        # the last fsync (the directory's, after the rename) leaves the complete output
        assert stats["complete"] >= 1 and stats["left_temps"] >= len(WRITE_POINTS), stats
        for _ in range(RANDOM_KILLS):  # and anywhere in a run's life
            remove(output)
            proc = subprocess.Popen([sys.executable, "-m", "ddiscan.cli", *cli_args(base, adapter, output)],
                                    env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL)
            time.sleep(rng.uniform(0, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stats["kills"] += 1
            check_after_kill(output, reference, "killed at a random moment")
        run_prune(base, adapter, output, "--force")
        assert temps(out_dir) == [] and tree(output) == reference
        assert {p: sha(p) for p in before} == before
        summary[name] = stats
    print(f"\nkills: {summary}")


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
