#!/usr/bin/env bash
# Measures the syscalls the tpmd worker makes once its seccomp filter is in force, to check
# seccomp/tpmd.json.
#
# Runs the through-the-broker tests (tests/tests/tpmd_broker.rs: keys, imports, good and bad
# blobs, HMACs short and long, restarts, a device: TCTI) with `aziotd` wrapped in `strace -f`,
# then, for every worker (the process that called seccomp(SECCOMP_SET_MODE_FILTER)) and its
# threads, counts the syscalls made after its last seccomp() call, with the argument values the
# filter checks. With --log-mode it instead runs the same tests with the worker's seccomp in log
# mode (AZIOT_TESTS_TPMD_CONFIG adds `[sandbox] seccomp = "log"`, `allow_degraded = true`) and
# prints the kernel's type=1326 audit records of user aziottpm: each is a syscall the list lacks.
# Under strace the test that runs `aziotctl policy audit` fails (the audit cannot dump the
# seccomp program of a traced worker: EPERM); that is expected. Idle-only syscalls (thread exit after the blocking pool's 10 s keep-alive)
# need a run that idles: IDLE=15 adds one (get keys, a bad import, then 15 s idle).
#
# usage: policy/tools/measure-tpmd-syscalls.sh [--log-mode]   (as root, from the workspace;
#        needs strace, swtpm, tpm2-tools, curl; builds aziotd and the test first)
set -euo pipefail
cd "$(dirname "$0")/../.."
. policy/tools/measure-lib.sh
measure_build
cargo test -q -p aziot-tests --test tpmd_broker --no-run
work=$(mktemp -d /tmp/aziot-measure-tpmd.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
bin=$(realpath target/debug/aziotd)

if [ "${1:-}" = --log-mode ]; then
  before=$(dmesg | wc -l)
  AZIOT_TESTS_TPMD_CONFIG=$'[sandbox]\nseccomp = "log"\nallow_degraded = true' \
    cargo test -q -p aziot-tests --test tpmd_broker || true
  seccomp_log_since "$before" aziottpm
  exit 0
fi

mkdir "$work/traces"
cat > "$work/aziotd" <<WRAP
#!/bin/bash
/usr/bin/strace -f -qq -s 0 -o $work/traces/t.\$\$ $bin "\$@" &
s=\$!
trap 'kill -TERM \$(/usr/bin/pgrep -P \$s) 2>/dev/null' TERM
wait \$s; wait \$s
WRAP
chmod +x "$work/aziotd"
AZIOTD_BIN="$work/aziotd" cargo test -q -p aziot-tests --test tpmd_broker || true

if [ -n "${IDLE:-}" ]; then
  port=$((20000 + RANDOM % 20000))
  mkdir "$work/idle" "$work/idle/state"
  swtpm socket --tpm2 --flags not-need-init,startup-clear --tpmstate dir="$work/idle/state" \
    --server type=tcp,port=$port,bindaddr=127.0.0.1 --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 &
  swtpm=$!
  sleep 0.5
  printf 'tcti = "swtpm:host=127.0.0.1,port=%s"\n[endpoints]\naziot_tpmd = "unix://%s/idle/s.sock"\n' "$port" "$work" > "$work/idle/c.toml"
  env -i AZIOT_TPMD_CONFIG="$work/idle/c.toml" AZIOT_TPMD_CONFIG_DIR="$work/idle/d" \
    /usr/bin/strace -f -qq -s 0 -o "$work/traces/t.idle" "$bin" aziot-tpmd 2>"$work/idle/log" &
  tracer=$!
  for _ in $(seq 100); do [ -e "$work/idle/tpmd.status" ] && break; sleep 0.1; done
  call() { curl -sS --max-time 20 --unix-socket "$work/idle/s.sock" -X "$1" -H 'content-type: application/json' ${3:+-d "$3"} "http://tpmd.sock$2?api-version=2020-09-01" >/dev/null; }
  call GET /get_tpm_keys
  call POST /import_auth_key '{"key":"AAAA"}'
  for _ in $(seq 8); do call GET /get_tpm_keys & done
  sleep "$IDLE"
  kill -TERM "$(pgrep -P "$tracer")"; wait "$tracer" || true
  kill "$swtpm"; wait "$swtpm" || true
fi

worker_syscalls "$work/traces" tpmd
