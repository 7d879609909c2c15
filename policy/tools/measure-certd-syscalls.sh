#!/usr/bin/env bash
# Measures the syscalls the certd worker makes once its seccomp filter is in force, to check
# seccomp/certd.json.
#
# Runs the through-the-broker suites (tests/tests/certd_api.rs, certd_issue.rs: every endpoint,
# preloaded files and lists, reload, local issuance signed by keyd through the engine's twin,
# kill -9 of the worker during issuances, restart) with `aziotd` wrapped in `strace -f`, then,
# for every certd worker (the process of user aziotcs that called seccomp(SECCOMP_SET_MODE_FILTER))
# and its threads, counts the syscalls made after its last seccomp() call, with the argument
# values the filter checks. keyd's workers run in the same traces and are told apart by the
# certd hand-off (`aziot-certd` in the worker's trace). With --log-mode it instead runs the
# suites with the worker's seccomp in log mode (AZIOT_TESTS_CERTD_CONFIG adds `[sandbox]
# seccomp = "log"`, `allow_degraded = true`) and prints the kernel's type=1326 audit records of
# user aziotcs: each is a syscall the list lacks. Under strace (and in log mode) the audit test
# fails (a traced or degraded worker is a deviation): expected.
#
# usage: policy/tools/measure-certd-syscalls.sh [--log-mode]   (as root, from the workspace)
set -euo pipefail
cd "$(dirname "$0")/../.."
. policy/tools/measure-lib.sh
measure_build
cargo test -q -p aziot-tests --test certd_api --test certd_issue --test certd_est --no-run
work=$(mktemp -d /tmp/aziot-measure-certd.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
bin=$(realpath target/debug/aziotd)

if [ "${1:-}" = --log-mode ]; then
  before=$(dmesg | wc -l)
  export AZIOT_TESTS_CERTD_CONFIG=$'[sandbox]\nseccomp = "log"\nallow_degraded = true'
  cargo test -q -p aziot-tests --test certd_api || true
  cargo test -q -p aziot-tests --test certd_issue || true
  cargo test -q -p aziot-tests --test certd_est || true
  seccomp_log_since "$before" aziotcs
  exit 0
fi

mkdir "$work/traces"
cat > "$work/aziotd" <<WRAP
#!/bin/bash
# only certd is traced (keyd runs the real binary)
# keyd: the real binary in this process (its harness checks that the broker is its child)
[ "\$1" = aziot-certd ] || exec $bin "\$@"
/usr/bin/strace -f -qq -s 64 -o $work/traces/t.\$\$ $bin "\$@" &
s=\$!
trap 'kill -TERM \$(/usr/bin/pgrep -P \$s) 2>/dev/null; kill -TERM \$s 2>/dev/null' TERM
wait \$s; wait \$s
WRAP
chmod +x "$work/aziotd"
AZIOTD_BIN="$work/aziotd" cargo test -q -p aziot-tests --test certd_api || true
AZIOTD_BIN="$work/aziotd" cargo test -q -p aziot-tests --test certd_issue || true
# EST against the mock server (TCP sockets, connect_timeout's poll, Retry-After sleeps)
AZIOTD_BIN="$work/aziotd" cargo test -q -p aziot-tests --test certd_est || true

worker_syscalls "$work/traces" certd
