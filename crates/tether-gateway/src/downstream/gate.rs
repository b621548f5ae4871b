//! A connection's loop polls hyper's connection on every turn, and with it a handful of futures
//! that rarely complete: the disconnect watcher, shutdown, timers, dead-peer probing. Polling all
//! of those on every turn (`select!` does) costs about as much as a small request's own work. A
//! [`Gate`] lets the loop poll them only after one of them woke the task: they are polled with
//! the gate's waker, which notes the wake-up before passing it on to the task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};

use crate::lock;

/// Notes whether any future polled with its waker has woken since the gate was last opened.
#[derive(Debug)]
pub struct Gate {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Gate {
    /// A gate and the waker to poll the gated futures with. It starts open: the futures must be
    /// polled once to register their wake-ups.
    pub fn new() -> (Arc<Gate>, Waker) {
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        let waker = Waker::from(gate.clone());
        (gate, waker)
    }

    /// Whether the gated futures must be polled now (one of them woke, or [`Gate::reopen`] was
    /// called). `task` is the waker of the task polling them, woken in turn by theirs.
    pub fn open(&self, task: &Waker) -> bool {
        {
            let mut t = lock(&self.task);
            if !t.as_ref().is_some_and(|t| t.will_wake(task)) {
                *t = Some(task.clone());
            }
        }
        self.woken.swap(false, Ordering::AcqRel)
    }

    /// Makes the next [`Gate::open`] true: after one of the futures completed, or the loop's
    /// state changed which of them it polls.
    pub fn reopen(&self) {
        self.woken.store(true, Ordering::Release);
    }
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(t) = lock(&self.task).as_ref() {
            t.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};

    #[tokio::test]
    async fn opens_only_after_a_gated_future_woke() {
        let (gate, waker) = Gate::new();
        let notify = Arc::new(tokio::sync::Notify::new());
        let mut notified = pin!(notify.notified());
        let task = Waker::noop();
        assert!(gate.open(task), "a new gate is open");
        let mut cx = Context::from_waker(&waker);
        assert!(notified.as_mut().poll(&mut cx).is_pending());
        assert!(!gate.open(task), "nothing woke");
        notify.notify_waiters();
        assert!(gate.open(task), "the gated future woke");
        assert_eq!(notified.as_mut().poll(&mut cx), Poll::Ready(()));
        assert!(!gate.open(task));
        gate.reopen();
        assert!(gate.open(task));
    }
}
