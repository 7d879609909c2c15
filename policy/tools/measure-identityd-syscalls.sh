#!/usr/bin/env bash
# Measures the syscalls the identityd worker makes once its seccomp filter is in force, to check
# seccomp/identityd.json.
#
# Runs the through-the-broker suites (tests/tests/identityd_api.rs: every endpoint for every
# caller class, reloads, local identities through certd, state files; identityd_hub.rs: the IoT
# Hub client against the mock hub over TLS, retries and back-off; identityd_dps.rs: DPS
# provisioning by SAS, X.509 and TPM attestation through tpmd on swtpm; identityd_proxy.rs: hub
# and DPS through an HTTP CONNECT proxy; identityd_dps_est.rs: DPS with certs from EST through
# certd) with `aziotd aziot-identityd` wrapped in `strace -f` (keyd, certd and tpmd run the real
# binary, untraced), then, for every identityd worker (the process that called
# seccomp(SECCOMP_SET_MODE_FILTER)) and its threads, counts the syscalls made after its last
# seccomp() call, with the argument values the filter checks. With --log-mode it instead runs the
# suites with the worker's seccomp in log mode (the wrapper puts a drop-in
# `zz-measure-seccomp-log.toml` with `[sandbox] seccomp = "log"`, `allow_degraded = true` into
# identityd's config directory before each start) and prints the kernel's type=1326 audit records
# of user aziotid: each is a syscall the list lacks. Under strace (and in log mode) the tests
# that run `aziotctl policy audit` fail (a traced or degraded worker is a deviation): expected.
#
# usage: policy/tools/measure-identityd-syscalls.sh [--log-mode]   (as root, from the workspace;
#        needs strace, swtpm, softhsm2 as the suites do; builds the workspace first)
set -euo pipefail
cd "$(dirname "$0")/../.."
. policy/tools/measure-lib.sh
suites=(identityd_api identityd_hub identityd_dps identityd_proxy identityd_dps_est)
measure_build
work=$(mktemp -d /tmp/aziot-measure-identityd.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
bin=$(realpath target/debug/aziotd)

run_suites() {
  for s in "${suites[@]}"; do
    AZIOTD_BIN="$work/aziotd" cargo test -q -p aziot-tests --test "$s" 2>&1 | tail -n 40 || true
  done
}

if [ "${1:-}" = --log-mode ]; then
  cat > "$work/aziotd" <<WRAP
#!/bin/bash
# identityd only: its worker's seccomp in log mode (a drop-in of the harness's config directory)
if [ "\$1" = aziot-identityd ] && [ -n "\${AZIOT_IDENTITYD_CONFIG_DIR:-}" ]; then
  mkdir -p "\$AZIOT_IDENTITYD_CONFIG_DIR"
  printf '[sandbox]\nseccomp = "log"\nallow_degraded = true\n' > "\$AZIOT_IDENTITYD_CONFIG_DIR/zz-measure-seccomp-log.toml"
fi
exec $bin "\$@"
WRAP
  chmod +x "$work/aziotd"
  before=$(dmesg | wc -l)
  run_suites
  seccomp_log_since "$before" aziotid "$bin"
  exit 0
fi

mkdir "$work/traces"
cat > "$work/aziotd" <<WRAP
#!/bin/bash
# only identityd is traced; keyd, certd, tpmd: the real binary in this process (their harnesses
# check that the broker is their child)
[ "\$1" = aziot-identityd ] || exec $bin "\$@"
/usr/bin/strace -f -qq -s 0 -o $work/traces/t.\$\$ $bin "\$@" &
s=\$!
trap 'kill -TERM \$(/usr/bin/pgrep -P \$s) 2>/dev/null; kill -TERM \$s 2>/dev/null' TERM
wait \$s; wait \$s
WRAP
chmod +x "$work/aziotd"
run_suites

worker_syscalls "$work/traces" identityd
