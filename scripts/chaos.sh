#!/usr/bin/env bash
# The chaos soak (tests/chaos.rs) at a length of your choice, on a release
# build: a 4-VM fleet through a seeded random sequence of faults (kill -9 of
# VMMs and of the supervisor, guest panics, crashes, resets and hangs,
# SIGSTOP of a VMM, forced failovers, a full disk), its invariants checked
# all along. Prints the seed, the fault counts and the failover times.
#
#   scripts/chaos.sh            # 10 minutes, a new seed
#   scripts/chaos.sh 600 SEED   # replay a run
#
# Needs /dev/kvm, and root for the tmpfs the fleet's state lives on (without
# it the full-disk fault is left out). The test suite runs a 2-minute soak.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs="${1:-600}"
export RELIVE_CHAOS_SECS="$secs"
if [ -n "${2:-}" ]; then export RELIVE_CHAOS_SEED="$2"; fi
export RELIVE_REQUIRE_KVM=1
cargo build --release --workspace --locked
exec cargo test --release --locked --test chaos -- --nocapture
