"""The error tree of dpop_hsm.

One root, :class:`DPoPError`, and four families, so callers can catch at the level they care
about: configuration mistakes (fix your setup), signer faults (the key or the device), protocol
errors (the servers said no or spoke nonsense) and verification failures (a proof we were asked
to check is bad).  Every class carries a stable ``code`` string for programs and log search;
messages are for people.

Messages are built by our own code from non-secret facts only: no constructor here takes a token,
PIN, client secret or proof, so none can leak through ``str()`` or ``repr()``.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousKeyError",
    "ConfigurationError",
    "DPoPError",
    "DeviceError",
    "InsecureEndpointError",
    "InvalidJwkError",
    "InvalidProofError",
    "KeyMismatchError",
    "KeyNotFoundError",
    "KeyReferenceError",
    "MechanismNotSupportedError",
    "MissingDependencyError",
    "NonceError",
    "OAuthError",
    "PinError",
    "PinLockedError",
    "Pkcs11ModuleError",
    "Pkcs11ModuleNotFoundError",
    "ProtocolError",
    "RedirectError",
    "ReplayCacheFullError",
    "ReplayError",
    "ReplayKeyQuotaError",
    "SecretSourceError",
    "SignatureEncodingError",
    "SignerError",
    "TokenBindingError",
    "TokenNotPresentError",
    "TokenResponseError",
    "TokenTypeError",
    "TpmUnreachableError",
    "TransportError",
    "UnauthorizedError",
    "UnsupportedKeyError",
    "UntrustedModuleError",
    "UseDPoPNonceError",
    "VerificationError",
]


class DPoPError(Exception):
    """Root of every error dpop_hsm raises on purpose."""

    code = "dpop_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"

    def diagnostics(self) -> str:
        """A one-line hint for people, used by the CLI; subclasses add advice."""
        return self.message


def _printable(text: str, limit: int = 200) -> str:
    """Server-supplied text, bounded and stripped of control characters before it is shown."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


# --- configuration -------------------------------------------------------------------------


class ConfigurationError(DPoPError):
    """The caller's setup is wrong: fix the arguments, the key reference or the environment."""

    code = "configuration_error"


class KeyReferenceError(ConfigurationError):
    """A key reference (path, ``pkcs11:`` or ``tpm2:`` URI) cannot be parsed or used."""

    code = "invalid_key_reference"


class UntrustedModuleError(KeyReferenceError):
    """A key reference names code to load that the caller did not allow.

    A PKCS#11 ``module-path`` outside the trusted module directories, or a TPM TCTI other than
    ``device``, ``tabrmd``, ``mssim`` and ``swtpm`` (``cmd:`` runs a command, a path loads any
    library): a reference string alone never makes the process run new code.
    """

    code = "untrusted_module"


class MissingDependencyError(ConfigurationError, ImportError):
    """An optional backend or adapter is needed but its extra is not installed or unusable.

    It is also an :class:`ImportError`, so the usual guard for optional features,
    ``try: import dpop_hsm.httpx`` / ``except ImportError:``, keeps working. ``module`` is the
    third-party module that failed, ``extra`` the ``dpop_hsm[extra]`` that provides it, and
    ``detail`` (when the module is installed but cannot be loaded: too old, or a shared library
    such as the TSS 2.0 ``libtss2-esys`` is missing) the import system's own explanation.
    """

    code = "missing_dependency"

    def __init__(self, module: str, extra: str, *, detail: str | None = None) -> None:
        command = f"pip install 'dpop_hsm[{extra}]'"
        if detail is None:
            problem = "is not installed"
        else:
            problem = f"cannot be loaded ({_printable(detail)})"
        super().__init__(f"the Python module {module!r} {problem}: {command}")
        self.module = module
        self.extra = extra
        self.name = module  # ImportError's attribute: the module that could not be imported

    def diagnostics(self) -> str:
        return f"{self.message} (from a source checkout: pip install '.[{self.extra}]')"


class Pkcs11ModuleError(ConfigurationError):
    """A PKCS#11 module file cannot be used: not loadable, not a PKCS#11 module, or it refused
    to initialize (a SoftHSM2 without a readable ``SOFTHSM2_CONF``, say)."""

    code = "pkcs11_module_error"

    def diagnostics(self) -> str:
        return (
            f"{self.message} (is it the PKCS#11 module of your device, built for this machine, "
            "and is the module's own configuration in place?)"
        )


class Pkcs11ModuleNotFoundError(Pkcs11ModuleError):
    """No PKCS#11 module file where the reference (``module-path``/``module-name``) says."""

    code = "pkcs11_module_not_found"

    def diagnostics(self) -> str:
        return (
            f"{self.message} (install the module's package, check the name or path, or add its "
            "directory to DPOP_HSM_PKCS11_MODULE_DIRS)"
        )


class InsecureEndpointError(ConfigurationError):
    """An endpoint is plain HTTP on a non-loopback host: credentials would travel in clear."""

    code = "insecure_endpoint"


class SecretSourceError(ConfigurationError):
    """A PIN, password or client secret could not be read from its source (never shown)."""

    code = "secret_source_error"


# --- signer --------------------------------------------------------------------------------


class SignerError(DPoPError):
    """The key or the device holding it failed to produce a signature or a public key."""

    code = "signer_error"


class UnsupportedKeyError(SignerError):
    """The key exists but is of a type, curve or form that DPoP signing cannot use."""

    code = "unsupported_key"


class InvalidJwkError(UnsupportedKeyError):
    """A JWK is malformed: a member is missing, not base64url, of the wrong length, off-curve."""

    code = "invalid_jwk"


class SignatureEncodingError(SignerError):
    """A signature is not in the encoding it must be in (strict DER or fixed-length raw)."""

    code = "signature_encoding"


class KeyNotFoundError(SignerError):
    """No key on the device matches the reference."""

    code = "key_not_found"


class KeyMismatchError(SignerError):
    """The public key found beside a private key is not its half of the pair.

    A public object with the same CKA_ID or label from another key pair would otherwise be
    published as the signer's JWK, and every proof would fail verification (or bind tokens to a
    key someone else holds). Checked by signing and verifying one challenge at load.
    """

    code = "key_pair_mismatch"


class AmbiguousKeyError(SignerError):
    """Several keys match the reference; we never pick one silently."""

    code = "ambiguous_key"


class TokenNotPresentError(SignerError):
    """The module loaded but no matching token/device is present (unplugged YubiKey, no TPM)."""

    code = "token_not_present"

    def diagnostics(self) -> str:
        return (
            f"{self.message} (is the device plugged in, pcscd running, the slot/token label right?)"
        )


class TpmUnreachableError(TokenNotPresentError):
    """No TPM answers at the TCTI: no device node, resource manager or simulator there."""

    code = "tpm_unreachable"

    def diagnostics(self) -> str:
        return (
            f"{self.message} (for device: TCTIs, is /dev/tpmrm0 there and readable by you; for "
            "tabrmd:, is tpm2-abrmd running; for swtpm:/mssim:, is the simulator started on that "
            "host and port? Set the TCTI in the reference or $TPM2TOOLS_TCTI)"
        )


class PinError(SignerError):
    """The PIN or key auth value was rejected. Never retried: retries lock tokens."""

    code = "pin_incorrect"

    def diagnostics(self) -> str:
        return f"{self.message} (check the PIN source; the PIN itself is never printed)"


class PinLockedError(PinError):
    """The token locked the PIN after too many wrong attempts."""

    code = "pin_locked"


class MechanismNotSupportedError(SignerError):
    """The device cannot perform the mechanism the key's algorithm needs."""

    code = "mechanism_not_supported"


class DeviceError(SignerError):
    """The device failed in a way that is not about the key or the PIN."""

    code = "device_error"


# --- protocol (client side) ----------------------------------------------------------------


class ProtocolError(DPoPError):
    """A server did not behave as OAuth 2.0 / RFC 9449 require, or refused us."""

    code = "protocol_error"


class TransportError(ProtocolError):
    """The server could not be reached, timed out, or broke the connection."""

    code = "transport_error"


class OAuthError(ProtocolError):
    """An OAuth error response (RFC 6749 §5.2): ``error`` and ``error_description`` as sent."""

    code = "oauth_error"

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        error_description: str | None = None,
        status: int | None = None,
    ) -> None:
        details = []
        if status is not None:
            details.append(f"HTTP {status}")
        if error:
            details.append(f"error={_printable(error)!r}")
        if error_description:
            details.append(f"error_description={_printable(error_description)!r}")
        super().__init__(f"{message} ({', '.join(details)})" if details else message)
        self.error = error
        self.error_description = error_description
        self.status = status


class TokenResponseError(ProtocolError):
    """The token endpoint answered 2xx but the body is not a usable token response."""

    code = "invalid_token_response"


class TokenTypeError(TokenResponseError):
    """The AS issued a token that is not DPoP-bound; refusing avoids a silent Bearer downgrade."""

    code = "token_type_not_dpop"


class NonceError(ProtocolError):
    """The server kept demanding a nonce after our one retry (RFC 9449 §8, §9)."""

    code = "nonce_loop"


class UnauthorizedError(OAuthError):
    """The resource server rejected the request (401/403) after any allowed retry."""

    code = "unauthorized"


class RedirectError(ProtocolError):
    """A redirect that we will not follow with DPoP credentials."""

    code = "redirect_refused"


# --- verification (server side) ------------------------------------------------------------


class VerificationError(DPoPError):
    """A DPoP proof or a DPoP-bound token failed a check.

    ``check`` names the failed check (``typ``, ``alg``, ``jwk``, ``signature``, ``htm``, ``htu``,
    ``iat``, ``jti``, ``ath``, ``nonce``, ``cnf``, ``token``, ``syntax``); ``oauth_error`` is the
    error code a server should send back (RFC 9449 §5, §7.1, §8, §9).

    Everything ``verify_proof`` raises because of the proof or the access token it was handed is
    in this family, so a server can map it to 400/401 (and :class:`ReplayCacheFullError` to
    503) without ever answering 500 to hostile input.
    """

    code = "verification_failed"
    oauth_error = "invalid_dpop_proof"

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check


class InvalidProofError(VerificationError):
    """The proof is malformed, badly signed, or its claims do not match the request."""

    code = "invalid_dpop_proof"


class ReplayError(InvalidProofError):
    """The proof's ``jti`` was seen before within the acceptance window."""

    code = "dpop_proof_replay"


class ReplayCacheFullError(VerificationError):
    """The replay cache is full of live entries, so the proof is refused instead of a live
    ``jti`` being forgotten (RFC 9449 §11.1: forgetting one would let it be replayed).

    Not a verdict on the proof: the server is at its replay-cache capacity, under a flood or
    sized below its proof rate. Servers answer 503 with ``Retry-After`` (RFC 9110 §15.6.4,
    §10.2.3) from ``retry_after``, the seconds until the next entry expires; a larger cache or
    a shorter ``max_age`` fixes a legitimate overload.
    """

    code = "replay_cache_full"
    oauth_error = "temporarily_unavailable"

    def __init__(self, check: str, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(check, message)
        self.retry_after = retry_after


class ReplayKeyQuotaError(ReplayCacheFullError):
    """One key holds its whole share of the replay cache; its proofs wait until some expire.

    Bounds what a single (possibly hostile) key can take from everyone else. Servers answer
    503 (or 429) with ``Retry-After``, like :class:`ReplayCacheFullError` whose subclass it is.
    """

    code = "replay_key_quota"


class UseDPoPNonceError(VerificationError):
    """The server requires a (fresh) nonce; it answers with ``use_dpop_nonce`` and a new one."""

    code = "use_dpop_nonce"
    oauth_error = "use_dpop_nonce"


class TokenBindingError(VerificationError):
    """The access token is not bound to the proof's key (``cnf.jkt`` mismatch) or is invalid."""

    code = "invalid_token"
    oauth_error = "invalid_token"


# --- developer login: discovery, PKCE, loopback redirect, device grant, refresh, profiles --
# (RFC 8414, RFC 7636, RFC 8252, RFC 9207, RFC 9126, RFC 8628, RFC 6749 §6, RFC 7009)

__all__ += [
    "AuthorizationRejectedError",
    "AuthorizationResponseError",
    "DeviceAccessDeniedError",
    "DeviceCodeExpiredError",
    "DeviceFlowError",
    "DiscoveryError",
    "IssuerMismatchError",
    "LoginError",
    "LoginRequiredError",
    "LoginTimeoutError",
    "LoopbackListenerError",
    "MetadataError",
    "PkceError",
    "ProfileCorruptError",
    "ProfileError",
    "ProfileLockedError",
    "ProfileNotFoundError",
    "ProfilePermissionError",
    "PushedAuthorizationError",
    "ResponseIssuerError",
    "RevocationError",
    "StateMismatchError",
    "UnsupportedAlgorithmError",
]


class DiscoveryError(ProtocolError):
    """Authorization server metadata (RFC 8414) could not be fetched or used."""

    code = "discovery_failed"


class MetadataError(DiscoveryError):
    """The metadata document is malformed or names an endpoint we must not use."""

    code = "invalid_metadata"


class IssuerMismatchError(DiscoveryError):
    """The metadata's ``issuer`` is not, exactly, the issuer asked for (RFC 8414 §3.3)."""

    code = "issuer_mismatch"


class UnsupportedAlgorithmError(ConfigurationError):
    """The AS does not accept DPoP proofs signed with the key's algorithm (RFC 9449 §5.1)."""

    code = "dpop_alg_not_supported"

    def diagnostics(self) -> str:
        return f"{self.message} (use a key of an algorithm the authorization server lists)"


class PkceError(ConfigurationError):
    """A PKCE verifier or method that RFC 7636 (S256 only, 43-128 unreserved chars) forbids."""

    code = "invalid_pkce"


class LoginError(ProtocolError):
    """An interactive login attempt ended without tokens; the user starts again."""

    code = "login_failed"


class AuthorizationResponseError(LoginError):
    """The redirect back from the AS is malformed (no code, repeated parameters)."""

    code = "invalid_authorization_response"


class StateMismatchError(AuthorizationResponseError):
    """The redirect's ``state`` is missing or not the one we sent (RFC 6749 §10.12)."""

    code = "state_mismatch"


class ResponseIssuerError(AuthorizationResponseError):
    """The redirect's ``iss`` is wrong, or missing where the AS promised it (RFC 9207 §2.4)."""

    code = "iss_mismatch"


class AuthorizationRejectedError(LoginError, OAuthError):
    """The AS redirected back with ``error=…`` (RFC 6749 §4.1.2.1); texts shown sanitised."""

    code = "authorization_rejected"


class PushedAuthorizationError(LoginError):
    """The pushed authorization request (RFC 9126) failed or its answer is unusable."""

    code = "par_failed"


class LoginTimeoutError(LoginError):
    """The user did not complete the login (browser or device) within the allowed time."""

    code = "login_timeout"


class LoopbackListenerError(ConfigurationError):
    """The loopback redirect listener (RFC 8252 §7.3) cannot listen where asked."""

    code = "loopback_listener_error"


class DeviceFlowError(LoginError):
    """The device authorization grant (RFC 8628) ended without tokens."""

    code = "device_flow_error"


class DeviceAccessDeniedError(DeviceFlowError):
    """The user denied the device authorization request (RFC 8628 §3.5 ``access_denied``)."""

    code = "device_access_denied"


class DeviceCodeExpiredError(DeviceFlowError):
    """The device code expired before the user approved it (RFC 8628 §3.5 ``expired_token``)."""

    code = "device_code_expired"


class LoginRequiredError(ProtocolError):
    """The refresh token is no longer accepted (``invalid_grant``): log in again."""

    code = "login_required"

    def diagnostics(self) -> str:
        return f"{self.message} (run 'dpop-hsm login' again)"


class RevocationError(ProtocolError):
    """The revocation endpoint (RFC 7009) refused to revoke a token."""

    code = "revocation_failed"


class ProfileError(ConfigurationError):
    """A stored login profile cannot be used."""

    code = "profile_error"


class ProfileNotFoundError(ProfileError):
    """No profile of that name exists: log in first."""

    code = "profile_not_found"


class ProfileCorruptError(ProfileError):
    """The profile file is not a profile we wrote (bad JSON, wrong types, unknown version)."""

    code = "profile_corrupt"


class ProfilePermissionError(ProfileError):
    """The state directory or a profile file is accessible to other users, or not ours."""

    code = "profile_insecure_permissions"


class ProfileLockedError(ProfileError):
    """Another process held the profile's lock for longer than we were willing to wait."""

    code = "profile_locked"
