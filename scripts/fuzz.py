"""Run the atheris fuzz targets in ``fuzz/targets.py`` for a fixed budget each.

    scripts/fuzz --budget 10                 # every target, 10 s each (CI: 3 s, via pytest)
    scripts/fuzz --budget 600 --target verify  # the long run of one target
    scripts/fuzz --list

Each target runs in its own subprocess (libFuzzer owns the process and exits on a crash), with
its corpus in ``fuzz-corpus/<target>`` (git-ignored; seeded from the RFC vectors and freshly
generated valid inputs at start) and crash artifacts in ``fuzz-corpus/crashes/``. The summary
line per target gives libFuzzer's own count of executed inputs and whether it crashed; the exit
status is non-zero when any target crashed. Crashes become regression tests in
``tests/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The repo root goes first: this script's own directory would otherwise make ``fuzz`` resolve
# to scripts/fuzz.py instead of the fuzz/ package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]

_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(r"^#(\d+)\s+DONE", re.MULTILINE)
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)
_CRASH_FILE = re.compile(r"Test unit written to (\S+)")


@dataclass(frozen=True)
class Result:
    """One target's run: libFuzzer's executed-input count, crash state, and where to look."""

    target: str
    executions: int
    crashed: bool
    seconds: float
    returncode: int
    artifact: str | None
    log_tail: str
    skipped: str | None = None


def parse_libfuzzer_log(stderr: str) -> tuple[int, str | None]:
    """Executed inputs (final stats, else the ``#N DONE`` line, else the last progress line)
    and the crash artifact path if libFuzzer wrote one."""
    executions = 0
    for pattern in (_EXECUTED, _DONE, _PROGRESS):
        found = pattern.findall(stderr)
        if found:
            executions = int(found[-1])
            break
    artifact = _CRASH_FILE.findall(stderr)
    return executions, artifact[-1] if artifact else None


def _interesting_tail(stderr: str) -> str:
    """The Python traceback atheris printed (if any) plus libFuzzer's last lines."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if "Uncaught Python exception" in line), None)
    head = lines[start : start + 40] if start is not None else []
    return "\n".join([*head, *lines[-12:]])


def write_seeds(target_name: str, corpus: Path) -> int:
    """Write the target's seeds into its corpus directory (content-addressed, idempotent)."""
    from fuzz.targets import TARGETS

    corpus.mkdir(parents=True, exist_ok=True)
    seeds = TARGETS[target_name].seeds()
    for seed in seeds:
        (corpus / ("seed-" + hashlib.sha256(seed).hexdigest()[:16])).write_bytes(seed)
    return len(seeds)


def run_target(name: str, *, budget: float, corpus_root: Path, runs: int | None = None) -> Result:
    """Fuzz one target in a subprocess for ``budget`` seconds (or ``runs`` inputs)."""
    from fuzz.targets import TARGETS

    target = TARGETS[name]
    if not target.available():
        return Result(name, 0, False, 0.0, 0, None, "", skipped=f"{target.module} not present")
    corpus = corpus_root / name
    crashes = corpus_root / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    write_seeds(name, corpus)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--",
        f"-max_total_time={max(1, int(budget))}",
        f"-max_len={target.max_len}",
        "-timeout=10",  # one input taking > 10 s is a hang: reported as a crash
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={crashes}/{name}-",
        str(corpus),
    ]
    if runs is not None:
        command.insert(-1, f"-runs={runs}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        errors="replace",
        env=env,
        cwd=ROOT,
        timeout=budget + 120,  # generous: startup, seed generation, final merge
        check=False,
    )
    elapsed = time.monotonic() - started
    executions, artifact = parse_libfuzzer_log(proc.stderr)
    crashed = proc.returncode != 0 or artifact is not None
    return Result(
        name,
        executions,
        crashed,
        elapsed,
        proc.returncode,
        artifact,
        _interesting_tail(proc.stderr),
    )


def worker(name: str, libfuzzer_args: list[str]) -> None:
    """Inside the subprocess: instrument dpop_hsm for coverage, then hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["dpop_hsm"]):
        from fuzz.targets import TARGETS

        one = TARGETS[name].prepare()
    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--worker"]:
        name = args[1]
        rest = args[3:] if args[2:3] == ["--"] else args[2:]
        worker(name, rest)
        return 0  # not reached: atheris.Fuzz() exits the process

    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per target")
    parser.add_argument(
        "--target", action="append", choices=sorted(TARGETS), help="repeatable; default: all"
    )
    parser.add_argument("--runs", type=int, default=None, help="stop after N inputs per target")
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        default=ROOT / "fuzz-corpus",
        help="corpus root (default: fuzz-corpus/, git-ignored)",
    )
    parser.add_argument("--list", action="store_true", help="list targets and exit")
    options = parser.parse_args(args)

    if options.list:
        for name, target in TARGETS.items():
            state = "available" if target.available() else f"unavailable ({target.module})"
            print(f"{name:18} {state}")
        return 0

    results = []
    for name in options.target or list(TARGETS):
        result = run_target(
            name, budget=options.budget, corpus_root=options.corpus_dir, runs=options.runs
        )
        results.append(result)
        if result.skipped:
            print(f"{name:18} skipped: {result.skipped}", flush=True)
            continue
        status = "CRASH" if result.crashed else "ok"
        print(
            f"{name:18} {status:5} executions={result.executions:<9} "
            f"({result.executions / max(result.seconds, 1e-9):,.0f}/s over {result.seconds:.1f}s)",
            flush=True,
        )
        if result.crashed:
            print(f"  artifact: {result.artifact}\n{result.log_tail}", flush=True)
    ran = [r for r in results if not r.skipped]
    crashed = [r for r in ran if r.crashed]
    total = sum(r.executions for r in ran)
    print(f"fuzz: {len(ran)} targets, {total} executions, {len(crashed)} crashed", flush=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
