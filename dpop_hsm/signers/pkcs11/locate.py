"""Where PKCS#11 module files are found: the trusted module directories and name lookup.

RFC 7512 §2.3 leaves ``module-name`` resolution to the consumer. We look in the directories
distributions and p11-kit install modules to (plus ``$DPOP_HSM_PKCS11_MODULE_DIRS``), and in
p11-kit's ``.module`` registrations. A name never carries a path, so a lookup never leaves
these directories.

This module imports nothing from python-pkcs11.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from ...errors import KeyReferenceError, TokenNotPresentError

__all__ = ["MODULE_DIRS_ENV", "module_search_dirs", "resolve_module_name"]

MODULE_DIRS_ENV = "DPOP_HSM_PKCS11_MODULE_DIRS"


def module_search_dirs() -> list[Path]:
    """Where ``module-name`` is looked up: our env override, p11-kit's and distro dirs."""
    dirs: list[Path] = []
    extra = os.environ.get(MODULE_DIRS_ENV)
    if extra:
        dirs += [Path(d) for d in extra.split(os.pathsep) if d]
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    libdirs = ["/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/lib64", "/lib"]
    for base in libdirs:
        roots = [Path(base, multiarch), Path(base)] if multiarch else [Path(base)]
        for root in roots:
            dirs += [root / "pkcs11", root / "softhsm", root]
    seen: set[Path] = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]  # type: ignore[func-returns-value]


def _p11kit_module_files() -> Iterable[Path]:
    # p11-kit registration files: <config dirs>/<name>.module with a "module:" line.
    for conf in (Path("/etc/pkcs11/modules"), Path("/usr/share/p11-kit/modules")):
        if conf.is_dir():
            yield from sorted(conf.glob("*.module"))


def resolve_module_name(name: str) -> str:
    """Find ``module-name`` (e.g. ``softhsm2``, ``libykcs11``, ``ykcs11.so``) on disk.

    RFC 7512 §2.3 leaves the lookup to the consumer: we try ``name``, ``lib<name>`` with and
    without ``.so`` in :func:`module_search_dirs`, then p11-kit ``.module`` registrations.
    """
    if not name or "/" in name or name in (".", ".."):
        raise KeyReferenceError(
            "pkcs11 URI attribute 'module-name': a bare module name without a path"
        )
    stems = [name] if name.startswith("lib") else [name, "lib" + name]
    candidates = []
    for stem in stems:
        candidates += [stem] if stem.endswith(".so") else [stem + ".so", stem]
    dirs = module_search_dirs()
    for d in dirs:
        for cand in candidates:
            p = d / cand
            if p.is_file():
                return str(p)
    for reg in _p11kit_module_files():
        if reg.stem not in (name, name.removeprefix("lib"), name.removesuffix(".so")):
            continue
        try:
            lines = reg.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key.strip() == "module" and value.strip():
                target = Path(value.strip())
                if not target.is_absolute():
                    for d in dirs:
                        if (d / target).is_file():
                            return str(d / target)
                elif target.is_file():
                    return str(target)
    raise TokenNotPresentError(
        f"PKCS#11 module {name!r} not found in {', '.join(str(d) for d in dirs if d.is_dir())}"
    )
