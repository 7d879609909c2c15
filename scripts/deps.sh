#!/usr/bin/env bash
# Installs the Debian packages the build, the demo and the tests need (idempotent).
# Sourced by scripts/demo and scripts/test; needs root (or sudo) on a fresh Debian 12.
set -euo pipefail

AZIOT_DEBIAN_PACKAGES=(
  build-essential pkg-config libssl-dev openssl curl ca-certificates systemd strace
  softhsm2 opensc swtpm swtpm-tools tpm2-tools libtss2-dev
  # scripts/package and its test (tests/tests/package.rs): dpkg-shlibdeps, lintian
  dpkg-dev lintian
  # scripts/vm-test (tests/vm/): the guest image, the VM, its TPM (swtpm above)
  mmdebstrap qemu-system-x86 qemu-utils
)

aziot_install_deps() {
  local missing=()
  for p in "${AZIOT_DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "==> installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install the Rust toolchain (rustup) first" >&2
    exit 1
  fi
}

# scripts/fuzz: cargo-fuzz from crates.io on the stable toolchain (skipped when installed).
aziot_install_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
  fi
}
