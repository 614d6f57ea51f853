#!/usr/bin/env bash
# Cluster mode on one machine: an etcd on 127.0.0.1:23790 and three
# supervisors as three "hosts" (configs/cluster-demo/host-{a,b,c}.yaml)
# sharing one fleet of three VMs. Each VM runs on the host that claimed it;
# kill a host's supervisor and its VMMs and watch another host take its VMs
# over from the replicated images. Ctrl-C ends the demo (VMs stopped,
# supervisors and etcd ended). With DEMO_SECONDS=N it ends by itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release --workspace --locked
relive=$PWD/target/release/relive
dir=target/relive-cluster-demo
rm -rf "$dir"
mkdir -p "$dir"
etcd --name demo --data-dir "$dir/etcd" \
    --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster demo=http://127.0.0.1:23800 >"$dir/etcd.log" 2>&1 &
etcd_pid=$!
pids=()
cleanup() {
    trap - EXIT INT TERM
    for h in a b c; do
        for vm in web-1 web-2 web-3; do
            "$relive" --api "$dir/host-$h/api.sock" stop "$vm" >/dev/null 2>&1 || true
        done
    done
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    kill -TERM "$etcd_pid" 2>/dev/null || true
    wait "$etcd_pid" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
for h in a b c; do
    "$relive" up "configs/cluster-demo/host-$h.yaml" --vmm-bin target/release/relive-vmm \
        >"$dir/host-$h.log" 2>&1 &
    pids+=($!)
done
for h in a b c; do
    for _ in $(seq 400); do [ -S "$dir/host-$h/api.sock" ] && break; sleep 0.05; done
done
sleep 3
"$relive" --api "$dir/host-a/api.sock" hosts
echo
for h in a b c; do
    echo "host-$h:"
    "$relive" --api "$dir/host-$h/api.sock" status
done
echo
echo "Try (each host's API is $dir/host-X/api.sock; logs in $dir/host-X.log):"
echo "  $relive --api $dir/host-b/api.sock events --follow"
echo "  kill -9 <the relive up of a host> and its VMMs (pids in its 'relive status'): another host takes its VMs"
if [ -n "${DEMO_SECONDS:-}" ]; then
    sleep "$DEMO_SECONDS"
    "$relive" --api "$dir/host-a/api.sock" hosts
else
    wait "${pids[0]}"
fi
