//! The stylesheet and the script, embedded in the binary and served with
//! a long cache life: pages link them with their content hash in the URL
//! (`?v=HASH`), and the hash is also their ETag.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

const CSS: &str = include_str!("static/app.css");
const JS: &str = include_str!("static/app.js");

/// One embedded file.
pub struct Asset {
    pub body: &'static str,
    pub content_type: &'static str,
    /// The first 16 hex digits of its SHA-256.
    pub hash: String,
}

fn asset(body: &'static str, content_type: &'static str) -> Asset {
    let hash = hex::encode(&Sha256::digest(body.as_bytes())[..8]);
    Asset {
        body,
        content_type,
        hash,
    }
}

pub fn css() -> &'static Asset {
    static A: OnceLock<Asset> = OnceLock::new();
    // The task graph's colours by state live with the graph's drawing
    // (`workflow::graph::GRAPH_CSS`); built once, kept for the process.
    A.get_or_init(|| {
        let body: &'static str =
            Box::leak(format!("{CSS}\n{}", crate::workflow::graph::GRAPH_CSS).into_boxed_str());
        asset(body, "text/css; charset=utf-8")
    })
}

pub fn js() -> &'static Asset {
    static A: OnceLock<Asset> = OnceLock::new();
    A.get_or_init(|| asset(JS, "text/javascript; charset=utf-8"))
}

/// The URL pages link an asset with.
pub fn url(name: &str, a: &Asset) -> String {
    format!("/ui/static/{name}?v={}", a.hash)
}

/// `GET /ui/static/{file}`: app.css or app.js; 304 when the browser has it.
pub async fn serve(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let a = match file.as_str() {
        "app.css" => css(),
        "app.js" => js(),
        _ => return super::error::UiError::not_found("no such file").into_response(),
    };
    let etag = format!("\"{}\"", a.hash);
    let cache = (
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    if fresh {
        return (StatusCode::NOT_MODIFIED, [cache], [(header::ETAG, etag)]).into_response();
    }
    (
        [cache],
        [
            (header::ETAG, etag),
            (header::CONTENT_TYPE, a.content_type.to_owned()),
        ],
        a.body,
    )
        .into_response()
}
