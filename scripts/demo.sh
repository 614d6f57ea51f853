#!/usr/bin/env bash
# The main job: build relive and supervise the demo fleet (configs/demo.yaml:
# three VMs on the bundled guest, each with a hot standby, consistency images
# every 5 s and a warm boot image). Prints where the API and metrics are.
# Ctrl-C ends the demo: its VMs are stopped and the supervisor exits. (A
# supervisor stopped on its own leaves its VMs running, to be adopted.)
# With DEMO_SECONDS=N the demo ends by itself after N seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release --workspace --locked
relive=target/release/relive
state=target/relive-demo
export RELIVE_API="$PWD/$state/api.sock"
# The demo starts from scratch: its previous run stopped its VMs (`relive
# stop`, which a supervisor remembers across restarts) and left its images.
if [ -d "$state" ] && ! "$relive" status >/dev/null 2>&1; then
    rm -rf "$state"
fi
"$relive" up configs/demo.yaml --vmm-bin target/release/relive-vmm &
pid=$!
cleanup() {
    trap - EXIT INT TERM
    for vm in demo-1 demo-2 demo-3; do "$relive" stop "$vm" >/dev/null 2>&1 || true; done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
for _ in $(seq 200); do [ -S "$RELIVE_API" ] && break; sleep 0.05; done
sleep 1
"$relive" status
echo
echo "In another terminal (export RELIVE_API=$RELIVE_API):"
echo "  $relive events --follow"
echo "  $relive failover demo-1 --to boot"
echo "  kill -9 \$($relive show demo-2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"pid\"])')"
echo "  curl --unix-socket $RELIVE_API http://localhost/metrics"
if [ -n "${DEMO_SECONDS:-}" ]; then
    sleep "$DEMO_SECONDS"
    "$relive" status
else
    wait "$pid"
fi
