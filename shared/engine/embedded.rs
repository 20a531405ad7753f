//! The embedded engine: catalog queries run in process on chDB.
//!
//! Owns a bounded pool of chDB connections used from blocking threads (chDB
//! is synchronous: a query never runs on the async runtime), streaming each
//! answer chunk by chunk through a small channel (a slow reader stops the
//! engine between blocks: backpressure), per-query settings, read-only
//! connections, and cancellation (an answer dropped or killed mid-stream
//! cancels the engine's query and frees its connection).
//!
//! It does not own what the answers mean (framing checks, retries and error
//! mapping are `crate::clickhouse`'s), nor loading data: its connections are
//! `readonly=2` (reads only; settings may change), so writes go through a
//! writable [`Chdb::connect`] in a process that does not serve.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use super::chdb::{Chdb, ChdbError, Connection};

/// Chunks buffered between the engine's thread and the reader.
const CHANNEL_CHUNKS: usize = 2;

/// One message of a running query.
enum Message {
    Chunk(Bytes),
    End,
    Failed(ChdbError),
}

/// The engine: the library, its data path and a bounded connection pool.
pub struct Embedded {
    chdb: Arc<Chdb>,
    data_path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    /// Cancel flags of running queries, by query id (for `kill`).
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    started: AtomicU64,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("data_path", &self.data_path)
            .finish()
    }
}

impl Embedded {
    /// Loads the library at `library` and opens one connection on
    /// `data_path` (so that a bad path or library fails now, not on the
    /// first query); at most `connections` queries run at once.
    pub fn open(
        library: &Path,
        data_path: &Path,
        connections: usize,
    ) -> Result<Arc<Embedded>, ChdbError> {
        let chdb = Chdb::load(library)?;
        let embedded = Embedded {
            chdb,
            data_path: data_path.to_owned(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(connections.max(1))),
            running: Mutex::new(HashMap::new()),
            started: AtomicU64::new(0),
        };
        let first = embedded.connect()?;
        embedded.give_back(first);
        Ok(Arc::new(embedded))
    }

    fn connect(&self) -> Result<Connection, ChdbError> {
        self.chdb.connect(&[
            format!("--path={}", self.data_path.display()),
            "--readonly=2".into(),
        ])
    }

    fn give_back(&self, connection: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(connection);
    }

    /// The engine's version.
    pub fn version(&self) -> String {
        self.chdb.version()
    }

    /// How many queries were started (each one engine query).
    pub fn queries_started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Starts `sql` with `settings` (`readonly` is left out: every
    /// connection is read-only); its chunks arrive through the answer.
    pub fn query(
        self: &Arc<Self>,
        sql: &str,
        format: &'static str,
        query_id: &str,
        settings: Vec<(String, String)>,
    ) -> EmbeddedAnswer {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let cancel = Arc::new(AtomicBool::new(false));
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(query_id.to_owned(), cancel.clone());
        let this = self.clone();
        let job = Job {
            sql: sql.to_owned(),
            format,
            settings,
            tx,
            cancel: cancel.clone(),
        };
        let query_id = query_id.to_owned();
        tokio::spawn(async move {
            if let Ok(permit) = this.permits.clone().acquire_owned().await {
                let worker = this.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    worker.run(job);
                })
                .await;
            }
            this.running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&query_id);
        });
        EmbeddedAnswer { rx, cancel }
    }

    /// Stops the query `query_id` if it runs.
    pub fn kill(&self, query_id: &str) {
        if let Some(flag) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(query_id)
        {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// One query on a blocking thread, holding a permit.
    fn run(&self, job: Job) {
        if job.cancel.load(Ordering::Relaxed) {
            return;
        }
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut connection = match idle.map_or_else(|| self.connect(), Ok) {
            Ok(connection) => connection,
            Err(err) => {
                let _ = job.tx.blocking_send(Message::Failed(err));
                return;
            }
        };
        self.started.fetch_add(1, Ordering::Relaxed);
        stream(&mut connection, &job);
        self.give_back(connection);
    }
}

/// What a blocking thread needs to run one query.
struct Job {
    sql: String,
    format: &'static str,
    settings: Vec<(String, String)>,
    tx: mpsc::Sender<Message>,
    cancel: Arc<AtomicBool>,
}

/// Applies the settings, then streams the answer into the channel until it
/// ends, fails, is cancelled or its reader goes away.
fn stream(connection: &mut Connection, job: &Job) {
    for (name, value) in &job.settings {
        if name == "readonly" {
            continue;
        }
        if let Err(err) = set(connection, name, value) {
            let _ = job.tx.blocking_send(Message::Failed(err));
            return;
        }
    }
    let mut stream = match connection.stream(&job.sql, job.format) {
        Ok(stream) => stream,
        Err(err) => {
            let _ = job.tx.blocking_send(Message::Failed(err));
            return;
        }
    };
    loop {
        if job.cancel.load(Ordering::Relaxed) {
            return; // dropping the stream cancels the engine's query
        }
        let message = match stream.next_chunk() {
            Ok(Some(chunk)) => Message::Chunk(Bytes::from(chunk)),
            Ok(None) => Message::End,
            Err(err) => Message::Failed(err),
        };
        let last = !matches!(message, Message::Chunk(_));
        if job.tx.blocking_send(message).is_err() || last {
            return;
        }
    }
}

/// `SET name = value`, the value as a number when it is one.
fn set(connection: &mut Connection, name: &str, value: &str) -> Result<(), ChdbError> {
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(ChdbError::Query {
            code: Some(115),
            message: format!("not a setting name: {name:?}"),
        });
    }
    let literal = if value.parse::<f64>().is_ok() {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    };
    connection
        .query(&format!("SET {name} = {literal}"), "Null")
        .map(drop)
}

/// A running embedded query's answer. Dropped before its end, it cancels
/// the query.
pub struct EmbeddedAnswer {
    rx: mpsc::Receiver<Message>,
    cancel: Arc<AtomicBool>,
}

impl EmbeddedAnswer {
    /// The next chunk; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ChdbError> {
        match self.rx.recv().await {
            Some(Message::Chunk(chunk)) => Ok(Some(chunk)),
            Some(Message::End) => Ok(None),
            Some(Message::Failed(err)) => Err(err),
            None => Err(ChdbError::Query {
                code: None,
                message: "the embedded engine stopped the query".into(),
            }),
        }
    }
}

impl Drop for EmbeddedAnswer {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}
