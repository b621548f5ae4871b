//! Why a request's work was cancelled.

use std::fmt;

/// The reason a request context was cancelled.
///
/// The set is closed so that it can label metrics and logs; [`CancelReason::as_str`] gives the
/// stable snake-case name used in access logs (`abort_reason`) and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelReason {
    /// An HTTP/1 client closed its side of the connection (TCP FIN) with the request in flight.
    ClientClosed,
    /// An HTTP/1 client reset the connection (TCP RST).
    ClientReset,
    /// An HTTP/2 client reset this one stream (RST_STREAM).
    StreamReset,
    /// The HTTP/2 connection carrying the request was lost (GOAWAY with error, connection error,
    /// TCP close).
    ConnectionLost,
    /// The client stopped answering (keepalive probes, PING or write timeout) without closing.
    PeerDead,
    /// The request's deadline passed.
    Deadline,
    /// The server is shutting down and the drain grace period ended.
    Shutdown,
}

impl CancelReason {
    /// Every reason, in declaration order.
    pub const ALL: [CancelReason; 7] = [
        CancelReason::ClientClosed,
        CancelReason::ClientReset,
        CancelReason::StreamReset,
        CancelReason::ConnectionLost,
        CancelReason::PeerDead,
        CancelReason::Deadline,
        CancelReason::Shutdown,
    ];

    /// The stable label: `client_closed`, `client_reset`, `stream_reset`, `connection_lost`,
    /// `peer_dead`, `deadline` or `shutdown`.
    pub const fn as_str(self) -> &'static str {
        match self {
            CancelReason::ClientClosed => "client_closed",
            CancelReason::ClientReset => "client_reset",
            CancelReason::StreamReset => "stream_reset",
            CancelReason::ConnectionLost => "connection_lost",
            CancelReason::PeerDead => "peer_dead",
            CancelReason::Deadline => "deadline",
            CancelReason::Shutdown => "shutdown",
        }
    }

    /// True when the client went away (as opposed to a deadline or shutdown ending the work).
    pub const fn is_client_gone(self) -> bool {
        matches!(
            self,
            CancelReason::ClientClosed
                | CancelReason::ClientReset
                | CancelReason::StreamReset
                | CancelReason::ConnectionLost
                | CancelReason::PeerDead
        )
    }

    /// Maps an I/O error seen on a client connection to the reason it implies.
    pub fn from_io_error(err: &std::io::Error) -> CancelReason {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                CancelReason::ClientReset
            }
            ErrorKind::TimedOut => CancelReason::PeerDead,
            _ => CancelReason::ClientClosed,
        }
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Returned by cancel-aware operations when the request context fired first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request cancelled: {reason}")]
pub struct Cancelled {
    /// Why the context was cancelled.
    pub reason: CancelReason,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_stable_and_distinct() {
        let labels: Vec<_> = CancelReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "client_closed",
                "client_reset",
                "stream_reset",
                "connection_lost",
                "peer_dead",
                "deadline",
                "shutdown"
            ]
        );
    }

    #[test]
    fn io_errors_map_to_reasons() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            CancelReason::from_io_error(&Error::from(ErrorKind::ConnectionReset)),
            CancelReason::ClientReset
        );
        assert_eq!(
            CancelReason::from_io_error(&Error::from(ErrorKind::TimedOut)),
            CancelReason::PeerDead
        );
        assert_eq!(
            CancelReason::from_io_error(&Error::from(ErrorKind::UnexpectedEof)),
            CancelReason::ClientClosed
        );
    }
}
