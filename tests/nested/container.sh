#!/bin/sh
# The container scenario of the nested real-KVM tier (tests/nested.rs), run
# inside L1 as root: a container image built on the host from Debian's
# busybox-static (/bin/app.cpio, its app /app.sh) runs as an `image:` VM of
# a supervised fleet on Debian's cloud kernel (/bin/vmlinux), and
#   1. its output reaches `relive logs`;
#   2. a kill -9 of its VMM restores it from its consistency image, and the
#      app carries on: the counter it keeps in /counter (in the initramfs,
#      so in guest memory) goes on from the image, not from 1, and the log
#      shows no line twice;
#   3. two restores of one image, once each has had the VMM's `restored`
#      notice, read different bytes from /dev/urandom, and the guest's clock
#      is the host's, not the image's;
#   4. a non-zero exit of the app (SIGUSR1 makes it exit 3) is a typed
#      `app-exit` failure that the policy restores;
#   5. its exit 0 (SIGUSR2) stops the VM, and `relive start` runs it anew.
# Each check says `container: ok ...` or `container: FAIL ...`; the exit
# status is 1 if any failed. Figures go out as `container: figure ...`.

fail=0
# Every call is bounded: a hung call fails the scenario with what it was,
# instead of holding the L1 until the host's limit.
relive() { timeout 60 /bin/relive "$@"; }
relive_vmm() { timeout 60 /bin/relive-vmm "$@"; }
say() { echo "container: $*"; }
bad() { say "FAIL $*"; fail=1; }
now() { cut -d' ' -f1 /proc/uptime; }
export RELIVE_API=/tmp/c/state/api.sock
mkdir -p /tmp/c && cd /tmp/c || exit 1
cat >fleet.yaml <<EOF
state_dir: /tmp/c/state
container_kernel: /bin/vmlinux
defaults:
  checkpoint_interval: 2s
  # The L2 Linux boots in 10-20 s here (everything runs under TCG): the
  # grace covers the boot, the timeout the emulation's hiccups.
  ready_grace: 40s
  heartbeat_timeout: 10s
  failure_window: 5m
  max_failures: 5
vms:
  - name: web
    image: /bin/app.cpio
    memory_mib: 256
    env: { GREETING: hello-from-the-fleet }
EOF

# wait_for SECONDS COMMAND...: until COMMAND succeeds (tried every 0.2 s),
# at most SECONDS of L1 uptime.
wait_for() {
    end=$(awk -v u="$(now)" -v l="$1" 'BEGIN { print u + l }')
    shift
    until "$@" >/dev/null 2>&1; do
        awk -v u="$(now)" -v e="$end" 'BEGIN { exit !(u > e) }' && return 1
        sleep 0.2
    done
}
logs() { relive logs web -n 1000 2>&1; }
has_log() { logs | grep -q "$1"; }
has_event() { relive events -n 200 2>/dev/null | grep -q "$1"; }
count_of() { sed -n 's/^count \([0-9]*\) .*/\1/p'; }
vmm_pid() { relive --json show web | sed -n 's/.*"pid": \([0-9]*\).*/\1/p'; }
dump() {
    say "--- relive events ---"
    relive events -n 50
    say "--- relive logs ---"
    logs | tail -40
    say "--- console ---"
    tail -30 state/web/console.log
    say "--- vmm logs ---"
    tail -20 state/web/vmm-a.log state/web/vmm-b.log 2>/dev/null
    say "--- supervisor ---"
    tail -30 up.log
}

t0=$(now)
/bin/relive up fleet.yaml >up.log 2>&1 &
up=$!

# 1. The app's output reaches `relive logs`, its env included.
if wait_for 120 has_log "^count 3 "; then
    first=$(relive --json logs web -n 1000 | grep '"stream":"out"' | head -1 |
        sed -n 's/.*"unix_ms":\([0-9]*\).*/\1/p')
    started=$(relive --json events -n 100 | grep '"reason":"started"' | head -1 |
        sed -n 's/.*"unix_ms":\([0-9]*\).*/\1/p')
    say "figure: the app's first output line $((first - started)) ms after the VMM started"
    if has_log "greeting hello-from-the-fleet"; then say "ok: output and env reach relive logs"; else bad "no greeting in the logs"; fi
else
    bad "no 'count 3' in relive logs within 120 s"
    dump
    kill $up
    exit 1
fi

# 2. kill -9 of the VMM: restored from the consistency image, counting on.
# The warm boot image, then consistency images once ready_grace is over.
wait_for 90 sh -c 'ls state/web/images/*.rimg 2>/dev/null | wc -l | grep -qv "^[01]$"' ||
    bad "no consistency image within 90 s"
sleep 3
before=$(logs | count_of | tail -1)
pid=$(vmm_pid)
kill -9 "$pid"
say "killed the VMM (pid $pid) at count $before"
if wait_for 60 has_event "restored"; then
    # The restored run shows its first line once its count passes what was
    # shown: up to a few seconds after the restore.
    counted_after_restore() { logs | sed -n '/restored from the consistency image/,$p' | grep -q '^count'; }
    wait_for 60 counted_after_restore
    # The log before the restore ends at count `shown`; the restored run
    # goes on after it: its lines up to `shown` are not repeated, and the
    # next one shown is shown + 1 (or + 2: a line the app printed just
    # before the kill may be in the image's state but never reached the
    # host). A run from scratch would start again at 1.
    shown=$(logs | sed '/restored from the consistency image/,$d' | count_of | tail -1)
    after=$(logs | sed -n '/restored from the consistency image/,$p' | count_of | head -1)
    dups=$(relive --json logs web -n 1000 | sed -n 's/.*"seq":\([0-9]*\).*/\1/p' | sort -n | uniq -d | wc -l)
    say "first count after the restore: $after (last shown before it: $shown, at the kill: $before), repeated lines: $dups"
    relive events -n 200 | grep "(restored)" | tail -1 | sed 's/^/container: figure: /'
    if [ -n "$after" ] && [ -n "$shown" ] && [ "$after" -gt "$shown" ] && [ "$after" -le $((shown + 2)) ] && [ "$dups" = 0 ]; then
        say "ok: the app carried on from its consistency image"
    else
        bad "the app did not carry on from the image (after=$after shown=$shown dups=$dups)"
        dump
    fi
else
    bad "no restore after kill -9"
    dump
fi

# 3. Two restores of one image: different random bytes, the host's time.
# `relive logs` does not show a restored run's lines again up to the count
# already shown, so the runs are compared on the console, where the app
# writes every line too. Lines of the run before may still reach the
# console after the failover began; the restored run is the one that starts
# at the lowest count (the image's + 1), and its second line is compared
# (the first may have been drawn before the agent took the `restored`
# notice).
image=$(relive --json events -n 200 | grep '"reason":"restored"' | tail -1 |
    sed -n 's/.*"image_id":"\([0-9a-f]*\)".*/\1/p')
console=state/web/console.log
# second_line FROM: the restored run's second line in the console from line FROM.
# Only whole lines count: the guest writes the console a byte at a time
# (slowly, under TCG), so its last line may still be half written.
second_line() {
    tail -n +"$1" $console | tr -d '\r' | awk '
        /^count [0-9]+ rand [0-9a-f]+ time [0-9]+$/ { n = $2 + 0; lines[NR] = $0; counts[NR] = n; if (min == "" || n < min) min = n }
        END {
            for (i = 1; i <= NR; i++) if (counts[i] == min) start = i
            for (i = start + 1; i <= NR; i++) if ((i in counts) && counts[i] == min + 1) { print lines[i]; exit }
        }'
}
has_second_line() { [ -n "$(second_line "$1")" ]; }
lines=""
for i in 1 2; do
    from=$(($(wc -l <$console) + 1))
    relive failover web --to "$image" >/dev/null || bad "failover $i to $image refused"
    wait_for 60 has_second_line $from
    line=$(second_line $from)
    host_time=$(date +%s)
    say "restore $i of image $image: '$line' (L1 time $host_time)"
    guest_time=$(echo "$line" | sed -n 's/.* time \([0-9]*\)$/\1/p')
    skew=$((host_time - ${guest_time:-0}))
    if [ "${skew#-}" -gt 3 ]; then bad "restore $i: the guest's clock is $skew s off the host's"; fi
    lines="$lines|$line"
    # The agent said it reseeded (with the VMM's 32 bytes) and stepped the
    # clock: an event of the supervisor's.
    answers=$(relive events -n 200 | grep -c "agent-restored.*restored reseeded=32 clock_step_ms=")
    if [ "$answers" -lt $((i + 1)) ]; then bad "restore $i: no agent-restored event saying reseeded=32"; fi
done
relive events -n 200 | grep "agent-restored" | tail -1 | sed 's/^/container: figure: /'
one=$(echo "$lines" | cut -d'|' -f2)
two=$(echo "$lines" | cut -d'|' -f3)
if [ "${one%% rand*}" != "${two%% rand*}" ] || [ -z "$one" ]; then
    bad "the two restores of one image did not reach the same count ('$one', '$two')"
elif [ "$(echo "$one" | cut -d' ' -f4)" = "$(echo "$two" | cut -d' ' -f4)" ]; then
    bad "the two restores of one image read the same random bytes at ${one%% rand*}"
else
    say "ok: two restores of one image read different random bytes at ${one%% rand*}"
fi

# 4. The app exits 3: a typed app-exit failure, restored by the policy.
restores=$(relive events -n 200 | grep -c "restored")
relive_vmm ctl "$(relive --json show web | sed -n 's/.*"socket": "\([^"]*\)".*/\1/p')" agent "signal 10" >/dev/null ||
    bad "cannot send signal 10 to the app"
restored_more() { [ "$(relive events -n 200 | grep -c restored)" -gt "$restores" ]; }
if wait_for 60 restored_more; then
    if relive events -n 200 | grep "app-exit" | grep -q "exit code 3"; then
        say "ok: the app's exit 3 was an app-exit failure, and the VM was restored"
    else
        bad "no app-exit event with exit code 3"
        dump
    fi
else
    bad "no restore after the app exited 3"
    dump
fi

# 5. The app exits 0: the VM is done (restart: on-failure), `stopped`; a
#    start runs the app anew from its boot image (the warm one, taken as
#    the app started: its count is where it was then, a few at most), after
#    a new-run note in the log.
after_run() { logs | sed -n '/a new run of the app/h; /a new run of the app/!H; ${x;p}' | count_of | head -1; }
# Step 4 went to the boot image (a failure soon after restores of saved
# state): this run began there. Two counts on, the app is stopped.
run_has_count() { [ -n "$(after_run)" ]; }
wait_for 60 run_has_count
run_first=$(after_run)
counted_past() { [ "$(logs | count_of | tail -1)" -ge $((${run_first:-0} + 2)) ]; }
wait_for 60 counted_past
at_stop=$(logs | count_of | tail -1)
relive_vmm ctl "$(relive --json show web | sed -n 's/.*"socket": "\([^"]*\)".*/\1/p')" agent "signal 12" >/dev/null ||
    bad "cannot send signal 12 to the app"
is_stopped() { relive status | grep web | grep -q stopped; }
if wait_for 60 is_stopped; then
    say "ok: the app's exit 0 stopped the VM (at count $at_stop)"
    relive start web >/dev/null || bad "relive start web refused"
    last_is_count() { logs | tail -1 | grep -q '^count'; }
    wait_for 60 last_is_count
    sleep 3
    first=$(after_run)
    if [ -n "$first" ] && [ "$first" = "$run_first" ] && [ "$first" -lt "$at_stop" ]; then
        say "ok: relive start ran the app anew from its boot image (count $first after a new-run note, as after the last boot restore; $at_stop at the stop)"
    else
        bad "relive start did not run the app anew from its boot image (first count '$first', '$run_first' after the last boot restore, $at_stop at the stop)"
        dump
    fi
else
    bad "the VM is not stopped after the app's exit 0"
    dump
fi
say "figure: scenario took $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
kill $up
wait $up
exit $fail
