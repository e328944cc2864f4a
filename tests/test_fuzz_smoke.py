"""A short coverage-guided fuzz run of every target, in CI: each target runs a few seconds.

Each target in ``fuzz/targets.py`` runs in its own libFuzzer subprocess for a fixed budget
(``DPOP_HSM_FUZZ_BUDGET`` seconds, default 3), two at a time on this 2-core budget, with a fresh
corpus seeded from the RFC vectors in a temp dir. A crash fails the test with atheris's
traceback and the crashing input (base64), ready to become a regression test in
``tests/test_fuzz_regressions.py``. The long run is ``scripts/fuzz --budget 600 --target NAME``.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGET = float(os.environ.get("DPOP_HSM_FUZZ_BUDGET", "3"))


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dpop_hsm_fuzz_runner", ROOT / "scripts/fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


runner = _load_runner()
from fuzz.targets import TARGETS  # noqa: E402  (the runner fixes sys.path first)

try:
    import atheris  # noqa: F401
except ImportError as e:  # pragma: no cover - atheris is in the dev dependency group on Linux
    pytest.skip(
        f"atheris cannot be imported ({e}); fuzzing needs Linux + the dev dependency group",
        allow_module_level=True,
    )


def report(request: pytest.FixtureRequest, line: str) -> None:
    """A line in pytest's own output, past output capture: executions per target, so a run
    shows how much each target really fuzzed."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if capture is None or reporter is None:  # pragma: no cover - plugins disabled
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture(scope="module")
def fuzz_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    corpus_root = tmp_path_factory.mktemp("fuzz-corpus")
    names = [name for name, target in TARGETS.items() if target.available()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(
            zip(
                names,
                pool.map(
                    lambda n: runner.run_target(n, budget=BUDGET, corpus_root=corpus_root), names
                ),
                strict=True,
            )
        )
    summary = ", ".join(
        f"{n}={r.executions}{' CRASHED' if r.crashed else ''}" for n, r in results.items()
    )
    crashed = sum(r.crashed for r in results.values())
    report(request, f"\nfuzz smoke ({BUDGET:g}s/target, executions): {summary}; {crashed} crashed")
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_runs_without_crashing(name: str, fuzz_results: dict[str, Any]) -> None:
    target = TARGETS[name]
    if not target.available():
        pytest.skip(f"{target.module} has not landed yet: nothing to fuzz")
    result = fuzz_results[name]
    if result.crashed:
        crashing = ""
        if result.artifact and Path(result.artifact).exists():
            crashing = base64.b64encode(Path(result.artifact).read_bytes()).decode()
        pytest.fail(
            f"fuzz target {name} crashed after {result.executions} executions "
            f"(rc={result.returncode}); input (base64): {crashing}\n{result.log_tail}"
        )
    assert result.executions > 0, f"{name}: libFuzzer reported no executions\n{result.log_tail}"


def test_libfuzzer_log_parsing() -> None:
    """The executed-input count comes from libFuzzer's own stats, with fallbacks."""
    final = "#1234\tDONE   cov: 10 ft: 20\nstat::number_of_executed_units: 1240\n"
    assert runner.parse_libfuzzer_log(final) == (1240, None)
    assert runner.parse_libfuzzer_log("#2\tINITED\n#77\tDONE   cov: 1\n") == (77, None)
    crash = "#9\tNEW\n==1== ERROR\nTest unit written to /tmp/x/crash-abc\n"
    assert runner.parse_libfuzzer_log(crash) == (9, "/tmp/x/crash-abc")
