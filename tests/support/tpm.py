"""swtpm for the tests: a real TPM 2.0 simulator on 127.0.0.1, one free port pair per instance.

The same steps as ``scripts/swtpm`` (free port P and P+1, PID file, readiness poll, stop by PID),
in Python so fixtures can restart an instance on the same port and state directory. Nothing
here is mocked: every test talks to swtpm over TCP through the TSS.

Dictionary-attack lockout: swtpm starts with maxTries=3 and a 1000 s recovery time, so three
wrong-auth tests would lock every later test out. Each instance is set up with
TPM2_DictionaryAttackParameters(maxTries=1000, recoveryTime=0, lockoutRecovery=0), i.e. DA
protection off — what the tests need, never what a real TPM should use.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.hardware import unavailable

os.environ.setdefault("TSS2_LOG", "all+NONE")

SWTPM = shutil.which("swtpm")


def _port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (server and control channel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _alive(pid: int) -> bool:
    """Running (a daemonized swtpm's zombie, not yet reaped by init, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _esapi(tcti: str) -> Any:
    from tpm2_pytss import ESAPI

    return ESAPI(tcti)


@dataclass
class SwTpm:
    """One running swtpm: its port, state directory and PID."""

    state_dir: Path
    port: int = 0
    pid: int = 0
    _started: bool = field(default=False, repr=False)

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "swtpm.pid"

    def start(self, *, timeout: float = 10.0) -> None:
        assert SWTPM is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = _port_pair()
        self.pid_file.unlink(missing_ok=True)
        subprocess.run(
            [
                SWTPM,
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--flags",
                "not-need-init,startup-clear",
                "--daemon",
                "--pid",
                f"file={self.pid_file}",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self.pid = int(self.pid_file.read_text().strip())
        self._started = True
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from tpm2_pytss import TPM2_CAP, TPM2_PT, TSS2_Exception

        deadline = time.monotonic() + timeout
        while True:
            try:
                esapi = _esapi(self.tcti)
                try:
                    esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MANUFACTURER, 1)
                finally:
                    esapi.close()
                return
            except TSS2_Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop by PID and wait until the process (and so its port) is gone."""
        if not self._started:
            return
        self._started = False
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _alive(self.pid):
                return
            time.sleep(0.005)
        os.kill(self.pid, signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same port and state directory (a TPM reset)."""
        self.stop()
        deadline = time.monotonic() + 10
        while True:  # the old listener may linger a moment after the process died
            try:
                self.start()
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def disable_da_lockout(self) -> None:
        esapi = _esapi(self.tcti)
        try:
            esapi.dictionary_attack_parameters(1000, 0, 0)
        finally:
            esapi.close()

    def transient_handles(self) -> list[int]:
        """TPM2_GetCapability(TPM_CAP_HANDLES, TRANSIENT_FIRST): what is loaded right now."""
        from tpm2_pytss import TPM2_CAP, TPM2_HC

        esapi = _esapi(self.tcti)
        try:
            _, cap = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
            handles = cap.data.handles
            return [int(handles[i]) for i in range(handles.count)]
        finally:
            esapi.close()


def require_swtpm() -> None:
    if SWTPM is None:
        unavailable("swtpm is not installed (apt-get install swtpm)")
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError as e:
        unavailable(f"tpm2-pytss is not importable: {e}")


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwTpm]:
    """One swtpm for the whole session (keys persist in its temporary state directory)."""
    require_swtpm()
    tpm = SwTpm(tmp_path_factory.mktemp("swtpm"))
    tpm.start()
    try:
        tpm.disable_da_lockout()
        yield tpm
    finally:
        tpm.stop()


@pytest.fixture
def swtpm_private(tmp_path: Path) -> Iterator[SwTpm]:
    """A swtpm of this test's own, for tests that restart or stop it."""
    require_swtpm()
    tpm = SwTpm(tmp_path / "swtpm")
    tpm.start()
    try:
        tpm.disable_da_lockout()
        yield tpm
    finally:
        tpm.stop()


_next_handle = [0x81010100]


def fresh_handle() -> int:
    """A persistent handle no earlier test in this session used."""
    _next_handle[0] += 1
    return _next_handle[0]


# --- tpm2-pkcs11 behind tpm2-abrmd on a private D-Bus session bus ----------------------------

TPM2_PKCS11_MODULE = Path("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so")
TABRMD_TCTI_LIB = "libtss2-tcti-tabrmd.so.0"


@dataclass(frozen=True)
class Tpm2Pkcs11:
    """A tpm2-pkcs11 store with one initialized token, reached through tpm2-abrmd."""

    module: Path
    store: Path
    token: str
    user_pin: str
    so_pin: str

    def uri(self, obj: str) -> str:
        return f"pkcs11:token={self.token};object={obj}?module-path={self.module}"


def _tabrmd_tcti_present() -> bool:
    import ctypes

    try:
        ctypes.CDLL(TABRMD_TCTI_LIB)
    except OSError:
        return False
    return True


def _stop_pid(proc: subprocess.Popen[bytes] | None, pid: int | None = None) -> None:
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    elif pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return


@pytest.fixture(scope="session")
def tpm2_pkcs11(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tpm2Pkcs11]:
    """swtpm → tpm2-abrmd (own D-Bus session bus) → a tpm2_ptool store with token "dpop".

    tpm2-pkcs11 keeps objects loaded across calls, so it needs a resource manager: swtpm alone
    runs out of its 3 object slots. Environment for the module (read when it is loaded):
    DBUS_SESSION_BUS_ADDRESS, TPM2_PKCS11_TCTI=tabrmd:bus_type=session, TPM2_PKCS11_STORE.
    All three daemons are started here and stopped by PID.
    """
    require_swtpm()
    for tool in ("dbus-daemon", "tpm2-abrmd", "tpm2_ptool", "tpm2_getcap"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (tpm2-pkcs11 needs dbus, tpm2-abrmd, tpm2_ptool)")
    if not TPM2_PKCS11_MODULE.exists():
        unavailable(f"{TPM2_PKCS11_MODULE} is missing (apt-get install libtpm2-pkcs11-1)")
    if not _tabrmd_tcti_present():
        unavailable("the tabrmd TCTI is missing (apt-get install libtss2-tcti-tabrmd0)")
    base = tmp_path_factory.mktemp("tpm2pkcs11")
    tpm = SwTpm(base / "swtpm")
    dbus: subprocess.Popen[bytes] | None = None
    abrmd: subprocess.Popen[bytes] | None = None
    saved = {k: os.environ.get(k) for k in _P11_ENV}
    try:
        tpm.start()
        tpm.disable_da_lockout()
        bus = f"unix:path={base}/bus"
        dbus = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={bus}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda: Path(f"{base}/bus").exists(), "dbus-daemon socket")
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus, TSS2_LOG="all+NONE")
        abrmd = subprocess.Popen(
            ["tpm2-abrmd", "--session", "--allow-root", f"--tcti={tpm.tcti}", "--flush-all"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env["TPM2TOOLS_TCTI"] = "tabrmd:bus_type=session"
        _wait_for(lambda: _tcti_answers(env), "tpm2-abrmd on the session bus")
        store = base / "store"
        store.mkdir()
        info = Tpm2Pkcs11(TPM2_PKCS11_MODULE, store, "dpop", "1234", "so-pin-5678")
        for args in (
            ["init", f"--path={store}"],
            [
                "addtoken",
                "--pid=1",
                f"--label={info.token}",
                f"--userpin={info.user_pin}",
                f"--sopin={info.so_pin}",
                f"--path={store}",
            ],
        ):
            subprocess.run(["tpm2_ptool", *args], env=env, check=True, capture_output=True)
        os.environ.update(
            DBUS_SESSION_BUS_ADDRESS=bus,
            TPM2_PKCS11_TCTI="tabrmd:bus_type=session",
            TPM2_PKCS11_STORE=str(store),
            TPM2_PKCS11_LOG_LEVEL="0",
        )
        yield info
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop_pid(abrmd)
        _stop_pid(dbus)
        tpm.stop()


_P11_ENV = (
    "DBUS_SESSION_BUS_ADDRESS",
    "TPM2_PKCS11_TCTI",
    "TPM2_PKCS11_STORE",
    "TPM2_PKCS11_LOG_LEVEL",
)


def _tcti_answers(env: dict[str, str]) -> bool:
    out = subprocess.run(
        ["tpm2_getcap", "properties-fixed"], env=env, capture_output=True, timeout=10
    )
    return out.returncode == 0


def _wait_for(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up in {timeout} s")
        time.sleep(0.05)
