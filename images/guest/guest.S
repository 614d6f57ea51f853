/*
 * relive's bundled guest: a tiny x86_64 kernel whose workload keeps real,
 * checkable state in guest memory.
 *
 * Boot contract (the VMM's, see vmm/src/boot.rs): every vCPU enters _start in
 * 64-bit mode with the VMM's identity page tables, interrupts off, and rsi
 * pointing at the Linux zero page (boot_params). The vCPUs tell themselves
 * apart by their initial APIC id (CPUID.1:EBX[31:24]).
 *
 * Kernel part (CPL 0). Guest kernel mode is emulated instruction by instruction
 * on nested KVM (see shared/PLATFORM.md), so it is kept to a few dozen
 * instructions per vCPU: GDT with user segments and one TSS per vCPU (RSP0 and
 * an all-zero I/O permission bitmap), IDT, own page tables (U bit on every
 * level), the LAPIC, the PIC masked, COM2's IRQ routed through the IOAPIC.
 * Then iretq to the workload in CPL 3, where it runs at native speed.
 *
 * The workload does port I/O in CPL 3, allowed twice over: IOPL=3 in RFLAGS
 * (what real CPUs and QEMU's TCG honour) and the TSS I/O bitmap (what the
 * development machines' PVM honours, ignoring IOPL). Either alone breaks
 * somewhere: PVM ignores IOPL; and TCG allows bitmap-based I/O only while TR
 * caches an *available* TSS type, which a restored TR is not (KVM reports
 * and restores TR as busy, as real CPUs hold it and as VMX requires), so a
 * restored guest relying on the bitmap alone #GPs on its first `out` on
 * kvm-amd nested under QEMU (tests/nested.rs).
 *
 * Interrupts and the one "system call":
 *   vector 32   LAPIC timer tick: counts ticks in the vCPU's per-CPU block.
 *   vector 0x23 COM2 receive (IOAPIC pin 3, BSP only): sets rx_pending.
 *   vector 13   #GP. `hlt` executed in CPL 3 faults here and means "idle until
 *               the next interrupt"; the first idle of a vCPU starts its LAPIC
 *               timer with the period the workload chose. Any other #GP is a
 *               bug: the guest prints `relive-guest: fatal #GP at rip=R
 *               error=E` (hex) on the console and triple-faults on purpose.
 *   vector 0xff spurious: ignored.
 * Every other vector is not present, so any other exception escalates to a
 * triple fault (that is how the `crash` command works: ud2 in CPL 3).
 *
 * Workload (CPL 3), per vCPU: on each wake-up, `work` iterations of
 *     counter += 1; hash = (hash ^ counter) * FNV_PRIME
 * starting from counter 0, hash FNV_OFFSET. The BSP also speaks the agent
 * protocol on COM2 (each line in one VM exit through relive's agent line
 * port at 0x2f0 when the VMM has it, else byte by byte on the UART):
 *     ready counter=C hash=H cpus=N hb_ms=M          once, when the boot is over
 *     hb seq=S counter=C hash=H cpus=N               every hb_ms
 *     status seq=S counter=C hash=H cpus=N ticks=T   reply to `status`
 *     ok CMD / error unknown command                 replies
 * The console (COM1) gets one banner line, `relive-guest: up, hb_ms=M work=W`,
 * before `ready`: nothing of the boot is left to do once the guest is ready.
 * counter and hash are the BSP's; cpus is the number of vCPUs whose counter
 * advanced since the previous heartbeat. Commands from the host (one per
 * line): panic (pvpanic), crash (triple fault), hang (stop heartbeats, keep
 * spinning), reset (i8042), exit (power-off port), status; and the VMM's
 * `restored time=NS entropy=HEX` after a restore, taken silently (this
 * guest has no RNG and no wall clock to fix).
 * Parameters (kernel command line): relive.hb_ms=N (default 100),
 * relive.work=N iterations per wake-up (default 10000), relive.touch_mib=N
 * (write every page of N MiB from 4 MiB up at start, default 0),
 * relive.dirty_pages=N (rewrite N of those pages at every heartbeat, round
 * robin over the first relive.dirty_mib=M MiB of them: a hot set; default
 * all).
 *
 * Working-set mode (relive.ws_mib=N): the BSP, instead of idling between
 * ticks, rewrites the pages of N MiB from 4 MiB up, one after the other, as
 * fast as it runs: each write stores the next write sequence number (ws_seq)
 * at offset 16 of the page, and keeps ws_sum = the sum (mod 2^64) over the
 * set's pages of mix(page address, stamp) up to date. Every state line then
 * ends with ` ws_sum=H ws_seq=N gap_tsc=G`, G the longest time between two
 * consecutive writes (TSC cycles) since the previous heartbeat: the guest's
 * own view of how long it was held up (a VMM pause, a page fault, an exit).
 * The command `verify` recomputes the sum from the pages themselves and
 * answers `verify ok sum=H ws_seq=N pages=P` or `verify torn sum=H expected=H`:
 * memory restored from an image whose pages come from different moments
 * (a torn image) does not add up to the ws_sum the guest carried.
 */

        .set MAX_CPUS,      32
        .set LAPIC,         0xfee00000
        .set IOAPIC,        0xfec00000
        .set COM1,          0x3f8
        .set COM2,          0x2f8
        .set LINE_PORT,     0x2f0
        .set LINE_MAGIC,    0x31564c52          /* "RLV1" */
        .set PVPANIC,       0x505
        .set I8042_CMD,     0x64
        .set POWER,         0x600
        .set SEL_KCODE,     0x08
        .set SEL_KDATA,     0x10
        .set SEL_UDATA,     0x1b
        .set SEL_UCODE,     0x23
        .set SEL_TSS0,      0x28
        .set VEC_TIMER,     32
        .set VEC_COM2,      0x23
        .set FNV_OFFSET,    0xcbf29ce484222325
        .set FNV_PRIME,     0x100000001b3
        /* per-CPU block at the bottom of each kernel stack page */
        .set PC_TICKS,      0
        .set PC_COUNTER,    8
        .set PC_HASH,       16
        .set PC_STARTED,    24
        .set TOUCH_BASE,    0x400000            /* 4 MiB: above the image */
        .set WS_STAMP,      16                  /* working-set stamp: offset in a page */
        .set MIX_K1,        0x9e3779b97f4a7c15
        .set MIX_K2,        0xbf58476d1ce4e5b9

        .section .text.entry, "ax"
        .code64
        .globl _start
_start:
        cli
        mov     %rsi, %r15                      /* boot_params (BSP) */
        mov     $1, %eax
        cpuid
        shr     $24, %ebx                       /* rbx = APIC id = cpu index */
        cmp     $MAX_CPUS, %ebx
        jae     park

        lgdt    gdt_ptr(%rip)
        pushq   $SEL_KCODE
        lea     1f(%rip), %rax
        pushq   %rax
        lretq
1:      mov     $SEL_KDATA, %eax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        xor     %eax, %eax
        mov     %ax, %fs
        mov     %ax, %gs
        lea     pml4(%rip), %rax
        mov     %rax, %cr3

        /* kernel stack: top of this CPU's page; per-CPU block at its bottom */
        mov     %rbx, %rax
        shl     $12, %rax
        lea     percpu(%rip), %rsp
        add     %rax, %rsp
        mov     %rsp, %r14                      /* r14 = per-CPU block */
        add     $4096, %rsp

        /* TSS for this CPU: RSP0, and the shared I/O bitmap after all TSSs */
        mov     %rbx, %rax
        shl     $7, %rax
        lea     tss_area(%rip), %rdi
        add     %rax, %rdi                      /* rdi = TSS base */
        mov     %rsp, 4(%rdi)                   /* RSP0 */
        mov     $MAX_CPUS, %ecx
        sub     %ebx, %ecx
        shl     $7, %ecx                        /* rcx = I/O map offset */
        mov     %cx, 0x66(%rdi)
        lea     8192(%rcx), %rdx                /* limit covers bitmap + 0xff */
        /* 16-byte TSS descriptor at GDT index 5 + 2 * cpu */
        mov     %rdx, %rax                      /* limit[15:0] */
        and     $0xffff, %eax
        mov     %rdi, %rsi
        and     $0xffffff, %esi
        shl     $16, %rsi
        or      %rsi, %rax                      /* base[23:0] */
        mov     $0x89, %esi
        shl     $40, %rsi
        or      %rsi, %rax                      /* present, 64-bit TSS */
        mov     %rdi, %rsi
        shr     $24, %rsi
        and     $0xff, %esi
        shl     $56, %rsi
        or      %rsi, %rax                      /* base[31:24] */
        mov     %rbx, %rsi
        shl     $4, %rsi
        lea     gdt_tss(%rip), %rdx
        mov     %rax, (%rdx, %rsi)
        movq    $0, 8(%rdx, %rsi)               /* base[63:32] */
        lea     SEL_TSS0(,%rsi,1), %eax
        ltr     %ax

        test    %ebx, %ebx
        jnz     2f
        /* BSP only: IDT gates, PIC masked, COM2 routed, boot_params saved */
        mov     %r15, boot_params(%rip)
        mov     $13, %edi
        lea     isr_gp(%rip), %rsi
        call    set_gate
        mov     $VEC_TIMER, %edi
        lea     isr_timer(%rip), %rsi
        call    set_gate
        mov     $VEC_COM2, %edi
        lea     isr_com2(%rip), %rsi
        call    set_gate
        mov     $0xff, %edi
        lea     isr_spurious(%rip), %rsi
        call    set_gate
        mov     $0xff, %al
        out     %al, $0x21
        out     %al, $0xa1
        mov     $IOAPIC, %eax
        movl    $0x17, (%rax)                   /* redirection 3, high: dest 0 */
        movl    $0, 0x10(%rax)
        movl    $0x16, (%rax)                   /* low: fixed, edge, vector */
        movl    $VEC_COM2, 0x10(%rax)
2:      lidt    idt_ptr(%rip)
        mov     $LAPIC, %eax
        movl    $0x1ff, 0xf0(%rax)              /* software enable, spurious 0xff */

        /* to the workload in CPL 3 */
        mov     %rbx, %rax
        shl     $12, %rax
        lea     ustacks+4096(%rip), %rcx
        add     %rax, %rcx
        mov     %rbx, %rdi                      /* rdi = cpu index */
        mov     %r14, %rsi                      /* rsi = per-CPU block */
        pushq   $SEL_UDATA
        pushq   %rcx
        pushq   $0x3202                         /* IF=1, IOPL=3: see the header */
        pushq   $SEL_UCODE
        lea     user_main(%rip), %rax
        pushq   %rax
        iretq

park:   cli
        hlt
        jmp     park

/* set_gate(rdi = vector, rsi = handler): 64-bit interrupt gate, DPL 0 */
set_gate:
        lea     idt(%rip), %rdx
        shl     $4, %rdi
        add     %rdi, %rdx
        mov     %rsi, %rax
        and     $0xffff, %eax
        or      $(SEL_KCODE << 16), %eax
        mov     %eax, (%rdx)
        mov     %rsi, %rax
        and     $0xffff0000, %eax
        or      $0x8e00, %eax
        mov     %eax, 4(%rdx)
        mov     %rsi, %rax
        shr     $32, %rax
        mov     %eax, 8(%rdx)
        movl    $0, 12(%rdx)
        ret

/* per-CPU block of the interrupted CPU, from the kernel stack pointer */
        .macro PERCPU reg
        mov     %rsp, \reg
        and     $-4096, \reg
        .endm

isr_timer:
        push    %rax
        PERCPU  %rax
        incq    PC_TICKS(%rax)
        mov     $LAPIC, %eax
        movl    $0, 0xb0(%rax)                  /* EOI */
        pop     %rax
        iretq

isr_com2:
        push    %rax
        movq    $1, rx_pending(%rip)
        mov     $LAPIC, %eax
        movl    $0, 0xb0(%rax)
        pop     %rax
        iretq

isr_spurious:
        iretq

/* #GP: `hlt` from CPL 3 is the idle call; anything else is fatal. */
isr_gp:
        push    %rax
        mov     16(%rsp), %rax                  /* faulting rip (after error code) */
        cmpb    $0xf4, (%rax)
        jne     die
        incq    16(%rsp)                        /* resume after the hlt */
        PERCPU  %rax
        cmpq    $0, PC_STARTED(%rax)
        jne     1f
        movq    $1, PC_STARTED(%rax)
        push    %rdx
        mov     timer_count(%rip), %edx
        mov     $LAPIC, %eax
        movl    $0xb, 0x3e0(%rax)               /* divide by 1 */
        movl    $(VEC_TIMER | (1 << 17)), 0x320(%rax)   /* periodic */
        movl    %edx, 0x380(%rax)               /* initial count */
        pop     %rdx
1:      pop     %rax
        add     $8, %rsp                        /* error code */
        sti
        hlt
        cli
        iretq

/* An unexpected #GP: say where on the console, then triple-fault on purpose. */
die:    mov     16(%rsp), %r14                  /* faulting rip (after rax, error code) */
        mov     8(%rsp), %r15                   /* error code */
        call    line_reset
        lea     s_fatal(%rip), %rsi
        mov     $(s_fatal_end - s_fatal), %ecx
        call    put_str
        mov     %r14, %rax
        call    put_hex
        lea     s_error(%rip), %rsi
        mov     $(s_error_end - s_error), %ecx
        call    put_str
        mov     %r15, %rax
        call    put_hex
        mov     $COM1, %dx
        call    send_line
        lidt    null_idt(%rip)
        ud2

/* ------------------------------------------------------------------ */
/* The workload, CPL 3. rdi = cpu index, rsi = per-CPU block.           */
/* ------------------------------------------------------------------ */
user_main:
        mov     %rdi, %r12                      /* r12 = cpu */
        mov     %rsi, %r13                      /* r13 = per-CPU block */
        movabs  $FNV_OFFSET, %rax
        mov     %rax, PC_HASH(%r13)
        test    %r12, %r12
        jnz     ap_main

        /* parameters from the command line */
        mov     boot_params(%rip), %rax
        mov     0x228(%rax), %eax               /* hdr.cmd_line_ptr */
        mov     %rax, cmdline(%rip)
        lea     p_hb(%rip), %rsi
        mov     $(p_hb_end - p_hb), %ecx
        mov     $100, %eax
        call    param
        test    %rax, %rax
        jnz     1f
        mov     $100, %eax
1:      mov     %rax, hb_ms(%rip)
        lea     p_work(%rip), %rsi
        mov     $(p_work_end - p_work), %ecx
        mov     $10000, %eax
        call    param
        mov     %rax, work(%rip)
        lea     p_touch(%rip), %rsi
        mov     $(p_touch_end - p_touch), %ecx
        xor     %eax, %eax
        call    param
        shl     $20, %rax                       /* MiB -> bytes */
        mov     %rax, touch_bytes(%rip)
        lea     p_dirty(%rip), %rsi
        mov     $(p_dirty_end - p_dirty), %ecx
        xor     %eax, %eax
        call    param
        mov     %rax, dirty_pages(%rip)
        lea     p_dirty_mib(%rip), %rsi
        mov     $(p_dirty_mib_end - p_dirty_mib), %ecx
        xor     %eax, %eax
        call    param
        shl     $20, %rax                       /* MiB -> bytes */
        mov     %rax, dirty_bytes(%rip)
        lea     p_ws(%rip), %rsi
        mov     $(p_ws_end - p_ws), %ecx
        xor     %eax, %eax
        call    param
        shl     $20, %rax                       /* MiB -> bytes */
        mov     %rax, ws_bytes(%rip)
        call    touch_memory
        call    ws_init
        /* tick = the largest divisor of hb_ms up to 10 ms */
        mov     $10, %ecx
2:      mov     hb_ms(%rip), %rax
        xor     %edx, %edx
        div     %rcx
        test    %rdx, %rdx
        jz      3f
        dec     %ecx
        jmp     2b
3:      mov     %rax, ticks_per_hb(%rip)
        imul    $1000000, %rcx, %rcx            /* LAPIC bus: 1 GHz on KVM */
        mov     %ecx, timer_count(%rip)

        /* relive's agent line port: one exit per line instead of per byte */
        mov     $LINE_PORT, %dx
        in      %dx, %eax
        cmp     $LINE_MAGIC, %eax
        sete    %al
        movzbl  %al, %eax
        mov     %rax, line_port_ok(%rip)

        /* COM2: receive interrupts on */
        mov     $(COM2 + 1), %dx
        mov     $1, %al
        out     %al, %dx
        mov     $(COM2 + 4), %dx
        mov     $0x08, %al                      /* MCR.OUT2 */
        out     %al, %dx

        /* banner on the console (one exit a byte on a UART), before `ready`:
         * ready means the boot is over, so a snapshot taken at ready (a warm
         * boot image) holds no boot output still to be printed */
        call    line_reset
        lea     s_banner(%rip), %rsi
        mov     $(s_banner_end - s_banner), %ecx
        call    put_str
        mov     hb_ms(%rip), %rax
        call    put_dec
        lea     s_work(%rip), %rsi
        mov     $(s_work_end - s_work), %ecx
        call    put_str
        mov     work(%rip), %rax
        call    put_dec
        mov     $COM1, %dx
        call    send_line

        movq    $1, config_ready(%rip)

        /* ready */
        call    line_reset
        lea     s_ready(%rip), %rsi
        mov     $(s_ready_end - s_ready), %ecx
        call    put_str
        call    put_state
        lea     s_hbms(%rip), %rsi
        mov     $(s_hbms_end - s_hbms), %ecx
        call    put_str
        mov     hb_ms(%rip), %rax
        call    put_dec
        mov     $COM2, %dx
        call    send_line

bsp_loop:
        cmpq    $0, ws_end(%rip)
        je      4f
        cmpq    $0, PC_TICKS(%r13)              /* the timer starts at the first idle */
        je      4f
        call    ws_run
        jmp     5f
4:      hlt                                     /* idle: see isr_gp */
5:      cmpq    $0, hanging(%rip)
        jne     hang_forever
        call    do_work
        cmpq    $0, rx_pending(%rip)
        je      1f
        call    handle_rx
1:      mov     PC_TICKS(%r13), %rax
        sub     last_hb_tick(%rip), %rax
        cmp     ticks_per_hb(%rip), %rax
        jb      bsp_loop
        mov     PC_TICKS(%r13), %rax
        mov     %rax, last_hb_tick(%rip)
        incq    seq(%rip)
        call    dirty_memory
        call    line_reset
        lea     s_hb(%rip), %rsi
        mov     $(s_hb_end - s_hb), %ecx
        call    put_str
        call    put_state
        movq    $0, ws_gap(%rip)                /* the gap since this heartbeat */
        mov     $COM2, %dx
        call    send_line
        jmp     bsp_loop

hang_forever:
        pause
        jmp     hang_forever

ap_main:
        cmpq    $0, config_ready(%rip)
        jne     1f
        pause
        jmp     ap_main
1:      hlt
        call    do_work
        jmp     1b

/* RAM end below 4 GiB from the zero page's e820 table (type 1 entries) */
ram_end:
        mov     boot_params(%rip), %rsi
        movzbl  0x1e8(%rsi), %ecx               /* e820_entries */
        lea     0x2d0(%rsi), %rsi               /* e820_table, 20 bytes each */
        xor     %eax, %eax
1:      test    %ecx, %ecx
        jz      3f
        cmpl    $1, 16(%rsi)
        jne     2f
        mov     (%rsi), %rdx
        add     8(%rsi), %rdx
        mov     $0x100000000, %r8
        cmp     %r8, %rdx
        cmova   %r8, %rdx
        cmp     %rax, %rdx
        cmova   %rdx, %rax
2:      add     $20, %rsi
        dec     %ecx
        jmp     1b
3:      ret

/* relive.touch_mib: write one word into every page of [TOUCH_BASE, +touch),
 * clamped to RAM, so the guest holds that much real, nonzero memory. */
touch_memory:
        call    ram_end
        mov     $TOUCH_BASE, %edi
        mov     touch_bytes(%rip), %rcx
        add     %rdi, %rcx
        cmp     %rax, %rcx
        cmova   %rax, %rcx
        cmp     %rdi, %rcx
        jbe     2f
        mov     %rcx, touch_end(%rip)
        mov     %rdi, dirty_next(%rip)
        mov     %rcx, dirty_end(%rip)           /* the hot set: all of it, */
        mov     dirty_bytes(%rip), %rdx         /* or its first dirty_mib */
        test    %rdx, %rdx
        jz      1f
        add     %rdi, %rdx
        cmp     %rcx, %rdx
        jae     1f
        mov     %rdx, dirty_end(%rip)
1:      mov     %rdi, (%rdi)                    /* the page's own address */
        add     $4096, %rdi
        cmp     %rcx, %rdi
        jb      1b
2:      ret

/* relive.dirty_pages: at each heartbeat, rewrite that many pages of the
 * hot set (round robin) with the heartbeat's sequence number. */
dirty_memory:
        mov     dirty_pages(%rip), %rcx
        test    %rcx, %rcx
        jz      3f
        mov     dirty_end(%rip), %rdx
        test    %rdx, %rdx
        jz      3f
        mov     dirty_next(%rip), %rdi
        mov     seq(%rip), %rax
1:      mov     %rax, 8(%rdi)
        add     $4096, %rdi
        cmp     %rdx, %rdi
        jb      2f
        mov     $TOUCH_BASE, %edi
2:      dec     %rcx
        jnz     1b
        mov     %rdi, dirty_next(%rip)
3:      ret

/* mix(rdi = page address, rax = stamp) -> rax; clobbers rdx */
ws_mix:
        movabs  $MIX_K1, %rdx
        imul    %rdx, %rax
        add     %rdi, %rax
        mov     %rax, %rdx
        shr     $29, %rdx
        xor     %rdx, %rax
        movabs  $MIX_K2, %rdx
        imul    %rdx, %rax
        ret

/* relive.ws_mib: stamp 0 on every page of the working set, and its sum */
ws_init:
        cmpq    $0, ws_bytes(%rip)
        je      3f
        call    ram_end
        mov     ws_bytes(%rip), %rcx
        mov     $TOUCH_BASE, %edi
        add     %rdi, %rcx
        cmp     %rax, %rcx
        cmova   %rax, %rcx
        cmp     %rdi, %rcx
        jbe     3f
        mov     %rdi, ws_next(%rip)
        xor     %r8d, %r8d                      /* sum */
        xor     %r9d, %r9d                      /* pages */
1:      movq    $0, WS_STAMP(%rdi)
        xor     %eax, %eax
        call    ws_mix
        add     %rax, %r8
        inc     %r9
        add     $4096, %rdi
        cmp     %rcx, %rdi
        jb      1b
        mov     %r8, ws_sum(%rip)
        mov     %r9, ws_pages(%rip)
        mov     %rcx, ws_end(%rip)
3:      ret

/* the working-set writer, until the next timer tick or a command: each
 * write takes the next sequence number, stamps the next page with it and
 * moves ws_sum by mix(page, new) - mix(page, old). A stop anywhere in here
 * is consistent: what is not in memory yet is in registers. */
ws_run:
        mov     PC_TICKS(%r13), %r10
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, %r11                      /* tsc of the previous write */
1:      mov     ws_next(%rip), %rdi
        mov     WS_STAMP(%rdi), %rax
        call    ws_mix
        mov     ws_sum(%rip), %r8
        sub     %rax, %r8
        mov     ws_seq(%rip), %rax
        inc     %rax
        mov     %rax, ws_seq(%rip)
        mov     %rax, WS_STAMP(%rdi)
        call    ws_mix
        add     %rax, %r8
        mov     %r8, ws_sum(%rip)
        add     $4096, %rdi
        cmp     ws_end(%rip), %rdi
        jb      2f
        mov     $TOUCH_BASE, %edi
2:      mov     %rdi, ws_next(%rip)
        rdtsc
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, %rax
        sub     %r11, %rax
        mov     %rdx, %r11
        cmp     ws_gap(%rip), %rax
        jbe     3f
        mov     %rax, ws_gap(%rip)
3:      cmpq    $0, rx_pending(%rip)
        jne     4f
        cmp     PC_TICKS(%r13), %r10
        je      1b
4:      ret

/* `verify`: the working set's sum recomputed from its pages */
cmd_verify:
        call    line_reset
        lea     s_verify(%rip), %rsi
        mov     $(s_verify_end - s_verify), %ecx
        call    put_str
        cmpq    $0, ws_end(%rip)
        jne     1f
        lea     s_none(%rip), %rsi
        mov     $(s_none_end - s_none), %ecx
        call    put_str
        mov     $COM2, %dx
        jmp     send_line
1:      mov     $TOUCH_BASE, %edi
        xor     %r8d, %r8d
2:      mov     WS_STAMP(%rdi), %rax
        call    ws_mix
        add     %rax, %r8
        add     $4096, %rdi
        cmp     ws_end(%rip), %rdi
        jb      2b
        cmp     ws_sum(%rip), %r8
        jne     3f
        lea     s_vok(%rip), %rsi
        mov     $(s_vok_end - s_vok), %ecx
        call    put_str
        mov     %r8, %rax
        call    put_hex
        lea     s_wsseq(%rip), %rsi
        mov     $(s_wsseq_end - s_wsseq), %ecx
        call    put_str
        mov     ws_seq(%rip), %rax
        call    put_dec
        lea     s_pages(%rip), %rsi
        mov     $(s_pages_end - s_pages), %ecx
        call    put_str
        mov     ws_pages(%rip), %rax
        call    put_dec
        mov     $COM2, %dx
        jmp     send_line
3:      lea     s_torn(%rip), %rsi
        mov     $(s_torn_end - s_torn), %ecx
        call    put_str
        mov     %r8, %rax
        call    put_hex
        lea     s_expected(%rip), %rsi
        mov     $(s_expected_end - s_expected), %ecx
        call    put_str
        mov     ws_sum(%rip), %rax
        call    put_hex
        mov     $COM2, %dx
        jmp     send_line

/* work iterations on this CPU's counter and hash */
do_work:
        mov     work(%rip), %rcx
        test    %rcx, %rcx
        jz      2f
        mov     PC_COUNTER(%r13), %rax
        mov     PC_HASH(%r13), %rdx
        movabs  $FNV_PRIME, %r8
1:      inc     %rax
        xor     %rax, %rdx
        imul    %r8, %rdx
        dec     %rcx
        jnz     1b
        mov     %rax, PC_COUNTER(%r13)
        mov     %rdx, PC_HASH(%r13)
2:      ret

/* appends " seq=S counter=C hash=H cpus=N" (seq omitted on `ready`) */
put_state:
        cmpq    $0, seq(%rip)
        je      1f
        lea     s_seq(%rip), %rsi
        mov     $(s_seq_end - s_seq), %ecx
        call    put_str
        mov     seq(%rip), %rax
        call    put_dec
1:      lea     s_counter(%rip), %rsi
        mov     $(s_counter_end - s_counter), %ecx
        call    put_str
        mov     PC_COUNTER(%r13), %rax
        call    put_dec
        lea     s_hash(%rip), %rsi
        mov     $(s_hash_end - s_hash), %ecx
        call    put_str
        mov     PC_HASH(%r13), %rax
        call    put_hex
        lea     s_cpus(%rip), %rsi
        mov     $(s_cpus_end - s_cpus), %ecx
        call    put_str
        /* count CPUs whose counter moved since the last report */
        xor     %r9d, %r9d
        xor     %r10d, %r10d
        lea     percpu(%rip), %r11
        lea     last_seen(%rip), %r8
2:      mov     PC_COUNTER(%r11), %rax
        cmp     (%r8, %r10, 8), %rax
        je      3f
        mov     %rax, (%r8, %r10, 8)
        inc     %r9
3:      add     $4096, %r11
        inc     %r10
        cmp     $MAX_CPUS, %r10
        jb      2b
        mov     %r9, %rax
        call    put_dec
        cmpq    $0, ws_end(%rip)
        je      4f
        lea     s_wssum(%rip), %rsi
        mov     $(s_wssum_end - s_wssum), %ecx
        call    put_str
        mov     ws_sum(%rip), %rax
        call    put_hex
        lea     s_wsseq(%rip), %rsi
        mov     $(s_wsseq_end - s_wsseq), %ecx
        call    put_str
        mov     ws_seq(%rip), %rax
        call    put_dec
        lea     s_gap(%rip), %rsi
        mov     $(s_gap_end - s_gap), %ecx
        call    put_str
        mov     ws_gap(%rip), %rax
        call    put_dec
4:      ret

/* read the pending command bytes from COM2; act on complete lines */
handle_rx:
        movq    $0, rx_pending(%rip)
1:      mov     $(COM2 + 5), %dx
        in      %dx, %al                        /* LSR */
        test    $1, %al
        jz      9f
        mov     $COM2, %dx
        in      %dx, %al
        cmp     $10, %al
        je      2f
        cmp     $13, %al
        je      1b
        mov     cmd_len(%rip), %rcx
        cmp     $63, %rcx
        jae     1b                              /* overlong: drop the excess */
        lea     cmd_buf(%rip), %rdx
        mov     %al, (%rdx, %rcx)
        incq    cmd_len(%rip)
        jmp     1b
2:      call    dispatch
        movq    $0, cmd_len(%rip)
        jmp     1b
9:      ret

        .macro IFCMD name, target
        lea     \name(%rip), %rsi
        mov     $(\name\()_end - \name), %ecx
        call    cmd_is
        jz      \target
        .endm

dispatch:
        IFCMD   c_status, cmd_status
        IFCMD   c_panic, cmd_panic
        IFCMD   c_crash, cmd_crash
        IFCMD   c_hang, cmd_hang
        IFCMD   c_reset, cmd_reset
        IFCMD   c_exit, cmd_exit
        IFCMD   c_verify, cmd_verify
        lea     c_restored(%rip), %rsi          /* the VMM's notice after a restore */
        mov     $(c_restored_end - c_restored), %ecx
        call    cmd_starts
        jz      cmd_restored
        call    line_reset
        lea     s_unknown(%rip), %rsi
        mov     $(s_unknown_end - s_unknown), %ecx
        call    put_str
        mov     $COM2, %dx
        jmp     send_line

cmd_status:
        call    line_reset
        lea     s_status(%rip), %rsi
        mov     $(s_status_end - s_status), %ecx
        call    put_str
        call    put_state
        lea     s_ticks(%rip), %rsi
        mov     $(s_ticks_end - s_ticks), %ecx
        call    put_str
        mov     PC_TICKS(%r13), %rax
        call    put_dec
        mov     $COM2, %dx
        jmp     send_line
cmd_panic:
        call    ack
        mov     $PVPANIC, %dx
        mov     $1, %al
        out     %al, %dx
        ret
cmd_crash:
        call    ack
        ud2
cmd_hang:
        call    ack
        movq    $1, hanging(%rip)
        ret
cmd_reset:
        call    ack
        mov     $0xfe, %al
        out     %al, $I8042_CMD
        ret
cmd_restored:                                   /* no RNG, no wall clock: nothing to do */
        ret
cmd_exit:
        call    ack
        mov     $POWER, %dx
        mov     $0x34, %al
        out     %al, %dx
        ret

/* "ok <command>" */
ack:
        call    line_reset
        lea     s_ok(%rip), %rsi
        mov     $(s_ok_end - s_ok), %ecx
        call    put_str
        lea     cmd_buf(%rip), %rsi
        mov     cmd_len(%rip), %rcx
        call    put_str
        mov     $COM2, %dx
        jmp     send_line

/* ZF set when cmd_buf equals rsi[0..rcx] */
cmd_is:
        cmp     cmd_len(%rip), %rcx
        jne     1f
        lea     cmd_buf(%rip), %rdi
        repe cmpsb
1:      ret

/* cmd_starts(rsi = prefix, rcx = its length) -> ZF set if the line starts with it */
cmd_starts:
        cmp     cmd_len(%rip), %rcx
        ja      1f                              /* longer than the line: ZF clear */
        lea     cmd_buf(%rip), %rdi
        repe cmpsb
1:      ret

/* param(rsi = "name=", rcx = its length, rax = default) -> rax */
param:
        mov     %rax, %r9                       /* default */
        mov     cmdline(%rip), %rdi
        test    %rdi, %rdi
        jz      8f
        mov     %rsi, %r10
        mov     %rcx, %r11
1:      cmpb    $0, (%rdi)
        je      8f
        mov     %rdi, %r8                       /* candidate start */
        mov     %r10, %rsi
        mov     %r11, %rcx
        repe cmpsb
        je      3f
        mov     %r8, %rdi
        /* skip to the byte after the next space */
2:      cmpb    $0, (%rdi)
        je      8f
        cmpb    $32, (%rdi)
        lea     1(%rdi), %rdi
        jne     2b
        jmp     1b
3:      xor     %eax, %eax                      /* decimal at rdi */
4:      movzbl  (%rdi), %ecx
        sub     $48, %ecx
        cmp     $9, %ecx
        ja      9f
        imul    $10, %rax, %rax
        add     %rcx, %rax
        inc     %rdi
        jmp     4b
8:      mov     %r9, %rax
9:      ret

/* line buffer */
line_reset:
        lea     line(%rip), %rax
        mov     %rax, line_end(%rip)
        ret

/* put_str(rsi, rcx) */
put_str:
        mov     line_end(%rip), %rdi
        rep movsb
        mov     %rdi, line_end(%rip)
        ret

/* put_dec(rax) */
put_dec:
        lea     numbuf+24(%rip), %rsi
        mov     $10, %r8d
        xor     %ecx, %ecx
1:      xor     %edx, %edx
        div     %r8
        add     $48, %dl
        dec     %rsi
        mov     %dl, (%rsi)
        inc     %ecx
        test    %rax, %rax
        jnz     1b
        jmp     put_str

/* put_hex(rax): 16 hex digits */
put_hex:
        lea     numbuf+16(%rip), %rsi
        mov     $16, %ecx
1:      mov     %eax, %edx
        and     $0xf, %edx
        lea     hexdigits(%rip), %r8
        mov     (%r8, %rdx), %dl
        dec     %rsi
        mov     %dl, (%rsi)
        shr     $4, %rax
        dec     %ecx
        jnz     1b
        mov     $16, %ecx
        jmp     put_str

/* send_line(dx = port): the line plus '\n'; agent lines through the line
 * port when the VMM has one (one exit), else rep outsb (one exit a byte) */
send_line:
        mov     line_end(%rip), %rdi
        movb    $10, (%rdi)
        inc     %rdi
        lea     line(%rip), %rsi
        cmp     $COM2, %dx
        jne     1f
        cmpq    $0, line_port_ok(%rip)
        je      1f
        mov     $LINE_PORT, %dx
        mov     %esi, %eax
        out     %eax, %dx
        jmp     line_reset
1:
        mov     %rdi, %rcx
        sub     %rsi, %rcx
        rep outsb
        jmp     line_reset

        .section .rodata
hexdigits:      .ascii "0123456789abcdef"
p_hb:           .ascii "relive.hb_ms="
p_hb_end:
p_work:         .ascii "relive.work="
p_work_end:
p_touch:        .ascii "relive.touch_mib="
p_touch_end:
p_dirty:        .ascii "relive.dirty_pages="
p_dirty_end:
p_dirty_mib:    .ascii "relive.dirty_mib="
p_dirty_mib_end:
p_ws:           .ascii "relive.ws_mib="
p_ws_end:
s_verify:       .ascii "verify "
s_verify_end:
s_none:         .ascii "none"
s_none_end:
s_vok:          .ascii "ok sum="
s_vok_end:
s_torn:         .ascii "torn sum="
s_torn_end:
s_expected:     .ascii " expected="
s_expected_end:
s_pages:        .ascii " pages="
s_pages_end:
s_wssum:        .ascii " ws_sum="
s_wssum_end:
s_wsseq:        .ascii " ws_seq="
s_wsseq_end:
s_gap:          .ascii " gap_tsc="
s_gap_end:
c_verify:       .ascii "verify"
c_verify_end:
s_fatal:        .ascii "relive-guest: fatal #GP at rip="
s_fatal_end:
s_error:        .ascii " error="
s_error_end:
s_banner:       .ascii "relive-guest: up, hb_ms="
s_banner_end:
s_work:         .ascii " work="
s_work_end:
s_ready:        .ascii "ready"
s_ready_end:
s_hbms:         .ascii " hb_ms="
s_hbms_end:
s_hb:           .ascii "hb"
s_hb_end:
s_status:       .ascii "status"
s_status_end:
s_seq:          .ascii " seq="
s_seq_end:
s_counter:      .ascii " counter="
s_counter_end:
s_hash:         .ascii " hash="
s_hash_end:
s_cpus:         .ascii " cpus="
s_cpus_end:
s_ticks:        .ascii " ticks="
s_ticks_end:
s_ok:           .ascii "ok "
s_ok_end:
s_unknown:      .ascii "error unknown command"
s_unknown_end:
c_status:       .ascii "status"
c_status_end:
c_panic:        .ascii "panic"
c_panic_end:
c_crash:        .ascii "crash"
c_crash_end:
c_hang:         .ascii "hang"
c_hang_end:
c_reset:        .ascii "reset"
c_reset_end:
c_exit:         .ascii "exit"
c_exit_end:
c_restored:     .ascii "restored "
c_restored_end:

        .section .data
        .balign 4096
/* identity map of the first 4 GiB, 2 MiB pages, user-accessible */
pml4:   .quad   pdpt + 0x7
        .fill   511, 8, 0
pdpt:   .quad   pd + 0x7, pd + 0x1007, pd + 0x2007, pd + 0x3007
        .fill   508, 8, 0
pd:
        .set    addr, 0
        .rept   2048
        .quad   addr | 0x87
        .set    addr, addr + 0x200000
        .endr

        .balign 16
gdt:    .quad   0
        .quad   0x00af9b000000ffff              /* 0x08 kernel code */
        .quad   0x00cf93000000ffff              /* 0x10 kernel data */
        .quad   0x00cff3000000ffff              /* 0x18 user data */
        .quad   0x00affb000000ffff              /* 0x20 user code */
gdt_tss:
        .fill   MAX_CPUS * 2, 8, 0              /* 0x28 + 16 * cpu: TSSs */
gdt_end:
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt
idt_ptr:
        .word   256 * 16 - 1
        .quad   idt
null_idt:
        .word   0
        .quad   0

        .balign 128
tss_area:
        .fill   MAX_CPUS * 128, 1, 0
iobitmap:
        .fill   8192, 1, 0                      /* every port allowed */
        .byte   0xff

        .section .bss
        .balign 4096
idt:            .skip   4096
percpu:         .skip   4096 * MAX_CPUS         /* kernel stacks + per-CPU blocks */
ustacks:        .skip   4096 * MAX_CPUS
last_seen:      .skip   8 * MAX_CPUS
boot_params:    .skip   8
cmdline:        .skip   8
hb_ms:          .skip   8
work:           .skip   8
ticks_per_hb:   .skip   8
timer_count:    .skip   8
config_ready:   .skip   8
rx_pending:     .skip   8
hanging:        .skip   8
seq:            .skip   8
last_hb_tick:   .skip   8
cmd_len:        .skip   8
line_port_ok:   .skip   8
touch_bytes:    .skip   8
touch_end:      .skip   8
dirty_pages:    .skip   8
dirty_next:     .skip   8
dirty_bytes:    .skip   8
dirty_end:      .skip   8
ws_bytes:       .skip   8
ws_end:         .skip   8                       /* 0: no working set */
ws_next:        .skip   8
ws_sum:         .skip   8
ws_seq:         .skip   8
ws_pages:       .skip   8
ws_gap:         .skip   8
cmd_buf:        .skip   64
line_end:       .skip   8
line:           .skip   256
numbuf:         .skip   32
