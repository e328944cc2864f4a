"""Where PKCS#11 module files are found, and which ones a key reference may make us load.

Loading a PKCS#11 module runs its code, so a URI string alone must not pick an arbitrary file
(``pkcs11:…?module-path=/tmp/x.so``). We follow the p11-kit and pkcs11-provider practice: the
operator decides which modules are trusted, the reference only chooses among them.

- ``module-name`` (RFC 7512 §2.3 leaves its resolution to the consumer) is looked up in the
  trusted module directories — where distributions and p11-kit install modules, plus
  ``$DPOP_HSM_PKCS11_MODULE_DIRS`` — and in p11-kit's ``.module`` registrations. A name never
  carries a path separator or ``..``, so a lookup never leaves these directories.
- ``module-path`` is loaded when it names a file directly in a trusted module directory or
  registered with p11-kit, when it is listed in ``$DPOP_HSM_PKCS11_MODULES`` (absolute paths
  separated by ``:``), or when the caller opts in (``allow_module_path=True``: the CLI does, for
  the URI its user typed). Anything else is :class:`~dpop_hsm.errors.UntrustedModuleError`,
  raised before the file is opened.

Linux and macOS are supported (module names and directories of both are known); Windows is
refused plainly, see :func:`require_supported_platform`. This module imports nothing from
python-pkcs11.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from ...errors import (
    KeyReferenceError,
    Pkcs11ModuleError,
    Pkcs11ModuleNotFoundError,
    UntrustedModuleError,
)

__all__ = [
    "MODULES_ENV",
    "MODULE_DIRS_ENV",
    "check_module_path",
    "module_file_names",
    "module_search_dirs",
    "require_supported_platform",
    "resolve_module_name",
]

MODULE_DIRS_ENV = "DPOP_HSM_PKCS11_MODULE_DIRS"
MODULES_ENV = "DPOP_HSM_PKCS11_MODULES"
_MODULE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")


def _kind(platform: str | None) -> str:
    """ "linux" (and other Unix systems with the same layout), "darwin", or "windows"."""
    name = sys.platform if platform is None else platform
    if name.startswith(("win", "cygwin", "msys")):
        return "windows"
    return "darwin" if name == "darwin" else "linux"


def require_supported_platform(platform: str | None = None) -> None:
    """Refuse plainly where the backend cannot work, before any module is opened.

    Windows Cryptoki headers pack every structure to one byte (``#pragma pack(1)`` in
    ``pkcs11.h``); the ctypes layer of this backend (:mod:`.cryptoki`) uses the natural
    alignment of Linux and macOS, so on Windows it would read the function list wrong.
    """
    if _kind(platform) == "windows":
        raise Pkcs11ModuleError(
            "the PKCS#11 backend supports Linux and macOS; on Windows, Cryptoki structures are "
            "packed to 1 byte, which its ctypes layer does not implement (use a TPM or a key "
            "file there)"
        )


# Module file names per platform: Linux ".so"; macOS ".dylib" (Yubico's libykcs11), and
# ".so", which OpenSC and Homebrew's SoftHSM2 use there too.
_SUFFIXES = {"linux": (".so",), "darwin": (".dylib", ".so"), "windows": (".dll",)}


def module_search_dirs(platform: str | None = None) -> list[Path]:
    """The trusted module directories, in lookup order: ``$DPOP_HSM_PKCS11_MODULE_DIRS``,
    then where the platform's packages install PKCS#11 modules.

    Linux: ``/usr/lib``, ``/usr/lib64``, ``/usr/local/lib``, ``/usr/local/lib64``, ``/lib``,
    each also under the multiarch triplet, with their ``pkcs11/`` and ``softhsm/``
    subdirectories (Debian, Fedora, Arch, Alpine layouts). macOS: Homebrew
    (``/opt/homebrew/lib``, ``/usr/local/lib``) with the same subdirectories, and the OpenSC
    installer's ``/Library/OpenSC/lib``. Windows: none (see
    :func:`require_supported_platform`).
    """
    dirs: list[Path] = []
    extra = os.environ.get(MODULE_DIRS_ENV)
    if extra:
        dirs += [Path(d) for d in extra.split(os.pathsep) if d]
    kind = _kind(platform)
    if kind == "linux":
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        libdirs = ["/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/lib64", "/lib"]
    elif kind == "darwin":
        multiarch, libdirs = "", ["/opt/homebrew/lib", "/usr/local/lib"]
    else:
        multiarch, libdirs = "", []
    for base in libdirs:
        roots = [Path(base, multiarch), Path(base)] if multiarch else [Path(base)]
        for root in roots:
            dirs += [root / "pkcs11", root / "softhsm", root]
    if kind == "darwin":
        dirs.append(Path("/Library/OpenSC/lib"))
    seen: set[Path] = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]  # type: ignore[func-returns-value]


def module_file_names(name: str, platform: str | None = None) -> list[str]:
    """The file names ``module-name`` may have: as given, with ``lib``, with the suffixes."""
    suffixes = _SUFFIXES[_kind(platform)]
    stems = [name] if name.startswith("lib") else [name, "lib" + name]
    names: list[str] = []
    for stem in stems:
        names += [stem] if stem.endswith(suffixes) else [stem + s for s in suffixes] + [stem]
    return names


def _normal(path: str) -> str:
    # Lexical: "/usr/lib/pkcs11/../../../tmp/x.so" is /tmp/x.so. Symlinks inside a trusted
    # directory are the administrator's, so they are not resolved.
    return os.path.normpath(os.path.abspath(path))


def _allowlisted() -> set[str]:
    listed = os.environ.get(MODULES_ENV, "")
    return {_normal(p) for p in listed.split(os.pathsep) if p and os.path.isabs(p)}


def check_module_path(path: str, *, allow_module_path: bool = False) -> str:
    """Return ``path`` if a URI's ``module-path`` may be loaded, else raise (nothing is opened).

    Allowed: ``allow_module_path=True`` (the caller vouches for the reference), a path in
    ``$DPOP_HSM_PKCS11_MODULES``, a file directly in a trusted module directory, or a module
    registered with p11-kit. Raises UntrustedModuleError naming the three fixes.
    """
    if allow_module_path:
        return path
    if os.path.isabs(path):
        normal = _normal(path)
        if normal in _allowlisted():
            return path
        parent = os.path.dirname(normal)
        if any(parent == _normal(str(d)) for d in module_search_dirs()):
            return path
        if normal in {_normal(str(t)) for t in _p11kit_registered()}:
            return path
    raise UntrustedModuleError(
        f"pkcs11 URI module-path {path!r} is not a trusted PKCS#11 module (loading it would run "
        f"its code): use module-name= for an installed module, list the path in {MODULES_ENV}, "
        "or pass allow_module_path=True if you trust the reference"
    )


def _p11kit_registered() -> Iterable[Path]:
    """Absolute module paths named by p11-kit registrations (the operator's configuration)."""
    for reg in _p11kit_module_files():
        target = _registered_module(reg)
        if target is not None and target.is_absolute():
            yield target


def _registered_module(reg: Path) -> Path | None:
    try:
        lines = reg.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "module" and value.strip():
            return Path(value.strip())
    return None


_P11KIT_CONFIG_DIRS = (
    Path("/etc/pkcs11/modules"),
    Path("/usr/share/p11-kit/modules"),
    Path("/opt/homebrew/etc/pkcs11/modules"),  # macOS, Homebrew
    Path("/opt/homebrew/share/p11-kit/modules"),
    Path("/usr/local/etc/pkcs11/modules"),
    Path("/usr/local/share/p11-kit/modules"),
)


def _p11kit_module_files() -> Iterable[Path]:
    # p11-kit registration files: <config dirs>/<name>.module with a "module:" line.
    for conf in _P11KIT_CONFIG_DIRS:
        if conf.is_dir():
            yield from sorted(conf.glob("*.module"))


def resolve_module_name(name: str, platform: str | None = None) -> str:
    """Find ``module-name`` (e.g. ``softhsm2``, ``libykcs11``, ``ykcs11.so``) on disk.

    RFC 7512 §2.3 leaves the lookup to the consumer: we try the names of
    :func:`module_file_names` in :func:`module_search_dirs`, then p11-kit ``.module``
    registrations. Raises KeyReferenceError for a name with a path in it,
    Pkcs11ModuleNotFoundError naming every file name and directory tried.
    """
    if not _MODULE_NAME.fullmatch(name) or ".." in name:
        raise KeyReferenceError(
            f"pkcs11 URI attribute 'module-name' {name[:60]!r}: a bare module name "
            "(letters, digits, '.', '_', '+', '-'; no path, no '..'); use module-path= for a file"
        )
    require_supported_platform(platform)
    candidates = module_file_names(name, platform)
    dirs = module_search_dirs(platform)
    for d in dirs:
        for cand in candidates:
            p = d / cand
            if p.is_file():
                return str(p)
    stems = {name, name.removeprefix("lib"), *(name.removesuffix(s) for s in _SUFFIXES["darwin"])}
    for reg in _p11kit_module_files():
        if reg.stem not in stems:
            continue
        target = _registered_module(reg)
        if target is None:
            continue
        if not target.is_absolute():
            for d in dirs:
                if (d / target).is_file():
                    return str(d / target)
        elif target.is_file():
            return str(target)
    present = [str(d) for d in dirs if d.is_dir()]
    raise Pkcs11ModuleNotFoundError(
        f"PKCS#11 module-name {name!r} not found: tried {', '.join(candidates)} in "
        f"{', '.join(present) or 'no existing directory'} and p11-kit's registrations"
    )
