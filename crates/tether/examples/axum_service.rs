//! An axum service whose work stops when the client gives up.
//!
//! Run with:
//!
//! ```text
//! DATABASE_URL="host=127.0.0.1 user=postgres" \
//!   cargo run -p tether --example axum_service --features axum,postgres,client
//! ```
//!
//! then interrupt a request with Ctrl-C:
//!
//! ```text
//! curl -v localhost:3000/report      # slow SQL + CPU work + an outbound call; press Ctrl-C
//! curl -v -H 'x-request-timeout-ms: 500' localhost:3000/report   # deadline from the caller
//! ```
//!
//! The log shows each piece stopping with the reason (`client_closed`, `deadline`, ...), and
//! `SELECT * FROM pg_stat_activity` shows that the `pg_sleep` query is gone. Without
//! `DATABASE_URL` the SQL step is skipped. The outbound call goes to `/upstream` on the same
//! server, which waits for 20 s unless its own context is cancelled.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderName, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tether::client::Client;
use tether::serve::{ServeOptions, serve};
use tether::{ContextLayer, RequestContext, budget, work};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct App {
    db: Option<Arc<tokio_postgres::Client>>,
    http: Client,
    port: u16,
}

async fn report(State(app): State<App>, ctx: RequestContext) -> (StatusCode, String) {
    tracing::info!(request_id = %ctx.id(), remaining = ?ctx.remaining(), "report started");

    // 1. Slow SQL, cancelled on the server if the request goes away.
    let sql = async {
        match &app.db {
            Some(db) => tether::postgres::query(&ctx, db, "SELECT pg_sleep(5)", &[])
                .await
                .map(|_| "sql done".to_owned())
                .map_err(|e| e.to_string()),
            None => Ok("sql skipped (no DATABASE_URL)".to_owned()),
        }
    };

    // 2. CPU work on the blocking pool with cooperative checks.
    let cpu = work::spawn_blocking(&ctx, |check| {
        let mut x = 0u64;
        for i in 0..400_000_000u64 {
            if i % 1_000_000 == 0 {
                check.check()?;
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        Ok(x)
    });

    // 3. An outbound call that carries the remaining budget and is aborted with the context.
    let outbound = async {
        let req = Request::get(format!("http://127.0.0.1:{}/upstream", app.port))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = app
            .http
            .request(&ctx, req)
            .await
            .map_err(|e| e.to_string())?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    };

    // All three run concurrently. If the context fires (client gone, deadline, shutdown), they
    // are dropped: the SQL cancel is sent, the CPU loop stops at its next check, the outbound
    // connection is closed. The cleanup runs even when hyper drops this handler, and logs why.
    let id = ctx.id().clone();
    let all = async { tokio::join!(sql, cpu, outbound) };
    let out = ctx
        .run_with_cleanup(all, Duration::from_secs(1), move |cleanup| async move {
            tracing::warn!(request_id = %id, reason = ?cleanup.reason, "report abandoned");
        })
        .await;
    match out {
        Ok((sql, cpu, outbound)) => {
            tracing::info!(?sql, ?cpu, ?outbound, "report finished");
            (StatusCode::OK, format!("{sql:?} {cpu:?} {outbound:?}\n"))
        }
        Err(c) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stopped: {}\n", c.reason),
        ),
    }
}

/// A slow upstream: honours its own context (the budget header and a client abort).
async fn upstream(ctx: RequestContext) -> String {
    tracing::info!(remaining = ?ctx.remaining(), "upstream called");
    match ctx.run(tokio::time::sleep(Duration::from_secs(20))).await {
        Ok(()) => "upstream done\n".to_owned(),
        Err(c) => {
            tracing::warn!(reason = %c.reason, "upstream stopped");
            format!("upstream stopped: {}\n", c.reason)
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tether=debug".into()),
        )
        .init();

    let db = match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::error!(error = %e, "database connection failed");
                }
            });
            Some(Arc::new(client))
        }
        Err(_) => None,
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    let port = listener.local_addr()?.port();
    let app = Router::new()
        .route("/report", get(report))
        .route("/upstream", get(upstream))
        .with_state(App {
            db,
            http: Client::new(),
            port,
        });

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        signal.cancel();
    });

    let layer = ContextLayer::new()
        .timeout(Duration::from_secs(30))
        .trust_budget_header(HeaderName::from_static(budget::DEFAULT_BUDGET_HEADER));
    tracing::info!("listening on http://127.0.0.1:{port}");
    serve(
        listener,
        app,
        ServeOptions::new()
            .layer(layer)
            .shutdown(shutdown)
            .grace(Duration::from_secs(5)),
    )
    .await;
    Ok(())
}
