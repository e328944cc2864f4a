# Shared by scripts/test, scripts/demo, scripts/bench: a repo-local .venv with everything the
# project needs, and the Debian packages for SoftHSM2 / swtpm / tpm2 when we may install them.
# Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

APT_PACKAGES=(softhsm2 opensc ykcs11 swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config
              libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-abrmd libtss2-tcti-tabrmd0 dbus pcscd
              redis-server)

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

# Installers' progress, notices and warnings go to this file, not to the terminal: the demo's
# output is the demo. A failing command shows the end of the file, so real errors stay visible.
SETUP_LOG="$ROOT/.dpop-hsm/setup.log"

# quietly CMD...: run CMD with its output appended to $SETUP_LOG; on failure print the last
# lines of that output and return CMD's status.
quietly() {
  local status=0 out
  mkdir -p "$(dirname "$SETUP_LOG")"
  out="$(mktemp)"
  "$@" >"$out" 2>&1 || status=$?
  { printf '\n$ %s\n' "$*"; cat "$out"; } >>"$SETUP_LOG"
  if [ "$status" != 0 ]; then
    log "failed (exit $status): $*"
    tail -n 40 "$out" >&2
    log "full output: $SETUP_LOG"
  fi
  rm -f "$out"
  return "$status"
}

missing_apt_packages() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  echo "${missing[@]:-}"
}

# ensure_apt [required]: install missing packages as root; without root, say so and go on
# (the demo then falls back to software keys; tests needing the hardware skip or fail in CI).
ensure_apt() {
  local missing
  missing=$(missing_apt_packages "${APT_PACKAGES[@]}")
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update -qq
    # shellcheck disable=SC2086
    quietly apt-get install -y -qq --no-install-recommends $missing
  else
    log "not root or no apt-get: cannot install $missing"
    return 1
  fi
}

# ensure_venv LIST: create .venv and install the project (editable) with LIST, comma-separated
# extras such as pkcs11,tpm,httpx. The name "dev" in LIST means the PEP 735 dependency group of
# development tools (pytest, ruff, mypy, build, ...), which is not an extra of the package;
# pip >= 25.1 installs it with --group, so pip is upgraded first.
ensure_venv() {
  local list="$1" item stamp target extras=() groups=()
  IFS=',' read -ra items <<<"$list"
  for item in "${items[@]}"; do
    case "$item" in
      "") ;;
      dev) groups+=(--group "$ROOT/pyproject.toml:dev") ;;
      *) extras+=("$item") ;;
    esac
  done
  target="$ROOT"
  if [ "${#extras[@]}" -gt 0 ]; then target="$ROOT[$(IFS=,; echo "${extras[*]}")]"; fi
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    quietly python3 -m venv "$VENV"
  fi
  stamp="$VENV/.installed-$(echo "$list" | tr ',' '-')-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing dpop_hsm[$list] into .venv (pip's output: ${SETUP_LOG#"$ROOT/"})"
    quietly "$PY" -m pip install --disable-pip-version-check --upgrade pip
    quietly "$PY" -m pip install --disable-pip-version-check -e "$target" "${groups[@]}"
    touch "$stamp"
  fi
}
