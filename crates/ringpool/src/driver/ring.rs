//! The io_uring itself, with 16-byte completions (the default) or 32-byte ones (what
//! zero-copy receive needs: its completions carry where in the area the bytes are). Everything
//! else in the driver sees one ring type and one completion type.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, squeue, IoUring, SubmissionQueue, Submitter};

/// The driver's ring: 16-byte CQEs, or 32-byte ones (`IORING_SETUP_CQE32`).
pub(super) enum Ring {
    Narrow(IoUring),
    Wide(IoUring<squeue::Entry, cqueue::Entry32>),
}

/// A reaped CQE: what every completion handler reads. `big` is the second half of a 32-byte
/// CQE (zeros on a ring of 16-byte ones).
#[derive(Debug, Clone, Copy)]
pub(super) struct Cqe {
    pub(super) user_data: u64,
    pub(super) res: i32,
    pub(super) flags: u32,
    pub(super) big: [u64; 2],
}

impl Ring {
    pub(super) fn submission(&mut self) -> SubmissionQueue<'_, squeue::Entry> {
        match self {
            Ring::Narrow(r) => r.submission(),
            Ring::Wide(r) => r.submission(),
        }
    }

    pub(super) fn submitter(&self) -> Submitter<'_> {
        match self {
            Ring::Narrow(r) => r.submitter(),
            Ring::Wide(r) => r.submitter(),
        }
    }

    pub(super) fn submit(&self) -> std::io::Result<usize> {
        self.submitter().submit()
    }

    pub(super) fn submit_and_wait(&self, want: usize) -> std::io::Result<usize> {
        self.submitter().submit_and_wait(want)
    }

    /// Whether no CQE is waiting to be reaped.
    pub(super) fn completions_empty(&mut self) -> bool {
        match self {
            Ring::Narrow(r) => r.completion().is_empty(),
            Ring::Wide(r) => r.completion().is_empty(),
        }
    }

    /// Moves every waiting CQE into `out`.
    pub(super) fn reap_into(&mut self, out: &mut Vec<Cqe>) {
        match self {
            Ring::Narrow(r) => out.extend(r.completion().map(|c| Cqe {
                user_data: c.user_data(),
                res: c.result(),
                flags: c.flags(),
                big: [0; 2],
            })),
            Ring::Wide(r) => out.extend(r.completion().map(|c| Cqe {
                user_data: c.user_data(),
                res: c.result(),
                flags: c.flags(),
                big: *c.big_cqe(),
            })),
        }
    }

    /// Whether completions are 32 bytes (zero-copy receive can be registered).
    pub(super) fn wide(&self) -> bool {
        matches!(self, Ring::Wide(_))
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Ring::Narrow(r) => r.as_raw_fd(),
            Ring::Wide(r) => r.as_raw_fd(),
        }
    }
}
