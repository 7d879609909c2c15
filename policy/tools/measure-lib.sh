# Shared by policy/tools/measure-{certd,tpmd,identityd}-syscalls.sh (sourced, not
# run): the build, the report of the kernel's seccomp log records, and the analysis of `strace -f`
# traces.

# measure_build: the workspace's binaries and tests as the suites need them. Not `cargo build -p
# aziotd`: that rebuilds aziotd without the test-only `escape-probe` feature (cargo unifies it in
# only through aziot-tests), and the escape/engine/mount_namespace suites then fail.
measure_build() { cargo build -q --workspace --bins --tests; }

# seccomp_log_since <dmesg line count before the run> <user> [<exe>]: the kernel's type=1326 audit
# records of <user>'s syscalls logged by SECCOMP_RET_LOG (code=0x7ffc0000) since then (only those
# of binary <exe> when given: another checkout's tests may run at the same time); each is a
# syscall the allowlist lacks. The kernel may rate-limit these lines ("callbacks suppressed"), so
# an empty answer is confirmed by the strace mode.
seccomp_log_since() {
  local before=$1 uid
  uid=$(id -u "$2")
  echo "# new type=1326 (SECCOMP_RET_LOG) records of uid $uid${3:+ and exe $3} (none = the allowlist covered every call):"
  dmesg | tail -n +"$((before + 1))" | grep 'type=1326' | grep " uid=$uid " | grep 'code=0x7ffc0000' \
    | grep -F "exe=\"${3:-}" || true
}

# worker_syscalls <directory of traces t.*> <service>: for every worker in the traces (each
# process that called seccomp(SECCOMP_SET_MODE_FILTER)) and its threads, the syscalls made after
# its last seccomp() call with counts, and the argument values the filter checks.
worker_syscalls() {
  python3 - "$1" "$2" <<'PY'
import collections, glob, re, sys
counts, args, workers = collections.Counter(), collections.defaultdict(collections.Counter), 0
argpos = {'ioctl': 1, 'fcntl': 1, 'prctl': 0, 'mmap': 2, 'mprotect': 2, 'getsockopt': 2, 'madvise': 2,
          'socket': (0, 1), 'setsockopt': (1, 2), 'rt_sigaction': 0, 'tgkill': 2}
for path in sorted(glob.glob(sys.argv[1] + '/t.*')):
    lines = open(path).read().splitlines()
    starts = {}
    for i, line in enumerate(lines):
        m = re.match(r'(\d+) +seccomp\(SECCOMP_SET_MODE_FILTER', line)
        if m:
            starts[m.group(1)] = i
    for main, last in starts.items():
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
            if name == 'clone':  # strace shows child_stack= first; the filter checks the flags
                f = re.search(r'flags=([A-Z0-9_|]+)', m.group(3))
                args[name][f.group(1) if f else '?'] += 1
            elif name in argpos:
                a = re.split(r'[,)<]', m.group(3))
                pos = argpos[name] if isinstance(argpos[name], tuple) else (argpos[name],)
                if len(a) > max(pos):
                    args[name][' '.join(a[i].strip() for i in pos)] += 1
print(f'# {workers} {sys.argv[2]} workers; syscalls after seccomp(), with counts:')
for name, n in counts.most_common():
    print(f'{n:8d} {name}')
print('# checked arguments:')
for name, c in sorted(args.items()):
    print(f'  {name}: ' + ', '.join(f'{k} x{v}' for k, v in c.most_common()))
PY
}
