//! The request context: a cancellation token that knows why it fired, and a deadline.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::reason::{CancelReason, Cancelled};

/// A point in time by which a request must be answered, with the budget it was given.
///
/// Keeping the original budget next to the instant lets logs and headers say both "how long was
/// allowed" and "how long is left".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Deadline {
        Deadline::starting_at(Instant::now(), budget)
    }

    /// A deadline `budget` after `start`.
    pub fn starting_at(start: Instant, budget: Duration) -> Deadline {
        Deadline {
            at: start + budget,
            budget,
        }
    }

    /// The instant the deadline passes.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The budget this deadline was created with.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Time left before the deadline, zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// True once the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Deadline) -> Deadline {
        if other.at < self.at { other } else { self }
    }
}

/// When and why a context was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cause {
    /// Why.
    pub reason: CancelReason,
    /// When the cancellation was signalled (the moment tether learned of it).
    pub at: Instant,
}

/// An opaque request identifier carried by the context and written to logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// Wraps an identifier received from a trusted peer or made by the caller.
    pub fn new(id: impl Into<Arc<str>>) -> RequestId {
        RequestId(id.into())
    }

    /// Makes a fresh identifier: 16 hex digits from the clock and a process-wide counter, unique
    /// within a process and unlikely to collide across processes.
    pub fn generate() -> RequestId {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SEED: OnceLock<u64> = OnceLock::new();
        let seed = *SEED.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos ^ (u64::from(std::process::id()) << 32)
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // splitmix64 scrambles the sequence so ids do not look consecutive.
        let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Hex by hand: this runs once per request, and `format!` costs a formatter pass.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 16];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = HEX[((z >> (60 - 4 * i)) & 0xf) as usize];
        }
        RequestId(Arc::from(std::str::from_utf8(&buf).unwrap_or_default()))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier as a shared string (no copy).
    pub fn as_arc(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Request-scoped cancellation: a token that carries its [`CancelReason`], an optional
/// [`Deadline`] and a [`RequestId`].
///
/// Cloning is cheap and every clone observes the same cancellation. A [child](Self::child) is
/// cancelled with its parent (and reports the parent's reason) but can be cancelled alone, and may
/// carry a shorter deadline.
#[derive(Clone)]
pub struct RequestContext {
    inner: Arc<Inner>,
}

struct Inner {
    token: CancellationToken,
    cause: OnceLock<Cause>,
    parent: Option<RequestContext>,
    deadline: Option<Deadline>,
    id: RequestId,
}

impl fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestContext")
            .field("id", &self.inner.id)
            .field("deadline", &self.inner.deadline)
            .field("cause", &self.cause())
            .finish()
    }
}

impl RequestContext {
    /// A new root context with a generated id and no deadline.
    pub fn new() -> RequestContext {
        RequestContext::with_id(RequestId::generate())
    }

    /// A new root context with the given id and no deadline.
    pub fn with_id(id: RequestId) -> RequestContext {
        RequestContext {
            inner: Arc::new(Inner {
                token: CancellationToken::new(),
                cause: OnceLock::new(),
                parent: None,
                deadline: None,
                id,
            }),
        }
    }

    /// A child context: cancelled whenever this one is, with the same id and deadline.
    pub fn child(&self) -> RequestContext {
        self.child_inner(self.inner.deadline, self.inner.id.clone())
    }

    /// A child context whose deadline is the earlier of this context's and `deadline`. A child can
    /// shorten the time left, never extend it.
    pub fn child_with_deadline(&self, deadline: Deadline) -> RequestContext {
        let d = match self.inner.deadline {
            Some(mine) => mine.min(deadline),
            None => deadline,
        };
        self.child_inner(Some(d), self.inner.id.clone())
    }

    /// A child context with another request id (for a sub-request made on this request's behalf).
    pub fn child_with_id(&self, id: RequestId) -> RequestContext {
        self.child_inner(self.inner.deadline, id)
    }

    fn child_inner(&self, deadline: Option<Deadline>, id: RequestId) -> RequestContext {
        RequestContext {
            inner: Arc::new(Inner {
                token: self.inner.token.child_token(),
                cause: OnceLock::new(),
                parent: Some(self.clone()),
                deadline,
                id,
            }),
        }
    }

    /// The request id.
    pub fn id(&self) -> &RequestId {
        &self.inner.id
    }

    /// The deadline, if one is set.
    pub fn deadline(&self) -> Option<Deadline> {
        self.inner.deadline
    }

    /// Time left before the deadline; `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner.deadline.map(|d| d.remaining())
    }

    /// Cancels this context (and its children) with `reason`. The first cause wins: returns
    /// false, changing nothing, if the context was already cancelled.
    pub fn cancel(&self, reason: CancelReason) -> bool {
        if self.inner.token.is_cancelled() {
            return false;
        }
        let cause = Cause {
            reason,
            at: Instant::now(),
        };
        if self.inner.cause.set(cause).is_err() {
            return false;
        }
        self.inner.token.cancel();
        true
    }

    /// True once the context was cancelled, by itself or through a parent. A passed deadline
    /// counts only once someone observed it (see [`cancelled`](Self::cancelled) and
    /// [`check`](Self::check)).
    pub fn is_cancelled(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// Why and when the context was cancelled; `None` while it is live.
    pub fn cause(&self) -> Option<Cause> {
        self.cancelled_cause().flatten()
    }

    /// `None` while the context is live; once it is cancelled, its cause, or its parent's, or
    /// `None` when no one gave one (a token cancelled directly). Looks at the token (which takes
    /// its lock) only when this context has no cause of its own.
    fn cancelled_cause(&self) -> Option<Option<Cause>> {
        if let Some(c) = self.inner.cause.get() {
            return Some(Some(*c));
        }
        if !self.inner.token.is_cancelled() {
            return None;
        }
        Some(self.inner.parent.as_ref().and_then(|p| p.cause()))
    }

    /// Why the context was cancelled; `None` while it is live.
    pub fn reason(&self) -> Option<CancelReason> {
        self.cause().map(|c| c.reason)
    }

    /// `Err(Cancelled)` if the context was cancelled or its deadline has passed (which cancels it
    /// with [`CancelReason::Deadline`]). Cheap enough for a tight loop of blocking work.
    pub fn check(&self) -> Result<(), Cancelled> {
        if let Some(d) = self.inner.deadline
            && d.is_expired()
        {
            self.cancel(CancelReason::Deadline);
        }
        match self.cancelled_cause() {
            None => Ok(()),
            // Shutdown when the token was cancelled with no reason given.
            Some(cause) => Err(Cancelled {
                reason: cause.map_or(CancelReason::Shutdown, |c| c.reason),
            }),
        }
    }

    /// Completes when the context is cancelled or its deadline passes, and returns the reason.
    ///
    /// Cancel safe: dropping it has no effect.
    pub async fn cancelled(&self) -> CancelReason {
        match self.inner.deadline {
            Some(d) => {
                tokio::select! {
                    // An explicit cancellation wins over a deadline that passes at the same time.
                    biased;
                    _ = self.inner.token.cancelled() => {}
                    _ = tokio::time::sleep_until(d.at()) => { self.cancel(CancelReason::Deadline); }
                }
            }
            None => self.inner.token.cancelled().await,
        }
        self.reason().unwrap_or(CancelReason::Shutdown)
    }

    /// A future that completes when the token is cancelled, ignoring the deadline. For poll-based
    /// code (body wrappers) that manages deadline timers itself.
    pub fn token_cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.inner.token.cancelled()
    }

    /// An owned handle on the underlying token, for code that only needs the signal.
    pub fn token(&self) -> CancellationToken {
        self.inner.token.clone()
    }

    /// Runs `fut` until it completes or the context is cancelled (or its deadline passes),
    /// whichever comes first. On cancellation `fut` is dropped.
    pub async fn run<F: Future>(&self, fut: F) -> Result<F::Output, Cancelled> {
        tokio::select! {
            // Cancellation first: once cancelled, a ready result is still discarded so that work
            // never continues on a request that is gone.
            biased;
            reason = self.cancelled() => Err(Cancelled { reason }),
            out = fut => Ok(out),
        }
    }

    /// A guard that cancels this context with `reason` when dropped, unless
    /// [disarmed](CancelOnDrop::disarm). Turns "the future owning this was dropped" into a
    /// cancellation with a reason.
    pub fn cancel_on_drop(&self, reason: CancelReason) -> CancelOnDrop {
        CancelOnDrop {
            ctx: Some(self.clone()),
            reason,
        }
    }
}

impl Default for RequestContext {
    fn default() -> Self {
        RequestContext::new()
    }
}

/// Cancels a [`RequestContext`] when dropped; see [`RequestContext::cancel_on_drop`].
#[derive(Debug)]
pub struct CancelOnDrop {
    ctx: Option<RequestContext>,
    reason: CancelReason,
}

impl CancelOnDrop {
    /// Changes the reason used if the guard is dropped armed.
    pub fn set_reason(&mut self, reason: CancelReason) {
        self.reason = reason;
    }

    /// Drops the guard without cancelling.
    pub fn disarm(mut self) {
        self.ctx = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            ctx.cancel(self.reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let ctx = RequestContext::new();
        assert!(ctx.cancel(CancelReason::ClientReset));
        assert!(!ctx.cancel(CancelReason::Deadline));
        assert_eq!(ctx.reason(), Some(CancelReason::ClientReset));
    }

    #[test]
    fn child_reports_parent_reason_and_can_cancel_alone() {
        let parent = RequestContext::new();
        let a = parent.child();
        let b = parent.child();
        assert!(a.cancel(CancelReason::StreamReset));
        assert!(!parent.is_cancelled());
        assert!(!b.is_cancelled());
        parent.cancel(CancelReason::ConnectionLost);
        assert_eq!(b.reason(), Some(CancelReason::ConnectionLost));
        assert_eq!(a.reason(), Some(CancelReason::StreamReset));
    }

    #[tokio::test(start_paused = true)]
    async fn check_reports_each_way_of_being_cancelled() {
        let reason = |ctx: &RequestContext| ctx.check().err().map(|c| c.reason);
        let parent = RequestContext::new();
        let own = parent.child();
        let through_parent = parent.child();
        assert_eq!(reason(&own), None);
        own.cancel(CancelReason::StreamReset);
        assert_eq!(reason(&own), Some(CancelReason::StreamReset));
        assert_eq!(reason(&through_parent), None);
        parent.cancel(CancelReason::ConnectionLost);
        assert_eq!(reason(&through_parent), Some(CancelReason::ConnectionLost));
        assert_eq!(reason(&own), Some(CancelReason::StreamReset));
        // A token cancelled with no reason given (by code holding only the token).
        let bare = RequestContext::new();
        let child = bare.child();
        bare.token().cancel();
        assert_eq!(reason(&child), Some(CancelReason::Shutdown));
        // A deadline that passed is found by the check itself.
        let timed =
            RequestContext::new().child_with_deadline(Deadline::after(Duration::from_millis(50)));
        assert_eq!(reason(&timed), None);
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(reason(&timed), Some(CancelReason::Deadline));
        assert!(timed.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn child_deadline_only_shortens() {
        let parent =
            RequestContext::new().child_with_deadline(Deadline::after(Duration::from_secs(1)));
        let longer = parent.child_with_deadline(Deadline::after(Duration::from_secs(5)));
        assert_eq!(longer.deadline(), parent.deadline());
        let shorter = parent.child_with_deadline(Deadline::after(Duration::from_millis(100)));
        assert_eq!(shorter.remaining(), Some(Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_cancels_with_reason() {
        let ctx =
            RequestContext::new().child_with_deadline(Deadline::after(Duration::from_millis(300)));
        let started = Instant::now();
        let out = ctx.run(std::future::pending::<()>()).await;
        assert_eq!(
            out,
            Err(Cancelled {
                reason: CancelReason::Deadline
            })
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert!(ctx.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn run_returns_output_when_live() {
        let ctx = RequestContext::new();
        assert_eq!(ctx.run(async { 7 }).await, Ok(7));
    }

    #[test]
    fn drop_guard_cancels_unless_disarmed() {
        let ctx = RequestContext::new();
        ctx.cancel_on_drop(CancelReason::ClientClosed).disarm();
        assert!(!ctx.is_cancelled());
        drop(ctx.cancel_on_drop(CancelReason::StreamReset));
        assert_eq!(ctx.reason(), Some(CancelReason::StreamReset));
    }

    #[test]
    fn generated_ids_differ() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 16);
        assert!(
            a.as_str()
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
}
