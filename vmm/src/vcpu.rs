//! The vCPU thread: an explicit state machine driven by events.
//!
//! Each vCPU runs on its own thread in one of three states:
//!
//! ```text
//!            Pause                 Finish
//! Running ----------> Paused ---------------> Finished
//!    ^                  |                        ^
//!    +------ Resume ----+                        |
//!    +------------------- Finish / guest exit ---+
//! ```
//!
//! The owner talks to the thread through a [`VcpuHandle`]: it sends a
//! [`VcpuEvent`] over a channel and then *kicks* the thread out of `KVM_RUN`
//! with a real-time signal. The signal handler sets `immediate_exit` in the
//! vCPU's `kvm_run` page, so a kick that lands just before the thread enters
//! `KVM_RUN` is not lost: the ioctl returns `EINTR` at once and the thread
//! drains its channel. Answers ([`VcpuResponse`]) come back on a second channel.
//!
//! The run loop only dispatches: port I/O goes to the [`PioBus`], anything that
//! ends the VM becomes an [`ExitReason`] sent to the VM's event loop.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::PioBus;
use crate::exit::ExitReason;
use crate::persist::{restore_vcpu, save_vcpu, VcpuState};
use crate::vm::EventSink;

/// What the owner asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Leave `KVM_RUN` and wait.
    Pause,
    /// Run again.
    Resume,
    /// Capture the vCPU's state (only answered while paused).
    Save,
    /// Load a saved state (only while paused; a standby restore).
    Restore(Box<VcpuState>),
    /// Stop the thread.
    Finish,
}

/// What a vCPU thread answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuResponse {
    /// The vCPU is out of `KVM_RUN` and parked.
    Paused,
    /// The vCPU runs again.
    Resumed,
    /// The vCPU's state, or why it could not be captured.
    Saved(Result<Box<VcpuState>, String>),
    /// The state was loaded, or why not.
    Restored(Result<(), String>),
}

/// The state of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRunState {
    /// In (or about to enter) `KVM_RUN`.
    Running,
    /// Parked, waiting for an event.
    Paused,
    /// The thread is ending.
    Finished,
}

/// Counters a vCPU thread keeps; read by `status`.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Every return from `KVM_RUN` to user space.
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub io_exits: AtomicU64,
    /// MMIO exits (no MMIO devices yet: reads return all ones).
    pub mmio_exits: AtomicU64,
}

thread_local! {
    /// This thread's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by this thread to its own vCPU's kvm_run
            // mapping, which lives as long as the VcpuFd owned by this thread's
            // run loop; the pointer is cleared before that VcpuFd is dropped.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// A vCPU with everything its thread needs.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    bus: PioBus,
    stats: Arc<VcpuStats>,
    sink: EventSink,
    msr_index: Arc<Vec<u32>>,
}

/// The owner's side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<VcpuStats>,
}

impl Vcpu {
    /// A vCPU ready to run on its own thread.
    pub fn new(id: u8, fd: VcpuFd, bus: PioBus, sink: EventSink, msr_index: Arc<Vec<u32>>) -> Self {
        Vcpu {
            id,
            fd,
            bus,
            stats: Arc::new(VcpuStats::default()),
            sink,
            msr_index,
        }
    }

    /// The vCPU's file descriptor (for configuration before it starts).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Starts the vCPU thread in `initial` state.
    pub fn start(self, initial: VcpuRunState) -> std::io::Result<VcpuHandle> {
        let (events_tx, events_rx) = std::sync::mpsc::channel();
        let (responses_tx, responses_rx) = std::sync::mpsc::channel();
        let id = self.id;
        let stats = self.stats.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(initial, events_rx, responses_tx))?;
        Ok(VcpuHandle {
            id,
            events: events_tx,
            responses: responses_rx,
            thread: Some(thread),
            stats,
        })
    }

    fn run(
        mut self,
        mut state: VcpuRunState,
        events: Receiver<VcpuEvent>,
        responses: Sender<VcpuResponse>,
    ) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        let _span = tracing::debug_span!("vcpu", id = self.id).entered();
        loop {
            state = match state {
                VcpuRunState::Running => match events.try_recv() {
                    Ok(event) => self.on_event(event, state, &responses),
                    Err(TryRecvError::Disconnected) => VcpuRunState::Finished,
                    Err(TryRecvError::Empty) => self.run_once(run_ptr),
                },
                VcpuRunState::Paused => match events.recv() {
                    Ok(event) => self.on_event(event, state, &responses),
                    Err(_) => VcpuRunState::Finished,
                },
                VcpuRunState::Finished => break,
            };
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    fn on_event(
        &self,
        event: VcpuEvent,
        state: VcpuRunState,
        responses: &Sender<VcpuResponse>,
    ) -> VcpuRunState {
        let (next, answer) = match (event, state) {
            (VcpuEvent::Pause, _) => (VcpuRunState::Paused, Some(VcpuResponse::Paused)),
            (VcpuEvent::Resume, _) => (VcpuRunState::Running, Some(VcpuResponse::Resumed)),
            (VcpuEvent::Save, VcpuRunState::Paused) => (
                state,
                Some(VcpuResponse::Saved(
                    save_vcpu(self.id, &self.fd, &self.msr_index)
                        .map(Box::new)
                        .map_err(|e| format!("vcpu{}: {e}", self.id)),
                )),
            ),
            (VcpuEvent::Save, _) => (
                state,
                Some(VcpuResponse::Saved(Err(format!(
                    "vcpu{} must be paused to save its state",
                    self.id
                )))),
            ),
            (VcpuEvent::Restore(saved), VcpuRunState::Paused) => (
                state,
                Some(VcpuResponse::Restored(
                    restore_vcpu(&self.fd, &saved).map_err(|e| format!("vcpu{}: {e}", self.id)),
                )),
            ),
            (VcpuEvent::Restore(_), _) => (
                state,
                Some(VcpuResponse::Restored(Err(format!(
                    "vcpu{} must be paused to load a state",
                    self.id
                )))),
            ),
            (VcpuEvent::Finish, _) => (VcpuRunState::Finished, None),
        };
        if let Some(answer) = answer {
            // The owner may be gone (process ending); nothing to do then.
            let _ = responses.send(answer);
        }
        next
    }

    /// One `KVM_RUN` and the dispatch of its exit.
    fn run_once(&mut self, run_ptr: *mut kvm_run) -> VcpuRunState {
        let result = self.fd.run();
        self.stats.exits.fetch_add(1, Ordering::Relaxed);
        let outcome = match result {
            Ok(exit) => dispatch(exit, &self.bus, &self.stats, run_ptr),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some((ExitReason::KvmError, format!("KVM_RUN failed: {e}"))),
        };
        match outcome {
            None => VcpuRunState::Running,
            Some((reason, detail)) => {
                self.sink.vcpu_exit(self.id, reason, detail);
                VcpuRunState::Finished
            }
        }
    }
}

/// Handles one exit; `Some` when the VM must stop.
fn dispatch(
    exit: VcpuExit<'_>,
    bus: &PioBus,
    stats: &VcpuStats,
    run_ptr: *mut kvm_run,
) -> Option<(ExitReason, String)> {
    match exit {
        VcpuExit::IoOut(port, data) => {
            stats.io_exits.fetch_add(1, Ordering::Relaxed);
            for chunk in data.chunks(io_size(run_ptr, data.len())) {
                bus.write(port, chunk);
            }
            None
        }
        VcpuExit::IoIn(port, data) => {
            stats.io_exits.fetch_add(1, Ordering::Relaxed);
            let size = io_size(run_ptr, data.len());
            for chunk in data.chunks_mut(size) {
                bus.read(port, chunk);
            }
            None
        }
        VcpuExit::MmioRead(_, data) => {
            stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
            None
        }
        VcpuExit::MmioWrite(..) => {
            stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
            None
        }
        VcpuExit::Hlt => None,
        VcpuExit::Shutdown => Some((
            ExitReason::TripleFault,
            "KVM_EXIT_SHUTDOWN: the guest triple-faulted".to_string(),
        )),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                Some((ExitReason::Exit, "KVM system event: shutdown".to_string()))
            }
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                Some((ExitReason::Reset, "KVM system event: reset".to_string()))
            }
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                Some((ExitReason::Panic, "KVM system event: crash".to_string()))
            }
            other => Some((
                ExitReason::KvmError,
                format!("unknown KVM system event {other}"),
            )),
        },
        VcpuExit::InternalError => {
            // SAFETY: run_ptr is this vCPU's kvm_run mapping; after
            // KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member.
            let suberror = unsafe { (*run_ptr).__bindgen_anon_1.internal.suberror };
            Some((
                ExitReason::KvmError,
                format!("KVM internal error, suberror {suberror} (1 = emulation failure)"),
            ))
        }
        VcpuExit::FailEntry(reason, cpu) => Some((
            ExitReason::KvmError,
            format!("KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}"),
        )),
        other => Some((
            ExitReason::KvmError,
            format!("unexpected KVM exit: {other:?}"),
        )),
    }
}

/// The access size of the current PIO exit (`data_len` is size * count).
fn io_size(run_ptr: *mut kvm_run, data_len: usize) -> usize {
    // SAFETY: run_ptr is this vCPU's kvm_run mapping and the current exit is
    // KVM_EXIT_IO, so the kernel filled the `io` member.
    let size = usize::from(unsafe { (*run_ptr).__bindgen_anon_1.io.size });
    if size == 0 || size > data_len {
        data_len.max(1)
    } else {
        size
    }
}

impl VcpuHandle {
    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The vCPU's counters.
    pub fn stats(&self) -> &Arc<VcpuStats> {
        &self.stats
    }

    /// Sends `event` and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, event: VcpuEvent) {
        if self.events.send(event).is_ok() {
            self.kick();
        }
    }

    /// Waits for the thread's next answer.
    pub fn response(&self, timeout: std::time::Duration) -> Option<VcpuResponse> {
        self.responses.recv_timeout(timeout).ok()
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread {
            if !thread.is_finished() {
                // A failed kill means the thread is gone, which is what we want.
                let _ = thread.kill(kick_signal());
            }
        }
    }

    /// Stops the thread and waits for it.
    pub fn finish(mut self) {
        self.send(VcpuEvent::Finish);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
