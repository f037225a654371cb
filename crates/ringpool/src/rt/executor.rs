//! The executor: one [`Runtime`] per thread (its driver, its op table, its tasks, its timers),
//! [`block_on`] and its loop, [`spawn`], wakers that work from any thread, and [`launch`] (a
//! runtime per core).
//!
//! The loop: poll the main future if it was woken, then every woken task; with nothing
//! runnable, wait in the driver until a completion or the next timer's deadline, route the
//! completions to their ops (`op.rs`) and fire the timers due (`time.rs`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use super::op::OpState;
use super::time::Timers;
use crate::{Driver, DriverConfig, Result};

type Task = Pin<Box<dyn Future<Output = ()>>>;

/// A thread's runtime while [`block_on`] runs. Ops and lease groups hold a `Weak` of it.
pub(super) struct Runtime {
    pub(super) driver: RefCell<Driver>,
    pub(super) ops: RefCell<crate::hash::IntMap<u64, OpState>>,
    /// Spawned tasks (taken out while polled) and their wakers, made once per task.
    tasks: RefCell<slab::Slab<(Option<Task>, Waker)>>,
    /// Task ids woken (wakers may be called from anywhere).
    woken: Arc<WakeQueue>,
    /// Timers: (deadline, id) → waker.
    pub(super) timers: Timers,
}

thread_local! {
    static RUNTIME: RefCell<Option<Rc<Runtime>>> = const { RefCell::new(None) };
}

/// The id of the future passed to [`block_on`].
const MAIN: usize = usize::MAX;

/// The ids of a runtime's woken tasks, and how to wake its thread when a waker is called on
/// another one (the thread may be asleep in the kernel, waiting for completions).
struct WakeQueue {
    ids: Mutex<VecDeque<usize>>,
    remote: Arc<crate::pool::CrossReturns>,
    /// A remote wake-up was signalled and the runtime has not taken the queue since: later
    /// ones need not signal again.
    signalled: std::sync::atomic::AtomicBool,
}

impl WakeQueue {
    fn ids(&self) -> std::sync::MutexGuard<'_, VecDeque<usize>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The woken ids, for the runtime's thread (which then looks at the queue again before it
    /// sleeps, so a remote wake-up after this point signals anew).
    fn take(&self, into: &mut VecDeque<usize>) {
        self.signalled
            .store(false, std::sync::atomic::Ordering::Release);
        std::mem::swap(into, &mut *self.ids());
    }

    /// The waker of task `id` (or of the main future, [`MAIN`]).
    fn waker(self: &Arc<Self>, id: usize) -> Waker {
        Waker::from(Arc::new(TaskWaker {
            id,
            woken: self.clone(),
        }))
    }
}

thread_local! {
    /// The [`WakeQueue`] of the runtime running on this thread (its address), if any.
    static LOCAL_QUEUE: Cell<usize> = const { Cell::new(0) };
}

struct TaskWaker {
    id: usize,
    woken: Arc<WakeQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.ids().push_back(self.id);
        // On another thread (a channel's sender, a thread pool): the runtime's thread may be
        // asleep in `wait`; its eventfd read wakes it.
        let remote = LOCAL_QUEUE.with(Cell::get) != Arc::as_ptr(&self.woken) as usize;
        if remote
            && !self
                .woken
                .signalled
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.woken.remote.notify();
        }
    }
}

/// This thread's runtime.
///
/// # Panics
/// Outside [`block_on`].
pub(super) fn runtime() -> Rc<Runtime> {
    RUNTIME.with(|r| {
        r.borrow()
            .clone()
            .expect("ringpool::rt used outside rt::block_on")
    })
}

/// This thread's runtime, if one runs (and the thread is not being torn down).
pub(super) fn try_runtime() -> Option<Rc<Runtime>> {
    RUNTIME.try_with(|r| r.borrow().clone()).ok().flatten()
}

/// Runs `fut` to completion on this thread, with a fresh driver (default configuration), and
/// every task [`spawn`]ed meanwhile. Tasks still running when `fut` completes are dropped
/// (which cancels their ops).
///
/// # Errors
/// The driver's setup error ([`Driver::new`]).
pub fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    block_on_with(DriverConfig::default(), fut)
}

/// [`block_on`] with a driver configuration.
///
/// # Examples
/// ```
/// let v = ringpool::rt::block_on_with(Default::default(), async { 7 })?;
/// assert_eq!(v, 7);
/// # Ok::<(), ringpool::Error>(())
/// ```
pub fn block_on_with<F: Future>(config: DriverConfig, fut: F) -> Result<F::Output> {
    assert!(
        RUNTIME.with(|r| r.borrow().is_none()),
        "rt::block_on inside rt::block_on"
    );
    let rt = Runtime::new(config)?;
    let _entered = Entered::enter(&rt);
    let mut fut = std::pin::pin!(fut);
    let main_waker = rt.woken.waker(MAIN);
    let mut main_woken = true;
    // Woken task ids taken from `rt.woken` (swapped with it, so both keep their capacity).
    let mut batch = VecDeque::new();
    loop {
        if main_woken {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut Context::from_waker(&main_waker)) {
                return Ok(v);
            }
        }
        main_woken = rt.run_woken(&mut batch);
        if !main_woken {
            rt.park()?;
        }
    }
}

/// The runtime installed as this thread's while `block_on` runs: dropping it (at the end of
/// `block_on`, or when a future panics) ends the runtime.
struct Entered;

impl Entered {
    fn enter(rt: &Rc<Runtime>) -> Entered {
        RUNTIME.with(|r| *r.borrow_mut() = Some(rt.clone()));
        LOCAL_QUEUE.with(|q| q.set(Arc::as_ptr(&rt.woken) as usize));
        Entered
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        // Drop the tasks (their ops cancel) while the runtime is still reachable, then the
        // runtime itself (the driver waits for the cancelled ops' final completions).
        let rt = RUNTIME.with(|r| r.borrow().clone());
        if let Some(rt) = rt {
            let tasks: Vec<_> = rt.tasks.borrow_mut().drain().collect();
            drop(tasks);
            rt.shutdown();
        }
        RUNTIME.with(|r| r.borrow_mut().take());
        LOCAL_QUEUE.with(|q| q.set(0));
    }
}

impl Runtime {
    /// A runtime over a new driver.
    fn new(config: DriverConfig) -> Result<Rc<Runtime>> {
        let mut driver = Driver::new(config)?;
        let woken = Arc::new(WakeQueue {
            ids: Mutex::default(),
            remote: driver.remote_waker(),
            signalled: Default::default(),
        });
        Ok(Rc::new(Runtime {
            driver: RefCell::new(driver),
            ops: RefCell::default(),
            tasks: RefCell::new(slab::Slab::new()),
            woken,
            timers: Timers::default(),
        }))
    }

    /// Runs every woken task (tasks woken while running go round again), taking the woken ids
    /// a batch at a time (one lock per batch, not per task). True if the main future was woken.
    fn run_woken(&self, batch: &mut VecDeque<usize>) -> bool {
        let mut main_woken = false;
        loop {
            if batch.is_empty() {
                self.woken.take(batch);
            }
            let Some(id) = batch.pop_front() else { break };
            if id == MAIN {
                main_woken = true;
                continue;
            }
            self.poll_task(id);
        }
        main_woken
    }

    /// Polls task `id` once, if it is still there; removes it when it completes.
    fn poll_task(&self, id: usize) {
        // (A stale wake-up of a finished task whose id was reused only polls the new one
        // once more, which futures allow.)
        let taken = self
            .tasks
            .borrow_mut()
            .get_mut(id)
            .and_then(|(t, w)| Some((t.take()?, w.clone())));
        let Some((mut task, waker)) = taken else {
            return;
        };
        if task
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            self.tasks.borrow_mut().remove(id);
        } else if let Some(slot) = self.tasks.borrow_mut().get_mut(id) {
            slot.0 = Some(task);
        }
    }

    /// Nothing runnable: waits for the kernel or the next timer, then hands the completions to
    /// their ops and fires the timers due.
    fn park(&self) -> Result<()> {
        let wait = self
            .timers
            .next_deadline()
            .map(|at| at.saturating_duration_since(Instant::now()));
        self.driver
            .borrow_mut()
            .wait(Some(wait.unwrap_or(Duration::from_millis(100))))?;
        self.route();
        self.timers.fire(Instant::now());
        Ok(())
    }
}

/// `n` consecutive numbers never handed out before in this process (tokens, timer ids).
pub(super) fn next_tokens(n: u64) -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(n, std::sync::atomic::Ordering::Relaxed)
}

/// A task started by [`spawn`]; awaiting it gives the task's output.
///
/// # Panics
/// Awaited after its task was dropped unfinished (its runtime ended: the handle was returned
/// out of `rt::block_on`), rather than waiting for ever.
pub struct JoinHandle<T> {
    result: Rc<RefCell<TaskResult<T>>>,
}

/// A task's output, the waker of whoever awaits it, and whether the task was dropped first.
struct TaskResult<T> {
    value: Option<T>,
    waker: Option<Waker>,
    dropped: bool,
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut r = self.result.borrow_mut();
        match r.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                assert!(
                    !r.dropped,
                    "rt::JoinHandle awaited after its task was dropped unfinished (its runtime ended)"
                );
                r.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Marks a task's result as never coming when the task is dropped before it finished.
struct OnTaskDrop<T>(Rc<RefCell<TaskResult<T>>>);

impl<T> Drop for OnTaskDrop<T> {
    fn drop(&mut self) {
        let mut r = self.0.borrow_mut();
        if r.value.is_none() {
            r.dropped = true;
            if let Some(w) = r.waker.take() {
                w.wake();
            }
        }
    }
}

/// Runs `fut` concurrently on this thread's runtime.
///
/// # Examples
/// ```
/// ringpool::rt::block_on(async {
///     let a = ringpool::rt::spawn(async { 1 });
///     let b = ringpool::rt::spawn(async { 2 });
///     assert_eq!(a.await + b.await, 3);
/// })?;
/// # Ok::<(), ringpool::Error>(())
/// ```
pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let rt = runtime();
    let result = Rc::new(RefCell::new(TaskResult {
        value: None,
        waker: None,
        dropped: false,
    }));
    let out = OnTaskDrop(result.clone());
    let task: Task = Box::pin(async move {
        let v = fut.await;
        let mut r = out.0.borrow_mut();
        r.value = Some(v);
        if let Some(w) = r.waker.take() {
            w.wake();
        }
    });
    let id = {
        let mut tasks = rt.tasks.borrow_mut();
        let entry = tasks.vacant_entry();
        let waker = Waker::from(Arc::new(TaskWaker {
            id: entry.key(),
            woken: rt.woken.clone(),
        }));
        let id = entry.key();
        entry.insert((Some(task), waker));
        id
    };
    rt.woken.ids().push_back(id);
    JoinHandle { result }
}

/// Starts one thread per core (`threads`, or the number of CPUs when 0), each pinned to its
/// CPU where the system allows and running its own runtime (its own ring): `make(i)` builds
/// thread `i`'s future on that thread, so the future need not be `Send`. Returns every
/// thread's output, in order.
///
/// # Errors
/// The first driver setup error of any thread.
///
/// # Examples
/// ```
/// let outs = ringpool::rt::launch(2, |i| async move { i * 10 })?;
/// assert_eq!(outs, vec![0, 10]);
/// # Ok::<(), ringpool::Error>(())
/// ```
pub fn launch<F, Fut>(threads: usize, make: F) -> Result<Vec<Fut::Output>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future,
    Fut::Output: Send + 'static,
{
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let make = Arc::new(make);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let make = make.clone();
            std::thread::spawn(move || {
                pin_to_cpu(i);
                block_on(make(i))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect()
}

/// Pins the calling thread to CPU `i` modulo the CPUs it may run on (best effort).
fn pin_to_cpu(i: usize) {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes a cpu_set_t of the given size for this thread (pid 0).
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) }
        != 0
    {
        return;
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set we own, for indices below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &allowed) })
        .collect();
    if cpus.is_empty() {
        return;
    }
    // SAFETY: as above, an all-zero set is empty.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the set we own; the index is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpus[i % cpus.len()], &mut one) };
    // SAFETY: sched_setaffinity reads a valid cpu_set_t of the given size; failing is harmless.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) };
}
