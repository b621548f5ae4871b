//! Work bounded by a request: spawned tasks, blocking CPU work, and cleanup after cancellation.
//!
//! A handler future is dropped when its client leaves, but what it started is not: a
//! `tokio::spawn`ed task or a `spawn_blocking` closure keeps running until it finishes. The
//! functions here tie such work to a [`RequestContext`]:
//!
//! | function | when the context fires |
//! |---|---|
//! | [`spawn`] | the task's future is dropped at its next poll (it never runs again) |
//! | [`spawn_blocking`] | the closure sees it at its next [`CancelCheck::check`] and returns |
//! | [`RequestContext::run_with_cleanup`] | the future is dropped, then a cleanup future runs for at most a window |
//! | [`detached`] | nothing: an explicit opt-out for work that must finish |
//!
//! Threads cannot be interrupted: blocking work stops only where it checks. Check often enough
//! that the gap between checks is small against the latency you want (a few milliseconds).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::context::{Deadline, RequestContext};
use crate::reason::{CancelReason, Cancelled};

/// Spawns `fut` on the Tokio runtime, bounded by `ctx`: when the context is cancelled (or its
/// deadline passes) the future is dropped inside the task and the handle resolves to
/// `Err(Cancelled)`.
///
/// Dropping the handle does **not** stop the task (as with Tokio's `JoinHandle`); the context
/// does. Use [`WorkHandle::abort`] to stop it without cancelling the context.
///
/// # Panics
/// Outside a Tokio runtime, like `tokio::spawn`. Awaiting the handle resumes a panic of the task.
pub fn spawn<F>(ctx: &RequestContext, fut: F) -> WorkHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let task_ctx = ctx.clone();
    let handle = tokio::spawn(async move { task_ctx.run(fut).await });
    WorkHandle {
        handle,
        ctx: ctx.clone(),
    }
}

/// Spawns `fut` with no context at all: it runs to completion even if the request that started it
/// is cancelled. Use it for work that must finish (writing an audit record, releasing a lease),
/// and make the choice visible in the code.
///
/// # Panics
/// Outside a Tokio runtime, like `tokio::spawn`.
pub fn detached<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(fut)
}

/// Runs blocking `work` on Tokio's blocking pool. The closure receives a [`CancelCheck`] to call
/// between units of work; returning its error with `?` ends the work early.
///
/// The handle resolves as soon as the context fires (the awaiting handler need not wait for the
/// thread); the closure itself stops at its next check. [`BlockingHandle::stopped`] waits for the
/// closure to return.
///
/// ```
/// # use tether::{RequestContext, work};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tether::Cancelled> {
/// let ctx = RequestContext::new();
/// let sum = work::spawn_blocking(&ctx, |check| {
///     let mut sum = 0u64;
///     for i in 0..1_000_000u64 {
///         if i % 10_000 == 0 {
///             check.check()?;
///         }
///         sum += i;
///     }
///     Ok(sum)
/// })
/// .await?;
/// assert_eq!(sum, 499_999_500_000);
/// # Ok(()) }
/// ```
///
/// # Panics
/// Outside a Tokio runtime. Awaiting the handle resumes a panic of the closure.
pub fn spawn_blocking<F, T>(ctx: &RequestContext, work: F) -> BlockingHandle<T>
where
    F: FnOnce(CancelCheck) -> Result<T, Cancelled> + Send + 'static,
    T: Send + 'static,
{
    let check = CancelCheck { ctx: ctx.clone() };
    let handle = tokio::task::spawn_blocking(move || {
        // Do not start work for a request that is already gone.
        check.check()?;
        work(check)
    });
    let ctx = ctx.clone();
    let cancelled = Box::pin(async move { ctx.cancelled().await });
    BlockingHandle {
        handle: Some(handle),
        cancelled,
    }
}

/// A cheap cooperative cancellation check for blocking code; see [`spawn_blocking`].
///
/// One check is an atomic load, plus a clock read when the context has a deadline.
#[derive(Clone, Debug)]
pub struct CancelCheck {
    ctx: RequestContext,
}

impl CancelCheck {
    /// A check bound to `ctx`, for blocking code started some other way.
    pub fn new(ctx: &RequestContext) -> CancelCheck {
        CancelCheck { ctx: ctx.clone() }
    }

    /// `Err(Cancelled)` once the context was cancelled or its deadline passed.
    pub fn check(&self) -> Result<(), Cancelled> {
        self.ctx.check()
    }

    /// True once the context was cancelled or its deadline passed.
    pub fn is_cancelled(&self) -> bool {
        self.ctx.check().is_err()
    }

    /// The context the check is bound to.
    pub fn context(&self) -> &RequestContext {
        &self.ctx
    }
}

/// The handle of a task started by [`spawn`]. Awaiting it gives the task's output, or
/// `Err(Cancelled)` if the context fired first.
pub struct WorkHandle<T> {
    handle: JoinHandle<Result<T, Cancelled>>,
    ctx: RequestContext,
}

impl<T> WorkHandle<T> {
    /// Stops the task without cancelling the context; awaiting the handle then returns
    /// `Err(Cancelled)` with the context's reason, or [`CancelReason::Shutdown`] if it is live.
    pub fn abort(&self) {
        self.handle.abort();
    }

    /// True once the task has finished (completed, cancelled or aborted).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl<T> fmt::Debug for WorkHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkHandle")
            .field("ctx", &self.ctx)
            .field("finished", &self.handle.is_finished())
            .finish()
    }
}

impl<T> Future for WorkHandle<T> {
    type Output = Result<T, Cancelled>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.handle).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(out)) => Poll::Ready(out),
            Poll::Ready(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Aborted by the caller or by a runtime shutting down.
            Poll::Ready(Err(_)) => Poll::Ready(Err(Cancelled {
                reason: self.ctx.reason().unwrap_or(CancelReason::Shutdown),
            })),
        }
    }
}

/// The handle of blocking work started by [`spawn_blocking`].
pub struct BlockingHandle<T> {
    handle: Option<JoinHandle<Result<T, Cancelled>>>,
    cancelled: Pin<Box<dyn Future<Output = CancelReason> + Send>>,
}

impl<T> BlockingHandle<T> {
    /// Waits for the closure itself to return (it returns at its next check once the context has
    /// fired), and gives its result. Use it when the thread holds something that must be released
    /// before going on.
    pub async fn stopped(mut self) -> Result<T, Cancelled> {
        match self.handle.take() {
            Some(h) => join(h.await),
            None => Err(Cancelled {
                reason: CancelReason::Shutdown,
            }),
        }
    }
}

fn join<T>(r: Result<Result<T, Cancelled>, tokio::task::JoinError>) -> Result<T, Cancelled> {
    match r {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Cancelled {
            reason: CancelReason::Shutdown,
        }),
    }
}

impl<T> fmt::Debug for BlockingHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingHandle")
            .field(
                "finished",
                &self.handle.as_ref().is_none_or(|h| h.is_finished()),
            )
            .finish()
    }
}

impl<T> Future for BlockingHandle<T> {
    type Output = Result<T, Cancelled>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(handle) = self.handle.as_mut() else {
            return Poll::Ready(Err(Cancelled {
                reason: CancelReason::Shutdown,
            }));
        };
        // The result first: work that finished just as the context fired still counts.
        if let Poll::Ready(r) = Pin::new(handle).poll(cx) {
            self.handle = None;
            return Poll::Ready(join(r));
        }
        match self.cancelled.as_mut().poll(cx) {
            Poll::Ready(reason) => {
                // The thread goes on until its next check; nobody waits for it.
                self.handle = None;
                Poll::Ready(Err(Cancelled { reason }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What a cleanup started by [`RequestContext::run_with_cleanup`] is given.
#[derive(Debug)]
#[non_exhaustive]
pub struct Cleanup {
    /// Why the work was abandoned: the context's reason, or `None` when the future was dropped by
    /// its owner while the context was still live.
    pub reason: Option<CancelReason>,
    /// A fresh context with the same request id and a deadline at the end of the cleanup window.
    /// Bound outbound calls made during cleanup by it.
    pub ctx: RequestContext,
}

impl RequestContext {
    /// Runs `fut` like [`run`](Self::run); if the work is abandoned, runs `cleanup` for at most
    /// `window` to release resources or record partial results.
    ///
    /// The work is abandoned when the context fires (cancelled or deadline) or when this future is
    /// dropped before `fut` completed, which is what happens to a handler whose client left. The
    /// cleanup then runs **on its own task**, so it survives the handler being dropped; it gets a
    /// [`Cleanup`] with the reason and a fresh context whose deadline ends the window, and is
    /// dropped when the window ends. When the context fired while this future was being polled,
    /// the call waits for the cleanup before returning `Err(Cancelled)`. When `fut` completes,
    /// `cleanup` is never called.
    ///
    /// ```
    /// # use std::{sync::{Arc, atomic::{AtomicU64, Ordering}}, time::Duration};
    /// # use tether::{CancelReason, RequestContext};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let ctx = RequestContext::new();
    /// let done = Arc::new(AtomicU64::new(0));
    /// let progress = done.clone();
    /// let canceller = ctx.clone();
    /// let out = ctx
    ///     .run_with_cleanup(
    ///         async move {
    ///             for _ in 0..100 {
    ///                 done.fetch_add(1, Ordering::Relaxed);
    ///                 if done.load(Ordering::Relaxed) == 3 {
    ///                     canceller.cancel(CancelReason::ClientClosed);
    ///                 }
    ///                 tokio::task::yield_now().await;
    ///             }
    ///         },
    ///         Duration::from_millis(500),
    ///         move |cleanup| async move {
    ///             // Record how far the work got; bounded by cleanup.ctx's deadline.
    ///             let n = progress.load(Ordering::Relaxed);
    ///             assert_eq!(cleanup.reason, Some(CancelReason::ClientClosed));
    ///             assert!(n < 100);
    ///         },
    ///     )
    ///     .await;
    /// assert_eq!(out.unwrap_err().reason, CancelReason::ClientClosed);
    /// # }
    /// ```
    pub async fn run_with_cleanup<F, C, CF>(
        &self,
        fut: F,
        window: Duration,
        cleanup: C,
    ) -> Result<F::Output, Cancelled>
    where
        F: Future,
        C: FnOnce(Cleanup) -> CF + Send + 'static,
        CF: Future<Output = ()> + Send + 'static,
    {
        let mut guard = CleanupGuard {
            ctx: self.clone(),
            window,
            cleanup: Some(Box::new(move |info| Box::pin(cleanup(info)))),
        };
        match self.run(fut).await {
            Ok(out) => {
                guard.cleanup = None;
                Ok(out)
            }
            Err(cancelled) => {
                if let Some(task) = guard.start() {
                    // If this await is dropped the task still runs its window out.
                    let _ = task.await;
                }
                Err(cancelled)
            }
        }
    }
}

type BoxCleanup = Box<dyn FnOnce(Cleanup) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Starts the cleanup when the work is abandoned, including by being dropped.
struct CleanupGuard {
    ctx: RequestContext,
    window: Duration,
    cleanup: Option<BoxCleanup>,
}

impl CleanupGuard {
    fn start(&mut self) -> Option<JoinHandle<()>> {
        let cleanup = self.cleanup.take()?;
        // Without a runtime (dropped during runtime shutdown) there is nowhere to run it.
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let ctx = RequestContext::with_id(self.ctx.id().clone())
            .child_with_deadline(Deadline::after(self.window));
        let info = Cleanup {
            reason: self.ctx.reason(),
            ctx: ctx.clone(),
        };
        Some(runtime.spawn(async move {
            let fut = cleanup(info);
            if ctx.run(fut).await.is_err() {
                tracing::debug!(request_id = %ctx.id(), "cleanup window ended before the cleanup");
            }
        }))
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        // Still armed: the future was dropped before `fut` completed.
        let _ = self.start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test(start_paused = true)]
    async fn spawned_task_is_dropped_when_the_context_fires() {
        let ctx = RequestContext::new();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let handle = spawn(&ctx, async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            flag.store(true, Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        ctx.cancel(CancelReason::ClientReset);
        assert_eq!(
            handle.await,
            Err(Cancelled {
                reason: CancelReason::ClientReset
            })
        );
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!done.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn blocking_handle_returns_early_and_the_closure_stops() {
        let ctx = RequestContext::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = spawn_blocking(&ctx, move |check| {
            tx.send(()).unwrap();
            loop {
                check.check()?;
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        tokio::task::spawn_blocking(move || rx.recv().unwrap())
            .await
            .unwrap();
        ctx.cancel(CancelReason::Deadline);
        let out: Result<(), Cancelled> = handle.await;
        assert_eq!(out.unwrap_err().reason, CancelReason::Deadline);
    }

    #[tokio::test]
    async fn blocking_stopped_waits_for_the_closure() {
        let ctx = RequestContext::new();
        let handle = spawn_blocking(&ctx, |check| {
            loop {
                check.check()?;
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        ctx.cancel(CancelReason::Shutdown);
        let out: Result<(), Cancelled> =
            tokio::time::timeout(Duration::from_secs(5), handle.stopped())
                .await
                .unwrap();
        assert_eq!(out.unwrap_err().reason, CancelReason::Shutdown);
    }

    #[tokio::test(start_paused = true)]
    async fn cleanup_runs_when_the_future_is_dropped_and_is_bounded() {
        let ctx = RequestContext::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let fut = ctx.run_with_cleanup(
            std::future::pending::<()>(),
            Duration::from_millis(100),
            move |cleanup| async move {
                tx.send(cleanup.reason).unwrap();
                // Longer than the window: must be cut.
                tokio::time::sleep(Duration::from_secs(10)).await;
                tx.send(None).unwrap();
            },
        );
        let mut fut = Box::pin(fut);
        assert!(futures_poll_once(fut.as_mut()).await.is_none());
        // The owner (hyper) cancels, then drops the handler.
        ctx.cancel(CancelReason::StreamReset);
        drop(fut);
        assert_eq!(rx.recv().await, Some(Some(CancelReason::StreamReset)));
        // The channel closes when the cleanup task is dropped at the end of its window.
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn cleanup_is_skipped_when_the_work_completes() {
        let ctx = RequestContext::new();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let out = ctx
            .run_with_cleanup(async { 5 }, Duration::from_secs(1), move |_| async move {
                flag.store(true, Ordering::SeqCst);
            })
            .await;
        assert_eq!(out, Ok(5));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!ran.load(Ordering::SeqCst));
    }

    async fn futures_poll_once<F: Future + Unpin>(mut fut: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut fut).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }
}
