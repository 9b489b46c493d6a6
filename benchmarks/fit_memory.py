"""Memory and speed of a long CPU ``fit`` under each way of serving freed memory, one run at a time.

    python benchmarks/fit_memory.py [--allocators release keep tcmalloc] [--rows bn uan] [--steps 1000] \
        [--out benchmarks/results/fit_memory.json]
    python benchmarks/fit_memory.py --probe [--allocators ...] [--out benchmarks/results/heap_probe.json]

Each run is the MNIST → USPS cell of ``da_table.py`` (batch 32 + 96, bf16 channels-last, validation every
100 steps, seed 3) for ``--steps`` steps, in a temporary run directory, with freed memory served by:

- ``release``: glibc's malloc as it is (``ADAMATCH_UAN_KEEP_FREED_MEMORY=0``);
- ``keep``: glibc's malloc keeping freed memory (``ADAMATCH_UAN_KEEP_FREED_MEMORY=1``, ``cpu_memory.py``);
- ``tcmalloc``: gperftools' tcmalloc preloaded (``LD_PRELOAD``; Debian's ``libtcmalloc-minimal4``), a
  caching allocator that keeps freed spans and releases them gradually.

The process's resident memory (VmRSS) is sampled every second. What decides whether a way of keeping memory
is safe for a long run is whether its memory stops growing: the JSON has each run's samples, its peak, the
peak of each half of training (by the last validation logged at each sample), and the seconds per step between the
first and the last validation (start, data loading and the final test excluded). The markdown table has
the peaks and the seconds per step. Run nothing else on the machine meanwhile.

``--probe`` runs instead, under each allocator, the pattern that makes a heap that keeps freed memory
grow: 200 times, a 64 MiB tensor allocated and freed while a small tensor made beside it lives on (torch
asks for 64-byte aligned blocks, which a freed block hemmed in by small ones cannot serve). It records
the resident memory and the page faults so far at every 40th iteration.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import da_table  # noqa: E402

from adamatch_uan.cli import cpu_memory  # noqa: E402

ALLOCATORS = ("release", "keep", "tcmalloc")
SAMPLES_KEPT_EVERY = 5  # the JSON keeps every 5th second's sample; the peaks come from all of them
PROBE = """
import json, resource, torch
from adamatch_uan.cli import cpu_memory
cpu_memory.from_environment()
def resident():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
small, points = [], []
for i in range(200):
    large = torch.ones(16 << 20)
    small.append(torch.ones(100 + i))
    del large
    if i % 40 == 0 or i == 199:
        points.append([i, round(resident(), 1), resource.getrusage(resource.RUSAGE_SELF).ru_minflt])
print(json.dumps(points))
"""
TCMALLOC = ("tcmalloc_minimal", "tcmalloc")


def tcmalloc_path() -> str | None:
    """The soname of an installed tcmalloc (the loader finds it for ``LD_PRELOAD``), or None."""
    return next(filter(None, map(ctypes.util.find_library, TCMALLOC)), None)


def environment(allocator: str) -> dict[str, str]:
    """The environment of a run under ``allocator``, without any preload the caller had."""
    env = {**os.environ, cpu_memory.VARIABLE: "1" if allocator == "keep" else "0"}
    env.pop("LD_PRELOAD", None)
    if allocator == "tcmalloc":
        path = tcmalloc_path()
        if path is None:
            raise SystemExit("error: --allocators tcmalloc: no tcmalloc library found; "
                             "install it (Debian: apt-get install libtcmalloc-minimal4) or leave tcmalloc out")
        env["LD_PRELOAD"] = path
    return env


def resident_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def validated(run_dir: Path) -> int:
    """The last step whose validation the run has logged so far (0 before the first)."""
    try:
        return max((step for step, _, _ in da_table.target_curve(run_dir)), default=0)
    except (OSError, KeyError, ValueError):  # not written yet, or caught mid-write
        return 0


def run(row: str, allocator: str, steps: int, data_root: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        command = da_table.command("mnist_usps", row, seed, steps, data_root, run_dir, "bf16-nhwc")
        start = time.perf_counter()
        # stderr to a file: a pipe nobody reads until the end would block a run that writes more than it holds.
        log = (Path(folder) / "stderr.txt").open("w")
        process = subprocess.Popen(command, cwd=da_table.ROOT, env=environment(allocator),
                                   stdout=subprocess.DEVNULL, stderr=log, text=True)
        samples: list[list[float]] = []  # [seconds since launch, RSS MiB, last validated step]
        while process.poll() is None:
            rss = resident_mib(process.pid)
            if rss is not None:
                samples.append([round(time.perf_counter() - start, 1), round(rss, 1), validated(run_dir)])
            time.sleep(1.0)
        wall = time.perf_counter() - start
        log.close()
        stderr = (Path(folder) / "stderr.txt").read_text()
        if process.returncode != 0:
            raise SystemExit(f"error: {row} under {allocator} failed (status {process.returncode}):\n{stderr[-2000:]}")
        curve = da_table.target_curve(run_dir)
    times = {step: seconds for step, _, seconds in curve if seconds is not None}
    first, last = min(times), max(times)
    middle = (first + last) // 2
    # A sample's step is the last validation logged by then: halves of training by step, the start (before
    # the first validation) and the final test (after the last) left out.
    halves = [[rss for _, rss, step in samples if first <= step < middle],
              [rss for _, rss, step in samples if middle <= step < last]]
    return {"row": row, "allocator": allocator, "steps": steps, "seed": seed, "wall_s": round(wall, 1),
            "s_per_step": (times[last] - times[first]) / (last - first),
            "peak_rss_mib": max(rss for _, rss, _ in samples),
            "peak_rss_first_half_mib": max(halves[0], default=None),
            "peak_rss_second_half_mib": max(halves[1], default=None),
            "validation_times_s": times, "rss_samples": samples[::SAMPLES_KEPT_EVERY]}


def probe(allocator: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=da_table.ROOT, env=environment(allocator),
                          capture_output=True, text=True, check=True)
    points = json.loads(done.stdout)
    return {"allocator": allocator, "points": [dict(zip(("iteration", "rss_mib", "page_faults"), p)) for p in points]}


def probe_table(rows: list[dict]) -> str:
    first = rows[0]["points"]
    lines = ["| allocator | " + " | ".join(f"iteration {p['iteration']}: RSS MiB, faults" for p in first) + " |",
             "|---|" + "---:|" * len(first)]
    for r in rows:
        lines.append(f"| {r['allocator']} | " + " | ".join(f"{p['rss_mib']:.0f}, {p['page_faults']}" for p in r["points"]) + " |")
    return "\n".join(lines) + "\n"


def compact(text: str) -> str:
    """Indented JSON with each innermost list (a sample) on one line."""
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def table(rows: list[dict]) -> str:
    lines = ["| row | allocator | s/step | peak RSS MiB | peak, 1st half of training | peak, 2nd half | wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['allocator']} | {r['s_per_step']:.3f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_first_half_mib'] or 0:.0f} | {r['peak_rss_second_half_mib'] or 0:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    parser.add_argument("--rows", nargs="+", choices=["bn", "mn", "uan"], default=["bn", "uan"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--data-root", default=str(da_table.ROOT.parent / "shared" / "data"))
    parser.add_argument("--probe", action="store_true", help="the heap-growth probe instead of fits")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or da_table.RESULTS / ("heap_probe.json" if args.probe else "fit_memory.json")
    for allocator in args.allocators:
        environment(allocator)  # a missing library fails before any run
    meta = {"command": "python benchmarks/fit_memory.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
            "machine": da_table.machine(), "commit": da_table.commit()}
    if args.probe:
        rows = [probe(allocator) for allocator in args.allocators]
        out.write_text(json.dumps({**meta, "probes": rows}, indent=1) + "\n")
        out.with_suffix(".md").write_text(probe_table(rows))
        print(probe_table(rows))
        return
    rows = []
    for row in args.rows:
        for allocator in args.allocators:
            rows.append(run(row, allocator, args.steps, args.data_root, args.seed))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    out.write_text(compact(json.dumps({**meta, "runs": rows}, indent=1)) + "\n")
    text = table(rows)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
