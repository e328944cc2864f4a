"""The package as a user gets it: the sdist and wheel built from a clean copy of the tree
(``python -m build``: the sdist first, the wheel from the sdist), the wheel installed into a
fresh virtual environment with no extras.

What a user relies on: ``from dpop_hsm import *``, ``pydoc dpop_hsm`` and ``dpop-hsm --help``
work without any extra; every module that needs one raises ``MissingDependencyError`` naming
it (and the pip command); the wheel carries LICENSE and ``py.typed`` and says its license as an
SPDX expression (PEP 639); the sdist holds the package and its documents but no tests.

Needs the package index only for what pip's cache lacks (setuptools for the isolated build,
the runtime dependencies).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
PYTHONS = ("3.11", "3.12", "3.13")  # the Programming Language classifiers, checked below
OPTIONAL_TOP_LEVEL = ("pkcs11", "tpm2_pytss", "httpx", "anyio", "redis", "aiohttp")
# The extra each module needs; every module not listed must import with no extra at all.
NEEDS_EXTRA = {
    "dpop_hsm._redis_twin": "redis",
    "dpop_hsm.aiohttp": "aiohttp",
    "dpop_hsm.httpx": "httpx",
    "dpop_hsm.redis": "redis",
    # The pkcs11 package itself imports without the extra (the URI parser needs none); every
    # module that talks to a Cryptoki module needs it.
    "dpop_hsm.signers.pkcs11.admin": "pkcs11",
    "dpop_hsm.signers.pkcs11.cryptoki": "pkcs11",
    "dpop_hsm.signers.pkcs11.keygen": "pkcs11",
    "dpop_hsm.signers.pkcs11.objects": "pkcs11",
    "dpop_hsm.signers.pkcs11.pool": "pkcs11",
    "dpop_hsm.signers.pkcs11.signer": "pkcs11",
    "dpop_hsm.signers.pkcs11_admin": "pkcs11",
    "dpop_hsm.signers.pkcs11_module": "pkcs11",
    "dpop_hsm.signers.tpm": "tpm",
    "dpop_hsm.signers.tpm_tss": "tpm",
}
# Modules that only the program hosting them loads (a pytest plugin runs inside pytest): without
# extras they may fail only because that host program itself is not installed.
HOSTED_BY = {"dpop_hsm.pytest_plugin": "pytest"}
SDIST_TOP_LEVEL = {
    "CHANGELOG.md",
    "LICENSE",
    "MANIFEST.in",
    "PKG-INFO",
    "README.md",
    "SECURITY.md",
    "dpop_hsm",
    "dpop_hsm.egg-info",
    "pyproject.toml",
    "setup.cfg",
}


@dataclass(frozen=True)
class Dists:
    tree: Path  # the clean copy the dists were built from
    wheel: Path
    sdist: Path
    build_log: str

    def wheel_names(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as whl:
            return whl.namelist()

    def metadata(self) -> Message:
        with zipfile.ZipFile(self.wheel) as whl:
            (name,) = (n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            raw = whl.read(name).decode("utf-8")
        return email.parser.Parser(policy=email.policy.compat32).parsestr(raw)


def clean_copy(dest: Path) -> Path:
    """The files git would commit (tracked or new, never ignored: no .venv, tokens, caches)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("the packaging test copies the tree with git: run it from a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode("utf-8")
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # tracked files deleted in the work tree are skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    tree = clean_copy(tmp_path_factory.mktemp("tree"))
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = built.stdout + built.stderr
    assert built.returncode == 0, f"python -m build failed (needs the dev group):\n{log[-4000:]}"
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return Dists(tree, wheel, sdist, log)


def fresh_venv(dists: Dists, where: Path, python: str) -> Path:
    """A new venv on ``python`` with only the wheel (and its core dependencies) installed."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    venv_python = where / "bin" / "python"
    installed = subprocess.run(
        [*PIP, "--python", str(venv_python), "install", "--quiet", str(dists.wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-4000:]
    return venv_python


@pytest.fixture(scope="module")
def bare(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fresh venv's python (same version as this run), without any extra."""
    yield fresh_venv(dists, tmp_path_factory.mktemp("venv") / "bare", sys.executable)


def run(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run in the fresh venv, from a directory without the source tree (the wheel is used)."""
    return subprocess.run(
        [str(python), *args],
        cwd=python.parent,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


# Star import, pydoc, CLI and every module's imports, in the venv without extras: one JSON report.
PROBE = r"""
import importlib, importlib.util, json, sys, types

report = {"extras_present": [m for m in OPTIONAL if importlib.util.find_spec(m)]}
namespace = {}
exec("from dpop_hsm import *", namespace)
import dpop_hsm
report["missing_from_star"] = [n for n in dpop_hsm.__all__ if n not in namespace]
report["loaded_after_star"] = sorted(
    m for m in sys.modules if m.partition(".")[0] in OPTIONAL
)
from dpop_hsm.errors import MissingDependencyError

def failure(action):
    try:
        action()
    except MissingDependencyError as e:
        return {
            "extra": e.extra, "module": e.module, "message": str(e),
            "import_error": isinstance(e, ImportError), "code": e.code,
        }
    except BaseException as e:
        return {"other": f"{type(e).__name__}: {e}"}
    return None

report["modules"] = {m: failure(lambda m=m: importlib.import_module(m)) for m in MODULES}
from dpop_hsm import load_signer
report["by_name"] = {
    n: failure(lambda n=n: exec(f"from dpop_hsm import {n}", {}))
    for n in ("Pkcs11Signer", "TpmSigner")
}
report["by_reference"] = {
    r: failure(lambda r=r: load_signer(r))
    for r in ("pkcs11:token=dpop;object=dpop-demo", "tpm2:handle=0x81010001")
}
print(json.dumps(report))
"""


def wheel_modules(dists: Dists) -> list[str]:
    """Every module in the wheel except ``__main__`` (importing it runs the CLI)."""
    names = [n[: -len(".py")] for n in dists.wheel_names() if n.endswith(".py")]
    modules = (n.replace("/", ".").removesuffix(".__init__") for n in names)
    return sorted(m for m in modules if not m.endswith(".__main__"))


@pytest.fixture(scope="module")
def probe(dists: Dists, bare: Path) -> dict[str, object]:
    code = f"OPTIONAL = {OPTIONAL_TOP_LEVEL!r}\nMODULES = {wheel_modules(dists)!r}\n{PROBE}"
    result = run(bare, "-c", code)
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_the_fresh_venv_has_no_extras(probe: dict[str, object]) -> None:
    assert probe["extras_present"] == []  # else the checks below would prove nothing


def test_star_import_works_without_extras_and_loads_no_backend(probe: dict[str, object]) -> None:
    assert probe["missing_from_star"] == []
    assert probe["loaded_after_star"] == []


def test_pydoc_and_cli_help_work_without_extras(bare: Path) -> None:
    doc = run(bare, "-m", "pydoc", "dpop_hsm")
    assert doc.returncode == 0, doc.stderr
    assert "MissingDependencyError" in doc.stdout and "TokenClient" in doc.stdout
    for command in ([str(bare.parent / "dpop-hsm"), "--help"], [str(bare), "-m", "dpop_hsm", "-h"]):
        shown = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith("usage: dpop-hsm"), shown.stdout


def check_names_extra(failure: object, extra: str, where: str) -> None:
    assert isinstance(failure, dict), f"{where}: imported without the {extra} extra"
    assert "other" not in failure, f"{where}: {failure['other']}"
    assert failure["extra"] == extra, (where, failure)
    assert failure["code"] == "missing_dependency"
    assert failure["import_error"], f"{where}: MissingDependencyError must be an ImportError"
    assert f"pip install 'dpop_hsm[{extra}]'" in str(failure["message"]), failure


def test_every_module_imports_or_names_its_extra(dists: Dists, probe: dict[str, object]) -> None:
    modules = probe["modules"]
    assert isinstance(modules, dict)
    provided = set(dists.metadata().get_all("Provides-Extra") or [])
    for module, failure in modules.items():
        if module in NEEDS_EXTRA:
            check_names_extra(failure, NEEDS_EXTRA[module], module)
        elif module in HOSTED_BY and failure is not None:
            host = HOSTED_BY[module]
            assert failure == {"other": f"ModuleNotFoundError: No module named '{host}'"}, failure
        else:  # a module that needs an extra on purpose belongs in NEEDS_EXTRA
            assert failure is None, f"{module} does not import without extras: {failure}"
    assert set(NEEDS_EXTRA) <= set(modules), "a module listed in NEEDS_EXTRA is not in the wheel"
    # Each declared extra is needed by some module, and nothing asks for an undeclared one.
    assert set(NEEDS_EXTRA.values()) == provided


def test_backends_by_name_and_by_reference_name_their_extra(probe: dict[str, object]) -> None:
    by_name, by_reference = probe["by_name"], probe["by_reference"]
    assert isinstance(by_name, dict) and isinstance(by_reference, dict)
    check_names_extra(by_name["Pkcs11Signer"], "pkcs11", "from dpop_hsm import Pkcs11Signer")
    check_names_extra(by_name["TpmSigner"], "tpm", "from dpop_hsm import TpmSigner")
    check_names_extra(by_reference["pkcs11:token=dpop;object=dpop-demo"], "pkcs11", "pkcs11:")
    check_names_extra(by_reference["tpm2:handle=0x81010001"], "tpm", "tpm2:")


def test_cli_names_the_missing_extra(bare: Path) -> None:
    from dpop_hsm.cli import EXIT_CODES

    result = subprocess.run(
        [str(bare.parent / "dpop-hsm"), "jwk", "--key", "pkcs11:token=dpop;object=dpop-demo"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == EXIT_CODES["configuration"], result.stderr
    assert "missing_dependency" in result.stderr
    assert "pip install 'dpop_hsm[pkcs11]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_wheel_carries_license_and_py_typed(dists: Dists) -> None:
    names = dists.wheel_names()
    assert "dpop_hsm/py.typed" in names
    (license_file,) = (n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    with zipfile.ZipFile(dists.wheel) as whl:
        assert whl.read(license_file) == (ROOT / "LICENSE").read_bytes()
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    # Every module of the tree is in the wheel: a new subpackage must reach the setuptools list.
    tree = sorted(str(p.relative_to(dists.tree)) for p in (dists.tree / "dpop_hsm").rglob("*.py"))
    assert sorted(n for n in names if n.startswith("dpop_hsm/") and n.endswith(".py")) == tree


def test_license_metadata_is_an_spdx_expression(dists: Dists) -> None:
    meta = dists.metadata()
    assert tuple(int(x) for x in meta["Metadata-Version"].split(".")) >= (2, 4)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None  # the legacy free-text field is gone (PEP 639)
    classifiers = meta.get_all("Classifier") or []
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639 forbids both
    assert "Typing :: Typed" in classifiers
    assert "Operating System :: POSIX :: Linux" in classifiers
    versions = tuple(
        c.rpartition(" :: ")[2]
        for c in classifiers
        if c.startswith("Programming Language :: Python :: 3.")
    )
    assert versions == PYTHONS
    assert meta["Requires-Python"] == f">={PYTHONS[0]}"
    assert "dev" not in (meta.get_all("Provides-Extra") or [])  # a dependency group instead
    assert 'anyio>=4; extra == "httpx"' in (meta.get_all("Requires-Dist") or [])
    assert "SetuptoolsDeprecationWarning" not in dists.build_log, dists.build_log[-4000:]


def test_sdist_holds_the_package_and_its_documents_but_no_tests(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as sdist:
        names = sdist.getnames()
    root = dists.sdist.name.removesuffix(".tar.gz")
    top = {n.removeprefix(f"{root}/").partition("/")[0] for n in names if n != root}
    assert top == SDIST_TOP_LEVEL, top ^ SDIST_TOP_LEVEL
    assert not [n for n in names if "/tests/" in n or n.endswith("/tests")]


def test_readme_names_the_wheel_that_is_built(dists: Dists) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"dist/{dists.wheel.name}" in readme


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` that runs: on PATH, else one pyenv installed (whose shims
    on PATH refuse versions that are not selected)."""
    candidates = [shutil.which(f"python{version}")]
    if shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        if root:
            found = sorted(Path(root, "versions").glob(f"{version}.*/bin/python{version}"))
            candidates += [str(p) for p in found]
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


CURRENT = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.mark.parametrize("version", [v for v in PYTHONS if v != CURRENT])
def test_wheel_works_on_every_classified_python(version: str, dists: Dists, tmp_path: Path) -> None:
    """The other classified versions: star import and the CLI from the same wheel."""
    python = find_python(version)
    if python is None:
        pytest.skip(f"no python{version} here to check the classifier with")
    venv_python = fresh_venv(dists, tmp_path / "venv", python)
    star = run(venv_python, "-c", "from dpop_hsm import *; print(TokenClient.__name__)")
    assert star.returncode == 0 and star.stdout.strip() == "TokenClient", star.stderr
    shown = run(venv_python, "-m", "dpop_hsm", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: dpop-hsm"), shown.stderr
