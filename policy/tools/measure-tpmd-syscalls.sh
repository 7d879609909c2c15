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
cargo build -q -p aziotd -p aziotctl --bins
cargo test -q -p aziot-tests --test tpmd_broker --no-run
work=$(mktemp -d /tmp/aziot-measure-tpmd.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
bin=$(realpath target/debug/aziotd)

if [ "${1:-}" = --log-mode ]; then
  before=$(dmesg | wc -l)
  AZIOT_TESTS_TPMD_CONFIG=$'[sandbox]\nseccomp = "log"\nallow_degraded = true' \
    cargo test -q -p aziot-tests --test tpmd_broker || true
  uid=$(id -u aziottpm)
  # SECCOMP_RET_LOG is code=0x7ffc0000; the kernel may rate-limit these lines ("callbacks
  # suppressed"), so an empty answer is confirmed by the strace mode
  echo "# new type=1326 (SECCOMP_RET_LOG) records of uid $uid (none = the allowlist covered every call):"
  dmesg | tail -n +"$((before + 1))" | grep 'type=1326' | grep " uid=$uid " | grep 'code=0x7ffc0000' || true
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

python3 - "$work/traces" <<'PY'
import collections, glob, re, sys
counts, args, workers = collections.Counter(), collections.defaultdict(collections.Counter), 0
argpos = {'ioctl': 1, 'fcntl': 1, 'prctl': 0, 'mmap': 2, 'mprotect': 2, 'getsockopt': 2, 'madvise': 2}
for path in sorted(glob.glob(sys.argv[1] + '/t.*')):
    lines = open(path).read().splitlines()
    main = last = None
    for i, line in enumerate(lines):
        m = re.match(r'(\d+) +seccomp\(SECCOMP_SET_MODE_FILTER', line)
        if m:
            main, last = m.group(1), i
    if main is None:
        continue
    workers += 1
    group, changed = {main}, True
    while changed:
        changed = False
        for line in lines:
            m = re.match(r'(\d+) +clone3?\(.*CLONE_THREAD.*\) = (\d+)', line) or re.match(r'(\d+) +<\.\.\. clone3? resumed>.*= (\d+)', line)
            if m and m.group(1) in group and m.group(2) not in group:
                group.add(m.group(2))
                changed = True
    for line in lines[last + 1:]:
        m = re.match(r'(\d+) +([a-z0-9_]+)\((.*)', line)
        if not m or m.group(1) not in group:
            continue
        name = m.group(2)
        counts[name] += 1
        if name in argpos:
            a = re.split(r'[,)<]', m.group(3))
            if len(a) > argpos[name]:
                args[name][a[argpos[name]].strip()] += 1
print(f'# {workers} tpmd workers; syscalls after seccomp(), with counts:')
for name, n in counts.most_common():
    print(f'{n:8d} {name}')
print('# checked arguments:')
for name, c in sorted(args.items()):
    print(f'  {name}: ' + ', '.join(f'{k} x{v}' for k, v in c.most_common()))
PY
