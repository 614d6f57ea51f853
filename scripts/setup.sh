#!/usr/bin/env bash
# Installs what relive needs on a fresh Debian machine (idempotent):
# the assembler and linker for the bundled guest, Debian's cloud kernel (and
# its KVM modules) for the Linux boot test, the nested real-KVM tier and
# container VMs (as /var/lib/relive/vmlinux, the default container_kernel), for
# that tier QEMU, a static busybox and cpio, and for the on-call tests
# Prometheus (with promtool) and systemd-analyze, for cluster mode protoc (to
# build the etcd client), etcd, iproute2 and curl (its tests). The Rust toolchain is
# expected to be installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v as >/dev/null 2>&1 || need_apt+=(binutils)
command -v ld >/dev/null 2>&1 || need_apt+=(binutils)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
# The nested tier's L1 runs /bin/busybox without libraries: it must be static.
if ! { [ -x /bin/busybox ] && [[ "$(ldd /bin/busybox 2>&1)" == *"not a dynamic executable"* ]]; }; then
    need_apt+=(busybox-static)
fi
command -v cpio >/dev/null 2>&1 || need_apt+=(cpio)
# On-call tests: promtool and a real Prometheus (one package), and
# systemd-analyze for the unit.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# Cluster mode: protoc builds the etcd client's gRPC code; the cluster
# tests run a real etcd.
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# ... on three hosts made of network namespaces (ip, from iproute2), and
# one of them sends a peer an image with a stale token (curl).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: error: cargo not found: install the Rust toolchain (rustup) first" >&2
    exit 1
fi
# The Linux boot test's kernel (cached in .cache/linux).
bash scripts/fetch-linux-kernel.sh >/dev/null
# The kernel of `image:` fleet VMs: the default container_kernel.
CONTAINER_KERNEL=/var/lib/relive/vmlinux
if [ "$(id -u)" = 0 ]; then
    cmp -s .cache/linux/vmlinux "$CONTAINER_KERNEL" ||
        install -D -m 0644 .cache/linux/vmlinux "$CONTAINER_KERNEL"
elif ! cmp -s .cache/linux/vmlinux "$CONTAINER_KERNEL"; then
    echo "setup: not root, so $CONTAINER_KERNEL is not installed: container VMs need" \
        "container_kernel: $PWD/.cache/linux/vmlinux in their fleet file" >&2
fi
# The guest agent, static (the /init of container images; tests/agent.rs).
bash scripts/build-agent.sh >/dev/null
