//! axum integration (feature `axum`): [`RequestContext`] as an extractor.

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::context::RequestContext;
use crate::layer::Downstream;

/// Rejection when no [`RequestContext`] is in the request extensions: the service was not wrapped
/// in [`ContextLayer`](crate::layer::ContextLayer) (nor served by [`serve`](crate::serve::serve)).
/// Answers 500.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request context missing: wrap the service in tether's ContextLayer")]
pub struct MissingContext;

impl IntoResponse for MissingContext {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = MissingContext;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RequestContext>()
            .cloned()
            .ok_or(MissingContext)
    }
}

/// The downstream connection, when served by [`serve`](crate::serve::serve); rejected with 500
/// otherwise.
impl<S: Send + Sync> FromRequestParts<S> for Downstream {
    type Rejection = MissingContext;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Downstream>()
            .cloned()
            .ok_or(MissingContext)
    }
}
