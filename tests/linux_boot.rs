//! Boots Debian's cloud kernel (an ELF vmlinux) with `relive-vmm` up to its
//! banner on the serial console. That proves the Linux path of the VMM: ELF
//! loading, boot_params and the e820 map, the command line, the boot page
//! tables and COM1.
//!
//! The kernel is not downloaded here: `scripts/fetch-linux-kernel.sh` puts it
//! in `<repo>/.cache/linux/vmlinux`, or `RELIVE_LINUX_KERNEL` names one. Without
//! it the test skips with a printed reason, unless `RELIVE_REQUIRE_KVM=1` or
//! `RELIVE_REQUIRE_LINUX=1`, which make it fail.
//!
//! On the nested KVM of the development machines, guest kernel code is
//! emulated (shared/PLATFORM.md). The kernel makes no VM exit at all before
//! its early console comes up in `setup_arch()`: it clears its 5.5 MiB BSS
//! with an emulated `rep stosb`, then sorts and patches its jump labels and
//! static calls through retpoline thunks, all instruction by instruction. So
//! the banner (replayed from the log buffer with the next few lines) appears
//! after about 15 s on an idle machine, and up to ~50 s when another process
//! competes for the CPU. The kernel would crawl on from there, so the test
//! stops the VM once those first lines are out.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{env_flag, repo_root, require_kvm, Vmm, STEP_TIMEOUT};

/// How long the kernel gets to print its banner.
const BANNER_TIMEOUT: Duration = Duration::from_secs(150);
/// How long it then gets to print the command line and the e820 map (they
/// come out in the same burst as the banner).
const EARLY_LINES_TIMEOUT: Duration = Duration::from_secs(20);

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 noapic nomodule";

/// The ELF vmlinux to boot, or `None` after printing why the test skips.
fn linux_kernel() -> Option<PathBuf> {
    let (path, origin) = match std::env::var_os("RELIVE_LINUX_KERNEL") {
        Some(p) => (PathBuf::from(p), "RELIVE_LINUX_KERNEL"),
        None => (
            repo_root().join(".cache/linux/vmlinux"),
            "the default location",
        ),
    };
    if path.is_file() {
        return Some(path);
    }
    let reason = format!(
        "no Linux kernel at {} ({origin}): run scripts/fetch-linux-kernel.sh",
        path.display()
    );
    assert!(
        !env_flag("RELIVE_REQUIRE_KVM") && !env_flag("RELIVE_REQUIRE_LINUX"),
        "{}: {reason} (RELIVE_REQUIRE_KVM or RELIVE_REQUIRE_LINUX forbids skipping)",
        common::test_name()
    );
    eprintln!("skipping {}: {reason}", common::test_name());
    None
}

/// Polls the console until a line satisfies `pred`; returns it, or `None`
/// at the deadline or if the VMM exits.
fn wait_console_line(
    vmm: &mut Vmm,
    deadline: Instant,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    loop {
        let console = vmm.console_text();
        if let Some(line) = console.lines().find(|l| pred(l)) {
            return Some(line.to_string());
        }
        if Instant::now() >= deadline || !vmm.is_running() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Describes the state of a VM whose console lacks something.
fn diagnose(vmm: &mut Vmm, what: &str, elapsed: Duration) -> String {
    let running = vmm.is_running();
    let status = if running {
        let out = vmm.ctl_output(&["status", "--json"]);
        out.stdout
    } else {
        String::from("(VMM exited)")
    };
    format!(
        "{what} not on the console after {elapsed:?}; VMM running: {running}\n\
         status: {status}\nstderr: {}\nconsole:\n{}",
        vmm.stderr(),
        vmm.console_text()
    )
}

#[test]
fn linux_prints_its_banner() {
    if !require_kvm() {
        return;
    }
    let Some(kernel) = linux_kernel() else {
        return;
    };
    let kernel = kernel.to_str().expect("UTF-8 kernel path").to_string();
    let started = Instant::now();
    let mut vmm = Vmm::start(&[
        "--kernel",
        &kernel,
        "--mem-mib",
        "256",
        "--cmdline",
        CMDLINE,
    ]);

    let banner = wait_console_line(&mut vmm, started + BANNER_TIMEOUT, |l| {
        l.contains("Linux version ")
    });
    let elapsed = started.elapsed();
    let Some(banner) = banner else {
        panic!("{}", diagnose(&mut vmm, "the Linux banner", elapsed));
    };
    eprintln!("{}: banner after {elapsed:.1?}", common::test_name());
    // "[    0.000000] Linux version 6.1.0-48-cloud-amd64 (debian-kernel@...) ... Debian 6.1.172-1 (...)"
    let version = banner
        .split("Linux version ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default();
    assert!(
        version.chars().next().is_some_and(|c| c.is_ascii_digit()) && version.contains('.'),
        "no kernel release in the banner: {banner:?}"
    );
    // The fetch script records the Debian package version next to vmlinux.
    if let Ok(debian) = std::fs::read_to_string(PathBuf::from(&kernel).with_file_name("VERSION")) {
        let debian = debian.trim();
        assert!(
            banner.contains(debian),
            "banner {banner:?} is not from package version {debian}"
        );
    }

    // The kernel got our command line and our memory map (256 MiB: usable
    // RAM from 1 MiB up to 0x0fffffff).
    let deadline = Instant::now() + EARLY_LINES_TIMEOUT;
    let cmdline = wait_console_line(&mut vmm, deadline, |l| l.contains("Command line: "));
    let Some(cmdline) = cmdline else {
        panic!(
            "{}",
            diagnose(&mut vmm, "the command line", started.elapsed())
        );
    };
    assert!(
        cmdline
            .trim_end()
            .ends_with(&format!("Command line: {CMDLINE}")),
        "{cmdline:?}"
    );
    let e820 = wait_console_line(&mut vmm, deadline, |l| {
        l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable")
    });
    assert!(
        e820.is_some(),
        "{}",
        diagnose(
            &mut vmm,
            "the e820 entry of RAM above 1 MiB",
            started.elapsed()
        )
    );

    // Stop it the way an operator would.
    assert!(vmm.is_running(), "{}", vmm.stderr());
    vmm.signal(libc::SIGTERM);
    let (code, record) = vmm.wait_exit(STEP_TIMEOUT);
    assert_eq!(
        (code, record["reason"].as_str()),
        (3, Some("shutdown")),
        "{record}"
    );
}
