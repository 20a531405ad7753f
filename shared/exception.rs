//! ClickHouse's exception texts as both engines produce them: the error code
//! in `Code: N.` / `Code: N, e.displayText() = …`. A leaf: the HTTP client
//! (`clickhouse`) and the embedded engine (`engine::chdb`) both read codes
//! here; where an exception starts inside a body is `clickhouse`'s.

/// The number after `Code: ` in an exception text.
pub fn error_code(text: &[u8]) -> Option<u32> {
    let at = memchr::memmem::find(text, b"Code: ")?;
    let digits: Vec<u8> = text[at + 6..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_of_old_and_current_texts() {
        assert_eq!(
            error_code(b"Code: 60, e.displayText() = DB::Exception: Table x"),
            Some(60)
        );
        assert_eq!(
            error_code(b"Code: 164. DB::Exception: Cannot modify"),
            Some(164)
        );
        assert_eq!(error_code(b"no code here"), None);
    }
}
