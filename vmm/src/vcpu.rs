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
//! Every event carries a sequence number and its answer carries the same
//! one: the owner waits for the answer to *its* request and drops any older
//! answer that arrived late, so a reply that missed its deadline can never be
//! read as the answer to the next request. The thread handles events in the
//! order they were sent.
//!
//! [`VcpuSet`] pauses and resumes all vCPUs of a VM as one: a pause either
//! succeeds for every vCPU, giving a [`Paused`] proof that the functions
//! reading guest memory for an image require, or leaves every vCPU running
//! again ([`PauseError::Timeout`]); when not even that can be made sure, it
//! says so ([`PauseError::Stuck`]) and the VM must end.
//!
//! The run loop only dispatches: port I/O goes to the [`PioBus`], anything that
//! ends the VM becomes an [`ExitReason`] sent to the VM's event loop.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use relive_control::ExitReason;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::PioBus;
use crate::persist::{restore_vcpu, save_vcpu_timed, StateError, TscReading, TscTarget, VcpuState};
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
    /// Load a saved state (only while paused; a standby restore), its TSC
    /// written as of now when a target is given.
    Restore(Box<VcpuState>, Option<TscTarget>),
    /// Stop the thread.
    Finish,
}

impl VcpuEvent {
    const fn name(&self) -> &'static str {
        match self {
            VcpuEvent::Pause => "pause",
            VcpuEvent::Resume => "resume",
            VcpuEvent::Save => "save",
            VcpuEvent::Restore(..) => "restore",
            VcpuEvent::Finish => "finish",
        }
    }
}

/// What a vCPU thread answers.
#[derive(Debug)]
pub enum VcpuResponse {
    /// The vCPU is out of `KVM_RUN` and parked.
    Paused,
    /// The vCPU runs again.
    Resumed,
    /// The vCPU's state, or why it could not be captured; and how its TSC
    /// was read (see "The TSC and the kvmclock" in [`crate::persist`]).
    Saved(Result<Box<VcpuState>, VcpuError>, Option<TscReading>),
    /// The state was loaded, or why not.
    Restored(Result<(), VcpuError>),
}

impl VcpuResponse {
    const fn name(&self) -> &'static str {
        match self {
            VcpuResponse::Paused => "paused",
            VcpuResponse::Resumed => "resumed",
            VcpuResponse::Saved(..) => "saved",
            VcpuResponse::Restored(_) => "restored",
        }
    }
}

/// Errors of one vCPU's requests.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Saving or loading state needs the vCPU out of `KVM_RUN`.
    #[error("vcpu{vcpu} must be paused to {what}")]
    NotPaused {
        /// The vCPU.
        vcpu: u8,
        /// What was asked.
        what: &'static str,
    },
    /// KVM refused to save or load the state.
    #[error("vcpu{vcpu}: cannot {what} its state")]
    State {
        /// The vCPU.
        vcpu: u8,
        /// `save` or `load`.
        what: &'static str,
        /// Why.
        #[source]
        source: StateError,
    },
    /// The thread did not answer in time.
    #[error("vcpu{vcpu} did not answer {request} within {after:?}")]
    Timeout {
        /// The vCPU.
        vcpu: u8,
        /// What was asked.
        request: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The thread has ended (the guest stopped the VM).
    #[error("vcpu{vcpu} has stopped")]
    Gone {
        /// The vCPU.
        vcpu: u8,
    },
    /// The saved state is of another number of vCPUs.
    #[error("the image holds {saved} vCPUs, this VM has {vcpus}")]
    Count {
        /// vCPUs of this VM.
        vcpus: usize,
        /// vCPUs in the saved state.
        saved: usize,
    },
    /// The thread answered another kind of request (a bug).
    #[error("vcpu{vcpu} answered {got} to {request}")]
    Unexpected {
        /// The vCPU.
        vcpu: u8,
        /// What was asked.
        request: &'static str,
        /// What came.
        got: &'static str,
    },
}

impl VcpuError {
    /// Whether a KVM call failed (rather than the thread not answering).
    pub fn is_kvm(&self) -> bool {
        matches!(self, VcpuError::State { .. })
    }
}

/// A request to a vCPU thread, tagged.
#[derive(Debug)]
pub struct Tagged<T> {
    seq: u64,
    body: T,
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
    events: Sender<Tagged<VcpuEvent>>,
    responses: Receiver<Tagged<VcpuResponse>>,
    next_seq: Cell<u64>,
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
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Vcpu);
                self.run(initial, events_rx, responses_tx)
            })?;
        Ok(VcpuHandle {
            id,
            events: events_tx,
            responses: responses_rx,
            next_seq: Cell::new(0),
            thread: Some(thread),
            stats,
        })
    }

    fn run(
        mut self,
        mut state: VcpuRunState,
        events: Receiver<Tagged<VcpuEvent>>,
        responses: Sender<Tagged<VcpuResponse>>,
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
        &mut self,
        event: Tagged<VcpuEvent>,
        state: VcpuRunState,
        responses: &Sender<Tagged<VcpuResponse>>,
    ) -> VcpuRunState {
        let vcpu = self.id;
        let state_err = |what| move |source| VcpuError::State { vcpu, what, source };
        let (next, answer) = match (event.body, state) {
            (VcpuEvent::Pause, VcpuRunState::Running) => {
                // The last exit may be a port or MMIO access KVM completes
                // only when KVM_RUN is entered again (an `in` has no value
                // in RAX yet, an `out` has not moved RIP on): one KVM_RUN
                // with `immediate_exit` completes it without running the
                // guest, so a saved state never repeats the access (seen on
                // kvm-amd: a restored guest sent its last heartbeat twice).
                self.fd.set_kvm_immediate_exit(1);
                let _ = self.fd.run();
                self.fd.set_kvm_immediate_exit(0);
                // As Firecracker does: tell the guest's kvmclock it was
                // stopped, so a Linux guest does not report a soft lockup for
                // the time it stood still. A guest without kvmclock (the
                // bundled one) makes this EINVAL, which is no error.
                if let Err(e) = self.fd.kvmclock_ctrl() {
                    if e.errno() != libc::EINVAL {
                        tracing::debug!(vcpu, error = %e, "KVM_KVMCLOCK_CTRL failed");
                    }
                }
                (VcpuRunState::Paused, Some(VcpuResponse::Paused))
            }
            (VcpuEvent::Pause, _) => (VcpuRunState::Paused, Some(VcpuResponse::Paused)),
            (VcpuEvent::Resume, _) => (VcpuRunState::Running, Some(VcpuResponse::Resumed)),
            (VcpuEvent::Save, VcpuRunState::Paused) => {
                let (saved, at) = match save_vcpu_timed(self.id, &self.fd, &self.msr_index) {
                    Ok((saved, at)) => (Ok(Box::new(saved)), Some(at)),
                    Err(e) => (Err(state_err("save")(e)), None),
                };
                (state, Some(VcpuResponse::Saved(saved, at)))
            }
            (VcpuEvent::Save, _) => (
                state,
                Some(VcpuResponse::Saved(
                    Err(VcpuError::NotPaused {
                        vcpu,
                        what: "save its state",
                    }),
                    None,
                )),
            ),
            (VcpuEvent::Restore(saved, tsc), VcpuRunState::Paused) => (
                state,
                Some(VcpuResponse::Restored(
                    restore_vcpu(&self.fd, &saved, tsc.as_ref()).map_err(state_err("load")),
                )),
            ),
            (VcpuEvent::Restore(..), _) => (
                state,
                Some(VcpuResponse::Restored(Err(VcpuError::NotPaused {
                    vcpu,
                    what: "load a state",
                }))),
            ),
            (VcpuEvent::Finish, _) => (VcpuRunState::Finished, None),
        };
        if let Some(body) = answer {
            // The owner may be gone (process ending); nothing to do then.
            let _ = responses.send(Tagged {
                seq: event.seq,
                body,
            });
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

    /// Sends `event` and kicks the thread out of `KVM_RUN`; returns the
    /// event's sequence number (its answer carries the same), or `None` when
    /// the thread has ended.
    pub fn post(&self, event: VcpuEvent) -> Option<u64> {
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        self.events.send(Tagged { seq, body: event }).ok()?;
        self.kick();
        Some(seq)
    }

    /// Waits until `deadline` for the answer to event `seq`, dropping older
    /// answers that came late.
    pub fn wait(
        &self,
        seq: u64,
        request: &'static str,
        deadline: Instant,
    ) -> Result<VcpuResponse, VcpuError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(answer) if answer.seq == seq => return Ok(answer.body),
                Ok(stale) => {
                    tracing::debug!(
                        vcpu = self.id,
                        seq = stale.seq,
                        answer = stale.body.name(),
                        "dropping a late vCPU answer"
                    );
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout {
                        vcpu: self.id,
                        request,
                        after: left,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VcpuError::Gone { vcpu: self.id })
                }
            }
        }
    }

    /// Sends `event` and waits (at most `timeout`) for its answer.
    pub fn request(&self, event: VcpuEvent, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        let request = event.name();
        let seq = self.post(event).ok_or(VcpuError::Gone { vcpu: self.id })?;
        self.wait(seq, request, Instant::now() + timeout)
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
        self.post(VcpuEvent::Finish);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Proof that every vCPU of the VM is out of `KVM_RUN` and parked: nothing
/// but the holder writes guest memory or vCPU state until it is handed back
/// to [`VcpuSet::resume`]. Only [`VcpuSet`] makes one; it cannot be cloned.
#[derive(Debug)]
pub struct Paused {
    _private: (),
}

/// Why the vCPUs could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// A vCPU did not stop in time; every vCPU was told to run again and
    /// those that had stopped did: the VM runs on, unchanged.
    #[error("the vCPUs did not all stop in time; the VM runs on")]
    Timeout(#[source] VcpuError),
    /// A vCPU did not stop, and the others could not all be made to run
    /// again: the VM is in no state to go on and must end.
    #[error("a vCPU stopped answering while the VM was being paused")]
    Stuck(#[source] VcpuError),
}

/// A vCPU did not answer `resume`: the VM must end.
#[derive(Debug, thiserror::Error)]
#[error("a vCPU did not resume")]
pub struct StuckError(#[source] pub VcpuError);

/// All vCPU threads of a VM, paused and resumed as one.
///
/// Lock and call order: only the event thread calls these; each call
/// finishes (or times out) before it returns, and the vCPU threads answer in
/// the order they were asked.
#[derive(Debug)]
pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
    timeout: Duration,
}

impl VcpuSet {
    /// The vCPUs started in `initial` state; answers are awaited at most
    /// `timeout`. A set started paused comes with its [`Paused`] proof.
    pub fn new(
        handles: Vec<VcpuHandle>,
        timeout: Duration,
        initial: VcpuRunState,
    ) -> (Self, Option<Paused>) {
        let paused = (initial == VcpuRunState::Paused).then_some(Paused { _private: () });
        (VcpuSet { handles, timeout }, paused)
    }

    /// The handles, in vCPU index order.
    pub fn handles(&self) -> &[VcpuHandle] {
        &self.handles
    }

    /// Stops every vCPU. All stop, or all run again
    /// ([`PauseError::Timeout`]), or the VM must end ([`PauseError::Stuck`]).
    pub fn pause(&self) -> Result<Paused, PauseError> {
        let deadline = Instant::now() + self.timeout;
        let posted = self.post_all(|_| VcpuEvent::Pause);
        let mut failure = None;
        let mut answered = vec![false; self.handles.len()];
        for (i, (handle, seq)) in self.handles.iter().zip(&posted).enumerate() {
            let answer = match seq {
                Some(seq) => handle.wait(*seq, "pause", deadline),
                None => Err(VcpuError::Gone { vcpu: handle.id }),
            };
            match answer {
                Ok(VcpuResponse::Paused) => answered[i] = true,
                Ok(other) => {
                    failure.get_or_insert(VcpuError::Unexpected {
                        vcpu: handle.id,
                        request: "pause",
                        got: other.name(),
                    });
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let Some(failure) = failure else {
            return Ok(Paused { _private: () });
        };
        // Undo: every vCPU gets `resume` after its `pause`, so each ends up
        // running whenever it gets to its queue. Those that answered the
        // pause must answer the resume now; a late one will run again once
        // it handles both (its late answers are dropped by sequence number).
        tracing::warn!(error = %failure, "pause failed: resuming the vCPUs");
        let stopped: Vec<bool> = self
            .handles
            .iter()
            .zip(&answered)
            .map(|(_, ok)| *ok)
            .collect();
        match self.resume_where(|i| stopped[i]) {
            Ok(()) => Err(PauseError::Timeout(failure)),
            Err(StuckError(stuck)) => {
                tracing::error!(error = %stuck, "a vCPU did not resume after a failed pause");
                Err(PauseError::Stuck(stuck))
            }
        }
    }

    /// Runs every vCPU again.
    pub fn resume(&self, paused: Paused) -> Result<(), StuckError> {
        // The proof is used up: no one can write an image on its strength any more.
        let Paused { _private: () } = paused;
        self.resume_where(|_| true)
    }

    /// Posts `resume` to every vCPU and waits for the answers of those
    /// `must_answer` picks.
    fn resume_where(&self, must_answer: impl Fn(usize) -> bool) -> Result<(), StuckError> {
        let deadline = Instant::now() + self.timeout;
        let posted = self.post_all(|_| VcpuEvent::Resume);
        let mut failure = None;
        for (i, (handle, seq)) in self.handles.iter().zip(posted).enumerate() {
            // A thread that has ended (the guest stopped the VM) needs no resume.
            let Some(seq) = seq.filter(|_| must_answer(i)) else {
                continue;
            };
            match handle.wait(seq, "resume", deadline) {
                Ok(VcpuResponse::Resumed) | Err(VcpuError::Gone { .. }) => {}
                Ok(other) => {
                    failure.get_or_insert(VcpuError::Unexpected {
                        vcpu: handle.id,
                        request: "resume",
                        got: other.name(),
                    });
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        failure.map_or(Ok(()), |e| Err(StuckError(e)))
    }

    /// Posts `event(i)` to vCPU `i`, all first, so that they work on it
    /// at once; the sequence numbers to wait for (`None`: thread ended).
    fn post_all(&self, event: impl Fn(usize) -> VcpuEvent) -> Vec<Option<u64>> {
        self.handles
            .iter()
            .enumerate()
            .map(|(i, h)| h.post(event(i)))
            .collect()
    }

    /// Every vCPU's state, in index order, and how each one's TSC was read.
    pub fn save(
        &self,
        _paused: &Paused,
    ) -> Result<(Vec<VcpuState>, Vec<Option<TscReading>>), VcpuError> {
        let deadline = Instant::now() + self.timeout;
        let posted = self.post_all(|_| VcpuEvent::Save);
        let mut states = Vec::with_capacity(self.handles.len());
        let mut read_at = Vec::with_capacity(self.handles.len());
        for (handle, seq) in self.handles.iter().zip(posted) {
            let seq = seq.ok_or(VcpuError::Gone { vcpu: handle.id })?;
            match handle.wait(seq, "save", deadline)? {
                VcpuResponse::Saved(state, at) => {
                    states.push(*state?);
                    read_at.push(at);
                }
                other => {
                    return Err(VcpuError::Unexpected {
                        vcpu: handle.id,
                        request: "save",
                        got: other.name(),
                    })
                }
            }
        }
        Ok((states, read_at))
    }

    /// Loads `states` (in index order) into the vCPUs, their TSCs written
    /// as of the moment of writing with `tsc`.
    pub fn load(
        &self,
        _paused: &Paused,
        states: &[VcpuState],
        tsc: Option<TscTarget>,
    ) -> Result<(), VcpuError> {
        if states.len() != self.handles.len() {
            return Err(VcpuError::Count {
                vcpus: self.handles.len(),
                saved: states.len(),
            });
        }
        let deadline = Instant::now() + self.timeout;
        let posted = self.post_all(|i| VcpuEvent::Restore(Box::new(states[i].clone()), tsc));
        for (handle, seq) in self.handles.iter().zip(posted) {
            let seq = seq.ok_or(VcpuError::Gone { vcpu: handle.id })?;
            match handle.wait(seq, "restore", deadline)? {
                VcpuResponse::Restored(result) => result?,
                other => {
                    return Err(VcpuError::Unexpected {
                        vcpu: handle.id,
                        request: "restore",
                        got: other.name(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Ends every vCPU thread and waits for them (the set is empty after).
    pub fn finish(&mut self) {
        for handle in self.handles.drain(..) {
            handle.finish();
        }
    }

    /// Whether [`finish`](Self::finish) has run: no vCPU thread is left.
    pub fn finished(&self) -> bool {
        self.handles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU thread without KVM: it obeys pause/resume like the real one
    /// (its state is in the returned cell), but before handling event number
    /// `n` it waits `delay(n)`; `None` never answers again (stuck in the guest).
    fn fake(
        id: u8,
        delay: impl Fn(u64) -> Option<Duration> + Send + 'static,
    ) -> (VcpuHandle, Arc<std::sync::Mutex<VcpuRunState>>) {
        install_kick_handler().unwrap();
        let state = Arc::new(std::sync::Mutex::new(VcpuRunState::Running));
        let (events_tx, events_rx) = std::sync::mpsc::channel::<Tagged<VcpuEvent>>();
        let (responses_tx, responses_rx) = std::sync::mpsc::channel();
        let thread_state = state.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while let Ok(event) = events_rx.recv() {
                match delay(n) {
                    Some(d) => std::thread::sleep(d),
                    None => loop {
                        std::thread::park();
                    },
                }
                n += 1;
                let (next, body) = match event.body {
                    VcpuEvent::Pause => (VcpuRunState::Paused, VcpuResponse::Paused),
                    VcpuEvent::Resume => (VcpuRunState::Running, VcpuResponse::Resumed),
                    VcpuEvent::Finish => return,
                    _ => (
                        *thread_state.lock().unwrap(),
                        VcpuResponse::Restored(Ok(())),
                    ),
                };
                *thread_state.lock().unwrap() = next;
                if responses_tx
                    .send(Tagged {
                        seq: event.seq,
                        body,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        let handle = VcpuHandle {
            id,
            events: events_tx,
            responses: responses_rx,
            next_seq: Cell::new(0),
            thread: Some(thread),
            stats: Arc::new(VcpuStats::default()),
        };
        (handle, state)
    }

    const TIMEOUT: Duration = Duration::from_millis(100);

    fn prompt(n: u64) -> Option<Duration> {
        let _ = n;
        Some(Duration::ZERO)
    }

    fn state(cell: &std::sync::Mutex<VcpuRunState>) -> VcpuRunState {
        *cell.lock().unwrap()
    }

    #[test]
    fn a_late_vcpu_leaves_the_vm_running_and_its_late_answer_is_dropped() {
        // vcpu1 handles its first event (the pause) three timeouts late.
        let (v0, s0) = fake(0, prompt);
        let (v1, s1) = fake(1, |n| {
            Some(if n == 0 { TIMEOUT * 3 } else { Duration::ZERO })
        });
        let (set, none) = VcpuSet::new(vec![v0, v1], TIMEOUT, VcpuRunState::Running);
        assert!(none.is_none());
        match set.pause() {
            Err(PauseError::Timeout(VcpuError::Timeout {
                vcpu: 1,
                request: "pause",
                ..
            })) => {}
            other => panic!("expected a pause timeout of vcpu1, got {other:?}"),
        }
        // Not half paused: vcpu0 runs again at once, vcpu1 once it catches up.
        assert_eq!(state(&s0), VcpuRunState::Running);
        std::thread::sleep(TIMEOUT * 4);
        assert_eq!(state(&s1), VcpuRunState::Running);
        // vcpu1's late `paused` and `resumed` are queued now; they must not
        // answer the next pause, which gets its own answers.
        let paused = set.pause().expect("a second pause, answered in time");
        assert_eq!(
            (state(&s0), state(&s1)),
            (VcpuRunState::Paused, VcpuRunState::Paused)
        );
        set.resume(paused).expect("resume after the second pause");
        assert_eq!(
            (state(&s0), state(&s1)),
            (VcpuRunState::Running, VcpuRunState::Running)
        );
    }

    #[test]
    fn a_vcpu_that_never_answers_a_pause_leaves_the_others_running() {
        let (v0, s0) = fake(0, prompt);
        let (v1, _) = fake(1, |_| None);
        let (set, _) = VcpuSet::new(vec![v0, v1], TIMEOUT, VcpuRunState::Running);
        for _ in 0..2 {
            match set.pause() {
                Err(PauseError::Timeout(VcpuError::Timeout { vcpu: 1, .. })) => {}
                other => panic!("expected a pause timeout of vcpu1, got {other:?}"),
            }
            assert_eq!(state(&s0), VcpuRunState::Running);
        }
    }

    #[test]
    fn a_vcpu_that_stops_answering_after_pausing_makes_the_vm_stuck() {
        // vcpu0 pauses, then never answers again: the undo cannot finish.
        let (v0, _) = fake(0, |n| (n == 0).then_some(Duration::ZERO));
        let (v1, _) = fake(1, |_| None);
        let (set, _) = VcpuSet::new(vec![v0, v1], TIMEOUT, VcpuRunState::Running);
        match set.pause() {
            Err(PauseError::Stuck(VcpuError::Timeout {
                vcpu: 0,
                request: "resume",
                ..
            })) => {}
            other => panic!("expected vcpu0 stuck on resume, got {other:?}"),
        }
        // And a resume that is not answered is stuck too.
        let (v2, _) = fake(2, |n| (n == 0).then_some(Duration::ZERO));
        let (set, _) = VcpuSet::new(vec![v2], TIMEOUT, VcpuRunState::Running);
        let paused = set.pause().unwrap();
        assert!(matches!(
            set.resume(paused),
            Err(StuckError(VcpuError::Timeout { vcpu: 2, .. }))
        ));
    }

    #[test]
    fn a_set_started_paused_holds_its_proof() {
        let (v0, s0) = fake(0, prompt);
        *s0.lock().unwrap() = VcpuRunState::Paused;
        let (set, paused) = VcpuSet::new(vec![v0], TIMEOUT, VcpuRunState::Paused);
        let paused = paused.expect("a parked set is paused");
        set.resume(paused).unwrap();
        assert_eq!(state(&s0), VcpuRunState::Running);
        let again = set.pause().unwrap();
        assert_eq!(state(&s0), VcpuRunState::Paused);
        set.resume(again).unwrap();
    }
}
