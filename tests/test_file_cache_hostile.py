"""FileTokenCache and fork(), with real files and flocks: a fork() during a renewal must leave
the child neither the parent's lock nor a renewal that never ends.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpop_hsm.file_cache import FileTokenCache
from dpop_hsm.signers.software import SoftwareSigner
from dpop_hsm.testing import ClientRegistration, LocalDPoPServers
from dpop_hsm.token import Renewal, TokenClient

SECRET = "file-hostile-secret-77d1"  # a fixture value the local AS registers


@pytest.fixture
def servers() -> Iterator[LocalDPoPServers]:
    with LocalDPoPServers(clients=[ClientRegistration("c", client_secret=SECRET)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return SoftwareSigner.generate("ES256")


def _client(srv: LocalDPoPServers, signer: SoftwareSigner, cache: Any) -> TokenClient:
    return TokenClient(
        signer,
        token_endpoint=srv.token_endpoint,
        client_id="c",
        client_secret=SECRET,
        scope="api",
        cache=cache,
        timeout=(2.0, 2.0),
    )


def _answer(fd: int) -> bytes:
    ready, _, _ = select.select([fd], [], [], 10)
    assert ready, "the child did not answer"
    return os.read(fd, 200)


def test_fork_during_a_renewal_leaves_the_child_no_lock_and_no_stuck_renewal(
    tmp_path: Path, servers: LocalDPoPServers, signer: SoftwareSigner
) -> None:
    """fork() copies one thread. A child forked while another thread renewed (1) kept a copy of
    that thread's lock descriptor, holding the fleet lock for as long as it lived, and (2) saw
    the client's renewal slot taken by a thread it does not have: it waited out every request's
    timeout and failed, for good."""
    directory = tmp_path / "cache"
    cache = FileTokenCache(directory)
    client = _client(servers, signer, cache)
    servers.token_delay = 1.0  # the renewal is at the AS when we fork
    renewer = threading.Thread(target=client.get_token, daemon=True)
    renewer.start()
    deadline = time.monotonic() + 10
    while servers.counters.token_requests < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert servers.counters.token_requests >= 1, "the renewal never reached the AS"
    answer_r, answer_w = os.pipe()  # child -> parent
    exit_r, exit_w = os.pipe()  # parent -> child: "you may exit now"
    pid = os.fork()
    if pid == 0:  # the child: answer, wait to be told, never return into pytest
        code = 1
        try:
            slot = client.try_acquire()
            os.write(answer_w, b"free" if isinstance(slot, Renewal) else b"taken")
            _answer(exit_r)
            code = 0
        finally:
            os._exit(code)
    try:
        assert _answer(answer_r) == b"free"
        renewer.join(timeout=10)
        assert not renewer.is_alive()
        # The child still lives: yet the parent's released lock is free for the next process.
        other = FileTokenCache(directory)
        attempt = other.lock(client.cache_key, 1.0)
        assert attempt.held
        attempt.release()
    finally:
        os.write(exit_w, b"exit")
        os.waitpid(pid, 0)
        for fd in (answer_r, answer_w, exit_r, exit_w):
            os.close(fd)
