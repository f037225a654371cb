//! `ringpool::rt`: a small single-threaded async runtime over one [`Driver`] (one ring per
//! thread; [`launch`] starts one per core): [`block_on`], [`spawn`], timers ([`sleep`], [`timeout`]), and futures for TCP
//! ([`TcpListener`], [`TcpStream`]) whose receives hand out pooled buffers and whose sends go
//! through the zero-copy policy.
//!
//! **Dropping a future cancels its op** under the driver's ownership rule: the cancel is asked
//! for at once and the driver keeps every byte the kernel may touch until the op's final
//! completion. A receive the kernel completed before the cancel landed did take data off the
//! socket: that data is kept for the stream's next receive, so cancelling never loses bytes. Nothing is
//! ever awaited on another thread: futures and the runtime are `!Send`, one runtime per thread.
//!
//! Files go through registered memory ([`File`], [`fixed_buf`]). This is the core of the async
//! layer; [`TcpStream::reader`]/[`TcpStream::writer`] give `futures-io`'s `AsyncRead`/`AsyncWrite`
//! and, with the crate's `tokio` feature, tokio's `AsyncRead`/`AsyncWrite` too: the copying path
//! (pooled buffers → the caller's buffer), for code written against those traits. They run on
//! this runtime, not on tokio's. [`UdpSocket`] receives datagrams into pooled buffers (multishot
//! `RECVMSG`).
//!
//! ```
//! use ringpool::rt::{self, TcpListener, TcpStream};
//! use ringpool::BufGroupConfig;
//!
//! rt::block_on(async {
//!     let group = rt::buf_group(BufGroupConfig::new(4096, 64))?;
//!     let listener = TcpListener::bind("127.0.0.1:0".parse().unwrap())?;
//!     let addr = listener.local_addr()?;
//!     let server = rt::spawn(async move {
//!         let stream = listener.accept().await?;
//!         while let Some(chain) = stream.recv(&group).await? {
//!             stream.send_zc(chain).await?; // echo the buffers back, no copy
//!         }
//!         Ok::<(), ringpool::Error>(())
//!     });
//!     let client = TcpStream::connect(addr).await?;
//!     client.write_all(b"ping".to_vec()).await?;
//!     let group2 = rt::buf_group(BufGroupConfig::new(4096, 8))?;
//!     let echoed = client.recv(&group2).await?.unwrap();
//!     assert_eq!(echoed.to_vec(), b"ping");
//!     drop(client);
//!     server.await?;
//!     Ok::<(), ringpool::Error>(())
//! })?;
//! # Ok::<(), ringpool::Error>(())
//! ```

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use crate::{
    BufChain, BufGroup, BufGroupConfig, Datagram, Driver, DriverConfig, Error, Event, Fd, OpId,
    RecvMode, Result, SendBuf,
};

#[cfg(feature = "tokio")]
mod tokio_io;

type Task = Pin<Box<dyn Future<Output = ()>>>;

/// Completions routed to the future that waits for them.
#[derive(Default)]
struct OpState {
    events: EventQueue,
    /// The op delivered its final completion.
    finished: bool,
    waker: Option<Waker>,
    /// Set when the op's future was dropped before the final completion and what it still
    /// receives must not be lost (a receive: the data is the stream's next bytes).
    orphan_sink: Option<Leftovers>,
    /// A stream's receive: where its untaken events go if the runtime ends before the op's
    /// holder takes them (it was returned out of `block_on`).
    stream: Option<Leftovers>,
}

/// An op's events not yet taken, in order. Most ops have one at a time, kept inline (no
/// allocation per op); a multishot op's backlog goes on in a deque.
#[derive(Default)]
struct EventQueue {
    first: Option<Event>,
    rest: VecDeque<Event>,
}

impl EventQueue {
    fn push_back(&mut self, e: Event) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(e);
        } else {
            self.rest.push_back(e);
        }
    }

    fn pop_front(&mut self) -> Option<Event> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    /// Takes every event, in order.
    fn drain(&mut self) -> impl Iterator<Item = Event> + '_ {
        self.first.take().into_iter().chain(self.rest.drain(..))
    }
}

/// Events of a stream's receives whose futures were dropped: the next receive returns them
/// first, so cancelling a receive never loses data that had already been taken from the socket.
type Leftovers = Rc<LeftoverQueue>;

#[derive(Default)]
struct LeftoverQueue {
    events: RefCell<VecDeque<Event>>,
    /// The receive waiting on the stream, woken when leftovers arrive.
    waker: RefCell<Option<Waker>>,
    /// Dropped receives of the stream still in the kernel. A new receive waits for them: two
    /// receives in flight on one socket could hand out its bytes out of order (seen in the
    /// proxy bench: a receive started while a dropped one was still armed overtook it).
    orphans: Cell<usize>,
}

impl LeftoverQueue {
    fn pop(&self) -> Option<Event> {
        self.events.borrow_mut().pop_front()
    }

    /// Ready when a new receive may start: leftovers wait to be handed out, or no dropped
    /// receive of the stream is still in the kernel.
    fn poll_quiet(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.events.borrow().is_empty() || self.orphans.get() == 0 {
            return Poll::Ready(());
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    /// A dropped receive's final completion came.
    fn orphan_done(&self) {
        self.orphans.set(self.orphans.get() - 1);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn push(&self, events: impl IntoIterator<Item = Event>) {
        self.events.borrow_mut().extend(events);
        if !self.events.borrow().is_empty() {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

struct Runtime {
    driver: RefCell<Driver>,
    ops: RefCell<crate::hash::IntMap<u64, OpState>>,
    /// Spawned tasks (taken out while polled) and their wakers, made once per task.
    tasks: RefCell<slab::Slab<(Option<Task>, Waker)>>,
    /// Task ids woken (wakers may be called from anywhere).
    woken: Arc<WakeQueue>,
    /// Timers: (deadline, id) → waker.
    timers: RefCell<BTreeMap<(Instant, u64), Waker>>,
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

fn runtime() -> Rc<Runtime> {
    RUNTIME.with(|r| {
        r.borrow()
            .clone()
            .expect("ringpool::rt used outside rt::block_on")
    })
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
    let mut driver = Driver::new(config)?;
    let woken = Arc::new(WakeQueue {
        ids: Mutex::default(),
        remote: driver.remote_waker(),
        signalled: Default::default(),
    });
    let rt = Rc::new(Runtime {
        driver: RefCell::new(driver),
        ops: RefCell::default(),
        tasks: RefCell::new(slab::Slab::new()),
        woken,
        timers: RefCell::default(),
    });
    RUNTIME.with(|r| *r.borrow_mut() = Some(rt.clone()));
    LOCAL_QUEUE.with(|q| q.set(Arc::as_ptr(&rt.woken) as usize));
    struct Reset;
    impl Drop for Reset {
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
    let _reset = Reset;
    let mut fut = std::pin::pin!(fut);
    let main_waker = Waker::from(Arc::new(TaskWaker {
        id: MAIN,
        woken: rt.woken.clone(),
    }));
    let mut main_woken = true;
    // Woken task ids taken from `rt.woken` (swapped with it, so both keep their capacity).
    let mut batch = VecDeque::new();
    loop {
        if main_woken {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut Context::from_waker(&main_waker)) {
                return Ok(v);
            }
        }
        main_woken = false;
        // Run every woken task (tasks woken while running go round again), taking the woken
        // ids a batch at a time (one lock per batch, not per task).
        loop {
            if batch.is_empty() {
                rt.woken.take(&mut batch);
            }
            let Some(id) = batch.pop_front() else { break };
            if id == MAIN {
                main_woken = true;
                continue;
            }
            // (A stale wake-up of a finished task whose id was reused only polls the new one
            // once more, which futures allow.)
            let taken = rt
                .tasks
                .borrow_mut()
                .get_mut(id)
                .and_then(|(t, w)| Some((t.take()?, w.clone())));
            let Some((mut task, waker)) = taken else {
                continue;
            };
            if task
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
            {
                rt.tasks.borrow_mut().remove(id);
            } else if let Some(slot) = rt.tasks.borrow_mut().get_mut(id) {
                slot.0 = Some(task);
            }
        }
        if main_woken {
            continue;
        }
        // Nothing runnable: wait for the kernel or the next timer.
        let next_timer = rt.timers.borrow().keys().next().map(|(at, _)| *at);
        let wait = next_timer.map(|at| at.saturating_duration_since(Instant::now()));
        rt.driver
            .borrow_mut()
            .wait(Some(wait.unwrap_or(Duration::from_millis(100))))?;
        rt.route();
        rt.fire_timers();
    }
}

impl Runtime {
    /// Hands every completion to the op state of its token; completions of ops whose future
    /// was dropped are dropped here (their buffers go home).
    fn route(&self) {
        loop {
            let c = self.driver.borrow_mut().pop();
            let Some(c) = c else { break };
            let mut ops = self.ops.borrow_mut();
            let Some(state) = ops.get_mut(&c.token) else {
                continue;
            };
            if let Some(sink) = &state.orphan_sink {
                // The cancel's own outcome is nobody's news; data (or EOF, or a real error)
                // taken off the socket before the cancel landed is the stream's.
                let sink = sink.clone();
                if !c.more {
                    ops.remove(&c.token);
                }
                drop(ops);
                if !matches!(c.event, Event::Error(Error::Cancelled)) {
                    sink.push([c.event]);
                }
                if !c.more {
                    sink.orphan_done();
                }
                continue;
            }
            state.finished |= !c.more;
            if let Some(event) = without_lease(c.event) {
                state.events.push_back(event);
            }
            if let Some(w) = state.waker.take() {
                w.wake();
            }
        }
    }

    fn fire_timers(&self) {
        let now = Instant::now();
        let mut timers = self.timers.borrow_mut();
        while let Some(entry) = timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            entry.remove().wake();
        }
    }

    fn token(&self) -> u64 {
        self.tokens(1)
    }

    /// `n` consecutive tokens (one op with several completion streams, such as a lease group
    /// and its members): the first of them. Tokens are unique across runtimes, so an op's
    /// token names nothing in any other runtime, whatever outlives its own.
    fn tokens(&self, n: u64) -> u64 {
        let first = next_tokens(n);
        let mut ops = self.ops.borrow_mut();
        for t in first..first + n {
            ops.insert(t, OpState::default());
        }
        first
    }
}

/// `n` consecutive numbers never handed out before in this process (tokens, timer ids).
fn next_tokens(n: u64) -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(n, std::sync::atomic::Ordering::Relaxed)
}

impl Runtime {
    /// The end of `block_on`, after its tasks were dropped: ops whose holders outlive the
    /// runtime (returned out of it) are cancelled and their final completions collected, so
    /// what a stream's receive took off the socket goes to the stream (its next receive, in a
    /// later runtime, returns it first) and receives dropped earlier stop counting as in
    /// flight. Nothing a later runtime runs can reach these ops: their holders see
    /// [`Error::RuntimeGone`].
    fn shutdown(&self) {
        if self.ops.borrow().values().any(|s| !s.finished) {
            self.driver.borrow_mut().cancel_all();
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.ops.borrow().values().any(|s| !s.finished) && Instant::now() < deadline {
                if self
                    .driver
                    .borrow_mut()
                    .wait(Some(Duration::from_millis(50)))
                    .is_err()
                {
                    break;
                }
                self.route();
            }
        }
        // Finished ops too: a receive that completed with data its holder had not taken yet
        // (found by the model checker: those bytes died with the runtime's op map).
        let states: Vec<OpState> = self.ops.borrow_mut().drain().map(|(_, s)| s).collect();
        for mut state in states {
            if let Some(sink) = state.orphan_sink.take() {
                // Its final completion did not come in time: the driver keeps its memory.
                sink.orphan_done();
            } else if let Some(stream) = state.stream.take() {
                stream.push(
                    state
                        .events
                        .drain()
                        .filter(|e| !matches!(e, Event::Error(Error::Cancelled))),
                );
            }
        }
    }
}

/// `event` without the lease clone it may carry. The runtime hands out no [`Lease`]: dropping
/// the clones as they arrive sends a lease group's buffer home once its members are done,
/// whether or not anyone awaits their results. A zero-copy member's `Returned` says only that
/// it let go of the lease: its op state's `finished` records that, so nothing is queued.
///
/// [`Lease`]: crate::Lease
fn without_lease(event: Event) -> Option<Event> {
    match event {
        Event::Returned(SendBuf::Leased(_)) => None,
        Event::Sent {
            result,
            buf: Some(SendBuf::Leased(_)),
        } => Some(Event::Sent { result, buf: None }),
        Event::LeaseFilled {
            result,
            lease: Some(_),
        } => Some(Event::LeaseFilled {
            result,
            lease: None,
        }),
        event => Some(event),
    }
}

/// One driver op awaited by a future: yields its events; dropping it before the final
/// completion cancels the op (later completions are dropped by the runtime).
struct Op {
    token: u64,
    id: Option<OpId>,
    /// Where late events go if this op is dropped unfinished (receives of a stream).
    sink: Option<Leftovers>,
    /// The runtime that started the op: the only one it ever touches (it may be held past
    /// that runtime's end, then dropped or polled in another).
    rt: Weak<Runtime>,
}

impl Op {
    /// Registers a new op started by `start` (which gets the token).
    fn start(start: impl FnOnce(&mut Driver, u64) -> Result<Option<OpId>>) -> Result<Op> {
        let rt = runtime();
        let token = rt.token();
        let id = start(&mut rt.driver.borrow_mut(), token);
        match id {
            Ok(id) => Ok(Op {
                token,
                id,
                sink: None,
                rt: Rc::downgrade(&rt),
            }),
            Err(e) => {
                rt.ops.borrow_mut().remove(&token);
                Err(e)
            }
        }
    }

    /// Makes this op a receive of the stream whose leftovers are `leftovers`: what it took off
    /// the socket and its holder did not take goes there when it is dropped or its runtime
    /// ends.
    fn set_stream(&mut self, leftovers: &Leftovers) {
        self.sink = Some(leftovers.clone());
        if let Some(rt) = self.rt.upgrade() {
            if let Some(state) = rt.ops.borrow_mut().get_mut(&self.token) {
                state.stream = Some(leftovers.clone());
            }
        }
    }

    /// The next event of this op.
    fn next(&self) -> impl Future<Output = Event> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    /// The stream's leftovers first, then this op's next event.
    fn poll_with(&self, cx: &mut Context<'_>, leftovers: &Leftovers) -> Poll<Event> {
        if let Some(e) = leftovers.pop() {
            return Poll::Ready(e);
        }
        let p = self.poll_next(cx);
        if p.is_pending() {
            *leftovers.waker.borrow_mut() = Some(cx.waker().clone());
        }
        p
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Event> {
        let Some(rt) = self.rt.upgrade() else {
            return Poll::Ready(Event::Error(Error::RuntimeGone));
        };
        let mut ops = rt.ops.borrow_mut();
        let state = ops.get_mut(&self.token).expect("a live op has its state");
        match state.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        // Its runtime ended: it cancelled the op and collected (or kept) what was its.
        let Some(rt) = self.rt.upgrade() else {
            return;
        };
        let mut ops = rt.ops.borrow_mut();
        let finished = match (ops.get_mut(&self.token), &self.sink) {
            (Some(state), Some(sink)) => {
                // What it received and nobody took, and whatever it still receives, is the
                // stream's next data.
                sink.push(state.events.drain());
                if state.finished {
                    ops.remove(&self.token);
                    true
                } else {
                    state.orphan_sink = Some(sink.clone());
                    sink.orphans.set(sink.orphans.get() + 1);
                    false
                }
            }
            _ => ops.remove(&self.token).is_none_or(|s| s.finished),
        };
        drop(ops);
        if !finished {
            if let Some(id) = self.id {
                rt.driver.borrow_mut().cancel(id);
            }
        }
    }
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

/// Runs `f` with this thread's driver (for its statistics, or the [`Driver`]-level API). Do
/// not await inside: the driver is borrowed for the call.
///
/// # Examples
/// ```
/// ringpool::rt::block_on(async {
///     let enters = ringpool::rt::with_driver(|d| d.stats().enters);
///     println!("{enters} io_uring_enter calls so far");
/// })?;
/// # Ok::<(), ringpool::Error>(())
/// ```
pub fn with_driver<T>(f: impl FnOnce(&mut Driver) -> T) -> T {
    f(&mut runtime().driver.borrow_mut())
}

/// A buffer group on this thread's driver.
///
/// # Errors
/// As [`Driver::buf_group`].
pub fn buf_group(cfg: BufGroupConfig) -> Result<BufGroup> {
    runtime().driver.borrow_mut().buf_group(cfg)
}

/// Completes after `d`.
///
/// # Examples
/// ```
/// ringpool::rt::block_on(async {
///     let t = std::time::Instant::now();
///     ringpool::rt::sleep(std::time::Duration::from_millis(20)).await;
///     assert!(t.elapsed() >= std::time::Duration::from_millis(20));
/// })?;
/// # Ok::<(), ringpool::Error>(())
/// ```
pub async fn sleep(d: Duration) {
    let at = Instant::now() + d;
    let id = next_tokens(1); // any unique number
    /// Takes the timer out when the sleep ends or is dropped early (e.g. by `timeout`), so a
    /// dropped sleep leaves no entry to fire for nothing later.
    struct Unregister(Instant, u64);
    impl Drop for Unregister {
        fn drop(&mut self) {
            if let Ok(Some(rt)) = RUNTIME.try_with(|r| r.borrow().clone()) {
                rt.timers.borrow_mut().remove(&(self.0, self.1));
            }
        }
    }
    let _unregister = Unregister(at, id);
    std::future::poll_fn(|cx| {
        if Instant::now() >= at {
            runtime().timers.borrow_mut().remove(&(at, id));
            return Poll::Ready(());
        }
        runtime()
            .timers
            .borrow_mut()
            .insert((at, id), cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// `fut`, or [`Error::TimedOut`] if it does not complete within `d` (it is then dropped, which
/// cancels its op).
///
/// # Examples
/// ```
/// use std::time::Duration;
/// let r = ringpool::rt::block_on(async {
///     ringpool::rt::timeout(Duration::from_millis(10), ringpool::rt::sleep(Duration::from_secs(5))).await
/// })?;
/// assert!(matches!(r, Err(ringpool::Error::TimedOut)));
/// # Ok::<(), ringpool::Error>(())
/// ```
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(sleep(d));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Error::TimedOut)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A listening TCP socket whose connections come from a multishot accept.
pub struct TcpListener {
    fd: Fd,
    accept: RefCell<Option<Op>>,
}

impl TcpListener {
    /// Binds `addr` (backlog 4096).
    ///
    /// # Errors
    /// The bind error.
    pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
        let l = std::net::TcpListener::bind(addr).map_err(Error::os("bind"))?;
        // SAFETY: listen on a socket we own; raising its backlog has no other effect.
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        Ok(TcpListener {
            fd: Fd::from(l),
            accept: RefCell::new(None),
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        local_addr(&self.fd)
    }

    /// The next connection.
    ///
    /// # Errors
    /// The accept error.
    pub async fn accept(&self) -> Result<TcpStream> {
        loop {
            if self.accept.borrow().is_none() {
                let fd = self.fd.clone();
                let op = Op::start(|d, t| d.accept_multishot(&fd, t).map(Some))?;
                *self.accept.borrow_mut() = Some(op);
            }
            // The op stays in the listener (a dropped `accept` future leaves it armed); only its
            // token is needed to await its next connection, so no borrow is held across it.
            let (token, rt) = {
                let accept = self.accept.borrow();
                let op = accept.as_ref().expect("armed above");
                (op.token, op.rt.clone())
            };
            if rt.strong_count() == 0 {
                // Armed by a runtime that has ended (the listener outlived it): arm anew here.
                self.accept.borrow_mut().take();
                continue;
            }
            let event = next_event(rt, token).await;
            match event {
                Event::Accepted(fd) => return Ok(TcpStream::from_fd(fd)),
                Event::Error(e) => {
                    self.accept.borrow_mut().take();
                    return Err(e);
                }
                _ => {}
            }
        }
    }
}

/// The next event of the op with `token` of runtime `rt` (the op stays owned by its holder).
async fn next_event(rt: Weak<Runtime>, token: u64) -> Event {
    std::future::poll_fn(move |cx| {
        let Some(rt) = rt.upgrade() else {
            return Poll::Ready(Event::Error(Error::RuntimeGone));
        };
        let mut ops = rt.ops.borrow_mut();
        let Some(state) = ops.get_mut(&token) else {
            return Poll::Ready(Event::Error(Error::Cancelled));
        };
        match state.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await
}

/// A connected TCP socket.
pub struct TcpStream {
    fd: Fd,
    /// Received by receives whose futures were dropped: handed out first.
    leftovers: Leftovers,
}

/// Starts a receive on `fd` whose late events go to `leftovers` if its future is dropped.
fn start_recv(fd: &Fd, group: &BufGroup, mode: RecvMode, leftovers: &Leftovers) -> Result<Op> {
    let mut op = Op::start(|d, t| d.recv(fd, group, mode, t).map(Some))?;
    op.set_stream(leftovers);
    Ok(op)
}

/// What a receive event means to the reader.
fn recv_result(event: Event) -> Result<Option<BufChain>> {
    match event {
        Event::Data(chain) => Ok(Some(chain)),
        Event::Eof => Ok(None),
        Event::Error(e) => Err(e),
        other => unreachable!("recv: {other:?}"),
    }
}

impl TcpStream {
    /// Connects to `addr`.
    ///
    /// # Errors
    /// The connect error (e.g. `ECONNREFUSED`).
    pub async fn connect(addr: SocketAddr) -> Result<TcpStream> {
        let fd = Fd::tcp_socket(addr)?;
        let op = Op::start(|d, t| d.connect(&fd, addr, t).map(Some))?;
        match op.next().await {
            Event::Connected => Ok(TcpStream::from_fd(fd)),
            Event::Error(e) => Err(e),
            other => unreachable!("connect: {other:?}"),
        }
    }

    /// A stream over an already connected socket (e.g. from `std::net`).
    ///
    /// # Examples
    /// ```no_run
    /// let s = std::net::TcpStream::connect("127.0.0.1:7000").unwrap();
    /// let stream = ringpool::rt::TcpStream::from_fd(ringpool::Fd::from(s));
    /// ```
    pub fn from_fd(fd: Fd) -> TcpStream {
        TcpStream {
            fd,
            leftovers: Leftovers::default(),
        }
    }

    /// An [`futures_io::AsyncRead`] view receiving into `group` (the copying path); also
    /// `tokio::io::AsyncRead` with the `tokio` feature.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream, g: ringpool::BufGroup) -> std::io::Result<()> {
    /// use futures::AsyncReadExt;
    /// let mut all = Vec::new();
    /// s.reader(g).read_to_end(&mut all).await?;
    /// # Ok(()) }
    /// ```
    pub fn reader(&self, group: BufGroup) -> Reader<'_> {
        Reader {
            stream: self,
            group,
            pending: None,
            op: None,
        }
    }

    /// An [`futures_io::AsyncWrite`] view (the copying path); also `tokio::io::AsyncWrite`
    /// with the `tokio` feature.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream) -> std::io::Result<()> {
    /// use futures::AsyncWriteExt;
    /// let mut w = s.writer();
    /// w.write_all(b"hello").await?;
    /// w.close().await?; // the peer reads end of stream
    /// # Ok(()) }
    /// ```
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            stream: self,
            op: None,
        }
    }

    /// The socket, for the [`Driver`]-level API.
    pub fn fd(&self) -> &Fd {
        &self.fd
    }

    /// Receives what has arrived (a bundle of buffers where the kernel has bundles) into
    /// buffers the kernel picks from `group`; `None` at end of stream. Dropping the future
    /// cancels the receive; nothing received is lost to the group.
    ///
    /// # Errors
    /// The receive error (e.g. a reset).
    pub async fn recv(&self, group: &BufGroup) -> Result<Option<BufChain>> {
        self.recv_as(group, RecvMode::Bundle).await
    }

    /// Like [`TcpStream::recv`], but into exactly one buffer: the receive never holds more than
    /// one buffer of `group`, which bounds what a connection can take from a shared group (a
    /// bundle takes what the socket holds, up to the whole group).
    ///
    /// # Errors
    /// The receive error (e.g. a reset).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream, g: &ringpool::BufGroup) -> ringpool::Result<()> {
    /// while let Some(chain) = s.recv_one(g).await? {
    ///     assert_eq!(chain.buf_count(), 1);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn recv_one(&self, group: &BufGroup) -> Result<Option<BufChain>> {
        self.recv_as(group, RecvMode::Once).await
    }

    async fn recv_as(&self, group: &BufGroup, mode: RecvMode) -> Result<Option<BufChain>> {
        std::future::poll_fn(|cx| self.leftovers.poll_quiet(cx)).await;
        if let Some(event) = self.leftovers.pop() {
            return recv_result(event);
        }
        let op = start_recv(&self.fd, group, mode, &self.leftovers)?;
        let event = std::future::poll_fn(|cx| op.poll_with(cx, &self.leftovers)).await;
        recv_result(event)
    }

    /// Shuts down the sending side: the peer reads end of stream once everything sent before
    /// has arrived; receiving goes on.
    ///
    /// # Errors
    /// `shutdown`'s error (e.g. `ENOTCONN`).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream) -> ringpool::Result<()> {
    /// s.write_all(b"last words".to_vec()).await?;
    /// s.shutdown_write()?;
    /// # Ok(()) }
    /// ```
    pub fn shutdown_write(&self) -> Result<()> {
        // SAFETY: shutdown on a live socket the stream owns.
        let rc = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::os("shutdown")(std::io::Error::last_os_error()))
        }
    }

    /// A multishot receive into `group` (bundles where the kernel has them): one op for the
    /// whole stream, re-armed by the driver when the group ran dry. Dropping the stream cancels
    /// it; chains it had received and not handed out go home.
    ///
    /// # Errors
    /// The op could not start.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::TcpStream, g: &ringpool::BufGroup) -> ringpool::Result<()> {
    /// let mut rx = s.recv_stream(g)?;
    /// while let Some(chain) = rx.next().await? {
    ///     s.send_zc(chain).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_stream(&self, group: &BufGroup) -> Result<RecvStream> {
        let (fd, group, leftovers) = (self.fd.clone(), group.clone(), self.leftovers.clone());
        let start =
            Box::new(move || start_recv(&fd, &group, RecvMode::MultishotBundle, &leftovers));
        Ok(RecvStream(MultishotEvents::new(&self.leftovers, start)?))
    }

    /// Sends all of `buf` through the zero-copy policy; completes when the bytes are queued
    /// (the memory goes home after the kernel's notification by itself).
    ///
    /// # Errors
    /// The send error.
    pub async fn send_zc(&self, buf: impl Into<SendBuf>) -> Result<usize> {
        let fd = self.fd.clone();
        let buf = buf.into();
        let op = Op::start(|d, t| d.send_zc(&fd, buf, t).map(Some))?;
        match op.next().await {
            Event::Sent { result, .. } => result,
            Event::Error(e) => Err(e),
            other => unreachable!("send: {other:?}"),
        }
    }

    /// Sends all of `buf` (a plain send; short sends are continued).
    ///
    /// # Errors
    /// The send error.
    pub async fn write_all(&self, buf: impl Into<SendBuf>) -> Result<()> {
        let fd = self.fd.clone();
        let buf = buf.into();
        let op = Op::start(|d, t| d.send(&fd, buf, t).map(Some))?;
        match op.next().await {
            Event::Sent { result, .. } => result.map(drop),
            Event::Error(e) => Err(e),
            other => unreachable!("send: {other:?}"),
        }
    }
}

/// [`futures_io::AsyncRead`] over a [`TcpStream`]: receives into pooled buffers of `group` and
/// copies out of them (the copying path, for code that needs the trait; [`TcpStream::recv`]
/// hands out the buffers themselves). Made by [`TcpStream::reader`]; with the `tokio` feature
/// it is `tokio::io::AsyncRead` as well.
pub struct Reader<'a> {
    stream: &'a TcpStream,
    group: BufGroup,
    /// Received bytes not yet read: the chain's bytes, and how far into them.
    pending: Option<(Vec<u8>, usize)>,
    op: Option<Op>,
}

impl Reader<'_> {
    /// The read shared by the `futures-io` and tokio impls: waits for received bytes (unless
    /// some are left from the last receive), hands at most `room` of them to `put` (which
    /// copies them into the caller's buffer) and returns how many; 0 at end of stream.
    fn poll_copy_out(
        &mut self,
        cx: &mut Context<'_>,
        room: usize,
        put: impl FnOnce(&[u8]),
    ) -> Poll<std::io::Result<usize>> {
        loop {
            if let Some((bytes, at)) = &mut self.pending {
                let n = room.min(bytes.len() - *at);
                put(&bytes[*at..*at + n]);
                *at += n;
                if *at == bytes.len() {
                    self.pending = None;
                }
                return Poll::Ready(Ok(n));
            }
            let leftover = self.stream.leftovers.pop();
            let event = match leftover {
                Some(e) => e,
                None => {
                    if self.op.is_none() {
                        // Never two receives on one socket: wait for a dropped one to end.
                        if self.stream.leftovers.poll_quiet(cx).is_pending() {
                            return Poll::Pending;
                        }
                        if !self.stream.leftovers.events.borrow().is_empty() {
                            continue; // handed out at the top of the loop
                        }
                        let op = start_recv(
                            &self.stream.fd,
                            &self.group,
                            RecvMode::Bundle,
                            &self.stream.leftovers,
                        )?;
                        self.op = Some(op);
                    }
                    let op = self.op.as_ref().expect("started above");
                    match op.poll_with(cx, &self.stream.leftovers) {
                        Poll::Ready(e) => {
                            self.op = None;
                            e
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            };
            match event {
                // Copied out at once, so the buffers go home now.
                Event::Data(chain) => self.pending = Some((chain.to_vec(), 0)),
                Event::Eof => return Poll::Ready(Ok(0)),
                Event::Error(e) => return Poll::Ready(Err(e.into())),
                other => unreachable!("recv: {other:?}"),
            }
        }
    }
}

impl futures_io::AsyncRead for Reader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_copy_out(cx, out.len(), |bytes| {
            out[..bytes.len()].copy_from_slice(bytes)
        })
    }
}

/// [`futures_io::AsyncWrite`] over a [`TcpStream`]: each write copies the caller's bytes and
/// sends them whole (the copying path; [`TcpStream::send_zc`] sends owned buffers without a
/// copy). Made by [`TcpStream::writer`]; with the `tokio` feature it is `tokio::io::AsyncWrite`
/// as well.
pub struct Writer<'a> {
    stream: &'a TcpStream,
    /// The send in flight and its length.
    op: Option<(Op, usize)>,
}

impl Writer<'_> {
    /// The write shared by the `futures-io` and tokio impls: copies `buf` and sends it whole,
    /// or, while a send is in flight (an earlier call returned `Pending`), waits for that one.
    fn poll_send(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.op.is_none() {
            let fd = self.stream.fd.clone();
            let owned = buf.to_vec();
            let op = Op::start(|d, t| d.send(&fd, owned, t).map(Some))?;
            self.op = Some((op, buf.len()));
        }
        let (op, len) = self.op.as_ref().expect("started above");
        let len = *len;
        match op.poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(event) => {
                self.op = None;
                match event {
                    Event::Sent { result, .. } => {
                        Poll::Ready(result.map(|_| len).map_err(Into::into))
                    }
                    Event::Error(e) => Poll::Ready(Err(e.into())),
                    other => unreachable!("send: {other:?}"),
                }
            }
        }
    }

    /// Shuts the socket down for writing (the peer reads end of stream); shared by
    /// `poll_close` and tokio's `poll_shutdown`.
    fn shutdown(&self) -> std::io::Result<()> {
        self.stream.shutdown_write().map_err(Into::into)
    }
}

impl futures_io::AsyncWrite for Writer<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_send(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // Each write completed only once its bytes were handed to the kernel.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.shutdown())
    }
}

/// The chains of a multishot receive ([`TcpStream::recv_stream`]).
pub struct RecvStream(MultishotEvents);

impl RecvStream {
    /// The next chain received; `None` at end of stream.
    ///
    /// # Errors
    /// The receive error (e.g. a reset); the stream has ended then.
    pub async fn next(&mut self) -> Result<Option<BufChain>> {
        self.0.next(chain_of).await
    }

    /// A chain already received, without waiting (`None` if there is none now): for
    /// coalescing what arrived meanwhile into one send.
    ///
    /// # Errors
    /// As [`RecvStream::next`].
    pub fn try_next(&mut self) -> Result<Option<BufChain>> {
        self.0.try_next(chain_of)
    }
}

fn chain_of(event: Event) -> Option<BufChain> {
    match event {
        Event::Data(chain) => Some(chain),
        _ => None,
    }
}

fn datagram_of(event: Event) -> Option<Datagram> {
    match event {
        Event::Datagram(d) => Some(d),
        _ => None,
    }
}

/// The events of a multishot receive, for its stream type: the socket's leftovers first, then
/// the op's own; end of stream and errors end it.
struct MultishotEvents {
    /// The receive: started at once, or (a dropped receive of the socket still in the kernel)
    /// by the first `next` after that one ended.
    op: Result<Op, StartRecv>,
    ended: bool,
    leftovers: Leftovers,
}

/// Starts a stream's receive (its socket, group and mode are in the closure).
type StartRecv = Box<dyn FnOnce() -> Result<Op>>;

impl MultishotEvents {
    /// The events of the receive `start` makes: started now, unless a dropped receive of the
    /// socket is still in the kernel. Two receives armed on one socket can hand out its bytes
    /// out of order (the later one takes a piece, the dropped one the next, and the dropped
    /// one's piece is handed out first as a leftover), so the new one waits for it.
    fn new(leftovers: &Leftovers, start: StartRecv) -> Result<MultishotEvents> {
        let op = if leftovers.orphans.get() == 0 {
            Ok(start()?)
        } else {
            Err(start)
        };
        Ok(MultishotEvents {
            op,
            ended: false,
            leftovers: leftovers.clone(),
        })
    }

    /// Starts the receive if its time has come (`quiet`: no dropped receive of the socket is
    /// in the kernel); false while it must wait.
    fn started(&mut self, quiet: bool) -> Result<bool> {
        if self.op.is_err() {
            if !quiet {
                return Ok(false);
            }
            let start = std::mem::replace(&mut self.op, Err(Box::new(|| Err(Error::Cancelled))));
            let Err(start) = start else {
                unreachable!("checked above")
            };
            match start() {
                Ok(op) => self.op = Ok(op),
                Err(e) => {
                    self.ended = true;
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    async fn next<T>(&mut self, item: fn(Event) -> Option<T>) -> Result<Option<T>> {
        if self.ended {
            return Ok(None);
        }
        if self.op.is_err() {
            std::future::poll_fn(|cx| self.leftovers.poll_quiet(cx)).await;
            if let Some(e) = self.leftovers.pop() {
                return self.item(e, item);
            }
        }
        self.started(true)?;
        let Ok(op) = &self.op else {
            unreachable!("started when quiet")
        };
        let event = std::future::poll_fn(|cx| op.poll_with(cx, &self.leftovers)).await;
        self.item(event, item)
    }

    fn try_next<T>(&mut self, item: fn(Event) -> Option<T>) -> Result<Option<T>> {
        if self.ended {
            return Ok(None);
        }
        if let Some(e) = self.leftovers.pop() {
            return self.item(e, item);
        }
        let quiet = self.leftovers.orphans.get() == 0;
        if !self.started(quiet)? {
            return Ok(None);
        }
        let Ok(op) = &self.op else {
            unreachable!("started above")
        };
        let event = {
            let Some(rt) = op.rt.upgrade() else {
                return self.item(Event::Error(Error::RuntimeGone), item);
            };
            let mut ops = rt.ops.borrow_mut();
            ops.get_mut(&op.token).and_then(|s| s.events.pop_front())
        };
        match event {
            Some(e) => self.item(e, item),
            None => Ok(None),
        }
    }

    fn item<T>(&mut self, event: Event, item: fn(Event) -> Option<T>) -> Result<Option<T>> {
        match event {
            Event::Eof => {
                self.ended = true;
                Ok(None)
            }
            Event::Error(e) => {
                self.ended = true;
                Err(e)
            }
            other => match item(other) {
                Some(t) => Ok(Some(t)),
                None => unreachable!("a receive stream got another op's event"),
            },
        }
    }
}

/// A UDP socket whose receives hand out pooled buffers (one per datagram, picked by the kernel
/// from a group, with the sender's address) and whose sends go through the zero-copy policy.
///
/// Dropping a receive future cancels it; a datagram the kernel had already delivered to it is
/// kept for the socket's next receive, so cancelling never loses one.
///
/// # Examples
/// ```
/// use ringpool::rt::{self, UdpSocket};
/// use ringpool::BufGroupConfig;
///
/// rt::block_on(async {
///     let group = rt::buf_group(BufGroupConfig::new(2048, 64))?;
///     let server = UdpSocket::bind("127.0.0.1:0".parse().unwrap())?;
///     let client = UdpSocket::bind("127.0.0.1:0".parse().unwrap())?;
///     client.send_zc_to(b"ping".to_vec(), server.local_addr()?).await?;
///     let d = server.recv_from(&group).await?;
///     assert_eq!(&d.data[..], b"ping");
///     server.send_zc_to(d.data, d.from.unwrap()).await?; // the buffer itself goes back out
///     assert_eq!(&client.recv_from(&group).await?.data[..], b"ping");
///     Ok::<(), ringpool::Error>(())
/// })??;
/// # Ok::<(), ringpool::Error>(())
/// ```
pub struct UdpSocket {
    fd: Fd,
    /// Datagrams delivered to receives whose futures were dropped: handed out first.
    leftovers: Leftovers,
}

impl UdpSocket {
    /// Binds a UDP socket to `addr` (port 0 picks a free port).
    ///
    /// # Errors
    /// The bind error.
    pub fn bind(addr: SocketAddr) -> Result<UdpSocket> {
        let s = std::net::UdpSocket::bind(addr).map_err(Error::os("bind"))?;
        Ok(UdpSocket::from_fd(Fd::from(std::os::fd::OwnedFd::from(s))))
    }

    /// A socket over an open UDP socket (e.g. from `std::net`).
    ///
    /// # Examples
    /// ```no_run
    /// let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let socket = ringpool::rt::UdpSocket::from_fd(ringpool::Fd::from(std::os::fd::OwnedFd::from(s)));
    /// ```
    pub fn from_fd(fd: Fd) -> UdpSocket {
        UdpSocket {
            fd,
            leftovers: Leftovers::default(),
        }
    }

    /// Sets the default peer: [`UdpSocket::send_zc`] sends there, and only its datagrams are
    /// received.
    ///
    /// # Errors
    /// The connect error.
    pub fn connect(&self, addr: SocketAddr) -> Result<()> {
        let (storage, len) = crate::driver::sockaddr(addr);
        // SAFETY: connect reads `len` bytes of a socket address we own, on a socket we own.
        let rc = unsafe {
            libc::connect(
                self.fd.as_raw_fd(),
                (&raw const storage).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::os("connect")(std::io::Error::last_os_error()))
        }
    }

    /// The bound address.
    ///
    /// # Errors
    /// `getsockname`'s error.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        local_addr(&self.fd)
    }

    /// The socket, for the [`Driver`]-level API.
    pub fn fd(&self) -> &Fd {
        &self.fd
    }

    /// The next datagram, in a buffer the kernel picks from `group`.
    ///
    /// # Errors
    /// The receive error; [`Error::BufferTooSmall`] for a group whose buffers cannot hold a
    /// payload (see [`Driver::recv_from`]).
    pub async fn recv_from(&self, group: &BufGroup) -> Result<Datagram> {
        std::future::poll_fn(|cx| self.leftovers.poll_quiet(cx)).await;
        if let Some(event) = self.leftovers.pop() {
            return datagram_result(event);
        }
        let mut op = Op::start(|d, t| d.recv_from(&self.fd, group, RecvMode::Once, t).map(Some))?;
        op.set_stream(&self.leftovers);
        let event = std::future::poll_fn(|cx| op.poll_with(cx, &self.leftovers)).await;
        datagram_result(event)
    }

    /// A multishot receive into `group`: one op for every datagram to come, re-armed by the
    /// driver when the group ran dry. Dropping the stream cancels it; datagrams it had received
    /// and not handed out go back to their group.
    ///
    /// # Errors
    /// As [`Driver::recv_from`].
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(s: &ringpool::rt::UdpSocket, g: &ringpool::BufGroup) -> ringpool::Result<()> {
    /// let mut rx = s.recv_stream(g)?;
    /// while let Some(d) = rx.next().await? {
    ///     if let Some(from) = d.from {
    ///         s.send_zc_to(d.data, from).await?; // echo, no copy
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recv_stream(&self, group: &BufGroup) -> Result<DatagramStream> {
        let (fd, group, leftovers) = (self.fd.clone(), group.clone(), self.leftovers.clone());
        let start = Box::new(move || {
            let mut op =
                Op::start(|d, t| d.recv_from(&fd, &group, RecvMode::Multishot, t).map(Some))?;
            op.set_stream(&leftovers);
            Ok(op)
        });
        Ok(DatagramStream(MultishotEvents::new(
            &self.leftovers,
            start,
        )?))
    }

    /// Sends `buf` as one datagram to `addr` through the zero-copy policy (pooled buffers,
    /// registered memory and owned bytes alike); completes when it is queued.
    ///
    /// # Errors
    /// The send error (e.g. `EMSGSIZE`).
    pub async fn send_zc_to(&self, buf: impl Into<SendBuf>, addr: SocketAddr) -> Result<usize> {
        let fd = self.fd.clone();
        let buf = buf.into();
        let op = Op::start(|d, t| d.send_zc_to(&fd, buf, addr, t).map(Some))?;
        sent_result(op.next().await)
    }

    /// Sends `buf` as one datagram to the connected peer ([`UdpSocket::connect`]).
    ///
    /// # Errors
    /// The send error (e.g. `EDESTADDRREQ` when not connected).
    pub async fn send_zc(&self, buf: impl Into<SendBuf>) -> Result<usize> {
        let fd = self.fd.clone();
        let buf = buf.into();
        let op = Op::start(|d, t| d.send_zc(&fd, buf, t).map(Some))?;
        sent_result(op.next().await)
    }
}

/// What a datagram receive's event means to the caller.
fn datagram_result(event: Event) -> Result<Datagram> {
    match event {
        Event::Datagram(d) => Ok(d),
        Event::Error(e) => Err(e),
        // A socket shut down for reading receives nothing more.
        Event::Eof => Err(Error::from_errno("recvmsg", libc::ESHUTDOWN)),
        other => unreachable!("recvmsg: {other:?}"),
    }
}

fn sent_result(event: Event) -> Result<usize> {
    match event {
        Event::Sent { result, .. } => result,
        Event::Error(e) => Err(e),
        other => unreachable!("send: {other:?}"),
    }
}

/// The datagrams of a multishot receive ([`UdpSocket::recv_stream`]).
pub struct DatagramStream(MultishotEvents);

impl DatagramStream {
    /// The next datagram; `None` once the stream has ended (after its error was returned, or
    /// when the socket was shut down for reading).
    ///
    /// # Errors
    /// The receive error; the stream has ended then.
    pub async fn next(&mut self) -> Result<Option<Datagram>> {
        self.0.next(datagram_of).await
    }

    /// A datagram already received, without waiting (`None` if there is none now).
    ///
    /// # Errors
    /// As [`DatagramStream::next`].
    pub fn try_next(&mut self) -> Result<Option<Datagram>> {
        self.0.try_next(datagram_of)
    }
}

/// A file, read and written through registered memory ([`FixedBuf`](crate::FixedBuf): page
/// aligned, so `O_DIRECT` files work too). Each op takes the buffer and gives it back with the
/// result; dropping the future cancels the op, and the buffer is then freed by the runtime once
/// the kernel is done with it.
pub struct File {
    fd: Fd,
}

impl File {
    /// Wraps an open file.
    ///
    /// # Examples
    /// ```
    /// ringpool::rt::block_on(async {
    ///     let file = ringpool::rt::File::from(std::fs::File::open("Cargo.toml").unwrap());
    ///     let buf = ringpool::rt::fixed_buf(4096)?;
    ///     let (buf, n) = file.read_fixed(buf, 0..4096, 0).await;
    ///     assert!(n? > 0 && buf.starts_with(b"["));
    ///     Ok::<(), ringpool::Error>(())
    /// })??;
    /// # Ok::<(), ringpool::Error>(())
    /// ```
    pub fn from_fd(fd: Fd) -> File {
        File { fd }
    }

    /// Reads into `buf[range]` at `offset`; gives the buffer back with the bytes read.
    pub async fn read_fixed(
        &self,
        buf: crate::FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
    ) -> (crate::FixedBuf, Result<usize>) {
        self.fixed_io(buf, range, offset, false).await
    }

    /// Writes `buf[range]` at `offset`; gives the buffer back with the bytes written.
    pub async fn write_fixed(
        &self,
        buf: crate::FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
    ) -> (crate::FixedBuf, Result<usize>) {
        self.fixed_io(buf, range, offset, true).await
    }

    async fn fixed_io(
        &self,
        buf: crate::FixedBuf,
        range: std::ops::Range<usize>,
        offset: u64,
        write: bool,
    ) -> (crate::FixedBuf, Result<usize>) {
        // A range outside the buffer is refused before the buffer is handed over.
        if range.start > range.end || range.end > buf.len() {
            let err = Error::InvalidArgument {
                what: "a range outside the registered buffer",
            };
            return (buf, Err(err));
        }
        let fd = self.fd.clone();
        let op = Op::start(|d, t| {
            if write {
                d.write_fixed(&fd, buf, range, offset, t).map(Some)
            } else {
                d.read_fixed(&fd, buf, range, offset, t).map(Some)
            }
        })
        .expect("the range was checked above, the only way these ops fail to start");
        match op.next().await {
            Event::FixedIo { buf, result } => (buf, result),
            other => unreachable!("fixed I/O: {other:?}"),
        }
    }
}

impl From<std::fs::File> for File {
    fn from(f: std::fs::File) -> File {
        File::from_fd(Fd::from(std::os::fd::OwnedFd::from(f)))
    }
}

/// Registered memory on this thread's driver (plain memory where it cannot be registered:
/// [`Driver::fixed_buf_or_plain`]).
///
/// # Errors
/// As [`Driver::fixed_buf_or_plain`].
pub fn fixed_buf(len: usize) -> Result<crate::FixedBuf> {
    runtime().driver.borrow_mut().fixed_buf_or_plain(len)
}

/// One member of a [`lease_group`]: what it does with the leased bytes. A member only reads
/// them (no member can write into the lease), so any number run at once.
///
/// # Examples
/// ```no_run
/// # fn f(a: &ringpool::rt::TcpStream, b: &ringpool::rt::TcpStream, copy: &ringpool::rt::File) {
/// use ringpool::rt::LeaseMember;
/// let members = vec![LeaseMember::send_zc(a), LeaseMember::send(b), LeaseMember::write(copy, 0)];
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LeaseMember(MemberTarget);

#[derive(Debug, Clone)]
enum MemberTarget {
    Send(Fd),
    SendZc(Fd),
    Write(Fd, u64),
}

impl LeaseMember {
    /// Sends the leased bytes on `stream` plainly.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(s: &ringpool::rt::TcpStream) {
    /// let m = ringpool::rt::LeaseMember::send(s);
    /// # }
    /// ```
    pub fn send(stream: &TcpStream) -> LeaseMember {
        LeaseMember(MemberTarget::Send(stream.fd.clone()))
    }

    /// Sends the leased bytes on `stream` through the zero-copy policy (registered memory is
    /// named, so nothing is pinned per send); it holds the lease until the kernel's
    /// notification ([`LeaseGroup::holds`]).
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(s: &ringpool::rt::TcpStream) {
    /// let m = ringpool::rt::LeaseMember::send_zc(s);
    /// # }
    /// ```
    pub fn send_zc(stream: &TcpStream) -> LeaseMember {
        LeaseMember(MemberTarget::SendZc(stream.fd.clone()))
    }

    /// Writes the leased bytes to `file` at `offset` (`WRITE_FIXED` on registered memory).
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(copy: &ringpool::rt::File) {
    /// let m = ringpool::rt::LeaseMember::write(copy, 4096);
    /// # }
    /// ```
    pub fn write(file: &File, offset: u64) -> LeaseMember {
        LeaseMember(MemberTarget::Write(file.fd.clone(), offset))
    }

    fn member(&self, token: u64) -> crate::Member {
        match &self.0 {
            MemberTarget::Send(fd) => crate::Member::send(fd, token),
            MemberTarget::SendZc(fd) => crate::Member::send_zc(fd, token),
            MemberTarget::Write(fd, offset) => crate::Member::write(fd, *offset, token),
        }
    }
}

/// Reads `file` at `offset` into `buf` once and lends what it read, read-only, to every member
/// at once ([`Driver::lease_group`] on this thread's driver): one file chunk to many sockets
/// or files, read once, no copy. The [`LeaseGroup`] gives the leader's result, each member's
/// result, and the buffer back after the last member (and its zero-copy notification) let go.
///
/// - Members start only after the leader succeeded (a read of 0 bytes at the end of the file
///   succeeds: members then send nothing); a failed leader cancels every member
///   ([`Error::Cancelled`]) and the buffer comes back at once.
/// - One member's failure does not end the others.
/// - After a short read, members send only the bytes read; the rest of the buffer is zeroed.
/// - **Dropping the group before its buffer came back cancels it**: the leader if it is still
///   reading, else every member still running. The driver keeps the buffer until the kernel
///   is done with it; the runtime then frees it.
///
/// # Errors
/// As [`Driver::lease_group`] (a buffer over 4 GiB); `buf` is dropped then.
///
/// # Examples
/// ```
/// use ringpool::rt::{self, File, LeaseMember, TcpStream};
/// use ringpool::Fd;
/// use std::io::Read;
///
/// let (a, mut peer_a) = std::os::unix::net::UnixStream::pair().unwrap();
/// let (b, mut peer_b) = std::os::unix::net::UnixStream::pair().unwrap();
/// rt::block_on(async move {
///     let file = File::from(std::fs::File::open("Cargo.toml").unwrap());
///     let a = TcpStream::from_fd(Fd::from(std::os::fd::OwnedFd::from(a)));
///     let b = TcpStream::from_fd(Fd::from(std::os::fd::OwnedFd::from(b)));
///     let members = vec![LeaseMember::send(&a), LeaseMember::send_zc(&b)];
///     let group = rt::lease_group(&file, rt::fixed_buf(64)?, 0, members)?;
///     assert_eq!(group.filled().await?, 64); // read once
///     assert_eq!(group.member(0).await?, 64); // sent twice
///     assert_eq!(group.member(1).await?, 64);
///     let buf = group.returned().await; // back for the next chunk
///     assert_eq!(buf.len(), 64);
///     Ok::<(), ringpool::Error>(())
/// })??;
/// let (mut x, mut y) = ([0u8; 64], [0u8; 64]);
/// peer_a.read_exact(&mut x).unwrap();
/// peer_b.read_exact(&mut y).unwrap();
/// assert_eq!(x, y);
/// # Ok::<(), ringpool::Error>(())
/// ```
pub fn lease_group(
    file: &File,
    buf: crate::FixedBuf,
    offset: u64,
    members: Vec<LeaseMember>,
) -> Result<LeaseGroup> {
    let rt = runtime();
    // The group's token (LeaseFilled, LeaseReturned), then one per member.
    let token = rt.tokens(1 + members.len() as u64);
    let driver_members = members
        .iter()
        .zip(token + 1..)
        .map(|(m, t)| m.member(t))
        .collect();
    let started = rt
        .driver
        .borrow_mut()
        .lease_group(&file.fd, buf, offset, driver_members, token);
    match started {
        Ok(leader) => Ok(LeaseGroup {
            token,
            members: members.len(),
            leader,
            rt: Rc::downgrade(&rt),
            leader_result: RefCell::new(Part::Waiting),
            buf: RefCell::new(Part::Waiting),
            waiters: RefCell::default(),
        }),
        Err(e) => {
            let mut ops = rt.ops.borrow_mut();
            for t in token..=token + members.len() as u64 {
                ops.remove(&t);
            }
            Err(e)
        }
    }
}

/// A part of a [`LeaseGroup`] handed out once.
enum Part<T> {
    Waiting,
    Ready(T),
    Taken,
}

impl<T> Part<T> {
    fn take(&mut self, what: &str) -> Option<T> {
        match std::mem::replace(self, Part::Taken) {
            Part::Ready(v) => Some(v),
            Part::Waiting => {
                *self = Part::Waiting;
                None
            }
            Part::Taken => panic!("LeaseGroup: {what} was already taken"),
        }
    }
}

/// A lease group started by [`lease_group`]: its awaitable parts are the leader's result
/// ([`filled`](LeaseGroup::filled)), each member's result ([`member`](LeaseGroup::member)) and
/// the buffer ([`returned`](LeaseGroup::returned)). Each is handed out once, in any order,
/// and may be awaited from different tasks (share the group in an `Rc`).
///
/// **Dropping the group before its buffer came back cancels what still runs** (the leader,
/// or the members still holding the lease). The kernel's late completions are then dropped
/// by the runtime, and the buffer is freed once the kernel let go of it: nothing leaks, and
/// no memory the kernel may touch is freed early.
///
/// # Examples
/// ```no_run
/// # async fn f(file: &ringpool::rt::File, members: Vec<ringpool::rt::LeaseMember>) -> ringpool::Result<()> {
/// let group = ringpool::rt::lease_group(file, ringpool::rt::fixed_buf(1 << 20)?, 0, members)?;
/// let n = group.filled().await?;
/// for i in 0..group.len() {
///     if let Err(e) = group.member(i).await {
///         eprintln!("member {i}: {e}");
///     }
/// }
/// let buf = group.returned().await; // every member let go: read the next chunk into it
/// # Ok(()) }
/// ```
#[must_use = "dropping a lease group cancels it"]
pub struct LeaseGroup {
    /// The group's token; member `i` has `token + 1 + i`.
    token: u64,
    members: usize,
    leader: OpId,
    /// The runtime that started the group: the only one it touches.
    rt: Weak<Runtime>,
    /// What the group's token delivered: the leader's result, then the buffer.
    leader_result: RefCell<Part<Result<usize>>>,
    buf: RefCell<Part<crate::FixedBuf>>,
    /// Tasks awaiting the leader or the buffer (one token, one waker slot in the runtime:
    /// whoever takes the token's events wakes the others).
    waiters: RefCell<Vec<Waker>>,
}

impl LeaseGroup {
    /// How many members the group has.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(g: &ringpool::rt::LeaseGroup) {
    /// let all_done = (0..g.len()).all(|i| !g.holds(i));
    /// # }
    /// ```
    pub fn len(&self) -> usize {
        self.members
    }

    /// Whether the group has no member (its leader still reads).
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(g: &ringpool::rt::LeaseGroup) {
    /// assert_eq!(g.is_empty(), g.len() == 0);
    /// # }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.members == 0
    }

    /// The leader's result: the bytes read into the buffer (0 at end of file; members then
    /// send nothing), or its error, in which case every member was cancelled.
    ///
    /// # Errors
    /// The read's error.
    ///
    /// # Panics
    /// If the result was already taken.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(g: ringpool::rt::LeaseGroup) -> ringpool::Result<()> {
    /// let eof = g.filled().await? == 0;
    /// # Ok(()) }
    /// ```
    pub async fn filled(&self) -> Result<usize> {
        std::future::poll_fn(|cx| {
            self.poll_group(cx, |g| {
                g.leader_result.borrow_mut().take("the leader's result")
            })
        })
        .await
        .unwrap_or(Err(Error::RuntimeGone))
    }

    /// The buffer, once the leader failed or the last member (and its zero-copy notification)
    /// let go of it. Awaiting it does not need the other results to have been taken.
    ///
    /// # Panics
    /// If the buffer was already taken, or the runtime that started the group has ended (it
    /// was returned out of its `rt::block_on`; the buffer went with that runtime's driver).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(g: ringpool::rt::LeaseGroup) {
    /// let buf = g.returned().await;
    /// # }
    /// ```
    pub async fn returned(&self) -> crate::FixedBuf {
        std::future::poll_fn(|cx| self.poll_group(cx, |g| g.buf.borrow_mut().take("the buffer")))
            .await
            .expect("LeaseGroup::returned awaited after the runtime that started the group ended")
    }

    /// Member `i`'s result (in the order of the members given to [`lease_group`]): the bytes
    /// it sent or wrote. A zero-copy send's result comes when its bytes are queued; it may hold
    /// the lease until its notification ([`LeaseGroup::holds`]).
    ///
    /// # Errors
    /// The member's error; [`Error::Cancelled`] when its leader failed or it was cancelled
    /// (e.g. [`Driver::cancel_fd`] on its socket).
    ///
    /// # Panics
    /// If `i` is not a member, or its result was already taken.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn f(g: ringpool::rt::LeaseGroup) {
    /// for i in 0..g.len() {
    ///     match g.member(i).await {
    ///         Ok(n) => println!("member {i}: {n} bytes"),
    ///         Err(e) => println!("member {i}: {e}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn member(&self, i: usize) -> Result<usize> {
        assert!(i < self.members, "LeaseGroup: no member {i}");
        let token = self.token + 1 + i as u64;
        let event = std::future::poll_fn(|cx| {
            let Some(rt) = self.rt.upgrade() else {
                return Poll::Ready(Event::Error(Error::RuntimeGone));
            };
            let mut ops = rt.ops.borrow_mut();
            let state = ops
                .get_mut(&token)
                .expect("a live group has its members' states");
            if let Some(e) = state.events.pop_front() {
                return Poll::Ready(e);
            }
            assert!(
                !state.finished,
                "LeaseGroup: member {i}'s result was already taken"
            );
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        match event {
            Event::Sent { result, .. } | Event::Written { result } | Event::ReadInto { result } => {
                result
            }
            Event::Error(e) => Err(e),
            other => unreachable!("lease member: {other:?}"),
        }
    }

    /// Whether member `i` still holds the lease (its op, or a zero-copy send's notification,
    /// is not done): for finding the members a buffer waits for, such as a client that does
    /// not read.
    ///
    /// # Panics
    /// If `i` is not a member.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(g: &ringpool::rt::LeaseGroup) {
    /// let waiting_for: Vec<usize> = (0..g.len()).filter(|&i| g.holds(i)).collect();
    /// # }
    /// ```
    pub fn holds(&self, i: usize) -> bool {
        assert!(i < self.members, "LeaseGroup: no member {i}");
        let token = self.token + 1 + i as u64;
        self.rt
            .upgrade()
            .is_some_and(|rt| rt.ops.borrow().get(&token).is_some_and(|s| !s.finished))
    }

    /// Takes the group token's events into their parts, then `take`s one part: pending (and
    /// registered to be woken) while it has not come.
    fn poll_group<T>(
        &self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&Self) -> Option<T>,
    ) -> Poll<Option<T>> {
        let Some(rt) = self.rt.upgrade() else {
            return Poll::Ready(None);
        };
        let mut ops = rt.ops.borrow_mut();
        let state = ops
            .get_mut(&self.token)
            .expect("a live group has its state");
        let mut took = false;
        while let Some(event) = state.events.pop_front() {
            took = true;
            match event {
                Event::LeaseFilled { result, .. } => {
                    *self.leader_result.borrow_mut() = Part::Ready(result);
                }
                Event::LeaseReturned(buf) => *self.buf.borrow_mut() = Part::Ready(buf),
                other => unreachable!("lease group: {other:?}"),
            }
        }
        if let Some(v) = take(self) {
            state.waker = None;
            drop(ops);
            if took {
                self.waiters.borrow_mut().drain(..).for_each(Waker::wake);
            }
            return Poll::Ready(Some(v));
        }
        state.waker = Some(cx.waker().clone());
        drop(ops);
        let mut waiters = self.waiters.borrow_mut();
        if took {
            waiters.drain(..).for_each(Waker::wake);
        }
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for LeaseGroup {
    fn drop(&mut self) {
        // Its runtime ended: it cancelled the group, and its driver kept what the kernel held.
        let Some(rt) = self.rt.upgrade() else {
            return;
        };
        let mut ops = rt.ops.borrow_mut();
        // Late completions of these tokens are dropped by `route` from now on (a buffer that
        // comes back then is freed there).
        let done = ops.remove(&self.token).is_none_or(|s| s.finished);
        let running: Vec<u64> = (self.token + 1..=self.token + self.members as u64)
            .filter(|t| ops.remove(t).is_some_and(|s| !s.finished))
            .collect();
        drop(ops);
        if done {
            // The buffer came back: every member had let go.
            return;
        }
        let mut driver = rt.driver.borrow_mut();
        // Ignored once the leader completed; members it has not started yet end at once.
        driver.cancel(self.leader);
        for t in running {
            driver.cancel_token(t);
        }
    }
}

fn local_addr(fd: &Fd) -> Result<SocketAddr> {
    // SAFETY: a borrowed view of a live socket; `ManuallyDrop` keeps it from being closed here.
    let l = std::mem::ManuallyDrop::new(unsafe {
        <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd.as_raw_fd())
    });
    l.local_addr().map_err(Error::os("getsockname"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events as tags, to compare orders.
    fn tag(e: Event) -> u8 {
        match e {
            Event::Eof => 0,
            Event::Connected => 1,
            Event::Error(_) => 2,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_event_queue_keeps_the_order_across_its_inline_slot_and_its_deque() {
        let mut q = EventQueue::default();
        q.push_back(Event::Eof);
        q.push_back(Event::Connected);
        assert_eq!(q.pop_front().map(tag), Some(0));
        q.push_back(Event::Error(Error::Cancelled)); // behind the one still queued
        assert_eq!(q.pop_front().map(tag), Some(1));
        q.push_back(Event::Eof);
        assert_eq!(q.drain().map(tag).collect::<Vec<_>>(), [2, 0]);
        assert!(q.pop_front().is_none());
        q.push_back(Event::Connected); // empty again: inline
        assert!(q.first.is_some() && q.rest.is_empty());
    }
}
