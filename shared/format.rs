//! Answer formats: what a client asks for (`format=`), what ClickHouse is asked
//! to produce, and the content type sent back.
//!
//! dashcache never re-encodes a body: each format maps to one ClickHouse output
//! format whose bytes are passed through and cached as they are.

use crate::params::{Problem, RawParam};

/// A response format a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// ClickHouse's `JSON` layout: `meta`, `data`, `rows`, `statistics`.
    Json,
    /// `CSVWithNames`: a header line, then one line per row.
    Csv,
    /// `JSONEachRow`: one JSON object per line.
    Ndjson,
    /// `TSVWithNames`: a header line, then tab-separated rows.
    Tsv,
}

impl Format {
    /// Every format, in the order documents list them.
    pub const ALL: [Format; 4] = [Format::Json, Format::Csv, Format::Ndjson, Format::Tsv];
    /// What exports stream: formats with one row per line.
    pub const LINES: [Format; 3] = [Format::Ndjson, Format::Csv, Format::Tsv];

    /// Parses the `format` parameter.
    pub fn from_param(text: &str) -> Option<Format> {
        Self::ALL.into_iter().find(|f| f.name() == text)
    }

    /// Separates the `format` parameter from a request's others; a value
    /// outside `allowed` or a repeat is a problem.
    pub fn split_param<'a>(
        raw: Vec<RawParam<'a>>,
        allowed: &[Format],
    ) -> (Option<Format>, Vec<RawParam<'a>>, Vec<Problem>) {
        let mut format = None;
        let mut problems = Vec::new();
        let mut params = Vec::with_capacity(raw.len());
        let mut seen = false;
        for (name, value) in raw {
            if name != "format" {
                params.push((name, value));
                continue;
            }
            if value.is_empty() {
                continue; // `format=`: not given, like any other empty parameter
            }
            if seen {
                problems.push(Problem::query(
                    "format",
                    "duplicate_parameter",
                    "given more than once",
                ));
                continue;
            }
            seen = true;
            match Format::from_param(&value).filter(|f| allowed.contains(f)) {
                Some(f) => format = Some(f),
                None => {
                    let names: Vec<&str> = allowed.iter().map(|f| f.name()).collect();
                    problems.push(Problem::query(
                        "format",
                        "enum",
                        format!("must be one of: {}", names.join(", ")),
                    ));
                }
            }
        }
        (format, params, problems)
    }

    /// The name clients use in `format=`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
            Format::Tsv => "tsv",
        }
    }

    /// File name extension of a download.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
            Format::Tsv => "tsv",
        }
    }

    /// The line format a client's `Accept` header asks for, if any.
    pub fn from_accept(accept: &str) -> Option<Format> {
        accept.split(',').find_map(|item| {
            let media = item.split(';').next().unwrap_or("").trim();
            match media {
                "application/x-ndjson" | "application/jsonl" | "application/json-seq" => {
                    Some(Format::Ndjson)
                }
                "text/csv" => Some(Format::Csv),
                "text/tab-separated-values" => Some(Format::Tsv),
                _ => None,
            }
        })
    }

    /// The ClickHouse output format producing it.
    pub fn clickhouse(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::Csv => "CSVWithNames",
            Format::Ndjson => "JSONEachRow",
            Format::Tsv => "TSVWithNames",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
            Format::Tsv => "text/tab-separated-values; charset=utf-8",
        }
    }
}
