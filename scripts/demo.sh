#!/usr/bin/env bash
# The main job, for now: boot one VM with the bundled guest and watch its
# agent channel (ready, then heartbeats with counter and hash) until Ctrl-C
# or, with DEMO_SECONDS=N, for N seconds. The console goes to the terminal.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release --workspace --locked
vmm=target/release/relive-vmm
dir=$(mktemp -d /tmp/relive-demo.XXXXXX)
sock=$dir/control.sock
"$vmm" run --vcpus 1 --mem-mib 128 --control "$sock" &
pid=$!
cleanup() {
    "$vmm" ctl "$sock" shutdown >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
echo "relive-vmm pid $pid, control socket $sock"
echo "try: $vmm ctl $sock status   |   $vmm ctl $sock agent panic"
"$vmm" ctl "$sock" status
echo "--- agent channel (COM2) ---"
if [ -n "${DEMO_SECONDS:-}" ]; then
    timeout "$DEMO_SECONDS" "$vmm" ctl "$sock" watch || true
else
    "$vmm" ctl "$sock" watch
fi
