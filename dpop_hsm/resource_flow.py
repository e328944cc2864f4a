"""The resource-server side of DPoP, decided once for every HTTP library (RFC 9449 §7, §9).

Sans-IO. An adapter (requests, httpx, aiohttp) asks this module three things and only does the
I/O around the answers:

* :meth:`ResourceFlow.stamp` — the ``Authorization: DPoP <token>`` and ``DPoP`` header values
  for one request: a fresh proof for its method and URL, with ``ath`` and the origin's latest
  nonce (§7.1, §9). Signs, so it may block on hardware.
* :meth:`ResourceFlow.classify` — what a response means: pass it on, retry once with the nonce
  the server just sent (§9), renew the token and resend once (``invalid_token``), or reject.
  Every response feeds the nonce store first (a server may rotate nonces on any response, §8.2).
* :meth:`ResourceFlow.redirect` — what a redirect hop gets: a new proof on the same origin,
  nothing on another origin (or a refusal). HTTP libraries re-send the old headers to the new
  URL; a proof names one method and URL (§4.3) and a token belongs to one server.

Retry rules (§9, RFC 9110 §15.5.2): at most ONE resend per request, never a loop — a second
``use_dpop_nonce``, a nonce challenge without a nonce, or the very nonce just rejected is a
:class:`~dpop_hsm.errors.NonceError`; a body that cannot be replayed (a stream, a generator)
is never re-sent. A 401 without a ``DPoP`` challenge is not ours to handle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache, partial
from typing import Literal, NamedTuple, Protocol

from .challenges import find_challenge
from .errors import ConfigurationError, NonceError, RedirectError, UnauthorizedError
from .htu import origin_of, require_https, safe_url
from .nonces import NonceStore
from .proof import ProofFactory
from .sansio import header_values
from .token_endpoint import Token

__all__ = [
    "CHALLENGE_STATUSES",
    "Action",
    "Decision",
    "FlowAdapter",
    "RedirectPolicy",
    "ResourceFlow",
    "Stamp",
    "TokenSource",
    "nonce_fields",
]

RedirectPolicy = Literal["strip", "refuse"]
# The only statuses whose header fields classify() reads (a WWW-Authenticate challenge, RFC 9449
# §7.1); for any other status an adapter may skip decoding all but DPoP-Nonce (nonce_fields).
CHALLENGE_STATUSES = frozenset({401, 403})


def nonce_fields(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The ``DPoP-Nonce`` fields among a response's raw header fields, decoded, in order.

    All that :meth:`ResourceFlow.observe` and :meth:`ResourceFlow.classify` read of a response
    whose status is not in :data:`CHALLENGE_STATUSES`: an adapter hands them this instead of
    decoding every field of every response (httpx's ``multi_items()`` alone is ~1% of a
    request). Latin-1 never fails; a nonce that is not ASCII is invalid however it is decoded
    (RFC 9449 §8.1), so the store ignores it either way.
    """
    return [
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k.lower() == b"dpop-nonce"
    ]


class TokenSource(Protocol):
    """What :class:`ResourceFlow` needs of a token client (``TokenClient`` has all of it)."""

    @property
    def nonces(self) -> NonceStore: ...

    @property
    def proofs(self) -> ProofFactory: ...

    def invalidate(self, token: Token | None = None) -> None: ...


class Action(Enum):
    """What the adapter does with a response."""

    PASS = "pass"  # noqa: S105 - hand the response to the application
    RETRY_NONCE = "retry_nonce"  # re-stamp (new proof, the new nonce) and resend once
    RENEW = "renew"  # the token was refused: renew it, re-stamp and resend once


class Stamp(NamedTuple):
    """The credentials put on one request, and what the response must be judged against.

    A named tuple, not a frozen dataclass: one is built per request, and a frozen dataclass's
    ``__init__`` (one ``object.__setattr__`` per field) cost more than the rest of the adapters'
    per-request bookkeeping together (measured with ``scripts/bench_async.py``).
    """

    authorization: str
    proof: str
    token: Token
    nonce: str | None  # the nonce the proof carries (a challenge handing it back is a loop)
    url: str
    method: str

    def __repr__(self) -> str:  # the Authorization value is the token itself; the proof too
        # The URL as error messages show it: a query may hold an API key or a code.
        where = safe_url(self.url)
        return f"Stamp({self.method} {where}, token=****, proof=****, nonce={self.nonce!r})"


# Hot path: the tuple built directly, without the Python-level ``__new__`` a NamedTuple has.
_new_stamp = partial(tuple.__new__, Stamp)


@dataclass(frozen=True)
class Decision:
    action: Action
    error: str | None = None


_PASS = Decision(Action.PASS)  # frozen: one shared instance for the common case


@lru_cache(maxsize=512)
def _check_target(url: str) -> None:
    """Refuse a resource URL before any token is fetched or sent (https except loopback)."""
    # Per request on the hot path; a pure function of the string, and only URLs that pass are
    # cached (a raising call caches nothing), so a refused URL is refused every time.
    require_https(url, "resource URL")


class ResourceFlow:
    """The rules of §7 and §9 for one token client, shared by every adapter.

    ``raise_on_rejection``: a final 401/403 with a ``DPoP`` challenge carrying an ``error``
    raises :class:`UnauthorizedError` instead of being handed back. ``cross_origin_redirects``:
    ``"strip"`` follows a redirect to another origin without credentials, ``"refuse"`` raises
    :class:`RedirectError`.
    """

    def __init__(
        self,
        token_client: TokenSource,
        *,
        raise_on_rejection: bool,
        cross_origin_redirects: RedirectPolicy = "strip",
    ) -> None:
        if cross_origin_redirects not in ("strip", "refuse"):
            raise ConfigurationError("cross_origin_redirects must be 'strip' or 'refuse'")
        self.token_client = token_client
        self.raise_on_rejection = raise_on_rejection
        self.cross_origin_redirects: RedirectPolicy = cross_origin_redirects

    # The cached function itself, not a method calling it: one Python call less per request.
    check_target = staticmethod(_check_target)

    def stamp(self, method: str, url: str, token: Token) -> Stamp:
        """A fresh proof for ``method url`` bound to ``token`` (§7.1), with the origin's nonce."""
        tc = self.token_client
        nonce = tc.nonces.get(url)
        proof = tc.proofs.create(method, url, access_token=token.access_token, nonce=nonce)
        stamp: Stamp = _new_stamp(
            (f"{token.token_type} {token.access_token}", proof, token, nonce, url, method)
        )
        return stamp

    def observe(self, url: str, headers: Iterable[tuple[str, str]]) -> str | None:
        """Feed a response's ``DPoP-Nonce`` into the store (any response, §8.2); return it."""
        return self.token_client.nonces.observe(url, headers)

    def classify(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        *,
        stamp: Stamp,
        fresh_nonce: str | None,
        retried: bool,
        replayable: bool,
    ) -> Decision:
        """Decide what a response to a stamped request means; raise for the errors of §9.

        ``fresh_nonce`` is what :meth:`observe` returned for this response. On
        :attr:`Action.RENEW` the caller must :meth:`invalidate` and fetch a new token.
        """
        if status not in CHALLENGE_STATUSES:
            return _PASS
        challenge = find_challenge(header_values(headers, "www-authenticate"), "DPoP")
        if challenge is None:
            return _PASS
        error = challenge.params.get("error")
        if status == 401 and error == "use_dpop_nonce":
            if retried:
                raise NonceError("the resource server rejected our nonce again (RFC 9449 §9)")
            if fresh_nonce is None:
                raise NonceError("use_dpop_nonce without a DPoP-Nonce header (RFC 9449 §9)")
            if fresh_nonce == stamp.nonce:
                raise NonceError("the resource server handed back the nonce it just rejected")
            if replayable:
                return Decision(Action.RETRY_NONCE, error)
        elif status == 401 and error == "invalid_token" and not retried and replayable:
            return Decision(Action.RENEW, error)
        if self.raise_on_rejection and error:
            why = "" if replayable else " (body not replayable, no retry)"
            raise UnauthorizedError(
                f"resource server rejected the request{why}",
                error=error,
                error_description=challenge.params.get("error_description"),
                status=status,
            )
        return Decision(Action.PASS, error)

    def invalidate(self, token: Token) -> None:
        """Drop a token the resource server refused, so the next caller renews it."""
        self.token_client.invalidate(token)

    def redirect(self, old_url: str, new_url: str) -> bool:
        """True: re-sign the hop to ``new_url`` (same origin); False: send it without credentials.

        Raises :class:`RedirectError` for a cross-origin hop under the ``"refuse"`` policy, and
        the https rule's errors for a same-origin hop to a URL we would not send a token to.
        """
        if origin_of(old_url) == origin_of(new_url):
            require_https(new_url, "redirect target")
            return True
        if self.cross_origin_redirects == "refuse":
            raise RedirectError(
                f"refusing to follow a redirect from {origin_of(old_url)} to "
                f"{origin_of(new_url)} with DPoP credentials"
            )
        return False


class FlowAdapter:
    """What every HTTP adapter keeps: its token client and the one :class:`ResourceFlow`.

    The requests, httpx and aiohttp adapters subclass it (beside their library's own base), so
    options are checked, stored and shown the same way everywhere. A final 401/403 is handed
    back by default; ``raise_on_rejection=True`` raises :class:`UnauthorizedError` instead.
    """

    def __init__(
        self,
        token_client: TokenSource,
        *,
        raise_on_rejection: bool = False,
        cross_origin_redirects: RedirectPolicy = "strip",
    ) -> None:
        self.flow = ResourceFlow(
            token_client,
            raise_on_rejection=raise_on_rejection,
            cross_origin_redirects=cross_origin_redirects,
        )

    @property
    def raise_on_rejection(self) -> bool:
        return self.flow.raise_on_rejection

    @property
    def cross_origin_redirects(self) -> RedirectPolicy:
        return self.flow.cross_origin_redirects

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.flow.token_client!r})"
