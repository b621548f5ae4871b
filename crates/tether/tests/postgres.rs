//! PostgreSQL cancellation against a real server that each test starts and stops itself.
//!
//! Needs the PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`) on PATH or under
//! `/usr/lib/postgresql/*/bin` (Debian/Ubuntu: `apt-get install postgresql`). When run as root the
//! server runs as user `postgres` through `runuser`.

// Helpers outside #[test] functions panic on purpose too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use tether::postgres::{self, QueryError};
use tether::serve::{ServeOptions, serve};
use tether::{CancelReason, RequestContext};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

const TEST_BOUND: Duration = Duration::from_secs(90);

/// A throwaway PostgreSQL server in a temporary directory, stopped (`-m immediate`) on drop.
struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn find_bin_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return dir;
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        .collect();
    // The newest major version; directory names are version numbers.
    found.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under \
             /usr/lib/postgresql/*/bin; install them with `apt-get install postgresql`"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgServer {
    fn start() -> PgServer {
        let bin = find_bin_dir();
        let as_postgres = is_root();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("tether-pg-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = PgServer {
            bin,
            dir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            // initdb refuses to run as root; the Debian package creates user postgres.
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&server.dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of {} to postgres failed", server.dir.display());
        }
        let data = server.dir.join("data");
        server.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            server.port,
            server.dir.display()
        );
        let log = server.dir.join("log");
        server.run(
            "pg_ctl",
            &[
                "-D",
                path(&data),
                "-l",
                path(&log),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        server
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}\n{}\nlog: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    async fn connect(&self) -> Client {
        let conf = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        );
        let (client, conn) = tokio_postgres::connect(&conf, NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", path(&data), "stop", "-m", "immediate", "-w"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How many backends other than the monitor are running a query containing `marker`.
async fn active(monitor: &Client, marker: &str) -> i64 {
    monitor
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%'",
            &[&marker],
        )
        .await
        .unwrap()
        .get(0)
}

async fn wait_for(monitor: &Client, marker: &str, count: i64) {
    let begun = Instant::now();
    while active(monitor, marker).await != count {
        assert!(
            begun.elapsed() < Duration::from_secs(5),
            "query {marker:?}: never saw {count} active"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cancelled_context_cancels_the_query_on_the_server() {
    timeout(TEST_BOUND, async {
        let pg = PgServer::start();
        let client = pg.connect().await;
        let monitor = pg.connect().await;
        let ctx = RequestContext::new();

        let canceller = {
            let ctx = ctx.clone();
            let monitor = pg.connect().await;
            tokio::spawn(async move {
                // The query must really be running before we cancel it.
                wait_for(&monitor, "pg_sleep(30) /* a */", 1).await;
                sleep(Duration::from_millis(200)).await;
                ctx.cancel(CancelReason::ClientClosed);
            })
        };
        let started = Instant::now();
        let out = postgres::query(&ctx, &client, "SELECT pg_sleep(30) /* a */", &[]).await;
        match out {
            Err(QueryError::Cancelled(c)) => assert_eq!(c.reason, CancelReason::ClientClosed),
            other => panic!("expected Cancelled, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        canceller.await.unwrap();
        wait_for(&monitor, "pg_sleep(30) /* a */", 0).await;

        // The connection is still usable.
        let row = client.query_one("SELECT 1::int4", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1);
    })
    .await
    .expect("test took too long");
}

#[tokio::test]
async fn live_context_returns_rows_and_plain_drop_leaves_the_query_running() {
    timeout(TEST_BOUND, async {
        let pg = PgServer::start();
        let client = pg.connect().await;
        let monitor = pg.connect().await;
        let ctx = RequestContext::new();

        let rows = postgres::query(&ctx, &client, "SELECT 1::int4 + $1", &[&41i32])
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, i32>(0), 42);
        let n = postgres::execute(&ctx, &client, "SELECT 1 UNION ALL SELECT 2", &[])
            .await
            .unwrap();
        assert_eq!(n, 2);

        // Why the module exists: dropping a plain tokio-postgres future does not stop the query.
        let plain = timeout(
            Duration::from_millis(300),
            client.query("SELECT pg_sleep(3) /* b */", &[]),
        )
        .await;
        assert!(plain.is_err());
        sleep(Duration::from_millis(300)).await;
        assert_eq!(active(&monitor, "pg_sleep(3) /* b */").await, 1);
    })
    .await
    .expect("test took too long");
}

async fn db(State(client): State<Arc<Client>>, ctx: RequestContext) -> String {
    match postgres::query(&ctx, &client, "SELECT pg_sleep(30) /* c */", &[]).await {
        Ok(_) => "done".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn client_abort_through_serve_cancels_the_query() {
    timeout(TEST_BOUND, async {
        let pg = PgServer::start();
        let client = Arc::new(pg.connect().await);
        let monitor = pg.connect().await;
        let app = Router::new()
            .route("/db", get(db))
            .with_state(client.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            app,
            ServeOptions::new()
                .shutdown(shutdown.clone())
                .grace(Duration::from_millis(200)),
        ));

        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /db HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        wait_for(&monitor, "pg_sleep(30) /* c */", 1).await;
        drop(s);
        wait_for(&monitor, "pg_sleep(30) /* c */", 0).await;

        shutdown.cancel();
        timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    })
    .await
    .expect("test took too long");
}
