"""How fast ``ddiscan audit`` scores a collection, against ``ddiscan report`` (not a test).

    python benchmarks/audit.py [--n 1000] [--loop 8] [--cache-dir DIR] [--out benchmarks/RESULTS.md]

Generates (once, under ``--cache-dir``, default ``~/.cache/ddiscan-bench``) the
LLaMA-3.2-1B-shaped base of ``bench_scan.py`` and N PEFT adapters on it (float32; rank 8,
16, 32, 64 in turn, on q/k/v/o for four adapters then on every linear layer for the next
four, and so on), then measures in one run, in adapters per second:

* a loop of ``ddiscan report BASE A`` subprocesses (over the first ``--loop`` adapters, one
  full turn of the mix);
* one ``ddiscan report BASE A1 ... AN`` subprocess;
* ``ddiscan.audit`` with the profile built (``--base PROFILE``, a fresh database each) on a
  local cluster of 1 and of 2 worker processes, and on a ``dask scheduler`` with 2
  ``dask worker`` processes started here; cluster start-up is not counted;
* the profile build on 2 workers; the mean task (one adapter scored in-process); the
  per-task scheduler overhead (no-op tasks, and audit wall × workers / N − mean task);
  each worker's peak RSS; the database's size per 1,000 adapters.

Appends a section to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scan  # noqa: E402  the base generator and the model's shapes

RANKS = (8, 16, 32, 64)
TARGETS = (bench_scan.QKVO, bench_scan.ALL)


def adapter_kind(i: int) -> tuple[int, tuple]:
    return RANKS[i % 4], TARGETS[(i // 4) % 2]


def generate_adapters(root: Path, base: Path, n: int) -> list[Path]:
    from safetensors.numpy import save_file

    cfg, out = bench_scan.SHAPES["1b"], []
    for i in range(n):
        r, kinds = adapter_kind(i)
        target = root / "audit-adapters" / f"a{i:05d}-r{r}-{'qkvo' if kinds == bench_scan.QKVO else 'all'}"
        out.append(target)
        if (target / "adapter_config.json").exists():
            continue
        rng, tensors = np.random.default_rng(i), {}
        for layer in range(cfg["layers"]):
            for kind in kinds:
                d, k = bench_scan.module_shape(cfg, kind)
                key = f"base_model.model.{bench_scan.module_path(layer, kind)}"
                tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, k), dtype=np.float32) / math.sqrt(k))
                tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((d, r), dtype=np.float32) * 0.01 / math.sqrt(d))
        target.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": r,
                  "lora_alpha": 2 * r, "target_modules": list(kinds), "fan_in_fan_out": False, "use_rslora": False}
        (target / "adapter_config.json").write_text(json.dumps(config))
    return out


def timed(cmd) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def command(*args) -> list[str]:
    return [sys.executable, "-m", "ddiscan.cli", *map(str, args)]


def audit_rate(client, adapters, profile: Path, work: Path, name: str) -> dict:
    import ddiscan

    db = work / f"{name}.sqlite"
    start = time.perf_counter()
    result = ddiscan.audit(adapters, base=profile, db=db, client=client)
    wall = time.perf_counter() - start
    assert result.scanned == len(adapters) and result.errors == 0, result
    rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    size = sum(p.stat().st_size for p in work.glob(f"{name}.sqlite*"))
    return {"wall": wall, "rate": len(adapters) / wall, "rss_mb": max(rss.values()), "db_bytes": size,
            "workers": len(client.scheduler_info()["workers"])}


def noop_overhead(client, n: int = 400) -> float:
    from distributed import wait

    start = time.perf_counter()
    wait([client.submit(int, i, pure=False) for i in range(n)])
    return (time.perf_counter() - start) / n


def mean_task(adapters, profile: Path) -> float:
    from ddiscan.auditing.tasks import score_adapter
    from ddiscan.profile import Profile

    pin = Profile(profile).sha256
    score_adapter(str(adapters[0]), str(profile), pin, {})  # opens the profile once, as a worker does
    start = time.perf_counter()
    for a in adapters:
        assert score_adapter(str(a), str(profile), pin, {})["status"] == "ok"
    return (time.perf_counter() - start) / len(adapters)


def external_cluster(work: Path):
    file = work / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    while not (file.is_file() and file.stat().st_size):
        time.sleep(0.1)
    address = json.loads(file.read_text())["address"]
    procs += [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                "--no-dashboard", "--host", "127.0.0.1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    return address, procs


def measure(args) -> dict:
    from distributed import Client, LocalCluster

    import ddiscan

    cache = Path(args.cache_dir).expanduser()
    base = bench_scan.generate_base("1b", cache)
    adapters = generate_adapters(cache, base, args.n)
    work = Path(tempfile.mkdtemp(prefix="ddiscan-audit-bench-"))
    out: dict = {"n": args.n, "loop": args.loop}
    loop = adapters[: args.loop]
    out["loop_wall"] = sum(timed(command("report", base, a, "-q", "--format", "json", "-o", work / "r.json"))
                           for a in loop)
    out["loop_rate"] = len(loop) / out["loop_wall"]
    out["many_wall"] = timed(command("report", base, *adapters, "-q", "--format", "jsonl", "-o", work / "r.jsonl"))
    out["many_rate"] = args.n / out["many_wall"]
    for workers in (2, 1):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            if workers == 2:
                start = time.perf_counter()
                ddiscan.audit(adapters[:1], db=work / "profile.sqlite", client=client)
                out["profile_build"] = time.perf_counter() - start
                profile = next((work / "profile.sqlite.profiles").glob("*.ddiprofile"))
                out["noop_task"] = noop_overhead(client)
            out[f"local{workers}"] = audit_rate(client, adapters, profile, work, f"local{workers}")
    address, procs = external_cluster(work)
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            out["external2"] = audit_rate(client, adapters, profile, work, "external2")
    finally:
        for proc in procs:
            proc.kill()
    out["task"] = mean_task(adapters[: args.loop], profile)
    for name in ("local1", "local2", "external2"):
        run = out[name]
        run["overhead"] = run["wall"] * run["workers"] / args.n - out["task"]
    return out


def render(m: dict) -> str:
    n, l1, l2, ext = m["n"], m["local1"], m["local2"], m["external2"]
    rows = [("loop of `ddiscan report BASE A` (first %d)" % m["loop"], m["loop_rate"], "—", "—"),
            ("`ddiscan report BASE A1 … AN`", m["many_rate"], "—", "—")]
    rows += [(f"`audit`, {label}", r["rate"], f"{r['rss_mb']:.0f}", f"{r['overhead'] * 1e3:.0f}")
             for label, r in (("local, 1 worker", l1), ("local, 2 workers", l2), ("dask scheduler + 2 workers", ext))]
    table = ["| run | adapters/s | peak RSS per worker (MB) | overhead per task (ms) |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {r[0]} | {r[1]:.3g} | {r[2]} | {r[3]} |" for r in rows]
    db_per_k = l2["db_bytes"] / n * 1000 / 1e6
    return "\n".join([
        "", "---", "", "# ddiscan audit benchmark", "",
        f"Generated by `python benchmarks/audit.py --n {n} --loop {m['loop']}` "
        f"({time.strftime('%Y-%m-%d %H:%M')}); {os.cpu_count()} CPUs, {platform.platform()}, "
        "shared with other jobs. LLaMA-3.2-1B-shaped base (bfloat16, 2.5 GB); adapters rank 8–64 on q/k/v/o "
        "and on every linear layer, in turn.", "", *table, "",
        f"* profile build (2 workers, {math.ceil(len(bench_scan.ALL) * 16 / 8)} tasks): {m['profile_build']:.1f} s",
        f"* mean task (one adapter scored against the profile, in-process): {m['task'] * 1e3:.0f} ms",
        f"* scheduler round trip of a no-op task: {m['noop_task'] * 1e3:.2f} ms",
        f"* database: {db_per_k:.2f} MB per 1,000 adapters",
        f"* 2 workers / 1 worker: {l2['rate'] / l1['rate']:.2f} (target ≥ 1.8); "
        f"audit on 2 workers / loop of reports: {l2['rate'] / m['loop_rate']:.1f} (target ≥ 10)", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="adapters to generate and audit")
    parser.add_argument("--loop", type=int, default=8, help="adapters in the loop of report calls")
    parser.add_argument("--cache-dir", default="~/.cache/ddiscan-bench")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    measured = measure(args)
    text = render(measured)
    print(text)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
