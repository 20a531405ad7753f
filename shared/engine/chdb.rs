//! chDB, ClickHouse's engine as a C library (`libchdb.so`), loaded at run time.
//!
//! Owns loading the library ([`Chdb::load`], with `libloading`: a build needs
//! neither the library nor its headers, and a process that never asks for it
//! never touches it), the few C functions of `chdb.h` dashcache calls, and
//! connections that run one statement at a time and return the whole answer
//! ([`Connection::query`]) or a typed [`ChdbError`] carrying ClickHouse's error
//! code. chDB's own process-wide signal handlers are turned off before the
//! first connection, so the host process keeps its SIGTERM/SIGHUP handling.
//!
//! It does not own pooling, blocking-thread hand-off or streaming to HTTP
//! clients (an embedded engine builds those on top), nor fetching the library:
//! `scripts/chdb` puts the pinned npm package `@chdb/lib-linux-x64-gnu` into
//! `.cache/chdb/`.
//!
//! The engine serves one data path per process: every connection of a process
//! must name the same `--path` (or none, in memory).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to get the library, for error messages.
pub const HOW_TO_GET: &str = "run scripts/chdb (it fetches the pinned npm package @chdb/lib-linux-x64-gnu into .cache/chdb/ and prints the path)";

/// Why chDB could not be loaded or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ChdbError {
    #[error("cannot load chDB from {path}: {reason}; {HOW_TO_GET}")]
    Load { path: PathBuf, reason: String },
    #[error("{path} is not a usable chDB library: missing `{symbol}`")]
    Symbol { path: PathBuf, symbol: &'static str },
    #[error("chDB refused the connection arguments {args:?}")]
    Connect { args: Vec<String> },
    #[error("the embedded engine's data path {path} is unusable: {reason}")]
    DataPath { path: PathBuf, reason: String },
    #[error("a chDB argument, query or format holds a NUL byte")]
    Nul,
    #[error("chDB failed the query (code {code:?}): {message}")]
    Query { code: Option<u32>, message: String },
}

impl ChdbError {
    /// The ClickHouse error code, when the engine gave one.
    pub fn code(&self) -> Option<u32> {
        match self {
            ChdbError::Query { code, .. } => *code,
            _ => None,
        }
    }
}

// The handles of chdb.h, opaque here.
#[repr(C)]
struct RawConnection {
    _internal: *mut c_void,
}
#[repr(C)]
struct RawResult {
    _internal: *mut c_void,
}

type ConnectFn = unsafe extern "C" fn(c_int, *mut *mut c_char) -> *mut *mut RawConnection;
type CloseFn = unsafe extern "C" fn(*mut *mut RawConnection);
type QueryFn = unsafe extern "C" fn(
    *mut RawConnection,
    *const c_char,
    usize,
    *const c_char,
    usize,
) -> *mut RawResult;
type BufferFn = unsafe extern "C" fn(*mut RawResult) -> *mut c_char;
type LengthFn = unsafe extern "C" fn(*mut RawResult) -> usize;
type ErrorFn = unsafe extern "C" fn(*mut RawResult) -> *const c_char;
type DestroyFn = unsafe extern "C" fn(*mut RawResult);
type VersionFn = unsafe extern "C" fn() -> *const c_char;
type SignalsFn = unsafe extern "C" fn(c_int);
type FetchFn = unsafe extern "C" fn(*mut RawConnection, *mut RawResult) -> *mut RawResult;
type CancelFn = unsafe extern "C" fn(*mut RawConnection, *mut RawResult);
/// Ends the process with `code`. When chDB was loaded, its threads may still
/// run, and its static destructors race them at a normal exit and can crash
/// the process (measured: about 1 exit in 15); `chdb_shutdown` crashes now and
/// then too. So stdout and stderr are flushed and the process ends without
/// running them.
pub fn exit(code: i32) -> ! {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if LOADED_ONCE.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: ends the process; nothing runs after it.
        unsafe { libc::_exit(code) }
    }
    std::process::exit(code)
}

/// Set when the process is about to end (see [`process_ending`]).
static ENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says the process is about to end (then [`exit`]): connections dropped from
/// now on are left open, since closing them while chDB winds down can crash
/// the process.
pub fn process_ending() {
    ENDING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether chDB was ever loaded in this process.
static LOADED_ONCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The loaded library and the functions dashcache calls.
pub struct Chdb {
    path: PathBuf,
    connect: ConnectFn,
    close: CloseFn,
    query: QueryFn,
    stream: QueryFn,
    fetch: FetchFn,
    cancel: CancelFn,
    buffer: BufferFn,
    length: LengthFn,
    error: ErrorFn,
    destroy: DestroyFn,
    version: VersionFn,
    /// Never unloaded: chDB's threads outlive every handle, and unmapping
    /// their code under them crashes the process.
    _library: std::mem::ManuallyDrop<libloading::Library>,
}

impl std::fmt::Debug for Chdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chdb").field("path", &self.path).finish()
    }
}

impl Chdb {
    /// Loads `libchdb.so` from `path` and turns chDB's signal handlers off.
    pub fn load(path: &Path) -> Result<Arc<Chdb>, ChdbError> {
        if !path.is_file() {
            return Err(ChdbError::Load {
                path: path.to_owned(),
                reason: "no such file".into(),
            });
        }
        // SAFETY: loading runs the library's initialisers; libchdb.so is a
        // plain C/C++ shared library without load-time requirements on us.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| ChdbError::Load {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        macro_rules! symbol {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the type is the C signature of this function in chdb.h.
                let symbol: Result<libloading::Symbol<$ty>, _> =
                    unsafe { library.get(concat!($name, "\0").as_bytes()) };
                *symbol.map_err(|_| ChdbError::Symbol {
                    path: path.to_owned(),
                    symbol: $name,
                })?
            }};
        }
        let signals = symbol!("chdb_set_signal_handlers_enabled", SignalsFn);
        let chdb = Chdb {
            path: path.to_owned(),
            connect: symbol!("chdb_connect", ConnectFn),
            close: symbol!("chdb_close_conn", CloseFn),
            query: symbol!("chdb_query_n", QueryFn),
            stream: symbol!("chdb_stream_query_n", QueryFn),
            fetch: symbol!("chdb_stream_fetch_result", FetchFn),
            cancel: symbol!("chdb_stream_cancel_query", CancelFn),
            buffer: symbol!("chdb_result_buffer", BufferFn),
            length: symbol!("chdb_result_length", LengthFn),
            error: symbol!("chdb_result_error", ErrorFn),
            destroy: symbol!("chdb_destroy_query_result", DestroyFn),
            version: symbol!("chdb_version", VersionFn),
            _library: std::mem::ManuallyDrop::new(library),
        };
        // SAFETY: takes an int; called before any connection exists.
        unsafe { signals(0) };
        LOADED_ONCE.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Arc::new(chdb))
    }

    /// Where the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine's version, e.g. `26.7.0`.
    pub fn version(&self) -> String {
        // SAFETY: returns a static NUL-terminated string.
        let version = unsafe { (self.version)() };
        if version.is_null() {
            return String::new();
        }
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { CStr::from_ptr(version) }
            .to_string_lossy()
            .into_owned()
    }

    /// Opens a connection. `args` are `clickhouse-local` style arguments:
    /// `--path=DIR` (the process's one data path), and `--SETTING=VALUE` for
    /// settings of this connection only (as if it had run `SET`).
    pub fn connect(self: &Arc<Self>, args: &[String]) -> Result<Connection, ChdbError> {
        let mut owned = Vec::with_capacity(args.len() + 1);
        owned.push(CString::new("clickhouse").map_err(|_| ChdbError::Nul)?);
        for arg in args {
            owned.push(CString::new(arg.as_str()).map_err(|_| ChdbError::Nul)?);
        }
        let mut argv: Vec<*mut c_char> = owned.iter().map(|a| a.as_ptr().cast_mut()).collect();
        let argc = c_int::try_from(argv.len()).map_err(|_| ChdbError::Nul)?;
        // SAFETY: argv holds argc valid NUL-terminated strings that outlive
        // the call (chDB copies what it keeps).
        let handle = unsafe { (self.connect)(argc, argv.as_mut_ptr()) };
        // SAFETY: checked for null before reading the pointer it points to.
        if handle.is_null() || unsafe { (*handle).is_null() } {
            return Err(ChdbError::Connect {
                args: args.to_vec(),
            });
        }
        Ok(Connection {
            chdb: self.clone(),
            handle,
        })
    }
}

/// One chDB connection: one statement at a time (`&mut self`); closed on drop.
pub struct Connection {
    chdb: Arc<Chdb>,
    handle: *mut *mut RawConnection,
}

// SAFETY: a chDB connection may be used from any thread, one call at a time,
// which `&mut self` on every call guarantees.
unsafe impl Send for Connection {}

impl Connection {
    /// Runs `sql` and returns the whole answer in the ClickHouse `format`
    /// (`JSON`, `CSVWithNames`, …; `Null` for statements without output).
    pub fn query(&mut self, sql: &str, format: &str) -> Result<Vec<u8>, ChdbError> {
        let chdb = &self.chdb;
        // SAFETY: the handle is a live connection (closed only on drop); the
        // strings are passed with their lengths and outlive the call.
        let result = unsafe {
            (chdb.query)(
                *self.handle,
                sql.as_ptr().cast(),
                sql.len(),
                format.as_ptr().cast(),
                format.len(),
            )
        };
        if result.is_null() {
            return Err(ChdbError::Query {
                code: None,
                message: "chDB returned no result".into(),
            });
        }
        let _destroy = DestroyOnDrop { chdb, result };
        // SAFETY: result is non-null and destroyed only after these reads.
        let error = unsafe { (chdb.error)(result) };
        if !error.is_null() {
            // SAFETY: a NUL-terminated message owned by the result.
            let message = unsafe { CStr::from_ptr(error) }
                .to_string_lossy()
                .trim()
                .to_owned();
            return Err(ChdbError::Query {
                code: crate::exception::error_code(message.as_bytes()),
                message,
            });
        }
        // SAFETY: as above; buffer holds length bytes (or is null when empty).
        let (buffer, length) = unsafe { ((chdb.buffer)(result), (chdb.length)(result)) };
        if buffer.is_null() || length == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: buffer points at length readable bytes owned by the result.
        Ok(unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), length) }.to_vec())
    }
}

impl Connection {
    /// Starts `sql` as a stream of chunks in the ClickHouse `format`; the
    /// connection runs nothing else until the stream is dropped. An error
    /// the engine finds before the first chunk is returned here.
    pub fn stream(&mut self, sql: &str, format: &str) -> Result<Stream<'_>, ChdbError> {
        let chdb = self.chdb.clone();
        // SAFETY: as in `query`.
        let handle = unsafe {
            (chdb.stream)(
                *self.handle,
                sql.as_ptr().cast(),
                sql.len(),
                format.as_ptr().cast(),
                format.len(),
            )
        };
        if handle.is_null() {
            return Err(ChdbError::Query {
                code: None,
                message: "chDB returned no stream".into(),
            });
        }
        let stream = Stream {
            connection: self,
            handle,
            done: false,
        };
        // SAFETY: the handle is live until the stream is dropped.
        if let Some(err) = unsafe { result_error(&chdb, handle) } {
            return Err(err);
        }
        Ok(stream)
    }
}

/// The error of a result, if it carries one.
///
/// # Safety
/// `result` must be a live result of `chdb`.
unsafe fn result_error(chdb: &Chdb, result: *mut RawResult) -> Option<ChdbError> {
    // SAFETY: the caller's promise.
    let error = unsafe { (chdb.error)(result) };
    if error.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated message owned by the result.
    let message = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .trim()
        .to_owned();
    Some(ChdbError::Query {
        code: crate::exception::error_code(message.as_bytes()),
        message,
    })
}

/// A query answering chunk by chunk ([`Connection::stream`]). Dropped before
/// its end, it cancels the engine's query.
pub struct Stream<'c> {
    connection: &'c mut Connection,
    handle: *mut RawResult,
    done: bool,
}

impl Stream<'_> {
    /// The next chunk; `None` at the end. The engine computes the next block
    /// only when asked, so a slow reader slows the query down (backpressure).
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, ChdbError> {
        if self.done {
            return Ok(None);
        }
        let chdb = &self.connection.chdb;
        // SAFETY: the connection and the stream handle are live.
        let chunk = unsafe { (chdb.fetch)(*self.connection.handle, self.handle) };
        if chunk.is_null() {
            self.done = true;
            return Err(ChdbError::Query {
                code: None,
                message: "chDB returned no chunk".into(),
            });
        }
        let _destroy = DestroyOnDrop {
            chdb,
            result: chunk,
        };
        // SAFETY: chunk is live until `_destroy` drops.
        if let Some(err) = unsafe { result_error(chdb, chunk) } {
            self.done = true;
            return Err(err);
        }
        // SAFETY: as in `Connection::query`.
        let (buffer, length) = unsafe { ((chdb.buffer)(chunk), (chdb.length)(chunk)) };
        if buffer.is_null() || length == 0 {
            self.done = true;
            return Ok(None);
        }
        // SAFETY: buffer points at length readable bytes owned by the chunk.
        Ok(Some(
            unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), length) }.to_vec(),
        ))
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        let chdb = &self.connection.chdb;
        if !self.done {
            // SAFETY: the connection and the stream handle are live.
            unsafe { (chdb.cancel)(*self.connection.handle, self.handle) };
        }
        // SAFETY: the handle came from chdb_stream_query_n and is destroyed once.
        unsafe { (chdb.destroy)(self.handle) };
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if ENDING.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // SAFETY: the handle came from chdb_connect and is closed once.
        unsafe { (self.chdb.close)(self.handle) };
    }
}

/// Frees a result however the reading of it ends.
struct DestroyOnDrop<'a> {
    chdb: &'a Chdb,
    result: *mut RawResult,
}

impl Drop for DestroyOnDrop<'_> {
    fn drop(&mut self) {
        // SAFETY: the result came from chdb_query_n and is destroyed once.
        unsafe { (self.chdb.destroy)(self.result) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_one_clear_error_naming_how_to_get_it() {
        let err = Chdb::load(Path::new("/nonexistent/libchdb.so")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/libchdb.so"), "{text}");
        assert!(text.contains("scripts/chdb"), "{text}");
    }

    #[test]
    fn a_library_without_chdb_functions_is_refused() {
        // Any shared library that is not chDB: the C library itself.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file());
        let Some(libc) = libc else { return };
        let err = Chdb::load(libc).unwrap_err();
        assert!(matches!(err, ChdbError::Symbol { .. }), "{err}");
    }
}
