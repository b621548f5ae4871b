//! PostgreSQL queries cancelled **on the server** when the request context fires
//! (tokio-postgres, feature `postgres`).
//!
//! # Dropping a tokio-postgres future does NOT stop the query
//! The query was already handed to the connection task; dropping the future only makes that task
//! read and discard the result. The server keeps executing it to the end, holding its locks, CPU
//! and I/O. The only way to stop it is PostgreSQL's cancel request, sent on a **new** connection
//! with the backend's pid and secret: `client.cancel_token().cancel_query(NoTls)`.
//!
//! [`run`], [`query`] and [`execute`] do that: they run the query under a [`RequestContext`], and
//! when the context fires first (or the future is dropped before the query finished, as happens
//! to a handler whose client left) they send the cancel request from a task of their own and
//! return [`QueryError::Cancelled`]. The server then ends the query with SQLSTATE 57014
//! (`query_canceled`), which the connection task discards; the connection stays usable.
//!
//! Caveats:
//! - A cancel request is unacknowledged and cancels **whatever the backend is running when it
//!   arrives**. If the same [`Client`] is shared by several requests (tokio-postgres pipelines
//!   their queries on one connection), a cancel can hit another request's query. Use one
//!   connection per request at a time (a pool checkout) together with these helpers.
//! - A cancel that arrives before the query started on the server, or after it ended, does
//!   nothing.
//! - The cancel connection uses `NoTls`; for TLS connections call
//!   [`CancelToken::cancel_query`] yourself.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{CancelToken, Client, NoTls, Row, ToStatement};

use crate::context::RequestContext;
use crate::reason::Cancelled;

/// How long the cancel request may take (connect + send) before it is given up.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a query run under a context failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The context fired first; a server-side cancel was sent.
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
    /// The query failed on its own.
    #[error("query failed")]
    Postgres(#[source] tokio_postgres::Error),
}

impl QueryError {
    /// The cancellation, when the context fired first.
    pub fn cancelled(&self) -> Option<Cancelled> {
        match self {
            QueryError::Cancelled(c) => Some(*c),
            QueryError::Postgres(_) => None,
        }
    }
}

/// Runs `fut`, a query made with `client`, under `ctx`; on cancellation (or if dropped before the
/// query finished) sends a server-side cancel for `client`'s connection. See the [module
/// docs](self).
///
/// ```no_run
/// # async fn f(client: &tokio_postgres::Client, ctx: &tether::RequestContext)
/// # -> Result<(), tether::postgres::QueryError> {
/// let rows = tether::postgres::run(ctx, client, client.query("SELECT pg_sleep(5)", &[])).await?;
/// # Ok(()) }
/// ```
pub async fn run<F, T>(ctx: &RequestContext, client: &Client, fut: F) -> Result<T, QueryError>
where
    F: Future<Output = Result<T, tokio_postgres::Error>>,
{
    ctx.check()?;
    let mut guard = ServerCancel {
        token: Some(client.cancel_token()),
        ctx: ctx.clone(),
    };
    match ctx.run(fut).await {
        Ok(out) => {
            guard.token = None;
            out.map_err(QueryError::Postgres)
        }
        Err(cancelled) => {
            if let Some(task) = guard.start() {
                // Wait for the cancel to be sent so that the caller's next query on this
                // connection is not hit by it. If this await is dropped, the task still runs.
                let _ = task.await;
            }
            Err(cancelled.into())
        }
    }
}

/// `client.query(statement, params)` under `ctx`; see [`run`].
pub async fn query<T>(
    ctx: &RequestContext,
    client: &Client,
    statement: &T,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, QueryError>
where
    T: ?Sized + ToStatement,
{
    run(ctx, client, client.query(statement, params)).await
}

/// `client.execute(statement, params)` under `ctx`; see [`run`].
pub async fn execute<T>(
    ctx: &RequestContext,
    client: &Client,
    statement: &T,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, QueryError>
where
    T: ?Sized + ToStatement,
{
    run(ctx, client, client.execute(statement, params)).await
}

/// Sends the server-side cancel when dropped armed.
struct ServerCancel {
    token: Option<CancelToken>,
    ctx: RequestContext,
}

impl ServerCancel {
    fn start(&mut self) -> Option<JoinHandle<()>> {
        let token = self.token.take()?;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let id = self.ctx.id().clone();
        let reason = self.ctx.reason();
        Some(runtime.spawn(async move {
            match tokio::time::timeout(CANCEL_TIMEOUT, token.cancel_query(NoTls)).await {
                Ok(Ok(())) => {
                    tracing::debug!(request_id = %id, reason = ?reason, "postgres query cancel sent");
                }
                Ok(Err(e)) => {
                    tracing::warn!(request_id = %id, error = %e, "postgres query cancel failed");
                }
                Err(_) => {
                    tracing::warn!(request_id = %id, "postgres query cancel timed out");
                }
            }
        }))
    }
}

impl Drop for ServerCancel {
    fn drop(&mut self) {
        // Still armed: dropped before the query finished.
        let _ = self.start();
    }
}
