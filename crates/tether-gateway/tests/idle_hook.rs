//! The worker idle hook (`listen::on_worker_idle`): it runs once a worker has started no request
//! for a few seconds, once per quiet spell, and never while requests keep coming, however long
//! the worker sleeps between them. A test binary of its own: the hook is process-wide, and other
//! tests' gateways would run it too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{BOUND, Down, Env, Up, bounded};
use test_support::behavior::{Behavior, script};
use tokio::time::Instant;

static RUNS: AtomicUsize = AtomicUsize::new(0);

fn count_run() {
    RUNS.fetch_add(1, Ordering::Relaxed);
}

/// One request on a connection of its own (one worker: `Env` runs one).
async fn get(env: &Env) {
    let mut c = env.h1().await;
    let (head, _) = bounded(BOUND, c.get("/")).await.unwrap();
    assert_eq!(head.status, 200);
}

async fn wait_for_runs(n: usize, within: Duration) {
    let start = Instant::now();
    while RUNS.load(Ordering::Relaxed) < n {
        assert!(start.elapsed() < within, "the hook did not run a time {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_idle_hook_waits_for_a_quiet_spell_and_runs_once_per_spell() {
    tether_gateway::listen::on_worker_idle(count_run);
    let env = Env::new(Down::H1, Up::H1, script(|_| Behavior::ok("hi"))).await;

    // A request every 0.7 s for over 3 s: the worker sleeps between them, but requests keep
    // coming, so the hook does not run.
    for _ in 0..6 {
        get(&env).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(
        RUNS.load(Ordering::Relaxed),
        0,
        "the hook ran between requests"
    );

    // Quiet: it runs once, about 3 s after the last request (the worker wakes every second).
    get(&env).await;
    let last = Instant::now();
    wait_for_runs(1, Duration::from_secs(8)).await;
    assert!(
        last.elapsed() >= Duration::from_millis(2900),
        "ran {:?} after the last request",
        last.elapsed()
    );
    // Once per quiet spell.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        RUNS.load(Ordering::Relaxed),
        1,
        "the hook ran again while quiet"
    );

    // A request starts a new spell.
    get(&env).await;
    wait_for_runs(2, Duration::from_secs(8)).await;
    env.stop().await;
}
