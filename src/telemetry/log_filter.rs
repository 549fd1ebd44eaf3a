//! The log filter as operators change it at runtime (`/logging`): parsing a request into
//! `tracing` directives with a precise error, and merging them into the current filter. Pure.
//!
//! Accepted spellings, per comma-separated item: a level (`debug`: the default level), a
//! `target=level` directive (`access=debug`, `l4mesh::proxy=trace`, also with span filters as
//! `RUST_LOG` allows), or ztunnel's and Envoy's `target:level`. A bare word that is not a level is
//! refused: as a `tracing` directive it would silently mean "target <word> at trace". Levels are
//! the six words only: `tracing` would also take an empty level (as `error`) and numbers (`0`
//! as `off` … `5` as `trace`), which read like mistakes, so both are refused.

use std::str::FromStr;

use tracing_subscriber::filter::{Directive, LevelFilter};

/// Why a requested filter cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("expected a level (off, error, warn, info, debug, trace) or target=level directives, found an empty filter")]
    Empty,
    #[error("expected a level (off, error, warn, info, debug, trace) or a target=level directive, found {0:?}")]
    NotALevel(String),
    #[error("directive {directive:?}: expected a level (off, error, warn, info, debug, trace) after '=', found {level:?}")]
    BadLevel { directive: String, level: String },
    #[error("directive {directive:?}: expected a level (off, error, warn, info, debug, trace) after the target, found none")]
    EmptyLevel { directive: String },
    #[error("directive {directive:?} is not a valid tracing filter directive: {reason}")]
    Directive { directive: String, reason: String },
}

/// Splits and checks a requested filter; returns its directives in `target=level` form.
pub fn parse(spec: &str) -> Result<Vec<String>, FilterError> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let d = normalise(item);
        match d.rsplit_once('=') {
            None => {
                if !is_level(&d) {
                    return Err(FilterError::NotALevel(item.to_owned()));
                }
            }
            Some((_, level)) if level.trim().is_empty() => {
                return Err(FilterError::EmptyLevel {
                    directive: item.to_owned(),
                });
            }
            Some((_, level)) => {
                if !is_level(level) {
                    return Err(FilterError::BadLevel {
                        directive: item.to_owned(),
                        level: level.to_owned(),
                    });
                }
            }
        }
        Directive::from_str(&d).map_err(|e| FilterError::Directive {
            directive: item.to_owned(),
            reason: e.to_string(),
        })?;
        out.push(d);
    }
    if out.is_empty() {
        return Err(FilterError::Empty);
    }
    Ok(out)
}

/// One of the six level words, in any case (what `LevelFilter` parses, without its numbers and
/// its empty string).
fn is_level(s: &str) -> bool {
    ["off", "error", "warn", "info", "debug", "trace"]
        .iter()
        .any(|l| s.eq_ignore_ascii_case(l))
        && LevelFilter::from_str(s).is_ok()
}

/// `target:level` (ztunnel, Envoy) → `target=level`; a module path's `::` is left alone.
fn normalise(item: &str) -> String {
    if item.contains('=') {
        return item.to_owned();
    }
    match item.rsplit_once(':') {
        Some((target, level)) if !target.is_empty() && !target.ends_with(':') => {
            format!("{target}={level}")
        }
        _ => item.to_owned(),
    }
}

/// What a directive sets: its target (with span filters), or `""` for the default level.
fn key(directive: &str) -> &str {
    directive.rsplit_once('=').map_or("", |(k, _)| k)
}

/// `current` with each of `changes` replacing the directive of the same target (or the default
/// level), others kept; the default level first.
pub fn merge(current: &str, changes: &[String]) -> String {
    let mut ds: Vec<String> = current
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(normalise)
        .collect();
    for c in changes {
        match ds.iter_mut().find(|d| key(d) == key(c)) {
            Some(d) => d.clone_from(c),
            None => ds.push(c.clone()),
        }
    }
    ds.sort_by_key(|d| !key(d).is_empty());
    ds.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(parse("debug").unwrap(), vec!["debug"]);
        assert_eq!(
            parse("access=debug, info").unwrap(),
            vec!["access=debug", "info"]
        );
        // ztunnel / Envoy spelling, with a module path.
        assert_eq!(
            parse("l4mesh::proxy:trace,access:warn").unwrap(),
            vec!["l4mesh::proxy=trace", "access=warn"]
        );
    }

    #[test]
    fn errors_name_what_was_wrong() {
        assert_eq!(parse(" , ").unwrap_err(), FilterError::Empty);
        assert_eq!(
            parse("verbose").unwrap_err(),
            FilterError::NotALevel("verbose".into())
        );
        let e = parse("info,access=loud").unwrap_err();
        assert_eq!(
            e,
            FilterError::BadLevel {
                directive: "access=loud".into(),
                level: "loud".into()
            }
        );
        assert!(e.to_string().contains("\"loud\""), "{e}");
    }

    #[test]
    fn empty_and_numeric_levels_are_refused() {
        // `tracing` reads an empty level as `error`: silently turning a target's logs down.
        for spec in ["access=", "access:", "info,access= "] {
            let e = parse(spec).unwrap_err();
            let directive = spec.rsplit(',').next().unwrap().trim();
            assert_eq!(
                e,
                FilterError::EmptyLevel {
                    directive: directive.into()
                },
                "{spec}"
            );
            assert!(e.to_string().contains("found none"), "{e}");
            assert!(e.to_string().contains(&format!("{directive:?}")), "{e}");
        }
        // `tracing` reads 0..=5 as off..trace; only the words are accepted.
        let e = parse("access=0").unwrap_err();
        assert_eq!(
            e,
            FilterError::BadLevel {
                directive: "access=0".into(),
                level: "0".into()
            }
        );
        assert!(
            e.to_string()
                .contains("off, error, warn, info, debug, trace"),
            "{e}"
        );
        assert_eq!(parse("5").unwrap_err(), FilterError::NotALevel("5".into()));
        assert_eq!(
            parse("access:3").unwrap_err(),
            FilterError::BadLevel {
                directive: "access:3".into(),
                level: "3".into()
            }
        );
        // Case does not matter for the words.
        assert_eq!(parse("access=DEBUG").unwrap(), vec!["access=DEBUG"]);
    }

    #[test]
    fn merge_replaces_by_target() {
        let changes = parse("access=debug").unwrap();
        assert_eq!(merge("info", &changes), "info,access=debug");
        let changes = parse("warn,access=info").unwrap();
        assert_eq!(
            merge("info,access=debug,h2=off", &changes),
            "warn,access=info,h2=off"
        );
        assert_eq!(merge("", &parse("debug").unwrap()), "debug");
    }
}
