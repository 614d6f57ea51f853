#!/bin/sh
# The Linux scenario of the nested real-KVM tier (tests/nested.rs), run
# inside L1 as root: Debian's cloud kernel (/bin/vmlinux) as the L2 guest
# with a busybox initramfs (/bin/l2.cpio, its /init in tests/nested.rs).
#   1. to userspace on 1 vCPU and on 2 (on an L1 of one CPU with
#      --overcommit-vcpus: a two-CPU L1 under QEMU 7.2's TCG wedges now and
#      then): ACPI gives it every CPU and no error; the same kernel as Debian ships it (bzImage,
#      /bin/vmlinuz) with relive-vmm's own default command line; its
#      `poweroff` is relive's typed `exit` and
#      its `reboot` relive's typed `reset` (with `reboot=k`, as relive's
#      default Linux command line has it: on hardware-reduced ACPI without
#      EFI, Linux's default reboot goes through EFI to a real-mode BIOS
#      restart, and a microVM has no firmware there: it spins);
#   2. checkpointed in userspace, its VMM killed, and restored, three ways
#      (a full image cold, on 2 vCPUs; an incremental layer cold through its
#      chain; a full image into a standby VMM): it goes on counting where
#      the image was taken, with no reboot and no clocksource or lockup
#      warning.
# Prints `linux ...` lines; exits 1 if a check failed.

fail=0
cpus=$(nproc)
# overcommit VCPUS: the flag relive-vmm needs for VCPUS on this L1
overcommit() { [ "$1" -gt "$cpus" ] && echo --overcommit-vcpus; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

run() { # vcpus mode expected_status [kernel]; mode `default`: relive-vmm's own command line
    log=/tmp/l2-$2-$1.log
    start=$(now)
    kernel=${4:-/bin/vmlinux}
    if [ "$2" = default ]; then
        relive-vmm run --kernel $kernel --initrd /bin/l2.cpio --vcpus $1 $(overcommit $1) --mem-mib 256 \
            --console $log 2>/tmp/l2.err
    else
        relive-vmm run --kernel $kernel --initrd /bin/l2.cpio --vcpus $1 $(overcommit $1) --mem-mib 256 \
            --console $log --cmdline "console=ttyS0 panic=-1 quiet reboot=k initcall_blacklist=cmos_init relive.test=$2" \
            2>/tmp/l2.err
    fi
    rc=$?
    online=$(grep -o 'L2-USERSPACE cpus=[^ ]*' $log | cut -d= -f2)
    want=0
    [ $1 = 2 ] && want=0-1
    echo "linux vcpus=$1 $2 $(basename $kernel): status $rc (want $3), online cpus '$online' (want $want), $(since $start) s"
    if [ "$rc" != "$3" ] || [ "$online" != "$want" ]; then
        fail=1
        tail -30 $log
        cat /tmp/l2.err
    fi
    if grep -i "ACPI.*Error\|ACPI BIOS" $log; then
        echo "linux vcpus=$1 $2: ACPI errors in the guest log"
        fail=1
    fi
}
run 1 poweroff 0
run 1 reboot 10
run 2 poweroff 0
run "$cpus" default 0 /bin/vmlinuz

# wait_for FILE PATTERN SECONDS (of L1 uptime)
wait_for() {
    end=$(awk -v u="$(now)" -v l="$3" 'BEGIN { print u + l }')
    until grep -q "$2" $1 2>/dev/null; do
        awk -v u="$(now)" -v e="$end" 'BEGIN { exit !(u > e) }' && return 1
        sleep 0.1
    done
}
last_tick() { grep -o "^tick [0-9]*" $1 | tail -1 | cut -d' ' -f2; }

# checkpoint KIND: a checkpoint of the running guest; sets img, and the
# ticks the guest had printed when it was asked for and when it answered
# (the image holds the guest as it was at some moment between the two:
# asked_at < the first tick after its restore <= answered_at + 1).
checkpoint() {
    asked_at=$(last_tick /tmp/lt.log)
    relive-vmm ctl /tmp/l.sock checkpoint $1 >/tmp/ck.txt
    answered_at=$(last_tick /tmp/lt.log)
    echo "linux checkpoint ($how, $1, $vcpus vCPUs): $(head -1 /tmp/ck.txt)"
    img=$(tail -1 /tmp/ck.txt)
}

# restore_check HOW VCPUS: HOW full | incremental | standby
restore_check() {
    how=$1
    vcpus=$2
    dir=/tmp/limg-$how
    rm -rf $dir /tmp/lt.log /tmp/lr.log /tmp/l.sock /tmp/r.sock
    mkdir -p $dir
    relive-vmm run --kernel /bin/vmlinux --initrd /bin/l2.cpio --vcpus $vcpus $(overcommit $vcpus) --mem-mib 256 \
        --images $dir --control /tmp/l.sock --console /tmp/lt.log \
        --cmdline "console=ttyS0 panic=-1 loglevel=5 initcall_blacklist=cmos_init relive.test=ticks" \
        2>/tmp/lt.err &
    vmm=$!
    if ! wait_for /tmp/lt.log "tick 3 " 120; then
        echo "linux restore ($how): the guest never ticked"
        fail=1
        tail -20 /tmp/lt.log
        cat /tmp/lt.err
        kill -9 $vmm
        return
    fi
    checkpoint full
    if [ $how = incremental ]; then
        wait_for /tmp/lt.log "tick $((answered_at + 2)) " 30
        checkpoint incremental
    fi
    if [ $how = standby ]; then
        relive-vmm standby --vcpus $vcpus $(overcommit $vcpus) --mem-mib 256 --control /tmp/r.sock --console /tmp/lr.log \
            2>/tmp/lr.err &
        restored=$!
        n=0
        until [ -S /tmp/r.sock ] || [ $n -gt 100 ]; do n=$((n + 1)); sleep 0.1; done
    fi
    kill -9 $vmm
    wait $vmm 2>/dev/null
    last=$(last_tick /tmp/lt.log)
    t0=$(now)
    if [ $how = standby ]; then
        relive-vmm ctl /tmp/r.sock restore "$img" >/tmp/rs.txt 2>&1 || {
            echo "linux restore ($how): the standby refused the image: $(cat /tmp/rs.txt)"
            fail=1
        }
    else
        relive-vmm restore --image "$img" $(overcommit $vcpus) --control /tmp/r.sock --console /tmp/lr.log 2>/tmp/lr.err &
        restored=$!
    fi
    if wait_for /tmp/lr.log "^tick" 60; then
        secs=$(since $t0)
        wait_for /tmp/lr.log "tick $((last + 4)) " 60
        first=$(grep -o "^tick [0-9]*" /tmp/lr.log | head -1 | cut -d' ' -f2)
        echo "linux restore ($how): ticks $asked_at and $answered_at when the checkpoint was asked for and answered, $last before the kill, $first first after the restore, $secs s after the restore started"
        if [ -z "$first" ] || [ "$first" -le "$asked_at" ] || [ "$first" -gt $((answered_at + 1)) ] || ! grep -q "tick $((last + 4)) " /tmp/lr.log; then
            echo "linux restore ($how): the ticks did not continue from the image"
            fail=1
        fi
        if grep -q "Linux version" /tmp/lr.log; then
            echo "linux restore ($how): the guest rebooted"
            fail=1
        fi
        if grep -i -A6 "clocksource.*unstable\|soft lockup\|watchdog" /tmp/lr.log; then
            echo "linux restore ($how): clock or lockup warnings after the restore"
            fail=1
        fi
    else
        echo "linux restore ($how): no tick after the restore"
        fail=1
        tail -20 /tmp/lr.log
        cat /tmp/lr.err
    fi
    relive-vmm ctl /tmp/r.sock shutdown >/dev/null 2>&1
    wait $restored 2>/dev/null
}
restore_check full 2
restore_check incremental 1
restore_check standby 1
exit $fail
