//! Reading a streamed body on its own task, ahead of its reader, bounded by
//! bytes.
//!
//! hyper's HTTP client hands a response body over one frame at a time: its
//! connection task decodes the next frame only once the reader has taken the
//! last one and asked again. ClickHouse streams answers in chunks of a few
//! KiB, so a reader that passes each frame on as it comes (an export, a
//! flight) pays a task hand-off and a client write per few KiB. A [`Pump`]
//! reads the body on a task of its own into a queue of at most `max_bytes`
//! (the reader is told the end or the failure in order), so whoever reads it
//! finds every chunk that arrived meanwhile at once ([`Pump::arrived`]) and
//! can pass them on together ([`crate::holdback`]).
//!
//! It owns nothing about what the bytes are; dropping it stops the task
//! (and drops the body, closing its connection).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc};

/// What the task passes on, in order.
enum Item<E> {
    Chunk(Bytes),
    End,
    Failed(E),
}

/// A body read ahead by its own task.
pub struct Pump<E> {
    rx: mpsc::UnboundedReceiver<Item<E>>,
    /// Room in the queue, in bytes: the task waits for it before queueing.
    room: Arc<Semaphore>,
    max_bytes: usize,
    task: tokio::task::AbortHandle,
    ended: bool,
}

impl<E: Send + 'static> Pump<E> {
    /// Starts reading `body` (chunks, then its end or one failure) on a task
    /// of the current runtime, with at most `max_bytes` queued (a chunk
    /// larger than that is queued alone).
    pub fn spawn<S>(body: S, max_bytes: usize) -> Pump<E>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    {
        let max_bytes = max_bytes.clamp(1, Semaphore::MAX_PERMITS);
        let room = Arc::new(Semaphore::new(max_bytes));
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn({
            let room = room.clone();
            async move {
                let mut body = std::pin::pin!(body);
                loop {
                    let item = match body.next().await {
                        Some(Ok(chunk)) if chunk.is_empty() => continue,
                        Some(Ok(chunk)) => {
                            let Ok(permit) = room.acquire_many(cost(&chunk, max_bytes)).await
                            else {
                                return;
                            };
                            permit.forget();
                            Item::Chunk(chunk)
                        }
                        Some(Err(err)) => Item::Failed(err),
                        None => Item::End,
                    };
                    let last = !matches!(item, Item::Chunk(_));
                    if tx.send(item).is_err() || last {
                        return;
                    }
                }
            }
        });
        Pump {
            rx,
            room,
            max_bytes,
            task: task.abort_handle(),
            ended: false,
        }
    }

    /// The next chunk (`None` at the end), waiting for it. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Bytes>, PumpError<E>> {
        let item = self.rx.recv().await;
        self.taken(item)
    }

    /// The next chunk if it has arrived (`None`: not yet).
    pub fn arrived(&mut self) -> Option<Result<Option<Bytes>, PumpError<E>>> {
        match self.rx.try_recv() {
            Ok(item) => Some(self.taken(Some(item))),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(self.taken(None)),
        }
    }

    fn taken(&mut self, item: Option<Item<E>>) -> Result<Option<Bytes>, PumpError<E>> {
        match item {
            Some(Item::Chunk(chunk)) => {
                self.room.add_permits(cost(&chunk, self.max_bytes) as usize);
                Ok(Some(chunk))
            }
            Some(Item::End) => {
                self.ended = true;
                Ok(None)
            }
            Some(Item::Failed(err)) => {
                self.ended = true;
                Err(PumpError::Body(err))
            }
            // Ended before: nothing more. Otherwise the task stopped without
            // saying how the body ended: never pass that off as complete.
            None if self.ended => Ok(None),
            None => Err(PumpError::Stopped),
        }
    }
}

impl<E> Drop for Pump<E> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a pumped body did not go on.
#[derive(Debug)]
pub enum PumpError<E> {
    /// The body's own failure.
    Body(E),
    /// The reading task stopped before the body's end (it panicked, or the
    /// runtime is shutting down).
    Stopped,
}

/// The queue room a chunk takes.
fn cost(chunk: &Bytes, max_bytes: usize) -> u32 {
    u32::try_from(chunk.len().min(max_bytes)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize, len: usize) -> Vec<Result<Bytes, String>> {
        (0..n)
            .map(|i| Ok(Bytes::from(vec![i as u8; len])))
            .collect()
    }

    #[tokio::test]
    async fn chunks_arrive_in_order_then_the_end() {
        let mut pump = Pump::spawn(futures_util::stream::iter(chunks(5, 10)), 1 << 20);
        for i in 0..5u8 {
            let chunk = pump.next().await.unwrap().unwrap();
            assert_eq!(&chunk[..], &[i; 10]);
        }
        assert!(pump.next().await.unwrap().is_none());
        assert!(pump.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_failure_is_passed_on_after_the_chunks_before_it() {
        let mut body = chunks(2, 3);
        body.push(Err("broken".into()));
        body.extend(chunks(1, 3));
        let mut pump = Pump::spawn(futures_util::stream::iter(body), 1 << 20);
        assert!(pump.next().await.unwrap().is_some());
        assert!(pump.next().await.unwrap().is_some());
        assert!(matches!(pump.next().await, Err(PumpError::Body(e)) if e == "broken"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_by_bytes() {
        let mut pump = Pump::spawn(futures_util::stream::iter(chunks(100, 1000)), 4000);
        // Let the task run as far as the room allows.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let mut queued = 0;
        while let Some(Ok(Some(_))) = pump.arrived() {
            queued += 1;
        }
        assert_eq!(queued, 4, "at most 4000 bytes are read ahead");
        // Taking them made room: the rest comes.
        let mut rest = 0;
        while pump.next().await.unwrap().is_some() {
            rest += 1;
        }
        assert_eq!(queued + rest, 100);
    }

    #[tokio::test]
    async fn a_task_that_stops_before_the_end_is_not_a_complete_body() {
        let body =
            futures_util::stream::iter(chunks(1, 1)).chain(futures_util::stream::once(async {
                panic!("reader task dies")
            }));
        let mut pump = Pump::<String>::spawn(body, 1 << 20);
        assert!(pump.next().await.unwrap().is_some());
        assert!(matches!(pump.next().await, Err(PumpError::Stopped)));
    }
}
