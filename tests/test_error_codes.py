"""Every error class keeps its ``code``, and the README's "Error codes" table lists every code.

A code is API: programs match on it and logs are searched for it, so changing one is a breaking
change and must show up here. The table below is written out by hand on purpose; the classes
are found by walking every ``DPoPError`` subclass in every ``dpop_hsm`` module, so a new class
without a row (here and in the README) fails.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import dpop_hsm
from dpop_hsm import errors
from dpop_hsm.cli import EXIT_CODES
from dpop_hsm.errors import DPoPError

README = Path(__file__).resolve().parent.parent / "README.md"

# class name -> code, for every DPoPError subclass in dpop_hsm (inherited codes included).
CODES = {
    "DPoPError": "dpop_error",
    "ConfigurationError": "configuration_error",
    "KeyReferenceError": "invalid_key_reference",
    "MissingDependencyError": "missing_dependency",
    "InsecureEndpointError": "insecure_endpoint",
    "SecretSourceError": "secret_source_error",
    "UsageError": "usage",
    "ArgumentsError": "usage",  # CLI: the command line does not parse
    "ConfigFileError": "invalid_config",  # CLI: the TOML settings file
    "ListenError": "cannot_listen",  # CLI: serve
    "AddressInUseError": "address_in_use",  # CLI: serve on a busy port
    "SignerError": "signer_error",
    "InvalidJwkError": "invalid_jwk",
    "UntrustedModuleError": "untrusted_module",
    "KeyMismatchError": "key_pair_mismatch",
    "Pkcs11ModuleError": "pkcs11_module_error",
    "Pkcs11ModuleNotFoundError": "pkcs11_module_not_found",
    "TpmUnreachableError": "tpm_unreachable",
    "UnsupportedKeyError": "unsupported_key",
    "SignatureEncodingError": "signature_encoding",
    "KeyNotFoundError": "key_not_found",
    "AmbiguousKeyError": "ambiguous_key",
    "TokenNotPresentError": "token_not_present",
    "PinError": "pin_incorrect",
    "PinLockedError": "pin_locked",
    "MechanismNotSupportedError": "mechanism_not_supported",
    "DeviceError": "device_error",
    "SessionLostError": "device_error",  # internal: re-opened once, surfaces as a DeviceError
    "ProtocolError": "protocol_error",
    "TransportError": "transport_error",
    "RequestsTransportError": "transport_error",  # also a requests.RequestException
    "AiohttpTransportError": "transport_error",  # also an aiohttp.ClientError
    "OAuthError": "oauth_error",
    "TokenResponseError": "invalid_token_response",
    "TokenTypeError": "token_type_not_dpop",
    "NonceError": "nonce_loop",
    "UnauthorizedError": "unauthorized",
    "RedirectError": "redirect_refused",
    "ChallengeParseError": "malformed_challenge",
    "VerificationError": "verification_failed",
    "InvalidProofError": "invalid_dpop_proof",
    "ReplayError": "dpop_proof_replay",
    "ReplayCacheFullError": "replay_cache_full",
    "ReplayKeyQuotaError": "replay_key_quota",
    "UseDPoPNonceError": "use_dpop_nonce",
    "TokenBindingError": "invalid_token",
    # developer login
    "DiscoveryError": "discovery_failed",
    "MetadataError": "invalid_metadata",
    "IssuerMismatchError": "issuer_mismatch",
    "UnsupportedAlgorithmError": "dpop_alg_not_supported",
    "PkceError": "invalid_pkce",
    "LoginError": "login_failed",
    "AuthorizationResponseError": "invalid_authorization_response",
    "StateMismatchError": "state_mismatch",
    "ResponseIssuerError": "iss_mismatch",
    "AuthorizationRejectedError": "authorization_rejected",
    "PushedAuthorizationError": "par_failed",
    "LoginTimeoutError": "login_timeout",
    "LoopbackListenerError": "loopback_listener_error",
    "DeviceFlowError": "device_flow_error",
    "DeviceAccessDeniedError": "device_access_denied",
    "DeviceCodeExpiredError": "device_code_expired",
    "LoginRequiredError": "login_required",
    "RevocationError": "revocation_failed",
    "ProfileError": "profile_error",
    "ProfileNotFoundError": "profile_not_found",
    "ProfileCorruptError": "profile_corrupt",
    "ProfilePermissionError": "profile_insecure_permissions",
    "ProfileLockedError": "profile_locked",
}

# Family root -> the CLI's exit-code name (``dpop_hsm.cli.EXIT_CODES``); most specific first.
FAMILIES = [
    ("UsageError", "usage"),
    ("ConfigurationError", "configuration"),
    ("SignerError", "hardware"),
    ("ProtocolError", "server"),
    ("VerificationError", "verification"),
    ("DPoPError", "unexpected"),
]
OPTIONAL = {
    "pkcs11",
    "tpm2_pytss",
    "httpx",
    "anyio",
    "aiohttp",
    "yarl",
}  # extras a developer may lack


def error_classes() -> dict[str, type[DPoPError]]:
    """Every DPoPError subclass defined in dpop_hsm, by class name (after importing it all)."""
    for info in pkgutil.walk_packages(dpop_hsm.__path__, "dpop_hsm."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as e:
            if (e.name or "").split(".")[0] not in OPTIONAL:
                raise
    found: dict[str, type[DPoPError]] = {}
    todo: list[type[DPoPError]] = [DPoPError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] != "dpop_hsm":
            continue  # a test's own subclass
        assert found.setdefault(cls.__name__, cls) is cls, f"two error classes {cls.__name__}"
    return found


def family(cls: type[DPoPError]) -> str:
    names = {base.__name__ for base in cls.__mro__}
    return next(name for root, name in FAMILIES if root in names)


def readme_rows() -> list[tuple[str, str, str]]:
    """(code, class, family column) of each row of the README's "Error codes" table."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Error codes\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README has no 'Error codes' section"
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| ([^|]+?) \| [^|]+ \|$", match.group(1), re.M)
    assert rows, "the 'Error codes' section has no table"
    return rows


def test_every_error_class_keeps_its_code() -> None:
    assert {name: cls.code for name, cls in error_classes().items()} == CODES


def test_codes_are_snake_case_and_each_defined_once() -> None:
    defined = [cls.code for cls in error_classes().values() if "code" in vars(cls)]
    assert len(defined) == len(set(defined)), "two classes define the same code"
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", code) for code in defined)


def test_the_error_tree_is_public() -> None:
    in_module = {
        name
        for name, cls in error_classes().items()
        if cls.__module__ == errors.__name__ and not name.startswith("_")
    }
    assert set(errors.__all__) == in_module
    for name in errors.__all__:
        assert getattr(dpop_hsm, name) is getattr(errors, name)
        assert name in dpop_hsm.__all__


def test_readme_lists_every_code_with_its_class_and_exit_code() -> None:
    classes = error_classes()
    rows = readme_rows()
    codes = [code for code, _, _ in rows]
    assert len(codes) == len(set(codes)), "a code listed twice"
    # One row per code, naming the class that defines it.
    expected = {(cls.code, name) for name, cls in classes.items() if "code" in vars(cls)}
    assert {(code, name) for code, name, _ in rows} == expected
    for code, name, column in rows:
        fam = family(classes[name])
        assert column == f"{fam} ({EXIT_CODES[fam]})", f"README row for {code}"
