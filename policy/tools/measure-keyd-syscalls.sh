#!/usr/bin/env bash
# Measures the syscalls the keys service makes once it serves, to derive seccomp/keyd.json.
#
# Runs the current (unconfined, single-process) `aziotd aziot-keyd` under `strace -f`, drives it
# with curl (symmetric keys, EC and RSA key pairs, sign/verify/encrypt/decrypt, derived keys,
# errors, concurrent requests, idle time), then prints every syscall made AFTER the listener was
# opened (the worker installs seccomp before it builds its runtime; what happens earlier is
# pre-load and is not in the allowlist) with counts, and the argument values that the filter
# checks (ioctl requests, prctl options, mmap/mprotect prot, clone flags, socket domains).
#
# usage: policy/tools/measure-keyd-syscalls.sh [path/to/aziotd]   (as root; needs strace, curl)
set -euo pipefail
bin=${1:-$(dirname "$0")/../../target/debug/aziotd}
bin=$(realpath "$bin")
command -v strace >/dev/null || { echo "install strace" >&2; exit 1; }
prefix=$(mktemp -d /tmp/aziot-measure.XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$prefix"' EXIT
mkdir -p "$prefix/etc/config.d" "$prefix/state" "$prefix/run"
chmod 0700 "$prefix/state"
cat > "$prefix/etc/config.toml" <<TOML
[aziot_keys]
homedir_path = "$prefix/state"

[endpoints]
aziot_keyd = "unix://$prefix/run/keyd.sock"
TOML
ln -s "$bin" "$prefix/aziot-keyd"
sock="$prefix/run/keyd.sock"
AZIOT_KEYD_CONFIG="$prefix/etc/config.toml" AZIOT_KEYD_CONFIG_DIR="$prefix/etc/config.d" \
  strace -f -qq -s 0 ${STRACE_EXTRA:-} -o "$prefix/trace" "$prefix/aziot-keyd" 2>"$prefix/log" &
pid=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { cat "$prefix/log" >&2; exit 1; }

v='api-version=2021-05-01'
call() { curl -sS --max-time 20 --unix-socket "$sock" -X "$1" -H 'content-type: application/json' ${3:+-d "$3"} "http://keyd.sock$2?$v"; }
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
msg=$(printf 'hello' | base64)
dig=$(printf 'hello' | openssl dgst -sha256 -binary | base64)
for round in 1 2 3; do
  h=$(call POST /key "{\"keyId\":\"sym$round\",\"usage\":\"sign\"}" | field keyHandle)
  call POST /sign "{\"keyHandle\":\"$h\",\"algorithm\":\"HMAC-SHA256\",\"parameters\":{\"message\":\"$msg\"}}" >/dev/null
  call GET "/key/sym$round" >/dev/null
  e=$(call POST /key "{\"keyId\":\"aead$round\",\"usage\":\"encrypt\"}" | field keyHandle)
  ct=$(call POST /encrypt "{\"keyHandle\":\"$e\",\"algorithm\":\"AEAD\",\"parameters\":{\"iv\":\"AAAAAAAAAAAAAAAA\",\"aad\":\"\"},\"plaintext\":\"$msg\"}" | field ciphertext)
  call POST /decrypt "{\"keyHandle\":\"$e\",\"algorithm\":\"AEAD\",\"parameters\":{\"iv\":\"AAAAAAAAAAAAAAAA\",\"aad\":\"\"},\"ciphertext\":\"$ct\"}" >/dev/null
  d=$(call POST /derivedkey "{\"baseKeyHandle\":\"$h\",\"derivationData\":\"$msg\"}" | field derivedKeyHandle)
  call POST /sign "{\"keyHandle\":\"$d\",\"algorithm\":\"HMAC-SHA256\",\"parameters\":{\"message\":\"$msg\"}}" >/dev/null
  for alg in ec-p256 rsa-2048 "ec-p384:rsa-4096"; do
    id="kp-$round-${alg%%:*}"
    k=$(call POST /keypair "{\"keyId\":\"$id\",\"preferredAlgorithms\":\"$alg\"}" | field keyHandle)
    call POST /parameters/algorithm "{\"keyHandle\":\"$k\"}" >/dev/null
    call POST /sign "{\"keyHandle\":\"$k\",\"algorithm\":\"ECDSA\",\"parameters\":{\"digest\":\"$dig\"}}" >/dev/null
    call POST /sign "{\"keyHandle\":\"$k\",\"algorithm\":\"RSA-PKCS1\",\"parameters\":{\"digest\":\"$dig\"}}" >/dev/null
    call GET "/keypair/$id" >/dev/null
  done
  call POST "/keypair/kp-$round-ec-p256" "{\"keyHandle\":\"$k\"}" >/dev/null || true
  call DELETE /key "{\"keyHandle\":\"$h\"}" >/dev/null || true
  call GET /key/no-such-key >/dev/null
  call POST /sign '{"keyHandle":"garbage"}' >/dev/null
  curl -sS --max-time 5 --unix-socket "$sock" "http://keyd.sock/key/x" >/dev/null || true
  # concurrency: several clients at once, some slow (idle keep-alive) ones
  kids=()
  for i in $(seq 12); do call GET "/key/sym$round" >/dev/null & kids+=($!); done
  wait "${kids[@]}"
  sleep 1.5
done
# $pid is strace; stop the traced service itself (SIGTERM, then SIGKILL if it lingers).
kpid=$(pgrep -P "$pid" | head -1)
kill -TERM "$kpid" 2>/dev/null || true
for _ in $(seq 30); do kill -0 "$kpid" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$kpid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true

# Cut at the listener: keep what comes after the listen() call.
start=$(grep -n ' listen(' "$prefix/trace" | head -1 | cut -d: -f1)
tail -n +"$start" "$prefix/trace" > "$prefix/served"
echo "# syscalls after listen(), with counts (pid-prefixed strace lines):"
sed -E 's/^[0-9]+ +//; s/^<\.\.\. ([a-z0-9_]+) resumed>.*/\1/; s/\(.*//' "$prefix/served" \
  | grep -E '^[a-z0-9_]+$' | sort | uniq -c | sort -rn
echo "# ioctl requests:";   grep -oE 'ioctl\([0-9]+, [A-Z0-9_x]+' "$prefix/served" | awk '{print $2}' | sort | uniq -c || true
echo "# prctl options:";    grep -oE 'prctl\([A-Z0-9_]+' "$prefix/served" | sort | uniq -c || true
echo "# mmap/mprotect prot:"; grep -oE '(mmap|mprotect)\([^,]+, [^,]+, [A-Z_|]+' "$prefix/served" | awk '{print $NF}' | sort | uniq -c || true
echo "# clone flags:";      grep -oE 'clone3?\(\{?[^)]*' "$prefix/served" | grep -oE 'flags=[A-Z_|]+|CLONE_[A-Z_|]+' | sort | uniq -c || true
echo "# socket/connect:";   grep -E ' (socket|connect)\(' "$prefix/served" | sed -E 's/^[0-9]+ +//' | cut -c1-60 | sort | uniq -c || true
echo "# fcntl:";            grep -oE 'fcntl\([0-9]+, [A-Z_]+' "$prefix/served" | awk '{print $2}' | sort | uniq -c || true
echo "# setsockopt/getsockopt:"; grep -oE '(get|set)sockopt\([0-9]+, [A-Z_]+, [A-Z_]+' "$prefix/served" | cut -d, -f2- | sort | uniq -c || true
echo "# futex ops:";        grep -oE 'futex\([^,]+, [A-Z_]+' "$prefix/served" | awk '{print $2}' | sort | uniq -c || true
echo "# errors seen (syscall = -1):"; grep -E ' = -1 ' "$prefix/served" | sed -E 's/^[0-9]+ +//; s/\(.* = -1 / /' | sort | uniq -c || true
cp "$prefix/trace" "${TRACE_OUT:-/dev/null}" 2>/dev/null || true
