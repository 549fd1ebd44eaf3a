//! The HTTP admin API (axum), for tests and scripts:
//!
//! | route | does |
//! | --- | --- |
//! | `GET /` | this list, as text |
//! | `GET /clients` | connected and recently disconnected clients, per type (JSON) |
//! | `GET /nacks` | every NACK received (JSON) |
//! | `GET /state` | resource names and versions per type (JSON) |
//! | `GET /ca` | the CA: trust domain, maximum validity, allowed identities, counts of certificates issued and requests refused, the last refusal, the root (JSON) |
//! | `PUT /state` | replace the whole state with the body (local-config YAML) |
//! | `POST /resources` | add or replace every resource of the body (local-config YAML) |
//! | `DELETE /resources/{address,authorization}/{*name}` | remove one resource |
//! | `POST /raw?type=address\|authorization&name=NAME` | serve the body bytes as that resource's `Any.value` |
//!
//! A refused request answers 400 with a text body saying what was wrong; a removal of a resource
//! that does not exist answers 404. Success answers 200 with a short text.
//!
//! Not here: authentication (bind it to loopback), the state rules (`server::Shared`), the CA
//! policy (`ca`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use crate::server::Shared;
use crate::Kind;

const INDEX: &str = "xds-testserver admin API
GET    /clients                                connected and recent clients (JSON)
GET    /nacks                                  NACKs received (JSON)
GET    /state                                  resource names and versions (JSON)
GET    /ca                                     CA settings, issued/refused counts, root (JSON)
PUT    /state                                  replace the state (body: local-config YAML)
POST   /resources                              upsert resources (body: local-config YAML)
DELETE /resources/address/{name}               remove a workload (uid) or service (namespace/hostname)
DELETE /resources/authorization/{name}         remove a policy (namespace/name)
POST   /raw?type=address|authorization&name=N  serve the body bytes as resource N
";

/// The admin routes over the server's shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { INDEX }))
        .route("/clients", get(clients))
        .route("/nacks", get(nacks))
        .route("/state", get(get_state).put(put_state))
        .route("/ca", get(get_ca))
        .route("/resources", post(post_resources))
        .route("/resources/{kind}/{*name}", delete(delete_resource))
        .route("/raw", post(post_raw))
        .with_state(shared)
}

type Shr = State<Arc<Shared>>;

fn bad_request(message: impl Into<String>) -> Response {
    let mut m = message.into();
    m.push('\n');
    (StatusCode::BAD_REQUEST, m).into_response()
}

async fn clients(State(shared): Shr) -> Response {
    Json(shared.registry().clients()).into_response()
}

async fn nacks(State(shared): Shr) -> Response {
    Json(shared.registry().nacks()).into_response()
}

async fn get_state(State(shared): Shr) -> Response {
    Json(shared.summary()).into_response()
}

async fn get_ca(State(shared): Shr) -> Response {
    Json(shared.ca.info()).into_response()
}

async fn put_state(State(shared): Shr, body: Bytes) -> Response {
    let Ok(yaml) = std::str::from_utf8(&body) else {
        return bad_request("the body must be local-config YAML (UTF-8)");
    };
    match shared.set_state_yaml(yaml) {
        Ok(()) => ok_counts("state replaced", &shared),
        Err(e) => bad_request(format!("invalid state, nothing changed: {e}")),
    }
}

async fn post_resources(State(shared): Shr, body: Bytes) -> Response {
    let Ok(yaml) = std::str::from_utf8(&body) else {
        return bad_request("the body must be local-config YAML (UTF-8)");
    };
    match shared.upsert_yaml(yaml) {
        Ok(()) => ok_counts("resources upserted", &shared),
        Err(e) => bad_request(format!("invalid resources, nothing changed: {e}")),
    }
}

fn ok_counts(what: &str, shared: &Shared) -> Response {
    let s = shared.summary();
    format!(
        "{what}: now {} address and {} authorization resources\n",
        s.address.resources.len(),
        s.authorization.resources.len()
    )
    .into_response()
}

async fn delete_resource(
    State(shared): Shr,
    Path((kind, name)): Path<(String, String)>,
) -> Response {
    let kind: Kind = match kind.parse() {
        Ok(k) => k,
        Err(e) => return bad_request(e.to_string()),
    };
    let name = name.trim_start_matches('/');
    if name.is_empty() {
        return bad_request("missing resource name after /resources/{kind}/");
    }
    if shared.remove(kind, name) {
        format!("removed {kind} {name:?}\n").into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("no {kind} resource named {name:?} (see GET /state)\n"),
        )
            .into_response()
    }
}

async fn post_raw(
    State(shared): Shr,
    Query(params): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let kind: Kind = match params.get("type").map(|t| t.parse()) {
        Some(Ok(k)) => k,
        Some(Err(e)) => return bad_request(format!("query parameter `type`: {e}")),
        None => {
            return bad_request("missing query parameter `type` (`address` or `authorization`)")
        }
    };
    let name = match params.get("name") {
        Some(n) if !n.is_empty() => n,
        _ => return bad_request("missing query parameter `name` (the resource name to serve)"),
    };
    let len = body.len();
    shared.push_raw(kind, name, body.to_vec());
    format!("serving {len} raw bytes as {kind} {name:?}\n").into_response()
}
