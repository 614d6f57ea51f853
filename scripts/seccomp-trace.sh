#!/usr/bin/env bash
# What each kind of relive-vmm thread really calls: runs a VMM without its
# filters (--no-seccomp) under `strace -ff` through every operation the
# confinement test covers (boot with a warm boot image, agent traffic,
# pause/resume, full and incremental checkpoints with background
# verification and merge, cold restore of a layer, standby restore,
# shutdown) and prints, per thread name, the system calls made and the
# ioctl requests. Compare with the allow-lists in vmm/src/seccomp.rs.
#
#   cargo build --workspace && scripts/seccomp-trace.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
V=$PWD/target/debug/relive-vmm
t=$(mktemp -d /tmp/relive-seccomp-trace.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$t"' EXIT
ctl() { "$V" ctl "$@" >/dev/null; }
# A checkpoint is refused while another (the warm boot image) is under way.
ckpt() { for _ in $(seq 100); do "$V" ctl "$1" checkpoint "$2" >/dev/null 2>&1 && return; sleep 0.1; done; echo "checkpoint $2 refused" >&2; exit 1; }
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && "$V" ctl "$1" status >/dev/null 2>&1 && return; sleep 0.05; done; echo "no $1" >&2; exit 1; }

strace -ff -qq -X verbose -o "$t/run" "$V" run --no-seccomp --images "$t/img" --boot-image warm \
  --cmdline "relive.hb_ms=20 relive.touch_mib=8 relive.dirty_pages=4" \
  --control "$t/run.sock" --console "$t/run.console" 2>/dev/null &
wait_sock "$t/run.sock"
ctl "$t/run.sock" agent status
ctl "$t/run.sock" pause; ctl "$t/run.sock" resume
ckpt "$t/run.sock" full
for _ in 1 2 3 4 5; do sleep 0.05; ckpt "$t/run.sock" incremental; done
sleep 1
ctl "$t/run.sock" shutdown; wait
layer=$(ls "$t"/img/*.rimg | tail -1)

strace -ff -qq -X verbose -o "$t/restore" "$V" restore --no-seccomp --image "$layer" --images "$t/img" \
  --control "$t/restore.sock" --console "$t/restore.console" 2>/dev/null &
wait_sock "$t/restore.sock"
ckpt "$t/restore.sock" incremental
ctl "$t/restore.sock" shutdown; wait

strace -ff -qq -X verbose -o "$t/standby" "$V" standby --no-seccomp --control "$t/standby.sock" \
  --console "$t/standby.console" 2>/dev/null &
wait_sock "$t/standby.sock"
ctl "$t/standby.sock" restore "$layer"
ctl "$t/standby.sock" agent status
ctl "$t/standby.sock" shutdown; wait

python3 - "$t" <<'P'
import collections, glob, os, re, sys
calls = collections.defaultdict(set)
ioctls = collections.defaultdict(set)
for f in glob.glob(os.path.join(sys.argv[1], "*.*")):
    name = "relive-vmm"
    for line in open(f, errors="replace"):
        m = re.match(r'prctl\((?:0xf /\* )?PR_SET_NAME(?: \*/)?, "([^"]*)"', line)
        if m:
            name = re.sub(r"\d+$", "", m.group(1))
        m = re.match(r"([a-z0-9_]+)\(", line)
        if not m:
            continue
        calls[name].add(m.group(1))
        if m.group(1) == "ioctl":
            r = re.match(r"ioctl\(\d+, ([^,)]+)", line)
            if r:
                ioctls[name].add(r.group(1))
for name in sorted(calls):
    print(f"{name}:\n  calls:  {' '.join(sorted(calls[name]))}")
    if ioctls[name]:
        print(f"  ioctls: {' '.join(sorted(ioctls[name]))}")
P
