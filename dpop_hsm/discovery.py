"""Authorization server metadata: where it lives, what it must say, how long we keep it.

Sans-IO. :func:`metadata_urls` builds the well-known URLs of an issuer (RFC 8414 §3.1 first,
then OpenID Connect Discovery 1.0 §4); :func:`parse_metadata` validates one document;
:func:`discovery_flow` yields the requests and returns :class:`ServerMetadata`;
:class:`MetadataCache` keeps a bounded number of documents for a bounded time.

Rules enforced here, each with its source:

* RFC 8414 §2: the issuer is an ``https`` URL without query or fragment (plain ``http`` only for
  loopback test servers, the same rule as every other endpoint in dpop_hsm).
* RFC 8414 §3.3: the document's ``issuer`` MUST be identical to the issuer we asked for — a
  byte-for-byte comparison, no normalization — or the metadata MUST NOT be used (the mix-up
  defence). A document failing that check is never returned or cached.
* Every endpoint in the document passes the https/loopback rule; an ``https`` issuer may only
  name ``https`` endpoints (a public AS pointing us at ``http://127.0.0.1`` is refused too).
* RFC 9449 §5.1: ``dpop_signing_alg_values_supported`` lists the proof algorithms the AS takes;
  absent, we assume ours works and let the AS say no (:func:`check_dpop_alg`).
* RFC 7636 §4.2 / RFC 8414 §2: when ``code_challenge_methods_supported`` is present it must
  contain ``S256``, the only method we send.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .errors import (
    ConfigurationError,
    DiscoveryError,
    DPoPError,
    InsecureEndpointError,
    IssuerMismatchError,
    MetadataError,
    UnsupportedAlgorithmError,
)
from .htu import is_loopback_host, normalize_htu
from .sansio import HttpRequest, HttpResponse
from .strict_json import StrictJsonError, loads_strict

__all__ = [
    "DEFAULT_CACHE_TTL",
    "ENDPOINT_MEMBERS",
    "MAX_METADATA_SIZE",
    "MetadataCache",
    "ServerMetadata",
    "check_dpop_alg",
    "check_endpoint",
    "discovery_flow",
    "fetch_metadata",
    "metadata_from_document",
    "metadata_urls",
    "parse_metadata",
    "scopes_with_offline_access",
    "validate_issuer",
]

MAX_METADATA_SIZE = 512 * 1024
DEFAULT_CACHE_TTL = 3600.0
OAUTH_WELL_KNOWN = "/.well-known/oauth-authorization-server"  # RFC 8414 §3
OIDC_WELL_KNOWN = "/.well-known/openid-configuration"  # OpenID Connect Discovery 1.0 §4

# Members that hold URLs we may send credentials, codes or tokens to.
ENDPOINT_MEMBERS = (
    "authorization_endpoint",
    "token_endpoint",
    "pushed_authorization_request_endpoint",  # RFC 9126 §5
    "device_authorization_endpoint",  # RFC 8628 §4
    "revocation_endpoint",  # RFC 7009 / RFC 8414 §2
    "introspection_endpoint",
    "userinfo_endpoint",
    "jwks_uri",
    "registration_endpoint",
    "end_session_endpoint",
)
_STRING_LISTS = (
    "scopes_supported",
    "response_types_supported",
    "grant_types_supported",
    "token_endpoint_auth_methods_supported",
    "code_challenge_methods_supported",
    "dpop_signing_alg_values_supported",
    "revocation_endpoint_auth_methods_supported",
)
_BOOLEANS = (
    "require_pushed_authorization_requests",  # RFC 9126 §5
    "authorization_response_iss_parameter_supported",  # RFC 9207 §3
)
_MAX_LIST = 1000
_MAX_STRING = 8192


def _shown(text: str, limit: int = 120) -> str:
    """Untrusted text bounded and made printable before it goes into an error message."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return repr(cleaned + ("..." if len(text) > limit else ""))


def validate_issuer(issuer: str) -> str:
    """``issuer`` unchanged if it is a usable issuer identifier, else a typed error.

    RFC 8414 §2: ``https`` scheme, a host, no query, no fragment; we also refuse userinfo and
    control characters. ``http`` only for a loopback host (local test servers).
    Raises :class:`ConfigurationError`, or :class:`InsecureEndpointError` for non-loopback http.
    """
    if not isinstance(issuer, str) or not issuer:
        raise ConfigurationError("issuer must be a non-empty string")
    if len(issuer) > _MAX_STRING or not issuer.isascii() or not issuer.isprintable():
        raise ConfigurationError(f"issuer {_shown(issuer)} is not a printable ASCII URL")
    if " " in issuer:
        raise ConfigurationError(f"issuer {_shown(issuer)} contains a space")
    try:
        parts = urlsplit(issuer)
        parts.port  # noqa: B018  (validates the port)
    except ValueError as e:
        raise ConfigurationError(f"issuer {_shown(issuer)} is not a valid URL") from e
    if parts.scheme not in ("https", "http"):
        raise ConfigurationError(f"issuer {_shown(issuer)} must be an https URL (RFC 8414 §2)")
    if parts.scheme == "http" and not is_loopback_host(issuer):
        raise InsecureEndpointError(
            f"issuer {_shown(issuer)} must use https (plain http only for loopback)"
        )
    if not parts.hostname:
        raise ConfigurationError(f"issuer {_shown(issuer)} has no host")
    if "@" in parts.netloc:
        raise ConfigurationError(f"issuer {_shown(issuer)} must not carry userinfo")
    if "?" in issuer or "#" in issuer:
        raise ConfigurationError(
            f"issuer {_shown(issuer)} must not have a query or fragment (RFC 8414 §2)"
        )
    return issuer


def metadata_urls(issuer: str) -> tuple[str, str]:
    """The two places an issuer's metadata may live, in the order we try them.

    RFC 8414 §3.1: ``/.well-known/oauth-authorization-server`` goes between the host and the
    issuer's path, after removing a terminating ``/``; OIDC Discovery §4 appends
    ``/.well-known/openid-configuration`` to the issuer (again without a trailing ``/``).
    """
    validate_issuer(issuer)
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    return (origin + OAUTH_WELL_KNOWN + path, origin + path + OIDC_WELL_KNOWN)


def check_endpoint(url: Any, member: str, *, issuer: str) -> str:
    """``url`` if it is an endpoint we may talk to for ``issuer``, else :class:`MetadataError`.

    ``https`` always; plain ``http`` only to a loopback host and only when the issuer itself is
    a loopback ``http`` URL: a real AS never legitimately points its clients at ``127.0.0.1``.
    """
    if not isinstance(url, str) or not url:
        raise MetadataError(f"metadata member {member!r} is not a URL string")
    if len(url) > _MAX_STRING or not url.isascii() or not url.isprintable() or " " in url:
        raise MetadataError(f"metadata member {member!r} is not a printable ASCII URL")
    try:
        normalize_htu(url)
        parts = urlsplit(url)
    except (DPoPError, ValueError) as e:
        raise MetadataError(f"metadata member {member!r} is not a valid http(s) URL") from e
    if "@" in parts.netloc:
        raise MetadataError(f"metadata member {member!r} must not carry userinfo")
    if parts.fragment or "#" in url:
        raise MetadataError(f"metadata member {member!r} must not have a fragment")
    scheme = parts.scheme.lower()
    if scheme == "https":
        return url
    issuer_is_local = urlsplit(issuer).scheme == "http" and is_loopback_host(issuer)
    if scheme == "http" and is_loopback_host(url) and issuer_is_local:
        return url
    raise MetadataError(
        f"metadata member {member!r} is {_shown(url)}: endpoints must use https "
        "(plain http only for a loopback test server)"
    )


def _string_list(value: Any, member: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > _MAX_LIST:
        raise MetadataError(f"metadata member {member!r} must be a JSON array of strings")
    for item in value:
        if not isinstance(item, str) or len(item) > _MAX_STRING:
            raise MetadataError(f"metadata member {member!r} must be a JSON array of strings")
    return tuple(value)


@dataclass(frozen=True)
class ServerMetadata:
    """A validated AS metadata document (RFC 8414 §2), with the members a login uses.

    ``raw`` keeps the whole document (read-only) for members not modelled here. Build one with
    :func:`parse_metadata`, or with :meth:`from_endpoints` when endpoints are given explicitly.
    """

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None = None
    pushed_authorization_request_endpoint: str | None = None
    require_pushed_authorization_requests: bool = False
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    scopes_supported: tuple[str, ...] | None = None
    grant_types_supported: tuple[str, ...] | None = None
    token_endpoint_auth_methods_supported: tuple[str, ...] | None = None
    code_challenge_methods_supported: tuple[str, ...] | None = None
    dpop_signing_alg_values_supported: tuple[str, ...] | None = None
    authorization_response_iss_parameter_supported: bool = False
    raw: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @classmethod
    def from_endpoints(
        cls,
        issuer: str,
        *,
        token_endpoint: str,
        authorization_endpoint: str | None = None,
        pushed_authorization_request_endpoint: str | None = None,
        device_authorization_endpoint: str | None = None,
        revocation_endpoint: str | None = None,
        authorization_response_iss_parameter_supported: bool = False,
    ) -> ServerMetadata:
        """Metadata for an AS without discovery: the same validation as a fetched document."""
        document: dict[str, Any] = {
            "issuer": issuer,
            "token_endpoint": token_endpoint,
            "authorization_response_iss_parameter_supported": (
                authorization_response_iss_parameter_supported
            ),
        }
        for name, value in (
            ("authorization_endpoint", authorization_endpoint),
            ("pushed_authorization_request_endpoint", pushed_authorization_request_endpoint),
            ("device_authorization_endpoint", device_authorization_endpoint),
            ("revocation_endpoint", revocation_endpoint),
        ):
            if value is not None:
                document[name] = value
        return metadata_from_document(document, issuer=issuer)

    def supports_scope(self, scope: str) -> bool:
        return self.scopes_supported is not None and scope in self.scopes_supported

    def to_document(self) -> dict[str, Any]:
        """The document as a plain dict (for storing in a profile)."""
        return dict(self.raw)


def metadata_from_document(document: Mapping[str, Any], *, issuer: str) -> ServerMetadata:
    """Validate a decoded metadata object for ``issuer``; :class:`MetadataError` if unusable.

    Also the loader for metadata stored in a profile: stored documents are checked exactly
    like fetched ones, so an edited profile cannot smuggle in an ``http`` endpoint.
    """
    validate_issuer(issuer)
    if not isinstance(document, Mapping):
        raise MetadataError("metadata is not a JSON object (RFC 8414 §3.2)")
    found = document.get("issuer")
    if not isinstance(found, str):
        raise MetadataError("metadata has no issuer string (RFC 8414 §2)")
    # RFC 8414 §3.3: identical, no normalization (case, trailing slash, default port all count).
    if found != issuer:
        raise IssuerMismatchError(
            f"metadata is for issuer {_shown(found)}, not {_shown(issuer)}; "
            "refusing it (RFC 8414 §3.3)"
        )
    values: dict[str, Any] = {}
    for member in ENDPOINT_MEMBERS:
        if member in document and document[member] is not None:
            values[member] = check_endpoint(document[member], member, issuer=issuer)
    if "token_endpoint" not in values:
        raise MetadataError("metadata has no token_endpoint")
    lists: dict[str, tuple[str, ...]] = {}
    for member in _STRING_LISTS:
        if member in document and document[member] is not None:
            lists[member] = _string_list(document[member], member)
    flags: dict[str, bool] = {}
    for member in _BOOLEANS:
        value = document.get(member, False)
        if not isinstance(value, bool):
            raise MetadataError(f"metadata member {member!r} must be true or false")
        flags[member] = value
    methods = lists.get("code_challenge_methods_supported")
    if methods is not None and "S256" not in methods:
        raise MetadataError(
            "the AS does not list S256 in code_challenge_methods_supported (RFC 7636 §4.2)"
        )
    if flags["require_pushed_authorization_requests"] and (
        "pushed_authorization_request_endpoint" not in values
    ):
        raise MetadataError(
            "metadata requires pushed authorization requests but names no PAR endpoint "
            "(RFC 9126 §5)"
        )
    return ServerMetadata(
        issuer=issuer,
        token_endpoint=values["token_endpoint"],
        authorization_endpoint=values.get("authorization_endpoint"),
        pushed_authorization_request_endpoint=values.get("pushed_authorization_request_endpoint"),
        require_pushed_authorization_requests=flags["require_pushed_authorization_requests"],
        device_authorization_endpoint=values.get("device_authorization_endpoint"),
        revocation_endpoint=values.get("revocation_endpoint"),
        scopes_supported=lists.get("scopes_supported"),
        grant_types_supported=lists.get("grant_types_supported"),
        token_endpoint_auth_methods_supported=lists.get("token_endpoint_auth_methods_supported"),
        code_challenge_methods_supported=methods,
        dpop_signing_alg_values_supported=lists.get("dpop_signing_alg_values_supported"),
        authorization_response_iss_parameter_supported=flags[
            "authorization_response_iss_parameter_supported"
        ],
        raw=MappingProxyType(dict(document)),
    )


def parse_metadata(response: HttpResponse, *, issuer: str) -> ServerMetadata:
    """A :class:`ServerMetadata` from the response to a well-known URL, or a typed error.

    Raises :class:`DiscoveryError` for a non-200 answer, :class:`MetadataError` for a body that
    is not a valid document, :class:`IssuerMismatchError` when it is some other issuer's.
    """
    if response.status != 200:
        raise DiscoveryError(f"metadata request answered HTTP {response.status}")
    if len(response.body) > MAX_METADATA_SIZE:
        raise MetadataError(f"metadata larger than {MAX_METADATA_SIZE} bytes")
    try:
        document = loads_strict(response.body)
    except StrictJsonError as e:
        raise MetadataError(f"metadata is not valid JSON: {e}") from e
    if not isinstance(document, dict):
        raise MetadataError("metadata is not a JSON object (RFC 8414 §3.2)")
    return metadata_from_document(document, issuer=issuer)


def check_dpop_alg(metadata: ServerMetadata, alg: str) -> None:
    """Refuse a key whose proofs the AS says it will not accept (RFC 9449 §5.1).

    Absent ``dpop_signing_alg_values_supported`` means "not said": we try, and the AS may
    still answer ``invalid_dpop_proof``. Raises :class:`UnsupportedAlgorithmError`.
    """
    supported = metadata.dpop_signing_alg_values_supported
    if supported is not None and alg not in supported:
        listed = ", ".join(_shown(a, 20) for a in supported[:10]) or "none"
        raise UnsupportedAlgorithmError(
            f"the authorization server {_shown(metadata.issuer)} does not accept DPoP proofs "
            f"signed with {alg}; it lists: {listed}"
        )


def _metadata_request(url: str) -> HttpRequest:
    return HttpRequest("GET", url, (("Accept", "application/json"),))


def discovery_flow(issuer: str) -> Generator[HttpRequest, HttpResponse, ServerMetadata]:
    """Yield the metadata requests for ``issuer`` and return the first valid document.

    RFC 8414's URL first, then OIDC's. A document for another issuer (§3.3) is never used, but
    we still try the other URL: some servers answer the root well-known URL for every issuer
    path. When neither yields usable metadata, the most telling error is raised: a mismatching
    issuer or invalid document over a mere 404.
    """
    errors: list[DiscoveryError] = []
    for url in metadata_urls(issuer):
        response = yield _metadata_request(url)
        try:
            return parse_metadata(response, issuer=issuer)
        except DiscoveryError as e:
            errors.append(e)
    telling = [e for e in errors if isinstance(e, MetadataError | IssuerMismatchError)]
    if telling:
        raise telling[0]
    raise DiscoveryError(
        f"no authorization server metadata for issuer {_shown(issuer)} "
        f"(tried {OAUTH_WELL_KNOWN} and {OIDC_WELL_KNOWN}: {errors[-1].message})"
    )


class MetadataCache:
    """Validated metadata by issuer: at most ``max_entries`` documents, each for ``ttl`` s.

    Thread-safe. Only documents that passed :func:`parse_metadata` (issuer check included) are
    stored, so a cache hit is as trustworthy as a fresh fetch.
    """

    def __init__(
        self,
        *,
        max_entries: int = 32,
        ttl: float = DEFAULT_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise DiscoveryError("MetadataCache max_entries must be positive")
        if not ttl > 0:
            raise DiscoveryError("MetadataCache ttl must be positive")
        self._max = max_entries
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, ServerMetadata]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, issuer: str) -> ServerMetadata | None:
        with self._lock:
            entry = self._entries.get(issuer)
            if entry is None:
                return None
            if self._clock() >= entry[0]:
                del self._entries[issuer]
                return None
            self._entries.move_to_end(issuer)
            return entry[1]

    def put(self, metadata: ServerMetadata) -> None:
        with self._lock:
            self._entries[metadata.issuer] = (self._clock() + self._ttl, metadata)
            self._entries.move_to_end(metadata.issuer)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def fetch_metadata(
    issuer: str,
    send: Callable[[HttpRequest], HttpResponse],
    *,
    cache: MetadataCache | None = None,
) -> ServerMetadata:
    """Discover ``issuer``'s metadata through a blocking ``send``, using ``cache`` if given."""
    if cache is not None:
        hit = cache.get(issuer)
        if hit is not None:
            return hit
    flow = discovery_flow(issuer)
    request = next(flow)
    while True:
        response = send(request)
        try:
            request = flow.send(response)
        except StopIteration as stop:
            metadata: ServerMetadata = stop.value
            break
    if cache is not None:
        cache.put(metadata)
    return metadata


def scopes_with_offline_access(scope: Sequence[str], metadata: ServerMetadata) -> list[str]:
    """``scope`` plus ``offline_access`` when the AS lists it (OIDC Core §11)."""
    result = list(scope)
    if metadata.supports_scope("offline_access") and "offline_access" not in result:
        result.append("offline_access")
    return result
