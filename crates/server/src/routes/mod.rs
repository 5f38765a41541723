//! The HTTP API. Each module has one `router()`; `api()` merges them with the
//! OpenAPI document generated from the handlers' annotations and types.

pub mod actions;
pub mod agent_api;
pub mod agents;
pub mod audit;
pub mod dispatch;
pub mod fleet;
pub mod jobs;
pub mod sandboxes;
pub mod system;
pub mod tokens;
pub mod users;
pub mod webhooks;
pub mod workflows;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "Drover API", description = "Control plane of the Drover fleet runner"),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Logging in"),
        (name = "tokens", description = "Bootstrap and API tokens"),
        (name = "agents", description = "The fleet, as operators see it"),
        (name = "agent", description = "The protocol agents speak"),
        (name = "actions", description = "The action catalog and sandbox profiles"),
        (name = "fleet", description = "Fleet-wide emergency stop"),
        (name = "jobs", description = "Running actions on agents"),
        (name = "audit", description = "Who changed what"),
        (name = "workflows", description = "Durable workflow runs, their events and artifacts"),
        (name = "webhooks", description = "Notifications when runs end"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "user",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "agent",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Every documented route, with the OpenAPI document describing them.
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(users::router())
        .merge(tokens::router())
        .merge(agents::router())
        .merge(agent_api::router())
        .merge(actions::router())
        .merge(sandboxes::router())
        .merge(fleet::router())
        .merge(jobs::router())
        .merge(dispatch::router())
        .merge(audit::router())
        .merge(workflows::router())
        .merge(webhooks::router())
}
