//! Live checkpoint benchmark of `relive-vmm`: what a consistency image costs
//! the guest as the memory it touched grows.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench checkpoint
//! ```
//!
//! A 2 GiB guest (the bundled one) touches T MiB at start (`relive.touch_mib`,
//! T = 16, 512, 1536; `RELIVE_BENCH_TOUCHED=16,512` to choose) and keeps
//! rewriting 16 MiB of it as fast as it runs (`relive.ws_mib=16`, which also
//! stamps its progress: each heartbeat carries `gap_tsc`, the longest time
//! between two of its writes since the previous heartbeat). For each T, after
//! one warm-up, N (`RELIVE_BENCH_RUNS`, default 10) full and then N
//! incremental checkpoints on the control socket, each recording:
//! - the VMM's `pause_us` (vCPUs stopped) and `total_us`, rounds and pages
//!   copied twice (`copy`);
//! - the guest-visible disruption: the largest `gap_tsc` among the heartbeats
//!   that arrive from the checkpoint's start to 100 ms after its end, in ms
//!   (the TSC rate is measured here against the monotonic clock; the guest's
//!   TSC runs at the host's); the baseline, measured in the same run before
//!   any checkpoint, is the guest's longest stall per heartbeat period over
//!   2 s without one;
//! - for full images, the write throughput (image bytes on disk / total
//!   time), against the disk's own, measured in the same run by writing and
//!   fsyncing a file of the same size in the same directory.
//!
//! It prints a table (medians and p90s), the ratio pause(largest) /
//! pause(smallest), the targets with a verdict each, and one line
//! `BENCH checkpoint {json}`. It is not a timed test: it exits 0 whether or
//! not the targets are met (1 when `/dev/kvm` is missing under
//! `RELIVE_REQUIRE_KVM=1`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relive_control::{CheckpointKind, ControlClient, WatchEvent};
use relive_testkit::bins::beside_exe;
use relive_testkit::{env_count, host_note, kvm_usable, verdict, Summary, TempDir};

type Result<T> = std::result::Result<T, String>;

const MEM_MIB: u64 = 2048;
const WS_MIB: u64 = 16;
const HB_MS: u64 = 20;

fn main() -> ExitCode {
    if let Err(why) = kvm_usable() {
        println!("checkpoint bench skipped: {why}");
        let required = std::env::var("RELIVE_REQUIRE_KVM").is_ok_and(|v| v == "1");
        return if required {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("checkpoint bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Cycles of the TSC per millisecond, measured against the monotonic clock.
fn tsc_per_ms() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let t0 = unsafe { std::arch::x86_64::_rdtsc() };
    let i0 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    let t1 = unsafe { std::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / (i0.elapsed().as_secs_f64() * 1e3)
}

struct Guest {
    child: Child,
    socket: PathBuf,
    images: PathBuf,
    /// (when received, gap_tsc) of every heartbeat.
    beats: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(vmm: &Path, dir: &Path, touched: u64) -> Result<Guest> {
    let socket = dir.join("ctl.sock");
    let images = dir.join("images");
    let child = Command::new(vmm)
        .args([
            "run",
            "--kernel",
            "bundled",
            "--mem-mib",
            &MEM_MIB.to_string(),
        ])
        .args([
            "--cmdline",
            &format!("relive.hb_ms={HB_MS} relive.touch_mib={touched} relive.ws_mib={WS_MIB}"),
        ])
        .arg("--control")
        .arg(&socket)
        .arg("--console")
        .arg(dir.join("console.log"))
        .arg("--images")
        .arg(&images)
        .args(["--keep-images", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = ControlClient::connect(&socket)
            .and_then(|mut c| c.status())
            .is_ok_and(|s| s.agent.ready);
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the {touched} MiB guest was not ready in 120 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let beats: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let mut watch = ControlClient::connect(&socket)
        .and_then(|c| c.with_timeout(None).watch())
        .map_err(|e| format!("watch: {e}"))?;
    let sink = beats.clone();
    std::thread::spawn(move || {
        while let Ok(Some(event)) = watch.next_event() {
            if let WatchEvent::Line(line) = event {
                if let Some(gap) = line
                    .split(' ')
                    .find_map(|w| w.strip_prefix("gap_tsc="))
                    .and_then(|g| g.parse().ok())
                {
                    sink.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now(), gap));
                }
            }
        }
    });
    Ok(Guest {
        child,
        socket,
        images,
        beats,
    })
}

#[derive(Default)]
struct Figures {
    pause_ms: Vec<f64>,
    total_ms: Vec<f64>,
    gap_ms: Vec<f64>,
    rounds: Vec<f64>,
    recopied_mib: Vec<f64>,
    mb_per_s: Vec<f64>,
}

fn run_kind(g: &Guest, kind: CheckpointKind, runs: usize, tsc_ms: f64) -> Result<Figures> {
    let mut f = Figures::default();
    for _ in 0..runs {
        let started = Instant::now();
        let report = ControlClient::connect(&g.socket)
            .and_then(|c| {
                c.with_timeout(Some(Duration::from_secs(600)))
                    .checkpoint(kind)
            })
            .map_err(|e| format!("checkpoint: {e}"))?;
        let ended = Instant::now();
        std::thread::sleep(Duration::from_millis(100 + 2 * HB_MS));
        let gap = g
            .beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, _)| *at > started && *at <= ended + Duration::from_millis(100))
            .map(|(_, gap)| *gap)
            .max()
            .unwrap_or(0);
        f.pause_ms.push(report.pause_us as f64 / 1e3);
        f.total_ms.push(report.total_us as f64 / 1e3);
        f.gap_ms.push(gap as f64 / tsc_ms);
        f.rounds.push(f64::from(report.copy.rounds));
        f.recopied_mib
            .push(report.copy.recopied_pages as f64 * 4096.0 / (1 << 20) as f64);
        if kind == CheckpointKind::Full {
            let on_disk = std::fs::metadata(&report.path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            f.mb_per_s
                .push(on_disk as f64 / 1e6 / (report.total_us as f64 / 1e6));
        }
    }
    Ok(f)
}

/// MB/s of writing and fsyncing `bytes` into `dir`.
fn disk_mb_per_s(dir: &Path, bytes: u64) -> Result<f64> {
    let path = dir.join("baseline.bin");
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    file.sync_all().map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok(bytes as f64 / 1e6 / secs)
}

fn s(v: &[f64]) -> Summary {
    Summary::of(v).unwrap_or(Summary {
        median: f64::NAN,
        p90: f64::NAN,
        min: f64::NAN,
        max: f64::NAN,
    })
}

fn bench() -> Result<()> {
    let vmm = beside_exe("relive-vmm").map_err(|e| e.to_string())?;
    let runs = env_count("RELIVE_BENCH_RUNS", 10)?;
    let touched: Vec<u64> = std::env::var("RELIVE_BENCH_TOUCHED")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![16, 512, 1536]);
    let tsc_ms = tsc_per_ms();
    println!(
        "live checkpoints of a {MEM_MIB} MiB guest rewriting {WS_MIB} MiB as fast as it runs; {runs} runs per row; TSC {:.0} MHz; {}",
        tsc_ms / 1e3,
        host_note()
    );
    println!(
        "{:>8} {:>12} {:>17} {:>19} {:>7} {:>13} {:>17} {:>14}",
        "touched",
        "kind",
        "pause ms med/p90",
        "total ms med/p90",
        "rounds",
        "recopied MiB",
        "guest gap med/p90",
        "MB/s (disk)"
    );
    let mut rows = Vec::new();
    let mut full_pause = Vec::new();
    for t in &touched {
        let dir = TempDir::create("relive-bench-ckpt").map_err(|e| e.to_string())?;
        let g = start(&vmm, dir.path(), *t)?;
        // The baseline: the guest's own stalls with no checkpoint, per
        // heartbeat period (timer interrupts and exits alone; guest kernel
        // code is emulated on nested hosts like these).
        let quiet = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let idle: Vec<f64> = g
            .beats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, _)| *at > quiet)
            .map(|(_, gap)| *gap as f64 / tsc_ms)
            .collect();
        let idle = s(&idle);
        println!(
            "{t:>6}Mi idle: the guest's longest stall per {HB_MS} ms heartbeat, no checkpoint: median {:.2} ms, max {:.2} ms",
            idle.median, idle.max
        );
        run_kind(&g, CheckpointKind::Full, 1, tsc_ms)?;
        let full = run_kind(&g, CheckpointKind::Full, runs, tsc_ms)?;
        let incr = run_kind(&g, CheckpointKind::Incremental, runs, tsc_ms)?;
        let on_disk = std::fs::read_dir(&g.images)
            .map_err(|e| e.to_string())?
            .filter_map(std::result::Result::ok)
            .filter_map(|e| e.metadata().ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .max()
            .unwrap_or(0);
        let disk = disk_mb_per_s(dir.path(), on_disk.max(1 << 20))?;
        drop(g);
        for (name, f) in [("full", &full), ("incremental", &incr)] {
            let (p, tt, gp) = (s(&f.pause_ms), s(&f.total_ms), s(&f.gap_ms));
            let mbs = if f.mb_per_s.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0} ({disk:.0})", s(&f.mb_per_s).median)
            };
            println!(
                "{t:>6}Mi {name:>12} {:>8.2}/{:<8.2} {:>9.1}/{:<9.1} {:>7.0} {:>13.1} {:>8.2}/{:<8.2} {mbs:>14}",
                p.median,
                p.p90,
                tt.median,
                tt.p90,
                s(&f.rounds).median,
                s(&f.recopied_mib).median,
                gp.median,
                gp.p90
            );
            rows.push(serde_json::json!({
                "touched_mib": t, "kind": name,
                "pause_ms": p.json(3), "total_ms": tt.json(1), "guest_gap_ms": gp.json(3),
                "rounds": s(&f.rounds).median, "recopied_mib": s(&f.recopied_mib).median,
                "idle_gap_ms": idle.json(3),
                "mb_per_s": s(&f.mb_per_s).median, "disk_mb_per_s": disk,
            }));
        }
        full_pause.push(s(&full.pause_ms).median);
    }
    let all_pauses: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["pause_ms"]["median"].as_f64())
        .collect();
    let all_gaps: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["guest_gap_ms"]["median"].as_f64())
        .collect();
    let ratio = match (full_pause.first(), full_pause.last()) {
        (Some(small), Some(large)) if *small > 0.0 => large / small,
        _ => f64::NAN,
    };
    let max_pause = all_pauses.iter().copied().fold(0.0, f64::max);
    let max_gap = all_gaps.iter().copied().fold(0.0, f64::max);
    println!("full-checkpoint pause ratio, largest / smallest touched: {ratio:.2}");
    println!(
        "target: pause <= 5 ms median at every size: {} (worst median {max_pause:.2} ms)",
        verdict(max_pause <= 5.0)
    );
    println!(
        "target: pause(largest) / pause(smallest) <= 2: {}",
        verdict(ratio <= 2.0)
    );
    println!(
        "target: guest-visible gap <= 10 ms median at every size: {} (worst median {max_gap:.2} ms)",
        verdict(max_gap <= 10.0)
    );
    println!(
        "BENCH checkpoint {}",
        serde_json::json!({"runs": runs, "mem_mib": MEM_MIB, "rows": rows, "pause_ratio": ratio})
    );
    Ok(())
}
