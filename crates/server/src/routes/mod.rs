//! The HTTP API. Each module has one `router()`; `api()` merges them with the
//! OpenAPI document generated from the handlers' annotations and types.

pub mod accounts;
pub mod actions;
pub mod agent_api;
pub mod agents;
pub mod approvals;
pub mod audit;
pub mod dispatch;
pub mod fleet;
pub mod jobs;
pub mod sandboxes;
pub mod schedules;
pub mod scripts;
pub mod secrets;
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
        (name = "users", description = "Users, their roles and scopes"),
        (name = "approvals", description = "Protected work waiting for people to approve it"),
        (name = "agents", description = "The fleet, as operators see it"),
        (name = "agent", description = "The protocol agents speak"),
        (name = "actions", description = "The action catalog and sandbox profiles"),
        (name = "fleet", description = "Fleet-wide emergency stop"),
        (name = "jobs", description = "Running actions on agents"),
        (name = "audit", description = "Who changed what"),
        (name = "workflows", description = "Durable workflow runs, their events and artifacts"),
        (name = "webhooks", description = "Notifications when runs end"),
        (name = "secrets", description = "The secrets vault: values go in, never out"),
        (name = "scripts", description = "The scripts library: immutable versions named by their SHA-256"),
        (name = "schedules", description = "Server-side schedules: actions and workflows started on a cron clock"),
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
        .merge(accounts::router())
        .merge(approvals::router())
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
        .merge(secrets::router())
        .merge(scripts::router())
        .merge(schedules::router())
}

/// Adds the error answers every operation can really give, with the
/// `ErrorBody` schema, where its annotations did not document them: 400
/// (a malformed body, query string or path), 401 (a missing or bad token,
/// on operations that need one), 429 (a user's token over its rate
/// limit), 413/415/422 (a body too large, not JSON,
/// or JSON the operation refuses; 422 also for query values it refuses),
/// 404 (an id in the path that names nothing), 500 and 503 (an internal
/// failure, the database unavailable). Done once on the generated document
/// so no operation can forget one.
fn document_errors(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    for item in openapi.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let params = op.parameters.as_deref().unwrap_or_default();
            let has_path = params
                .iter()
                .any(|p| p.parameter_in == utoipa::openapi::path::ParameterIn::Path);
            let has_query = params
                .iter()
                .any(|p| p.parameter_in == utoipa::openapi::path::ParameterIn::Query);
            let has_body = op.request_body.is_some();
            let authenticated = op.security.as_ref().is_some_and(|s| !s.is_empty());
            // A user's token (not an agent's) is subject to the rate limits.
            let as_user = op.security.as_ref().is_some_and(|s| {
                serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .any(|r| r.get("user").is_some())
            });
            let mut add = |status: &str, description: &str| {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                            .description(description)
                            .content(
                                "application/json",
                                ContentBuilder::new()
                                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                                    .build(),
                            )
                            .build()
                            .into()
                    });
            };
            if has_body || has_query || has_path {
                add("400", "Malformed request (body, query string or path)");
            }
            if authenticated {
                add("401", "Missing, unknown or expired token");
            }
            if as_user {
                add(
                    "429",
                    "Over the user's or the token's rate limit: retry after the Retry-After header",
                );
            }
            if has_path {
                add("404", "Nothing has this id");
            }
            if has_body {
                add("413", "Request body larger than the server accepts");
                add("415", "Request body is not JSON (Content-Type)");
            }
            if has_body || has_query {
                add("422", "The request names something invalid");
            }
            add("500", "Internal error (logged by the server)");
            add("503", "The database is unavailable, try again");
        }
    }
}

/// The OpenAPI document as served: the generated one with the common error
/// answers documented and closed compositions merged.
pub fn document(mut openapi: utoipa::openapi::OpenApi) -> serde_json::Value {
    document_errors(&mut openapi);
    let mut doc = serde_json::to_value(&openapi).unwrap_or_else(|e| {
        tracing::error!(error = %e, "serialising the OpenAPI document");
        serde_json::Value::Null
    });
    let schemas = doc
        .pointer("/components/schemas")
        .cloned()
        .unwrap_or_default();
    merge_closed_all_of(&mut doc, &schemas);
    doc
}

/// A type that refuses unknown fields (`deny_unknown_fields`) is documented
/// with `additionalProperties: false`, so where serde adds fields to it —
/// `#[serde(flatten)]` into a bigger struct (`Action`), the tag of an
/// internally tagged enum (`Sandbox`) — the generated `allOf` can be
/// satisfied by no value at all. Such an `allOf` becomes the one closed
/// object it means: the union of the parts' properties and required fields.
fn merge_closed_all_of(value: &mut serde_json::Value, schemas: &serde_json::Value) {
    use serde_json::{Map, Value};
    match value {
        Value::Array(items) => {
            for item in items {
                merge_closed_all_of(item, schemas);
            }
        }
        Value::Object(map) => {
            for v in map.values_mut() {
                merge_closed_all_of(v, schemas);
            }
            let Some(Value::Array(parts)) = map.get("allOf") else {
                return;
            };
            let resolved: Option<Vec<&Value>> = parts
                .iter()
                .map(|p| match p.get("$ref").and_then(Value::as_str) {
                    Some(r) => r
                        .strip_prefix("#/components/schemas/")
                        .and_then(|name| schemas.get(name)),
                    None => Some(p),
                })
                .collect();
            let Some(resolved) = resolved else { return };
            let objects = resolved
                .iter()
                .all(|p| p.get("type").and_then(Value::as_str) == Some("object"));
            let closed = resolved
                .iter()
                .any(|p| p.get("additionalProperties") == Some(&Value::Bool(false)));
            if !objects || !closed {
                return;
            }
            let mut properties = Map::new();
            let mut required: Vec<Value> = Vec::new();
            for part in &resolved {
                if let Some(Value::Object(props)) = part.get("properties") {
                    properties.extend(props.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                if let Some(Value::Array(req)) = part.get("required") {
                    for r in req {
                        if !required.contains(r) {
                            required.push(r.clone());
                        }
                    }
                }
            }
            map.remove("allOf");
            map.insert("type".into(), Value::from("object"));
            map.insert("properties".into(), Value::Object(properties));
            map.insert("required".into(), Value::Array(required));
            map.insert("additionalProperties".into(), Value::Bool(false));
        }
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::merge_closed_all_of;

    #[test]
    fn a_closed_all_of_becomes_one_closed_object() {
        let schemas = json!({
            "Spec": {"type": "object", "additionalProperties": false,
                     "required": ["name"], "properties": {"name": {"type": "string"}}},
            "Open": {"type": "object", "properties": {"a": {"type": "string"}}},
        });
        let cases = [
            // A flattened closed struct: merged, still closed.
            (
                json!({"allOf": [{"$ref": "#/components/schemas/Spec"},
                                 {"type": "object", "required": ["hash"],
                                  "properties": {"hash": {"type": "string"}}}],
                       "description": "d"}),
                json!({"type": "object", "additionalProperties": false, "description": "d",
                       "required": ["name", "hash"],
                       "properties": {"name": {"type": "string"}, "hash": {"type": "string"}}}),
            ),
            // Nothing closed: left as it is.
            (
                json!({"allOf": [{"$ref": "#/components/schemas/Open"},
                                 {"type": "object", "properties": {"b": {"type": "string"}}}]}),
                json!({"allOf": [{"$ref": "#/components/schemas/Open"},
                                 {"type": "object", "properties": {"b": {"type": "string"}}}]}),
            ),
            // A part that is not an object (or an unknown ref): left as it is.
            (
                json!({"allOf": [{"$ref": "#/components/schemas/Spec"}, {"type": "string"}]}),
                json!({"allOf": [{"$ref": "#/components/schemas/Spec"}, {"type": "string"}]}),
            ),
            (
                json!({"allOf": [{"$ref": "#/components/schemas/Nope"}]}),
                json!({"allOf": [{"$ref": "#/components/schemas/Nope"}]}),
            ),
        ];
        for (mut input, want) in cases {
            let before = input.clone();
            merge_closed_all_of(&mut input, &schemas);
            assert_eq!(input, want, "from {before}");
        }
    }

    #[test]
    fn every_operation_documents_its_errors() {
        let doc = super::document(super::api().split_for_parts().1);
        let paths = doc["paths"].as_object().expect("paths");
        assert!(!paths.is_empty());
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item") {
                let responses = &op["responses"];
                for status in ["500", "503"] {
                    assert!(responses[status].is_object(), "{method} {path}: {status}");
                }
                if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
                    assert!(responses["401"].is_object(), "{method} {path}: 401");
                }
                if op.get("requestBody").is_some() {
                    for status in ["400", "413", "415", "422"] {
                        assert!(responses[status].is_object(), "{method} {path}: {status}");
                    }
                }
            }
        }
        let action = &doc["components"]["schemas"]["Action"];
        assert_eq!(action["additionalProperties"], json!(false), "{action}");
        assert!(action["properties"]["updated_at"].is_object(), "{action}");
    }
}
