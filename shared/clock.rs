//! The wall clock in the unit the cache and the control store use: Unix
//! milliseconds. One function, so that every module reads time the same way.

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
