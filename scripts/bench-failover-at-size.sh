#!/usr/bin/env bash
# Failover through the supervisor at the sizes users run: one VM of 2 GiB
# whose guest touched T MiB (16, then 1536: the baseline and the target size,
# measured in the same run), with and without a standby. Each of N times
# (default 6): wait for a checkpoint taken since the last restore and its
# background verdict (and a ready standby), kill -9 the VMM, and read the
# `restored` event's durations.total_ms (failure detected -> guest running,
# the supervisor's clock). Prints every figure, the medians, and the ratios
# 1536/16. A figure, not a timed test.
#
#   cargo build --release --workspace && scripts/bench-failover-at-size.sh [N]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
R=$PWD/target/release/relive; V=$PWD/target/release/relive-vmm
N=${1:-6}
scratch=$(mktemp -d /tmp/relive-failover-size.XXXXXX)
out=$scratch/figures.txt
run() {
  local T=$1 SB=$2 d=$scratch/$1-$2
  mkdir -p "$d"
  cat > "$d/fleet.yaml" <<Y
state_dir: $d/state
defaults:
  checkpoint_interval: 2s
  heartbeat_timeout: 2s
  ready_grace: 5s
  failure_window: 5s
  max_failures: 100
  keep_images: 2
  standby: $SB
vms:
  - name: big
    kernel: bundled
    cmdline: "relive.hb_ms=100 relive.touch_mib=$T"
    memory_mib: 2048
Y
  export RELIVE_API=$d/state/api.sock
  "$R" up "$d/fleet.yaml" --vmm-bin "$V" > "$d/sup.log" 2>&1 &
  local sup=$!
  show() { "$R" show big --json 2>/dev/null || echo '{}'; }
  field() { python3 -c "import json,sys; v=json.load(sys.stdin); print(v.get('$1') or '')"; }
  for _ in $(seq 600); do [ "$(show | field state)" = running ] && [ -n "$(show | field last_checkpoint)" ] && break; sleep 0.2; done
  for _ in $(seq "$N"); do
    local ck c n line
    ck=$(show | field last_checkpoint)
    for _ in $(seq 600); do
      c=$(show | field last_checkpoint)
      if [ "$c" != "$ck" ] && ls "$d"/state/big/images/*"$c".verdict >/dev/null 2>&1; then break; fi
      sleep 0.2
    done
    if [ "$SB" = true ]; then for _ in $(seq 300); do [ "$(show | field standby)" = ready ] && break; sleep 0.2; done; fi
    n=$("$R" events --json -n 1000 | wc -l)
    kill -9 "$(show | field pid)"
    line=
    for _ in $(seq 300); do
      line=$("$R" events --json -n 1000 | tail -n +$((n+1)) | grep '"reason":"restored"' | head -1)
      [ -n "$line" ] && break; sleep 0.1
    done
    echo "$line" | python3 -c "import json,sys; e=json.load(sys.stdin); print($T, '$SB', e['path'], e['durations']['total_ms'], e['detail'])" | tee -a "$out"
    sleep 6
  done
  echo "image-unverified events ($T MiB, standby $SB): $(grep -c image-unverified "$d/state/events.jsonl")"
  "$R" stop big >/dev/null 2>&1
  kill "$sup"; wait "$sup" 2>/dev/null
}
for T in 16 1536; do for SB in true false; do run "$T" "$SB"; done; done
python3 - "$out" <<'P'
import statistics, sys
rows = [l.split(None, 4) for l in open(sys.argv[1])]
med = {}
for t, sb, path, ms, _ in rows:
    med.setdefault((int(t), sb), []).append(float(ms))
for (t, sb), v in sorted(med.items()):
    print(f"touched {t:>5} MiB standby {sb:<5}: n={len(v)} median {statistics.median(v):.2f} ms, max {max(v):.2f} ms")
for sb in ("true", "false"):
    a, b = med.get((1536, sb)), med.get((16, sb))
    if a and b:
        print(f"ratio 1536/16 standby {sb}: {statistics.median(a) / statistics.median(b):.2f}")
P
rm -rf "$scratch"
