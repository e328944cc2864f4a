"""Worker processes for the fleet tests: start, command and collect
``tests.support.fleet_worker``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class Fleet:
    """``n`` worker processes, each holding the same key, driven by JSON lines on stdio."""

    def __init__(self, n: int, init: dict[str, Any], *, timeout: float = 90) -> None:
        self._pool = ThreadPoolExecutor(max_workers=n)
        self.procs = [self._spawn() for _ in range(n)]
        try:
            answers = self.command(init, timeout=timeout)
            # SoftHSM2's file store, opened by a process while another logs in, sometimes
            # shows that process no token (or fails its login) for as long as it lives:
            # such a start is retried in a new process.
            for _attempt in range(5):
                failed = [i for i, a in enumerate(answers) if not a.get("ok")]
                if not failed:
                    break
                for i in failed:
                    self._stop(self.procs[i])
                    self.procs[i] = self._spawn()
                retried = [self.procs[i] for i in failed]
                self.send(init, retried)
                for i, answer in zip(failed, self.collect(retried, timeout=timeout), strict=True):
                    answers[i] = answer
        except BaseException:
            self.close()
            raise
        failed_answers = [a for a in answers if not a.get("ok")]
        if failed_answers:
            self.close()
            raise AssertionError(f"fleet workers failed to start: {failed_answers}")
        self.jkt = answers[0]["jkt"]

    def _spawn(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.fleet_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            text=True,
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send(
        self, command: dict[str, Any], procs: list[subprocess.Popen[str]] | None = None
    ) -> None:
        line = json.dumps(command) + "\n"
        for p in procs if procs is not None else self.procs:
            assert p.stdin is not None
            p.stdin.write(line)
            p.stdin.flush()

    def collect(
        self, procs: list[subprocess.Popen[str]] | None = None, *, timeout: float = 90
    ) -> list[dict[str, Any]]:
        """One answer per process (``{"ok": False, "error": "exited"}`` for one that died)."""
        chosen = procs if procs is not None else self.procs
        futures = [self._pool.submit(p.stdout.readline) for p in chosen if p.stdout]
        answers = []
        for future in futures:
            try:
                line = future.result(timeout=timeout)
            except FutureTimeout:
                self.close()
                raise AssertionError("a fleet worker did not answer in time") from None
            answers.append(json.loads(line) if line else {"ok": False, "error": "exited"})
        return answers

    def command(self, command: dict[str, Any], *, timeout: float = 90) -> list[dict[str, Any]]:
        self.send(command)
        return self.collect(timeout=timeout)

    @staticmethod
    def _stop(p: subprocess.Popen[str]) -> None:
        if p.stdin is not None:
            with contextlib.suppress(OSError):  # a killed worker's pipe is broken
                if p.poll() is None:
                    p.stdin.write('{"cmd": "exit"}\n')
                    p.stdin.flush()
            with contextlib.suppress(OSError):
                p.stdin.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()

    def close(self) -> None:
        for p in self.procs:
            self._stop(p)
        self._pool.shutdown(wait=False, cancel_futures=True)
