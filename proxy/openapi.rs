//! `GET /openapi.json`: the API as an OpenAPI 3.1 document, generated from the catalog.
//!
//! Owns describing what the proxy serves: one path per query
//! (`/v1/query/revenue`, …) and per export (`/v1/export/events`, …) with
//! every declared parameter's type, allowed values, pattern, bounds, default
//! and whether it is required; the `format` parameter; every status a client
//! can get with its error body and headers; and the two ways to present an
//! API key. The document is built once at start ([`build`]) and served as the
//! same bytes to everyone, without authentication.
//!
//! It does not validate anything and decides no status: the rules it
//! describes are enforced by [`dashcache::params`] and [`dashcache::catalog`],
//! and the error answers are [`crate::error`]'s. Parameters are derived from
//! the same compiled definitions, and error statuses, `type` values and
//! headers from [`ApiError::ALL`], so those cannot drift. The rest is written
//! here by hand and is kept true only by the tests and `scripts/schemathesis`:
//! success answers (200/304 and their headers), the `/healthz` and `/readyz`
//! bodies, and the `QueryResult` and `ValidationError` schemas.

use std::collections::BTreeMap;

use bytes::Bytes;
use dashcache::catalog::{Catalog, QueryDef};
use dashcache::config::{AuthConfig, ParamType};
use dashcache::format::Format;
use dashcache::params::{MAX_RAW_LEN, ParamDef};
use dashcache::timeexpr::span_text;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::error::{self, ApiError, Surface};
use crate::reply::{self, Body};

/// What `GET /openapi.json` answers: the document built at start.
pub fn response(document: &Bytes) -> Response<Body> {
    let mut response = Response::new(reply::full(document.clone()));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The document as bytes, ready to serve.
pub fn build(catalog: &Catalog, auth: &AuthConfig) -> Bytes {
    Bytes::from(document(catalog, auth).to_string())
}

/// The OpenAPI 3.1 document for `catalog`.
pub fn document(catalog: &Catalog, auth: &AuthConfig) -> Value {
    let mut paths = Map::new();
    for query in catalog.iter() {
        paths.insert(
            format!("/v1/query/{}", query.name),
            json!({ "get": query_operation(query) }),
        );
    }
    for export in catalog.exports() {
        paths.insert(
            format!("/v1/export/{}", export.name),
            json!({ "get": export_operation(export) }),
        );
    }
    paths.insert("/healthz".into(), json!({ "get": health_operation(auth) }));
    paths.insert("/readyz".into(), json!({ "get": ready_operation(auth) }));
    paths.insert("/metrics".into(), json!({ "get": metrics_operation(auth) }));
    paths.insert(
        "/openapi.json".into(),
        json!({ "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["service"],
            "security": [],
            "responses": { "200": {
                "description": "The OpenAPI 3.1 document, generated from the query catalog at start",
                "content": { "application/json": { "schema": { "type": "object" } } }
            } }
        } }),
    );

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "dashcache",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "Named, parameterized ClickHouse queries, cached and coalesced",
            "description": "Every query is a path of its own under `/v1/query/`, every export \
                under `/v1/export/`. Parameters are validated before any I/O: a problem is a 422 \
                naming each bad field. Lists are comma-separated and are sets (order and repeats \
                do not matter). An empty value (`country=`) means the parameter was not given. \
                The tenant comes from the API key, never from the URL.",
        },
        "tags": [
            { "name": "queries", "description": "Cached answers (`X-Cache` says where from)" },
            { "name": "exports", "description": "Raw rows streamed from ClickHouse, never cached" },
            { "name": "service", "description": "Liveness, readiness, metrics and this document" },
        ],
        "security": api_key(),
        "paths": paths,
        "components": components(),
    })
}

/// Either way of presenting an API key.
fn api_key() -> Value {
    json!([{ "bearer": [] }, { "apiKey": [] }])
}

fn query_operation(query: &QueryDef) -> Value {
    let mut parameters: Vec<Value> = query.params.iter().map(|p| parameter(p, query)).collect();
    parameters.push(format_parameter(&Format::ALL, Format::Json));
    let mut description = query_description(query);
    description.push_str(&format!(
        "\n\nAnswers are fresh for {} (`X-Cache: HIT`), then served `STALE` for up to {} \
         while they are refreshed. `If-None-Match` with a stored answer's `ETag` gives 304.",
        span_text(query.ttl),
        span_text(query.grace)
    ));
    let ok_headers = json!({
        "X-Cache": { "$ref": "#/components/headers/X-Cache" },
        "ETag": { "$ref": "#/components/headers/ETag" },
        "Age": { "$ref": "#/components/headers/Age" },
        "Cache-Control": { "$ref": "#/components/headers/Cache-Control" },
        "Content-Encoding": { "$ref": "#/components/headers/Content-Encoding" },
        "Vary": { "$ref": "#/components/headers/Vary" },
        "Server-Timing": { "$ref": "#/components/headers/Server-Timing" },
        "RateLimit-Limit": { "$ref": "#/components/headers/RateLimit-Limit" },
        "RateLimit-Remaining": { "$ref": "#/components/headers/RateLimit-Remaining" },
        "RateLimit-Reset": { "$ref": "#/components/headers/RateLimit-Reset" },
    });
    let mut responses = json!({
        "200": {
            "description": "The answer, in the requested format",
            "headers": ok_headers,
            "content": {
                "application/json": { "schema": { "$ref": "#/components/schemas/QueryResult" } },
                "text/csv": { "schema": { "type": "string" } },
                "application/x-ndjson": { "schema": { "type": "string" } },
                "text/tab-separated-values": { "schema": { "type": "string" } },
            },
        },
        "304": {
            "description": "Not modified: the stored answer still has the `ETag` given in `If-None-Match`",
            "headers": {
                "X-Cache": { "$ref": "#/components/headers/X-Cache" },
                "ETag": { "$ref": "#/components/headers/ETag" },
                "Age": { "$ref": "#/components/headers/Age" },
                "Cache-Control": { "$ref": "#/components/headers/Cache-Control" },
            },
        },
    });
    add_errors(&mut responses, Surface::Query);
    json!({
        "operationId": format!("query_{}", query.name),
        "summary": query.description.clone().unwrap_or_else(|| format!("Query `{}`", query.name)),
        "description": description,
        "tags": ["queries"],
        "parameters": parameters,
        "responses": responses,
    })
}

fn export_operation(export: &QueryDef) -> Value {
    let mut parameters: Vec<Value> = export.params.iter().map(|p| parameter(p, export)).collect();
    parameters.push(format_parameter(&Format::LINES, Format::Ndjson));
    let mut description = query_description(export);
    description.push_str(
        "\n\nStreamed straight from ClickHouse with backpressure, never cached. Without \
         `format`, the `Accept` header picks it (`text/csv`, `text/tab-separated-values`, \
         `application/x-ndjson`), else NDJSON. A failure after the first row ends NDJSON with \
         one line `{\"error\": {\"type\", \"code\", \"detail\"}}`, and cuts a CSV/TSV transfer \
         (the chunked body never terminates properly).",
    );
    let mut responses = json!({
        "200": {
            "description": "The rows, streamed in the requested format",
            "headers": {
                "Content-Disposition": {
                    "description": "`attachment; filename=\"<export>.<ext>\"`",
                    "schema": { "type": "string" },
                },
                "X-Dashcache-Query-Id": {
                    "description": "The export's ClickHouse `query_id` (system.processes)",
                    "schema": { "type": "string" },
                },
                "Cache-Control": {
                    "description": "Always `no-store`",
                    "schema": { "type": "string" },
                },
                "Content-Encoding": { "$ref": "#/components/headers/Content-Encoding" },
                "Vary": { "$ref": "#/components/headers/Vary" },
                "RateLimit-Limit": { "$ref": "#/components/headers/RateLimit-Limit" },
                "RateLimit-Remaining": { "$ref": "#/components/headers/RateLimit-Remaining" },
                "RateLimit-Reset": { "$ref": "#/components/headers/RateLimit-Reset" },
            },
            "content": {
                "application/x-ndjson": { "schema": { "type": "string" } },
                "text/csv": { "schema": { "type": "string" } },
                "text/tab-separated-values": { "schema": { "type": "string" } },
            },
        },
    });
    add_errors(&mut responses, Surface::Export);
    json!({
        "operationId": format!("export_{}", export.name),
        "summary": export.description.clone().unwrap_or_else(|| format!("Export `{}`", export.name)),
        "description": description,
        "tags": ["exports"],
        "parameters": parameters,
        "responses": responses,
    })
}

/// What every query and export says about itself: its range rule and tenancy.
fn query_description(query: &QueryDef) -> String {
    let mut text = query
        .description
        .clone()
        .unwrap_or_else(|| format!("`{}`", query.name));
    text.push('.');
    if let Some(rule) = range_rule(query) {
        text.push_str("\n\n");
        text.push_str(&rule);
    }
    if query.tenant_scoped {
        text.push_str("\n\nPer tenant: answers are the API key's tenant's.");
    }
    text
}

/// The range rule in words: which parameters bound it and how wide it may be.
fn range_rule(query: &QueryDef) -> Option<String> {
    let range = query.range.as_ref()?;
    let mut text = format!(
        "The range is half-open, [`{}`, `{}`); `{}` must be after `{}`. ",
        range.from, range.to, range.to, range.from
    );
    let granularity = range
        .granularity
        .as_deref()
        .and_then(|g| query.params.iter().find(|p| p.name == g));
    match granularity {
        Some(g) => {
            let spans: Vec<String> = g
                .values
                .iter()
                .filter_map(|v| {
                    range
                        .max_span(Some(v))
                        .map(|s| format!("{}={v}: {}", g.name, span_text(s)))
                })
                .collect();
            text.push_str(&format!("At most: {}.", spans.join("; ")));
        }
        None => {
            if let Some(max) = range.max_span(None) {
                text.push_str(&format!("At most {}.", span_text(max)));
            }
        }
    }
    Some(text)
}

/// One declared parameter as an OpenAPI query parameter.
fn parameter(param: &ParamDef, query: &QueryDef) -> Value {
    let mut schema = Map::new();
    let mut description = param.description.clone().unwrap_or_default();
    let mut note = |text: String| {
        if !description.is_empty() {
            description.push_str(". ");
        }
        description.push_str(&text);
    };
    if param.list {
        let item = item_pattern(param);
        schema.insert("type".into(), json!("string"));
        schema.insert(
            "pattern".into(),
            json!(format!(
                "^(?:{item})(?:,(?:{item})){{0,{}}}$",
                param.max_items.saturating_sub(1)
            )),
        );
        schema.insert("maxLength".into(), json!(MAX_RAW_LEN));
        note(format!(
            "Comma-separated list of up to {} items, each {}; a set (order and repeats do not matter)",
            param.max_items,
            item_words(param)
        ));
    } else {
        match param.kind {
            ParamType::Int => {
                schema.insert("type".into(), json!("integer"));
                schema.insert("format".into(), json!("int64"));
                if let Some(min) = param.min {
                    schema.insert("minimum".into(), json!(min));
                }
                if let Some(max) = param.max {
                    schema.insert("maximum".into(), json!(max));
                }
            }
            ParamType::Enum => {
                schema.insert("type".into(), json!("string"));
                schema.insert("enum".into(), json!(param.values));
            }
            ParamType::String if !param.values.is_empty() => {
                schema.insert("type".into(), json!("string"));
                schema.insert("enum".into(), json!(param.values));
            }
            ParamType::String => {
                schema.insert("type".into(), json!("string"));
                schema.insert(
                    "pattern".into(),
                    json!(format!("^(?:{})$", param.pattern_text())),
                );
                schema.insert("maxLength".into(), json!(param.max_len.min(MAX_RAW_LEN)));
            }
            ParamType::Time => {
                schema.insert("type".into(), json!("string"));
                schema.insert("maxLength".into(), json!(MAX_RAW_LEN));
                schema.insert("examples".into(), time_examples(param, query));
                note(TIME_GRAMMAR.to_owned());
            }
        }
    }
    if let Some(default) = &param.default {
        let value = match (param.kind, param.list, default.parse::<i64>()) {
            (ParamType::Int, false, Ok(n)) => json!(n),
            _ => json!(default),
        };
        schema.insert("default".into(), value);
    }
    if let Some(range) = &query.range {
        if param.name == range.to {
            note(format!(
                "End of the range (exclusive); after `{}`",
                range.from
            ));
        } else if param.name == range.from {
            note("Start of the range (inclusive)".to_owned());
        }
    }
    let mut out = json!({
        "name": param.name,
        "in": "query",
        "required": param.required,
        "schema": schema,
    });
    if !description.is_empty() {
        out["description"] = json!(description);
    }
    out
}

/// Examples of a time parameter; a range's `from` and `to` examples pair up
/// into valid ranges (7 days, then 30 days), so the first examples work.
fn time_examples(param: &ParamDef, query: &QueryDef) -> Value {
    match &query.range {
        Some(range) if param.name == range.from => {
            json!(["now-7d", "today-30d", "2026-11-01", "2026-11-01 08:00:00"])
        }
        Some(range) if param.name == range.to => {
            json!(["now", "today", "2026-11-08", "2026-11-02T08:00:00+01:00"])
        }
        _ => json!(["now-7d", "today", "2026-11-01", "2026-11-01T08:00:00Z"]),
    }
}

/// The grammar of `time` parameters, for people ([`dashcache::timeexpr`]).
const TIME_GRAMMAR: &str = "A point in time: `YYYY-MM-DD` (midnight UTC), `YYYY-MM-DD HH:MM:SS` \
    (UTC), RFC 3339 (`2026-11-01T08:00:00+01:00`), or relative: `now`, `today`, \
    `start_of_month`, each optionally followed by `-` or `+` and a duration (`now-7d`, \
    `today-30d`, `now-1h30m`). `now` is rounded down to the minute. Between 1970-01-01 and \
    2106-02-07";

/// A regular expression for one list item.
fn item_pattern(param: &ParamDef) -> String {
    match param.kind {
        ParamType::Int | ParamType::Time => "-?[0-9]+".into(),
        _ if !param.values.is_empty() => param
            .values
            .iter()
            .map(|v| regex::escape(v))
            .collect::<Vec<_>>()
            .join("|"),
        _ => param.pattern_text().to_owned(),
    }
}

/// A list item's rule in words.
fn item_words(param: &ParamDef) -> String {
    match param.kind {
        ParamType::Int | ParamType::Time => match (param.min, param.max) {
            (Some(min), Some(max)) => format!("a whole number in {min}..={max}"),
            (Some(min), None) => format!("a whole number of at least {min}"),
            (None, Some(max)) => format!("a whole number of at most {max}"),
            (None, None) => "a whole number".into(),
        },
        _ if !param.values.is_empty() => format!("one of {}", param.values.join(", ")),
        _ => format!("matching `{}`", param.pattern_text()),
    }
}

/// The `format` parameter: which of `allowed` the answer comes in.
fn format_parameter(allowed: &[Format], default: Format) -> Value {
    let names: Vec<&str> = allowed.iter().map(|f| f.name()).collect();
    let types: Vec<String> = allowed
        .iter()
        .map(|f| format!("`{}`: {}", f.name(), f.content_type()))
        .collect();
    json!({
        "name": "format",
        "in": "query",
        "required": false,
        "description": format!("Response format. {}", types.join("; ")),
        "schema": { "type": "string", "enum": names, "default": default.name() },
    })
}

fn health_operation(auth: &AuthConfig) -> Value {
    let mut responses = json!({
        "200": {
            "description": "The process runs",
            "content": { "application/json": { "schema": {
                "type": "object",
                "required": ["status"],
                "properties": { "status": { "type": "string" } },
            } } },
        },
    });
    protect(&mut responses, auth.protect_health);
    json!({
        "operationId": "healthz",
        "summary": "Liveness",
        "tags": ["service"],
        "security": if auth.protect_health { api_key() } else { json!([]) },
        "responses": responses,
    })
}

fn ready_operation(auth: &AuthConfig) -> Value {
    let check = json!({
        "type": "object",
        "required": ["ok"],
        "properties": { "ok": { "type": "boolean" }, "error": { "type": "string" } },
    });
    let body = json!({ "application/json": { "schema": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": { "type": "string", "enum": ["ready", "not_ready"] },
            "checks": { "type": "object", "additionalProperties": check },
        },
    } } });
    let mut responses = json!({
        "200": { "description": "ClickHouse and Redis answer", "content": body.clone() },
        "503": { "description": "A dependency does not answer; `checks` says which", "content": body },
    });
    protect(&mut responses, auth.protect_health);
    json!({
        "operationId": "readyz",
        "summary": "Readiness: ClickHouse and Redis reachable",
        "tags": ["service"],
        "security": if auth.protect_health { api_key() } else { json!([]) },
        "responses": responses,
    })
}

fn metrics_operation(auth: &AuthConfig) -> Value {
    let mut responses = json!({
        "200": {
            "description": "Prometheus metrics (OpenMetrics text)",
            "content": {
                "application/openmetrics-text": { "schema": { "type": "string" } },
                "text/plain": { "schema": { "type": "string" } },
            },
        },
    });
    protect(&mut responses, auth.protect_metrics);
    json!({
        "operationId": "metrics",
        "summary": "Prometheus metrics",
        "description": if auth.protect_metrics {
            "Needs a key of a tier with `operator = true` (`auth.protect_metrics`)"
        } else {
            "Open: names no tenant, key or query parameter"
        },
        "tags": ["service"],
        "security": if auth.protect_metrics { api_key() } else { json!([]) },
        "responses": responses,
    })
}

/// The answers an API key check adds to a route.
fn protect(responses: &mut Value, protected: bool) {
    if protected {
        add_errors(responses, Surface::Service);
    }
}

/// The error kinds `surface` can answer, by status ([`ApiError::surfaces`]).
fn errors_by_status(surface: Surface) -> BTreeMap<u16, Vec<ApiError>> {
    let mut by_status: BTreeMap<u16, Vec<ApiError>> = BTreeMap::new();
    for kind in ApiError::ALL {
        if kind.surfaces().contains(&surface) {
            by_status
                .entry(kind.status().as_u16())
                .or_default()
                .push(kind);
        }
    }
    by_status
}

/// The name under `#/components/responses` of `surface`'s `status` answer.
fn error_response_name(surface: Surface, status: u16) -> String {
    format!("{}_{status}", surface.as_str())
}

/// Adds to `responses` every error status `surface` can answer.
fn add_errors(responses: &mut Value, surface: Surface) {
    for status in errors_by_status(surface).keys() {
        responses[status.to_string()] = json!({
            "$ref": format!("#/components/responses/{}", error_response_name(surface, *status)),
        });
    }
    if error::INVALID_SURFACES.contains(&surface) {
        responses[error::INVALID_STATUS.as_u16().to_string()] =
            json!({ "$ref": "#/components/responses/Invalid" });
    }
}

/// One status's answer: its kinds in words, the error body, the headers
/// any of them carries.
fn error_response(kinds: &[ApiError]) -> Value {
    let description: Vec<String> = kinds
        .iter()
        .map(|k| format!("{} (`{}`)", k.description(), k.as_str()))
        .collect();
    let mut headers = Map::new();
    if kinds.iter().any(|k| k.rate_limit_headers()) {
        for name in ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"] {
            headers.insert(
                name.into(),
                json!({ "$ref": format!("#/components/headers/{name}") }),
            );
        }
    }
    if kinds.iter().any(|k| k.retry_after().is_some()) {
        headers.insert(
            "Retry-After".into(),
            json!({ "$ref": "#/components/headers/Retry-After" }),
        );
    }
    for kind in kinds {
        for (name, value) in kind.headers() {
            headers.insert(
                (*name).into(),
                json!({ "description": format!("`{value}`"), "schema": { "type": "string" } }),
            );
        }
    }
    let mut response = json!({
        "description": description.join("; or "),
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
    });
    if !headers.is_empty() {
        response["headers"] = Value::Object(headers);
    }
    response
}

/// Every `type` an error body can have, once each, in [`ApiError::ALL`]'s order.
fn error_types() -> Vec<&'static str> {
    let mut types: Vec<&'static str> = Vec::new();
    for kind in ApiError::ALL {
        if !types.contains(&kind.as_str()) {
            types.push(kind.as_str());
        }
    }
    types
}

fn components() -> Value {
    let mut responses = Map::new();
    for surface in Surface::ALL {
        for (status, kinds) in errors_by_status(surface) {
            responses.insert(error_response_name(surface, status), error_response(&kinds));
        }
    }
    responses.insert(
        "Invalid".into(),
        json!({
            "description": "Invalid parameters: every problem, each naming its parameter",
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ValidationError" } } },
        }),
    );

    json!({
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <key>`; keys come from `dashcache-proxy keys add`",
            },
            "apiKey": {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": "The same key in `X-API-Key: <key>`",
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["detail", "type"],
                "properties": {
                    "detail": { "type": "string", "description": "What went wrong, for people" },
                    "type": {
                        "type": "string",
                        "enum": error_types(),
                        "description": "A stable machine-readable kind",
                    },
                },
            },
            "ValidationError": {
                "type": "object",
                "required": ["detail"],
                "properties": { "detail": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["loc", "msg", "type"],
                        "properties": {
                            "loc": {
                                "type": "array",
                                "items": { "type": "string" },
                                "minItems": 2,
                                "maxItems": 2,
                                "description": "`[\"query\", <parameter>]`",
                            },
                            "msg": { "type": "string" },
                            "type": {
                                "type": "string",
                                "description": "e.g. `missing`, `enum`, `int_parsing`, `datetime_parsing`, \
                                    `string_pattern_mismatch`, `range_too_wide`, `extra_forbidden`",
                            },
                        },
                    },
                } },
            },
            "QueryResult": {
                "type": "object",
                "description": "ClickHouse's `JSON` layout; 64-bit integers are numbers",
                "required": ["meta", "data", "rows"],
                "properties": {
                    "meta": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "type"],
                            "properties": {
                                "name": { "type": "string" },
                                "type": { "type": "string" },
                            },
                        },
                    },
                    "data": { "type": "array", "items": { "type": "object" } },
                    "rows": { "type": "integer", "minimum": 0 },
                    "rows_before_limit_at_least": { "type": "integer", "minimum": 0 },
                    "statistics": { "type": "object" },
                },
            },
        },
        "responses": responses,
        "headers": {
            "X-Cache": {
                "description": "Where the answer came from: `HIT` (stored, fresh), `STALE` (stored, \
                    being refreshed), `MISS` (this request ran the query), `COALESCED` (read along \
                    with a query another request started)",
                "schema": { "type": "string", "enum": ["HIT", "STALE", "MISS", "COALESCED"] },
            },
            "ETag": {
                "description": "The stored answer's weak entity tag (`W/\"…\"`, HIT and STALE); send it back in `If-None-Match` for a 304",
                "schema": { "type": "string" },
            },
            "Age": {
                "description": "Seconds since the stored answer was computed",
                "schema": { "type": "integer", "minimum": 0 },
            },
            "Cache-Control": {
                "description": "`private, max-age=<seconds the answer stays fresh>`",
                "schema": { "type": "string" },
            },
            "Content-Encoding": {
                "description": "`gzip` or `zstd` when the request's `Accept-Encoding` allows it; absent for identity",
                "schema": { "type": "string", "enum": ["gzip", "zstd"] },
            },
            "Vary": {
                "description": "`accept-encoding`: the body's encoding was negotiated",
                "schema": { "type": "string" },
            },
            "Server-Timing": {
                "description": "Where the request's time went (cache lookup, ClickHouse, …)",
                "schema": { "type": "string" },
            },
            "RateLimit-Limit": {
                "description": "Requests the key may make in a burst",
                "schema": { "type": "integer", "minimum": 0 },
            },
            "RateLimit-Remaining": {
                "description": "Requests left before the limit applies",
                "schema": { "type": "integer", "minimum": 0 },
            },
            "RateLimit-Reset": {
                "description": "Seconds until the full burst is available again",
                "schema": { "type": "integer", "minimum": 0 },
            },
            "Retry-After": {
                "description": "Seconds to wait before retrying",
                "schema": { "type": "integer", "minimum": 0 },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn catalog() -> (Catalog, AuthConfig) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let config = dashcache::config::Config::load(&path).expect("config.toml loads");
        (
            Catalog::compile(&config).expect("catalog"),
            config.auth.clone(),
        )
    }

    fn param<'a>(doc: &'a Value, path: &str, name: &str) -> &'a Value {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{path} has no parameter {name}"))
    }

    #[test]
    fn every_query_and_export_is_a_path_of_its_own() {
        let (catalog, auth) = catalog();
        let doc = document(&catalog, &auth);
        assert_eq!(doc["openapi"], "3.1.0");
        for query in catalog.iter() {
            let op = &doc["paths"][format!("/v1/query/{}", query.name)]["get"];
            assert_eq!(op["operationId"], format!("query_{}", query.name));
            for status in ["200", "304", "401", "403", "404", "422", "429", "503"] {
                assert!(
                    op["responses"].get(status).is_some(),
                    "{} {status}",
                    query.name
                );
            }
        }
        for export in catalog.exports() {
            let op = &doc["paths"][format!("/v1/export/{}", export.name)]["get"];
            assert!(op["responses"].get("413").is_some(), "{}", export.name);
        }
        assert_eq!(doc["paths"]["/openapi.json"]["get"]["security"], json!([]));
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert!(
                doc["paths"][path]["get"]["responses"].get("200").is_some(),
                "{path}"
            );
        }
    }

    #[test]
    fn parameters_carry_their_declared_rules() {
        let (catalog, auth) = catalog();
        let doc = document(&catalog, &auth);
        let from = param(&doc, "/v1/query/revenue", "from");
        assert_eq!(from["required"], true);
        assert_eq!(from["schema"]["type"], "string");
        assert!(from["description"].as_str().unwrap().contains("now-7d"));

        let granularity = param(&doc, "/v1/query/revenue", "granularity");
        assert_eq!(granularity["required"], false);
        assert_eq!(
            granularity["schema"]["enum"],
            json!(["minute", "hour", "day", "month"])
        );
        assert_eq!(granularity["schema"]["default"], "day");

        let limit = param(&doc, "/v1/query/top_countries", "limit");
        assert_eq!(limit["schema"]["type"], "integer");
        assert_eq!(limit["schema"]["minimum"], 1);
        assert_eq!(limit["schema"]["maximum"], 100);
        assert_eq!(limit["schema"]["default"], 10);

        let country = param(&doc, "/v1/query/revenue", "country");
        let pattern = country["schema"]["pattern"].as_str().unwrap();
        let re = regex::Regex::new(pattern).unwrap();
        assert!(re.is_match("DE,FR"));
        assert!(!re.is_match("de"));
        assert!(!re.is_match(&vec!["DE"; 51].join(",")), "max_items 50");

        let plan = param(&doc, "/v1/query/revenue", "plan");
        let re = regex::Regex::new(plan["schema"]["pattern"].as_str().unwrap()).unwrap();
        assert!(re.is_match("free,enterprise"));
        assert!(!re.is_match("gold"));

        let format = param(&doc, "/v1/query/revenue", "format");
        assert_eq!(
            format["schema"]["enum"],
            json!(["json", "csv", "ndjson", "tsv"])
        );
        let format = param(&doc, "/v1/export/events", "format");
        assert_eq!(format["schema"]["enum"], json!(["ndjson", "csv", "tsv"]));
        assert_eq!(format["schema"]["default"], "ndjson");

        let description = doc["paths"]["/v1/query/revenue"]["get"]["description"]
            .as_str()
            .unwrap();
        assert!(
            description.contains("granularity=hour: 31 days"),
            "{description}"
        );
    }

    /// The documented answer for `status` of the operation `op`.
    fn documented<'a>(doc: &'a Value, op: &Value, status: u16) -> &'a Value {
        let reference = op["responses"][status.to_string()]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{status} is not documented"));
        let name = reference.trim_start_matches("#/components/responses/");
        &doc["components"]["responses"][name]
    }

    #[test]
    fn every_error_answer_is_documented_where_it_can_happen() {
        let (catalog, mut auth) = catalog();
        auth.protect_health = true;
        auth.protect_metrics = true;
        let doc = document(&catalog, &auth);
        let query = catalog.iter().next().expect("a query");
        let export = catalog.exports().next().expect("an export");
        let operations = [
            (Surface::Query, format!("/v1/query/{}", query.name)),
            (Surface::Export, format!("/v1/export/{}", export.name)),
            (Surface::Service, "/metrics".to_owned()),
            (Surface::Service, "/healthz".to_owned()),
        ];
        for (surface, path) in &operations {
            let op = &doc["paths"][path]["get"];
            for kind in ApiError::ALL {
                if !kind.surfaces().contains(surface) {
                    continue;
                }
                let answer = documented(&doc, op, kind.status().as_u16());
                let description = answer["description"].as_str().unwrap();
                assert!(
                    description.contains(&format!("(`{}`)", kind.as_str())),
                    "{path} {kind:?}: {description}"
                );
                assert_eq!(
                    answer["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Error"
                );
                if kind.retry_after().is_some() {
                    assert!(
                        answer["headers"].get("Retry-After").is_some(),
                        "{path} {kind:?}"
                    );
                }
                for (name, _) in kind.headers() {
                    assert!(answer["headers"].get(*name).is_some(), "{path} {kind:?}");
                }
            }
        }
        // Only the statuses some kind (or invalid parameters) gives are documented.
        let op = &doc["paths"][format!("/v1/export/{}", export.name)]["get"];
        let mut statuses: Vec<String> = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        statuses.sort();
        assert_eq!(
            statuses,
            [
                "200", "400", "401", "403", "404", "413", "422", "429", "500", "503"
            ]
        );
        let op = &doc["paths"]["/healthz"]["get"];
        let mut statuses: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        statuses.sort();
        assert_eq!(statuses, ["200", "400", "401", "403", "429"]);
    }

    #[test]
    fn error_bodies_and_security_are_described() {
        let (catalog, auth) = catalog();
        let doc = document(&catalog, &auth);
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["apiKey"]["name"], "X-API-Key");
        let problem =
            &doc["components"]["schemas"]["ValidationError"]["properties"]["detail"]["items"];
        assert_eq!(problem["required"], json!(["loc", "msg", "type"]));
        assert_eq!(
            doc["components"]["schemas"]["Error"]["required"],
            json!(["detail", "type"])
        );
        // Every `type` an error body can carry is in the schema, and nothing else.
        let types = &doc["components"]["schemas"]["Error"]["properties"]["type"]["enum"];
        let mut expected: Vec<&str> = ApiError::ALL.iter().map(|k| k.as_str()).collect();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(types.as_array().unwrap().len(), expected.len());
        for kind in ApiError::ALL {
            assert!(types.as_array().unwrap().contains(&json!(kind.as_str())));
        }
        // The served bytes are the document.
        let served: Value = serde_json::from_slice(&build(&catalog, &auth)).unwrap();
        assert_eq!(served, doc);
    }
}
