//! Typed query parameters: declaration, validation, canonical values.
//!
//! Owns turning one URL value into a typed [`Value`] (or a [`Problem`] naming the
//! field and the reason, in FastAPI's 422 shape), and the canonical form of a
//! bound parameter set ([`Bound`]) that cache keys are made from. It does no I/O.
//! Which parameters a query takes, and the rules across parameters (time range
//! spans), live in [`crate::catalog`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use regex::Regex;
use serde::Serialize;

use crate::config::{ParamConfig, ParamType};
use crate::timeexpr;

/// The placeholder a template uses for the caller's tenant. Its value comes
/// from the API key, never from the URL.
pub const TENANT: &str = "tenant";

/// Longest raw value accepted for any parameter, before any parsing.
pub const MAX_RAW_LEN: usize = 1024;
const DEFAULT_MAX_LEN: usize = 256;
const DEFAULT_MAX_ITEMS: usize = 50;

/// One `name=value` pair of a request's query string, percent-decoded.
pub type RawParam<'a> = (std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>);

/// A validated, typed parameter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// An optional parameter that was not given.
    Null,
    Int(i64),
    Str(String),
    /// Seconds since the Unix epoch, UTC.
    Time(i64),
    StrList(Vec<String>),
    IntList(Vec<i64>),
}

impl Value {
    /// The value as a URL would carry it, resolved: what cache keys are made of.
    pub fn canonical(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Int(n) => n.to_string(),
            Value::Str(s) => s.clone(),
            Value::Time(t) => timeexpr::format(*t),
            Value::StrList(items) => items.join(","),
            Value::IntList(items) => items
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// One reason a request was rejected, as FastAPI/Pydantic report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub loc: [String; 2],
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl Problem {
    pub fn query(param: &str, kind: &'static str, msg: impl Into<String>) -> Self {
        Problem {
            loc: ["query".into(), param.into()],
            msg: msg.into(),
            kind,
        }
    }
}

/// What a request is evaluated against: its clock reading and the `now` rounding.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: DateTime<Utc>,
    pub now_step: Duration,
}

/// A declared parameter, compiled from its config.
#[derive(Debug, Clone)]
pub struct ParamDef {
    pub name: String,
    pub kind: ParamType,
    pub required: bool,
    pub default: Option<String>,
    pub description: Option<String>,
    pub values: Vec<String>,
    pub pattern: Option<Regex>,
    pub max_len: usize,
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub list: bool,
    pub max_items: usize,
}

/// What is wrong with a parameter's declaration.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ParamError {
    #[error("parameter names use a-z, 0-9 and _")]
    BadName,
    #[error("bad pattern `{pattern}`: {source}")]
    BadPattern {
        pattern: String,
        source: regex::Error,
    },
    #[error("an enum needs `values`")]
    EnumWithoutValues,
    #[error("a string needs a `pattern` or allowed `values`")]
    StringWithoutRule,
    /// The default is not a value of the parameter; `reason` is the 422
    /// message a request with that value would get.
    #[error("default `{default}` {reason}")]
    BadDefault { default: String, reason: String },
}

impl ParamError {
    /// The key of the declaration to point at (`None`: the table itself).
    pub fn key(&self) -> Option<&'static str> {
        match self {
            ParamError::BadName | ParamError::EnumWithoutValues | ParamError::StringWithoutRule => {
                None
            }
            ParamError::BadPattern { .. } => Some("pattern"),
            ParamError::BadDefault { .. } => Some("default"),
        }
    }
}

impl ParamDef {
    /// Compiles a declaration; the error says what is wrong with it.
    pub fn compile(name: &str, config: &ParamConfig) -> Result<ParamDef, ParamError> {
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid_name {
            return Err(ParamError::BadName);
        }
        let common = config.common();
        let (mut values, mut pattern, mut max_len, mut min, mut max) =
            (Vec::new(), None, None, None, None);
        match config {
            ParamConfig::Time(_) => {}
            ParamConfig::Enum(p) => {
                if p.values.is_empty() {
                    return Err(ParamError::EnumWithoutValues);
                }
                values = p.values.clone();
            }
            ParamConfig::Int(p) => (min, max) = (p.min, p.max),
            ParamConfig::String(p) => {
                if let Some(text) = &p.pattern {
                    let anchored = Regex::new(&format!("^(?:{text})$")).map_err(|source| {
                        ParamError::BadPattern {
                            pattern: text.clone(),
                            source,
                        }
                    })?;
                    pattern = Some(anchored);
                }
                if pattern.is_none() && p.values.is_empty() {
                    return Err(ParamError::StringWithoutRule);
                }
                values = p.values.clone();
                max_len = p.max_len;
            }
        }
        let def = ParamDef {
            name: name.to_owned(),
            kind: config.kind(),
            required: common.required,
            default: common.default.as_ref().map(|d| d.as_text()),
            description: common.description,
            values,
            pattern,
            max_len: max_len.unwrap_or(DEFAULT_MAX_LEN),
            min,
            max,
            list: common.list,
            max_items: common.max_items.unwrap_or(DEFAULT_MAX_ITEMS),
        };
        if let Some(default) = &def.default {
            let clock = Clock {
                now: Utc::now(),
                now_step: Duration::from_secs(60),
            };
            def.parse(default, &clock)
                .map_err(|p| ParamError::BadDefault {
                    default: default.clone(),
                    reason: p.msg,
                })?;
        }
        Ok(def)
    }

    /// Parses one raw URL value into a typed value.
    pub fn parse(&self, raw: &str, clock: &Clock) -> Result<Value, Problem> {
        if raw.len() > MAX_RAW_LEN {
            return Err(self.problem(
                "string_too_long",
                format!("is longer than {MAX_RAW_LEN} bytes"),
            ));
        }
        if !self.list {
            return self.parse_item(raw, clock);
        }
        let items: Vec<&str> = raw.split(',').collect();
        if items.len() > self.max_items {
            return Err(self.problem(
                "too_long",
                format!(
                    "has {} items; at most {} allowed",
                    items.len(),
                    self.max_items
                ),
            ));
        }
        let mut strs = Vec::new();
        let mut ints = Vec::new();
        for item in items {
            match self.parse_item(item, clock)? {
                Value::Int(n) => ints.push(n),
                Value::Str(s) => strs.push(s),
                Value::Time(t) => ints.push(t),
                _ => {}
            }
        }
        // A list is a set: order and repeats do not change the answer, so they
        // must not change the cache key either.
        strs.sort();
        strs.dedup();
        ints.sort_unstable();
        ints.dedup();
        Ok(
            if self.kind == ParamType::Int || self.kind == ParamType::Time {
                Value::IntList(ints)
            } else {
                Value::StrList(strs)
            },
        )
    }

    fn parse_item(&self, raw: &str, clock: &Clock) -> Result<Value, Problem> {
        match self.kind {
            ParamType::Time => timeexpr::resolve(raw, clock.now, clock.now_step)
                .map(Value::Time)
                .map_err(|err| self.problem("datetime_parsing", err.to_string())),
            ParamType::Enum => {
                if self.values.iter().any(|v| v == raw) {
                    Ok(Value::Str(raw.to_owned()))
                } else {
                    Err(self.problem(
                        "enum",
                        format!("must be one of: {}", self.values.join(", ")),
                    ))
                }
            }
            ParamType::Int => {
                let n: i64 = raw
                    .parse()
                    .map_err(|_| self.problem("int_parsing", "must be a whole number"))?;
                if let Some(min) = self.min.filter(|&min| n < min) {
                    return Err(
                        self.problem("greater_than_equal", format!("must be at least {min}"))
                    );
                }
                if let Some(max) = self.max.filter(|&max| n > max) {
                    return Err(self.problem("less_than_equal", format!("must be at most {max}")));
                }
                Ok(Value::Int(n))
            }
            ParamType::String => {
                if raw.len() > self.max_len {
                    return Err(self.problem(
                        "string_too_long",
                        format!("must be at most {} bytes", self.max_len),
                    ));
                }
                if !self.values.is_empty() && !self.values.iter().any(|v| v == raw) {
                    return Err(self.problem(
                        "enum",
                        format!("must be one of: {}", self.values.join(", ")),
                    ));
                }
                if let Some(pattern) = &self.pattern
                    && !pattern.is_match(raw)
                {
                    return Err(self.problem(
                        "string_pattern_mismatch",
                        format!("must match the pattern {}", self.pattern_text()),
                    ));
                }
                Ok(Value::Str(raw.to_owned()))
            }
        }
    }

    /// The pattern as the operator wrote it (without the anchors added here).
    pub fn pattern_text(&self) -> &str {
        self.pattern
            .as_ref()
            .map(|p| p.as_str())
            .and_then(|p| p.strip_prefix("^(?:"))
            .and_then(|p| p.strip_suffix(")$"))
            .unwrap_or("")
    }

    /// For a relative time (`now-7d`), its canonical text: the request as
    /// asked, kept in cache keys instead of the instant it resolves to now.
    /// `None` for every other value (lists of times are kept resolved).
    pub fn relative_form(&self, raw: &str) -> Option<String> {
        if self.kind != ParamType::Time || self.list {
            return None;
        }
        timeexpr::TimeExpr::parse(raw)
            .ok()
            .filter(|expr| expr.is_relative())
            .map(|expr| expr.canonical())
    }

    /// The value an absent parameter takes.
    pub fn absent(&self) -> Value {
        match (self.list, self.kind) {
            (true, ParamType::Int | ParamType::Time) => Value::IntList(Vec::new()),
            (true, _) => Value::StrList(Vec::new()),
            (false, _) => Value::Null,
        }
    }

    fn problem(&self, kind: &'static str, msg: impl Into<String>) -> Problem {
        Problem::query(&self.name, kind, msg)
    }
}

/// A query's parameters after validation, defaults and relative-time resolution.
///
/// Values are in declaration order (parameter names sorted), so the same
/// request always binds to the same `Bound`. A relative time keeps its
/// canonical text next to the instant it resolved to, so the request can be
/// told as asked ([`Bound::asked_query`]) as well as resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bound {
    values: Vec<(String, Value)>,
    /// Canonical relative forms, by parameter name.
    relative: Vec<(String, String)>,
}

impl Bound {
    pub fn push(&mut self, name: &str, value: Value) {
        self.values.push((name.to_owned(), value));
    }

    /// Like [`Bound::push`], for a value that was asked as a relative time.
    pub fn push_relative(&mut self, name: &str, value: Value, relative: Option<String>) {
        if let Some(relative) = relative {
            self.relative.push((name.to_owned(), relative));
        }
        self.push(name, value);
    }

    /// Whether any value was asked relative to the clock.
    pub fn is_relative(&self) -> bool {
        !self.relative.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.values.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The request as asked, in canonical form (`from=now-7d&granularity=day`):
    /// absent values and the tenant left out (it comes from the API key, and
    /// cache keys carry it on their own), relative times in their canonical
    /// text, everything else resolved. Binding it again at any time gives a
    /// `Bound` with the same asked query, which is what cache keys and
    /// popularity are made of.
    pub fn asked_query(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (name, value) in self.iter() {
            if name == TENANT
                || matches!(value, Value::Null)
                || matches!(value, Value::StrList(v) if v.is_empty())
                || matches!(value, Value::IntList(v) if v.is_empty())
            {
                continue;
            }
            match self.relative.iter().find(|(n, _)| n == name) {
                Some((_, relative)) => out.append_pair(name, relative),
                None => out.append_pair(name, &value.canonical()),
            };
        }
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn def(toml_text: &str) -> ParamDef {
        let config: ParamConfig = toml::from_str(toml_text).unwrap();
        ParamDef::compile("p", &config).unwrap()
    }

    fn clock() -> Clock {
        Clock {
            now: Utc.with_ymd_and_hms(2024, 3, 15, 10, 17, 42).unwrap(),
            now_step: Duration::from_secs(60),
        }
    }

    #[test]
    fn ints_are_bounded() {
        let p = def("type = 'int'\nmin = 1\nmax = 100");
        assert_eq!(p.parse("10", &clock()), Ok(Value::Int(10)));
        assert_eq!(
            p.parse("0", &clock()).unwrap_err().kind,
            "greater_than_equal"
        );
        assert_eq!(
            p.parse("101", &clock()).unwrap_err().kind,
            "less_than_equal"
        );
        assert_eq!(p.parse("1e3", &clock()).unwrap_err().kind, "int_parsing");
        assert_eq!(
            p.parse("99999999999999999999", &clock()).unwrap_err().kind,
            "int_parsing"
        );
    }

    #[test]
    fn string_lists_are_sets_matching_the_pattern() {
        let p = def("type = 'string'\npattern = '[A-Z]{2}'\nlist = true\nmax_items = 3");
        assert_eq!(
            p.parse("FR,DE,FR", &clock()),
            Ok(Value::StrList(vec!["DE".into(), "FR".into()]))
        );
        let problem = p.parse("us'); DROP TABLE x", &clock()).unwrap_err();
        assert_eq!(problem.kind, "string_pattern_mismatch");
        assert_eq!(problem.loc, ["query".to_string(), "p".to_string()]);
        assert_eq!(
            p.parse("DE,", &clock()).unwrap_err().kind,
            "string_pattern_mismatch"
        );
        assert_eq!(
            p.parse("AA,BB,CC,DD", &clock()).unwrap_err().kind,
            "too_long"
        );
        assert_eq!(
            p.parse(&"A".repeat(2000), &clock()).unwrap_err().kind,
            "string_too_long"
        );
    }

    #[test]
    fn enums_name_the_allowed_values() {
        let p = def("type = 'enum'\nvalues = ['hour', 'day']");
        let problem = p.parse("week", &clock()).unwrap_err();
        assert_eq!(problem.kind, "enum");
        assert!(problem.msg.contains("hour, day"), "{}", problem.msg);
    }

    #[test]
    fn bad_declarations_are_refused() {
        let config: ParamConfig = toml::from_str("type = 'string'").unwrap();
        assert!(matches!(
            ParamDef::compile("p", &config),
            Err(ParamError::StringWithoutRule)
        ));
        let config: ParamConfig = toml::from_str("type = 'int'\nmax = 5\ndefault = 9").unwrap();
        let err = ParamDef::compile("p", &config).unwrap_err();
        assert_eq!(err.to_string(), "default `9` must be at most 5");
        assert_eq!(err.key(), Some("default"));
        let config: ParamConfig = toml::from_str("type = 'int'").unwrap();
        assert!(matches!(
            ParamDef::compile("Bad-Name", &config),
            Err(ParamError::BadName)
        ));
    }

    #[test]
    fn a_key_of_another_type_is_an_error_naming_it() {
        for (text, key) in [
            ("type = 'int'\npattern = '[0-9]+'", "pattern"),
            ("type = 'enum'\nvalues = ['a']\nmax_len = 3", "max_len"),
            ("type = 'time'\nvalues = ['a']", "values"),
            ("type = 'string'\npattern = 'x'\nmin = 1", "min"),
        ] {
            let err = toml::from_str::<ParamConfig>(text).unwrap_err();
            assert!(
                err.message().contains(&format!("unknown field `{key}`")),
                "{text}: {err}"
            );
        }
        let err = toml::from_str::<ParamConfig>("type = 'float'").unwrap_err();
        assert!(err.message().contains("unknown variant `float`"), "{err}");
        // Every key a type has is still accepted.
        for text in [
            "type = 'time'\nrequired = true\ndefault = 'now-7d'\ndescription = 'd'\nlist = true\nmax_items = 3",
            "type = 'enum'\nvalues = ['a']\ndefault = 'a'\nlist = true",
            "type = 'int'\nmin = 1\nmax = 9\ndefault = 5",
            "type = 'string'\npattern = '[A-Z]{2}'\nvalues = ['DE']\nmax_len = 2\nlist = true\nmax_items = 5",
        ] {
            let config: ParamConfig =
                toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            ParamDef::compile("p", &config).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn asked_query_leaves_out_absent_values_and_keeps_relative_times() {
        let mut bound = Bound::default();
        bound.push("country", Value::StrList(vec!["DE".into(), "FR".into()]));
        bound.push("from", Value::Time(0));
        bound.push("plan", Value::Null);
        bound.push(TENANT, Value::Str("acme".into()));
        assert!(!bound.is_relative());
        assert_eq!(
            bound.asked_query(),
            "country=DE%2CFR&from=1970-01-01T00%3A00%3A00Z"
        );
        let p = def("type = 'time'");
        let mut bound = Bound::default();
        let value = p.parse("now-168h", &clock()).unwrap();
        bound.push_relative("from", value, p.relative_form("now-168h"));
        assert!(bound.is_relative());
        assert_eq!(bound.asked_query(), "from=now-7d");
        assert_eq!(p.relative_form("2024-01-01"), None);
    }
}
