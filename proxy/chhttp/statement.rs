//! Read-only by construction: what a statement is, decided before anything is sent.
//!
//! Owns classifying the SQL a BI tool sends: leading whitespace and comments
//! (`--`, `#!`/`# `, `/* */`) skipped, the first keyword decides
//! ([`Kind`]): `SELECT`, `WITH`, `(`, `SHOW`, `DESCRIBE`/`DESC`, `EXISTS`,
//! `EXPLAIN` pass; anything else, and a body with a second statement after a
//! `;` outside strings, identifiers and comments, is refused ([`Refusal`]).
//! It also gives the text the cache key uses (leading comments and trailing
//! whitespace and `;` removed) and the `FORMAT` the statement names. It does
//! not parse SQL beyond that: ClickHouse does, under `readonly`.

/// What a statement that may be sent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `SELECT`, `WITH … SELECT`, `(SELECT …)`: cacheable.
    Select,
    /// `SHOW`, `DESCRIBE`, `DESC`, `EXISTS`, `EXPLAIN`: metadata, passed through.
    Metadata,
}

/// Why a statement is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Empty,
    /// A statement that writes or changes state (`INSERT`, `ALTER`, `SET`, …).
    NotReadOnly(String),
    /// Its first word starts no statement ClickHouse knows (as ClickHouse,
    /// a syntax error).
    Unknown(String),
    /// A second statement follows the first.
    MultiStatement,
    /// A string, quoted identifier or comment that never closes.
    Unterminated,
}

impl Refusal {
    /// The text of the ClickHouse exception it becomes.
    pub fn message(&self) -> String {
        match self {
            Refusal::Empty => "Empty query".into(),
            Refusal::NotReadOnly(word) => format!(
                "Cannot execute query in readonly mode: dashcache passes only SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN (got `{word}`)"
            ),
            Refusal::Unknown(word) => {
                format!("Syntax error: failed at position 1: `{word}` starts no statement")
            }
            Refusal::MultiStatement => "Multi-statements are not allowed".into(),
            Refusal::Unterminated => {
                "Syntax error: a string, quoted identifier or comment is not closed".into()
            }
        }
    }
}

/// A statement that may be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement<'a> {
    pub kind: Kind,
    /// The statement without leading comments and whitespace, trailing
    /// whitespace and a final `;` (what the cache key uses).
    pub text: &'a str,
}

/// First words of statements that write or change state.
const WRITES: &[&str] = &[
    "INSERT", "CREATE", "ALTER", "DROP", "DELETE", "UPDATE", "TRUNCATE", "RENAME", "EXCHANGE",
    "ATTACH", "DETACH", "OPTIMIZE", "SET", "SYSTEM", "KILL", "USE", "GRANT", "REVOKE", "CHECK",
    "UNDROP", "BACKUP", "RESTORE", "MOVE", "WATCH", "BEGIN", "COMMIT", "ROLLBACK", "REPLACE",
];

/// Classifies `sql`.
pub fn classify(sql: &str) -> Result<Statement<'_>, Refusal> {
    let start = skip_comments(sql, 0)?;
    let rest = &sql[start..];
    if rest.is_empty() {
        return Err(Refusal::Empty);
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let kind = if rest.starts_with('(') {
        Kind::Select
    } else {
        match word.to_ascii_uppercase().as_str() {
            "SELECT" | "WITH" => Kind::Select,
            "SHOW" | "DESCRIBE" | "DESC" | "EXISTS" | "EXPLAIN" => Kind::Metadata,
            upper if WRITES.contains(&upper) => return Err(Refusal::NotReadOnly(word)),
            _ => {
                let shown: String = if word.is_empty() {
                    rest.chars().take(16).collect()
                } else {
                    word
                };
                return Err(Refusal::Unknown(shown));
            }
        }
    };
    let end = statement_end(sql, start)?;
    let text = sql[start..end].trim_end();
    let text = text.strip_suffix(';').unwrap_or(text).trim_end();
    Ok(Statement { kind, text })
}

/// The end of the one statement starting at `from`: the whole text, or just
/// past a `;` that only whitespace and comments follow.
fn statement_end(sql: &str, from: usize) -> Result<usize, Refusal> {
    let bytes = sql.as_bytes();
    let mut at = from;
    while at < bytes.len() {
        match bytes[at] {
            quote @ (b'\'' | b'"' | b'`') => at = after_quoted(bytes, at, quote)?,
            b'-' if bytes.get(at + 1) == Some(&b'-') => at = after_line(bytes, at),
            b'/' if bytes.get(at + 1) == Some(&b'*') => at = after_block(bytes, at)?,
            b';' => {
                let next = skip_comments(sql, at + 1)?;
                return if next == sql.len() {
                    Ok(at + 1)
                } else {
                    Err(Refusal::MultiStatement)
                };
            }
            _ => at += 1,
        }
    }
    Ok(sql.len())
}

/// Past whitespace and comments from `at`.
fn skip_comments(sql: &str, mut at: usize) -> Result<usize, Refusal> {
    let bytes = sql.as_bytes();
    loop {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        let next = bytes.get(at + 1).copied();
        match (bytes.get(at), next) {
            (Some(b'-'), Some(b'-')) => at = after_line(bytes, at),
            (Some(b'#'), Some(b'!' | b' ')) => at = after_line(bytes, at),
            (Some(b'/'), Some(b'*')) => at = after_block(bytes, at)?,
            _ => return Ok(at),
        }
    }
}

fn after_line(bytes: &[u8], at: usize) -> usize {
    memchr::memchr(b'\n', &bytes[at..]).map_or(bytes.len(), |nl| at + nl + 1)
}

fn after_block(bytes: &[u8], at: usize) -> Result<usize, Refusal> {
    memchr::memmem::find(&bytes[at + 2..], b"*/")
        .map(|end| at + 2 + end + 2)
        .ok_or(Refusal::Unterminated)
}

/// Past a quoted string or identifier (backslash escapes and doubled quotes).
fn after_quoted(bytes: &[u8], at: usize, quote: u8) -> Result<usize, Refusal> {
    let mut i = at + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b if b == quote => {
                if bytes.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return Ok(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    Err(Refusal::Unterminated)
}

/// The output format a statement names with a final `FORMAT <name>`, if any.
pub fn format_clause(text: &str) -> Option<&str> {
    let trimmed = text.trim_end();
    let name_start = trimmed
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    let name = &trimmed[name_start..];
    let before = trimmed[..name_start].trim_end();
    let keyword = before.get(before.len().checked_sub(6)?..)?;
    let boundary = before[..before.len() - 6]
        .chars()
        .next_back()
        .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
    (!name.is_empty()
        && name_start > before.len()
        && keyword.eq_ignore_ascii_case("format")
        && boundary)
        .then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_statements_pass_with_their_key_text() {
        for (sql, kind, text) in [
            ("SELECT 1", Kind::Select, "SELECT 1"),
            ("  select 1 ;  \n", Kind::Select, "select 1"),
            (
                "-- panel 3\n/* x */ WITH 1 AS a SELECT a",
                Kind::Select,
                "WITH 1 AS a SELECT a",
            ),
            (
                "(SELECT 1) UNION ALL (SELECT 2)",
                Kind::Select,
                "(SELECT 1) UNION ALL (SELECT 2)",
            ),
            ("SHOW TABLES", Kind::Metadata, "SHOW TABLES"),
            ("desc demo.events", Kind::Metadata, "desc demo.events"),
            ("DESCRIBE TABLE t", Kind::Metadata, "DESCRIBE TABLE t"),
            ("EXISTS TABLE t", Kind::Metadata, "EXISTS TABLE t"),
            ("EXPLAIN SELECT 1", Kind::Metadata, "EXPLAIN SELECT 1"),
            (
                "SELECT 'a;b', `c;`, \"d;\" -- e;f",
                Kind::Select,
                "SELECT 'a;b', `c;`, \"d;\" -- e;f",
            ),
            (
                "SELECT 'it''s; \\' ;' ; -- done\n",
                Kind::Select,
                "SELECT 'it''s; \\' ;'",
            ),
            ("SELECT 1 /* ; */", Kind::Select, "SELECT 1 /* ; */"),
        ] {
            let statement = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            assert_eq!((statement.kind, statement.text), (kind, text), "{sql}");
        }
    }

    #[test]
    fn writes_and_second_statements_are_refused() {
        for (sql, refusal) in [
            (
                "INSERT INTO t VALUES (1)",
                Refusal::NotReadOnly("INSERT".into()),
            ),
            (
                "-- SELECT\nDROP TABLE t",
                Refusal::NotReadOnly("DROP".into()),
            ),
            (
                "/* SELECT */ alter table t delete where 1",
                Refusal::NotReadOnly("alter".into()),
            ),
            ("SET readonly = 0", Refusal::NotReadOnly("SET".into())),
            ("SELECTX 1", Refusal::Unknown("SELECTX".into())),
            ("SELEC 1", Refusal::Unknown("SELEC".into())),
            ("SELECT 1; DROP TABLE t", Refusal::MultiStatement),
            ("SELECT 1;SELECT 2", Refusal::MultiStatement),
            (
                "SELECT ';' ; INSERT INTO t VALUES (1)",
                Refusal::MultiStatement,
            ),
            ("", Refusal::Empty),
            ("  -- only a comment\n", Refusal::Empty),
            ("SELECT 'open", Refusal::Unterminated),
            ("/* open SELECT 1", Refusal::Unterminated),
        ] {
            assert_eq!(classify(sql), Err(refusal), "{sql}");
        }
    }

    #[test]
    fn the_format_clause_is_found_at_the_end_only() {
        assert_eq!(format_clause("SELECT 1 FORMAT JSON"), Some("JSON"));
        assert_eq!(
            format_clause("SELECT 1\n format  JSONEachRow"),
            Some("JSONEachRow")
        );
        assert_eq!(format_clause("SELECT 1"), None);
        assert_eq!(format_clause("SELECT 1 AS informat"), None);
        assert_eq!(format_clause("SELECT 1 AS xformat JSON"), None);
        assert_eq!(format_clause("SELECT formatX"), None);
    }
}
