//! SQL templates and the literals bound into them.
//!
//! A template is operator-written SQL with `{name}` placeholders (`{{` and `}}`
//! for literal braces). Rendering replaces each placeholder with the ClickHouse
//! literal of a validated [`Value`]: strings quoted and escaped, times as
//! `toDateTime(<unix seconds>)`, lists as typed arrays. User input only ever
//! reaches SQL as such a literal, after validation. ClickHouse 18.16 has no
//! server-side `{name:Type}` parameters, so binding happens here.

use std::fmt::Write as _;

use crate::params::{Bound, Value};

/// Why template text does not parse (positions are byte offsets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("malformed placeholder at byte {at} (write {{name}}, or {{{{ for a brace)")]
    Malformed { at: usize },
    #[error("empty placeholder at byte {at}")]
    Empty { at: usize },
    #[error("unmatched `}}` at byte {at} (write }}}} for a brace)")]
    Unmatched { at: usize },
}

/// A template rendered with a set that lacks one of its placeholders (the
/// catalog checks templates against the declared parameters, so this is a bug).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("placeholder {{{name}}} is not bound")]
pub struct UnboundPlaceholder {
    pub name: String,
}

/// A parsed SQL template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Param(String),
}

impl Template {
    /// Parses template text; the error says where a placeholder is malformed.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, c))
                                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' =>
                            {
                                name.push(c)
                            }
                            _ => return Err(TemplateError::Malformed { at }),
                        }
                    }
                    if name.is_empty() {
                        return Err(TemplateError::Empty { at });
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Param(name));
                }
                '}' => return Err(TemplateError::Unmatched { at }),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// The placeholder names, in order of appearance (repeats included).
    /// Feeds the template's text into `hash`: equal for equal templates.
    pub fn hash_into(&self, hash: &mut sha2::Sha256) {
        use sha2::Digest as _;
        for part in &self.parts {
            let (tag, text) = match part {
                Part::Text(text) => (b'T', text),
                Part::Param(name) => (b'P', name),
            };
            hash.update([tag]);
            hash.update((text.len() as u64).to_le_bytes());
            hash.update(text.as_bytes());
        }
    }

    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Param(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Renders the template with bound values. Every placeholder must be bound
    /// (the catalog checks this when it loads).
    pub fn render(&self, bound: &Bound) -> Result<String, UnboundPlaceholder> {
        let mut sql = String::with_capacity(self.parts.iter().map(Part::len_hint).sum());
        for part in &self.parts {
            match part {
                Part::Text(text) => sql.push_str(text),
                Part::Param(name) => {
                    let value = bound
                        .get(name)
                        .ok_or_else(|| UnboundPlaceholder { name: name.clone() })?;
                    write_literal(&mut sql, value);
                }
            }
        }
        Ok(sql)
    }
}

impl Part {
    fn len_hint(&self) -> usize {
        match self {
            Part::Text(text) => text.len(),
            Part::Param(_) => 24,
        }
    }
}

/// Appends the ClickHouse literal of `value` to `sql`.
pub fn write_literal(sql: &mut String, value: &Value) {
    match value {
        Value::Null => sql.push_str("NULL"),
        Value::Int(n) => {
            let _ = write!(sql, "{n}");
        }
        Value::Time(t) => {
            let _ = write!(sql, "toDateTime({t})");
        }
        Value::Str(s) => write_string(sql, s),
        Value::StrList(items) if items.is_empty() => sql.push_str("emptyArrayString()"),
        Value::IntList(items) if items.is_empty() => sql.push_str("emptyArrayInt64()"),
        Value::StrList(items) => {
            sql.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                write_string(sql, item);
            }
            sql.push(']');
        }
        Value::IntList(items) => {
            sql.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    sql.push(',');
                }
                let _ = write!(sql, "toInt64({item})");
            }
            sql.push(']');
        }
    }
}

/// A single-quoted ClickHouse string literal with backslash escapes.
fn write_string(sql: &mut String, s: &str) {
    sql.push('\'');
    for c in s.chars() {
        match c {
            '\\' => sql.push_str("\\\\"),
            '\'' => sql.push_str("\\'"),
            '\n' => sql.push_str("\\n"),
            '\r' => sql.push_str("\\r"),
            '\t' => sql.push_str("\\t"),
            '\0' => sql.push_str("\\0"),
            c => sql.push(c),
        }
    }
    sql.push('\'');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_kind_of_literal() {
        let t = Template::parse("SELECT {a}, {b}, {c}, {d}, {e}, {f}, {g} FROM t WHERE x = {{1}}")
            .unwrap();
        let mut bound = Bound::default();
        bound.push("a", Value::Int(-5));
        bound.push("b", Value::Str("it's \\ fine".into()));
        bound.push("c", Value::Time(1_700_000_000));
        bound.push("d", Value::StrList(vec!["DE".into(), "FR".into()]));
        bound.push("e", Value::StrList(vec![]));
        bound.push("f", Value::Null);
        bound.push("g", Value::IntList(vec![1, 2]));
        assert_eq!(
            t.render(&bound).unwrap(),
            "SELECT -5, 'it\\'s \\\\ fine', toDateTime(1700000000), ['DE','FR'], \
             emptyArrayString(), NULL, [toInt64(1),toInt64(2)] FROM t WHERE x = {1}"
        );
    }

    #[test]
    fn quotes_cannot_break_out_of_a_string() {
        let t = Template::parse("WHERE c = {c}").unwrap();
        let mut bound = Bound::default();
        bound.push("c", Value::Str("x' OR 1=1 --\\'".into()));
        assert_eq!(
            t.render(&bound).unwrap(),
            "WHERE c = 'x\\' OR 1=1 --\\\\\\''"
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert_eq!(
            Template::parse("SELECT {"),
            Err(TemplateError::Malformed { at: 7 })
        );
        assert_eq!(
            Template::parse("SELECT {}"),
            Err(TemplateError::Empty { at: 7 })
        );
        assert!(Template::parse("SELECT {Bad}").is_err());
        assert_eq!(
            Template::parse("SELECT }"),
            Err(TemplateError::Unmatched { at: 7 })
        );
        assert!(Template::parse("SELECT {a").is_err());
        assert_eq!(
            TemplateError::Malformed { at: 7 }.to_string(),
            "malformed placeholder at byte 7 (write {name}, or {{ for a brace)"
        );
        assert_eq!(
            TemplateError::Unmatched { at: 7 }.to_string(),
            "unmatched `}` at byte 7 (write }} for a brace)"
        );
    }

    #[test]
    fn unbound_placeholders_are_errors() {
        let t = Template::parse("SELECT {missing}").unwrap();
        assert_eq!(
            t.render(&Bound::default()).unwrap_err().to_string(),
            "placeholder {missing} is not bound"
        );
    }
}
