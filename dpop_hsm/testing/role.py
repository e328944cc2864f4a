"""What the local authorization server and resource server share.

Both are handed the same state by :class:`~dpop_hsm.testing.LocalDPoPServers` (the settings a
test may change while they run, the counters, the token issuer, their own nonces, the request
log), and both log every request the same way before answering it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .plumbing import Counters, Handler, Nonces, Settings, target_path
from .tokens import TokenIssuer

__all__ = ["ServerRole"]


class ServerRole:
    """Base of the two servers: the shared state, and the request log entry.

    Subclasses build their own parts in :meth:`_setup`, not in ``__init__``, so the shared
    state is declared once.

    ``role`` (``"as"`` or ``"rs"``) names the server in the log and in its thread's name.
    """

    role: str

    def __init__(
        self,
        settings: Settings,
        *,
        counters: Counters,
        issuer: TokenIssuer,
        nonces: Nonces,
        seen: deque[dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.issuer = issuer
        self.nonces = nonces
        self.seen = seen
        self._setup()

    def _setup(self) -> None:
        """What a server builds on top of the shared state (routes, caches); called once."""

    def record(self, h: Handler) -> str:
        """Log that a request arrived and return its path (RFC 9112 §3.2, no query).

        The log says only whether ``Authorization`` and ``DPoP`` headers came, never their
        values: tests read it to check what was sent, and it must hold no token or proof.
        """
        path = target_path(h.path)
        self.seen.append(
            {
                "server": self.role,
                "path": path,
                "authorization": "Authorization" in h.headers,
                "dpop": "DPoP" in h.headers,
            }
        )
        return path
