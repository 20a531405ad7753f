//! Answer formats: what a client asks for (`format=`), what ClickHouse is asked
//! to produce, and the content type sent back.
//!
//! dashcache never re-encodes a body: each format maps to one ClickHouse output
//! format whose bytes are passed through and cached as they are.

/// A response format a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// ClickHouse's `JSON` layout: `meta`, `data`, `rows`, `statistics`.
    Json,
    /// `CSVWithNames`: a header line, then one line per row.
    Csv,
    /// `JSONEachRow`: one JSON object per line.
    Ndjson,
}

impl Format {
    /// Every format, in the order documents list them.
    pub const ALL: [Format; 3] = [Format::Json, Format::Csv, Format::Ndjson];

    /// Parses the `format` parameter.
    pub fn from_param(text: &str) -> Option<Format> {
        Self::ALL.into_iter().find(|f| f.name() == text)
    }

    /// The name clients use in `format=`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
        }
    }

    /// The ClickHouse output format producing it.
    pub fn clickhouse(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::Csv => "CSVWithNames",
            Format::Ndjson => "JSONEachRow",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
        }
    }
}
