//! `/logging`: read and change the log filter at runtime, in the spellings Envoy and ztunnel
//! operators know (`?level=debug`, `?level=access:debug`; Envoy's `?paths=` is the same) and
//! `RUST_LOG`'s (`?level=access=debug,info`).

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};

use super::text;
use crate::telemetry::{self, LogError};

const HELP: &str = "\
usage: GET  /logging                              the filter in force
       POST /logging?level=<level>                set the default level (off|error|warn|info|debug|trace)
       POST /logging?level=<target>=<level>,...   set levels per target (also <target>:<level>), e.g. access=debug,info
       POST /logging?reset                        back to the filter l4mesh started with (RUST_LOG, default info)
       POST /logging?reset&level=...              the startup filter with these changes
targets: access (the access log), l4mesh::proxy, l4mesh::xds, l4mesh::identity, h2, rustls, ...
";

pub(super) fn answer(method: &Method, query: Option<&str>) -> Response<Full<Bytes>> {
    let mut level: Option<String> = None;
    let mut reset = false;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "level" | "paths" => {
                level = Some(match level {
                    Some(l) => format!("{l},{v}"),
                    None => v.into_owned(),
                })
            }
            "reset" => reset = true,
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}; expected level, paths or reset\n{HELP}"),
                )
            }
        }
    }
    let change = level.is_some() || reset;
    if change && method != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("changing the log filter takes POST, found {method}\n{HELP}"),
        );
    }
    if !change {
        return match telemetry::log_filter() {
            Some(f) => text(StatusCode::OK, format!("log filter: {f}\n")),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", LogError::NotInstalled),
            ),
        };
    }
    match telemetry::set_log_filter(level.as_deref().unwrap_or(""), reset) {
        Ok(f) => text(StatusCode::OK, format!("log filter: {f}\n")),
        Err(e @ LogError::Filter(_)) => text(StatusCode::BAD_REQUEST, format!("{e}\n{HELP}")),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}
