//! Large reads of data already in the page cache, taken without copying it into a buffer:
//! how ([`ZeroCopy`]) and what comes back ([`Cached`]).

use super::mapped::Mapped;
use super::pipe::Pipe;

/// How a cached range is taken for an NBD reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Referenced in a pipe and spliced into the socket: the server copies nothing
    /// ([`crate::lun::pipe`]).
    Splice,
    /// Viewed in a mapping of the LUN and handed to `writev`: the server copies once
    /// ([`crate::lun::mapped`]).
    Map,
}

/// A cached range held without a copy.
#[derive(Debug)]
pub enum Cached {
    Pipe(Pipe),
    Mapped(Mapped),
}

impl Cached {
    /// Bytes held.
    pub fn len(&self) -> usize {
        match self {
            Cached::Pipe(p) => p.len(),
            Cached::Mapped(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
