//! An op's life in the table: its id ([`OpId`], the `user_data` of its SQEs), its slot, what it
//! owns until its final CQE (`OpKind`, each variant's payload owned by its capability's file),
//! and starting one (a user's op, or one of the driver's own).

use std::rc::Rc;

use io_uring::{squeue, types};

use crate::error::Error;
use crate::pool::GroupShared;

use super::fixed_io::FixedOp;
use super::group::ProvideOp;
use super::lease::{LeaderOp, LeaseReadOp, LeaseWriteOp};
use super::pipe_lease::PagesOp;
use super::recv::{ReadOp, RecvOp};
use super::send::SendOp;
use super::send_ring::BundleOp;
use super::socket::ConnectOp;
use super::splice::SpliceOp;
use super::udp::RecvMsgOp;
use super::zcrx::RecvZcOp;
use super::{Driver, Fd};

/// User data of CQEs nobody waits for (cancel requests, timeout removals). Such SQEs name no
/// memory. Its low half equals the fixed table's tag key: `reap` drops these CQEs before
/// `dispatch` looks for tags.
pub(super) const IGNORED: u64 = u64::MAX;

/// Identifies one op of one driver, for [`Driver::cancel`]. Stale ids (of finished ops) and ids
/// of another driver's ops are recognised and ignored: an id never reaches an op it does not
/// name.
///
/// # Examples
/// ```
/// use ringpool::{BufGroupConfig, Driver, Fd, RecvMode};
/// let (mut a, mut b) = (Driver::new(Default::default())?, Driver::new(Default::default())?);
/// let (ga, gb) = (a.buf_group(BufGroupConfig::new(512, 2))?, b.buf_group(BufGroupConfig::new(512, 2))?);
/// let (x, _px) = std::os::unix::net::UnixStream::pair().unwrap();
/// let (y, _py) = std::os::unix::net::UnixStream::pair().unwrap();
/// let (x, y) = (Fd::from(std::os::fd::OwnedFd::from(x)), Fd::from(std::os::fd::OwnedFd::from(y)));
/// let id_a = a.recv(&x, &ga, RecvMode::Multishot, 1)?;
/// let id_b = b.recv(&y, &gb, RecvMode::Multishot, 1)?;
/// assert_ne!(id_a, id_b);
/// b.cancel(id_a); // not b's op: nothing happens
/// assert_eq!(b.in_flight(), 1);
/// # Ok::<(), ringpool::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpId {
    /// The `user_data` of the op's SQEs: slab key and generation.
    pub(super) ud: u64,
    /// The driver's `ring_id` (never 0 for a real op).
    pub(super) driver: u64,
}

impl OpId {
    /// The id of completions that belong to no op of the user's (lease members that never
    /// started): it names nothing in any driver.
    pub(super) const NONE: OpId = OpId {
        ud: u64::MAX,
        driver: 0,
    };

    pub(super) fn new(key: usize, gen: u32, driver: u64) -> OpId {
        OpId {
            ud: user_data(key, gen),
            driver,
        }
    }
    pub(super) fn key(self) -> usize {
        (self.ud & 0xffff_ffff) as usize
    }
    pub(super) fn gen(self) -> u32 {
        (self.ud >> 32) as u32
    }
}

/// An op's failed result (a negative `res`) as an error: `ECANCELED` is [`Error::Cancelled`].
pub(super) fn errno_error(op: &'static str, res: i32) -> Error {
    if res == -libc::ECANCELED {
        Error::Cancelled
    } else {
        Error::from_errno(op, res)
    }
}

/// The `user_data` of an op's SQEs: its slab key in the low half, its generation in the high.
pub(super) fn user_data(key: usize, gen: u32) -> u64 {
    key as u64 | (gen as u64) << 32
}

/// What an op is, and what its slot owns until its final CQE (the ownership rule). Each
/// capability owns its payload type and the code that builds its SQE (routed by
/// [`Driver::arm`]) and handles its completions (routed by [`Driver::dispatch`]).
pub(super) enum OpKind {
    /// A stream receive selecting buffers ([`Driver::recv`], `recv.rs`).
    Recv(RecvOp),
    /// A read selecting a buffer ([`Driver::read`], `recv.rs`).
    Read(ReadOp),
    /// Datagram receives (`RECVMSG` selecting buffers, `udp.rs`).
    RecvMsg(RecvMsgOp),
    /// Accepts on a listener (`socket.rs`).
    Accept { fd: Fd },
    /// A connect (`socket.rs`).
    Connect(ConnectOp),
    /// A send in its socket's lane (`send.rs`).
    Send(Box<SendOp>),
    /// A read or write on registered memory (`fixed_io.rs`).
    Fixed(Box<FixedOp>),
    /// The leader of a lease group: a read into the buffer to lend (`lease.rs`).
    Leader(Box<LeaderOp>),
    /// A lease member writing the leased bytes (`lease.rs`).
    LeaseWrite(LeaseWriteOp),
    /// A send bundle: sends what a send ring holds, in order (`send_ring.rs`).
    SendBundle(BundleOp),
    /// A read-in lease member reading into its range of the buffer (`lease.rs`).
    LeaseRead(LeaseReadOp),
    /// A zero-copy receive into an area (`zcrx.rs`).
    RecvZc(RecvZcOp),
    /// A pages lease's leader or member: splices and tees through pipes (`pipe_lease.rs`).
    Pages(PagesOp),
    /// A splice stream: source to pipe to sink, chunk after chunk (`splice.rs`).
    Splice(Box<SpliceOp>),
    /// Internal: buffers provided to a legacy group (`group.rs`).
    Provide(ProvideOp),
    /// Internal: a legacy group's buffers taken back before its id is reused (`group.rs`).
    Remove { group: Rc<GroupShared> },
    /// Internal: the timeout op bounding a wait on kernels without `EXT_ARG` (`submit.rs`).
    Timeout { _ts: Box<types::Timespec> },
    /// Internal: the read of the eventfd that says buffers came back on another thread
    /// (`group.rs`).
    Wake { _counter: Box<u64> },
}

impl OpKind {
    /// The descriptor the op works on, if it is the user's op (internal ops have none; a send
    /// waiting only for its notifications has let go of its socket).
    pub(super) fn fd(&self) -> Option<&Fd> {
        match self {
            OpKind::Recv(op) => Some(&op.fd),
            OpKind::Read(op) => Some(&op.fd),
            OpKind::RecvMsg(op) => Some(&op.fd),
            OpKind::Accept { fd } => Some(fd),
            OpKind::Connect(op) => Some(&op.fd),
            OpKind::Send(op) => op.fd.as_ref(),
            OpKind::Fixed(op) => Some(&op.fd),
            OpKind::Leader(op) => Some(&op.fd),
            OpKind::LeaseWrite(op) => Some(&op.fd),
            OpKind::LeaseRead(op) => Some(&op.fd),
            OpKind::SendBundle(op) => Some(&op.fd),
            OpKind::RecvZc(op) => Some(&op.fd),
            OpKind::Pages(op) => Some(op.fd()),
            OpKind::Splice(op) => Some(&op.from),
            _ => None,
        }
    }

    /// Whether the op uses `fd`: its descriptor, or a splice stream's sink.
    pub(super) fn uses_fd(&self, fd: &Fd) -> bool {
        match self {
            OpKind::Splice(op) => op.from.same(fd) || op.sink().same(fd),
            other => other.fd().is_some_and(|f| f.same(fd)),
        }
    }

    /// Whether the op's current step is one the driver runs itself (`driver/inline.rs`)
    /// rather than an SQE.
    pub(super) fn runs_inline(&self) -> bool {
        match self {
            OpKind::Pages(op) => op.runs_inline(),
            OpKind::Splice(op) => op.runs_inline(),
            _ => false,
        }
    }

    /// The group an op selects buffers from in the kernel (receives and reads).
    pub(super) fn selecting_group(&self) -> Option<&Rc<GroupShared>> {
        match self {
            OpKind::Recv(op) => Some(&op.group),
            OpKind::Read(op) => Some(&op.group),
            OpKind::RecvMsg(op) => Some(&op.group),
            _ => None,
        }
    }

    /// The group an op uses, which stays registered while it does: the selecting ops, and the
    /// internal provides and removes.
    pub(super) fn group(&self) -> Option<&Rc<GroupShared>> {
        match self {
            OpKind::Provide(op) => Some(&op.group),
            OpKind::Remove { group } => Some(group),
            other => other.selecting_group(),
        }
    }
}

/// Where an op is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotState {
    /// The kernel has an SQE of this op.
    InKernel,
    /// Out of buffers; waiting for its group to be refilled.
    Parked,
    /// A send waiting in its socket's lane.
    Queued,
    /// A send whose result was reported, waiting for its zero-copy notifications.
    Notif,
    /// A splice or tee the driver runs itself before it next enters the kernel
    /// (`driver/inline.rs`): nothing of it is in the kernel.
    Inline,
}

/// An op's entry in the driver's table.
pub(super) struct OpSlot {
    /// The user's token (0 for internal ops).
    pub(super) token: u64,
    /// The generation in the op's `user_data` (a send's current attempt has its own).
    pub(super) gen: u32,
    pub(super) kind: OpKind,
    pub(super) state: SlotState,
    /// The user (or the driver's drop) asked to cancel it.
    pub(super) cancel: bool,
}

impl Driver {
    /// The next generation: a new op's, or a send attempt's.
    pub(super) fn next_gen(&mut self) -> u32 {
        self.gen = self.gen.wrapping_add(1);
        self.gen
    }

    /// Starts a user's op: a slot for it, then its SQE ([`Driver::arm`]).
    pub(super) fn start(&mut self, kind: OpKind, token: u64) -> OpId {
        let gen = self.next_gen();
        let key = self.ops.insert(OpSlot {
            token,
            gen,
            kind,
            state: SlotState::InKernel,
            cancel: false,
        });
        self.arm(key);
        OpId::new(key, gen, self.ring_id)
    }

    /// Starts an op of the driver's own (not the user's); returns its user data.
    pub(super) fn start_internal(&mut self, kind: OpKind, sqe: squeue::Entry) -> u64 {
        let gen = self.next_gen();
        let key = self.ops.insert(OpSlot {
            token: 0,
            gen,
            kind,
            state: SlotState::InKernel,
            cancel: false,
        });
        self.internal += 1;
        let ud = user_data(key, gen);
        self.push(sqe.user_data(ud));
        ud
    }

    /// The final CQE of an internal op arrived.
    pub(super) fn finish_internal(&mut self, key: usize) {
        self.ops.remove(key);
        self.internal -= 1;
    }
}

// An op's slot is one cache line: the table is walked by cancels and group reaping.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<OpSlot>() <= 64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_op_id_carries_its_key_and_generation() {
        for (key, gen) in [
            (0, 0),
            (1, 1),
            (0xffff_fffe, u32::MAX),
            (12345, 0x8000_0000),
        ] {
            let id = OpId::new(key, gen, 9);
            assert_eq!((id.key(), id.gen(), id.driver), (key, gen, 9));
            assert_eq!(id.ud, user_data(key, gen));
        }
    }

    #[test]
    fn no_op_id_is_the_ignored_user_data_or_a_tag() {
        // Slab keys stay below the tag key (0xffff_ffff), which IGNORED and tags use.
        let id = OpId::new(0xffff_fffe, u32::MAX, 1);
        assert_ne!(id.ud, IGNORED);
        assert_ne!(id.ud & crate::fixed::TAG_KEY, crate::fixed::TAG_KEY);
        assert_eq!(OpId::NONE.driver, 0);
    }
}
