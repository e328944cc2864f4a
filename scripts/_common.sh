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
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    log "not root or no apt-get: cannot install $missing"
    return 1
  fi
}

# ensure_venv EXTRAS: create .venv and install the project with the given extras (editable).
ensure_venv() {
  local extras="$1" stamp
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  stamp="$VENV/.installed-$(echo "$extras" | tr ',' '-')-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing dpop_hsm[$extras] into .venv"
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[$extras]"
    touch "$stamp"
  fi
}
