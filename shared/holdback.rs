//! The held-back tail of a streamed ClickHouse answer, and the batching of
//! what may be passed on.
//!
//! ClickHouse reports a failure after the first block by appending its
//! exception to a `200 OK` body, so the last [`TAIL_HOLDBACK`] bytes of every
//! answer are held until the answer is complete and its tail was checked
//! ([`crate::clickhouse::exception_start`]). [`Holdback`] owns that tail:
//! chunks go in as they arrive ([`Holdback::push`]), the reader taking those
//! that follow within [`GATHER`] of each other; what lies before the tail
//! comes out merged into pieces of up to [`PASS_BATCH`] bytes
//! ([`Holdback::pass`]), so a server that sends small chunks (a few KiB each)
//! costs the client one write per batch rather than one per chunk.
//!
//! It does not read anything (the HTTP client of [`crate::clickhouse`] and the
//! ClickHouse-compatible endpoint's raw client do), nor decide what the tail
//! holds: the reader takes it with [`Holdback::finish`], checks it, and gives
//! back what may still go with [`Holdback::keep`].

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// Bytes at the end of every answer held back until the answer is complete.
pub const TAIL_HOLDBACK: usize = 64 * 1024;

/// The most bytes one [`Holdback::pass`] merges (and how far past the tail a
/// reader reads ahead without waiting, [`Holdback::wants_more`]).
pub const PASS_BATCH: usize = 256 * 1024;

/// How long a reader waits for more chunks before passing on what it has
/// ([`Holdback::wants_more`]): ClickHouse streams in chunks of a few KiB
/// (18.16: 4 KiB) that hyper's client hands over one at a time, so without
/// waiting a little each would cost the client its own write.
pub const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// An answer's chunks between arriving and being passed on.
#[derive(Debug, Default)]
pub struct Holdback {
    held: VecDeque<Bytes>,
    held_len: usize,
    /// The last byte passed on (`None` before the first): whether the held
    /// tail starts a line.
    passed_last: Option<u8>,
    finished: bool,
}

impl Holdback {
    pub fn new() -> Holdback {
        Holdback::default()
    }

    /// A chunk arrived.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.held_len += chunk.len();
            self.held.push_back(chunk);
        }
    }

    /// Whether a reader should take what arrives next before passing on: the
    /// body goes on, less than a batch waits beyond the tail, and it is not
    /// the answer's first piece that could go (first bytes go as soon as they
    /// may: time to first byte).
    pub fn wants_more(&self) -> bool {
        let first_ready = self.passed_last.is_none()
            && self
                .held
                .front()
                .is_some_and(|front| self.held_len - front.len() >= TAIL_HOLDBACK);
        !self.finished && !first_ready && self.held_len < TAIL_HOLDBACK + PASS_BATCH
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// What may go now, merged up to [`PASS_BATCH`]: everything before the
    /// last [`TAIL_HOLDBACK`] bytes, or everything once the body is finished
    /// (and its tail checked). `None` when nothing may go yet.
    pub fn pass(&mut self) -> Option<Bytes> {
        let first = self.take_front(0)?;
        let mut merged: Option<BytesMut> = None;
        while let Some(next) = self.take_front(merged.as_ref().map_or(first.len(), |m| m.len())) {
            merged
                .get_or_insert_with(|| {
                    let mut buf = BytesMut::with_capacity(PASS_BATCH);
                    buf.extend_from_slice(&first);
                    buf
                })
                .extend_from_slice(&next);
        }
        let out = merged.map_or(first, BytesMut::freeze);
        self.passed_last = out.last().copied().or(self.passed_last);
        Some(out)
    }

    /// The front chunk, when it may go and fits a batch that has `batched`
    /// bytes already.
    fn take_front(&mut self, batched: usize) -> Option<Bytes> {
        let front = self.held.front()?;
        let may_go = self.finished || self.held_len - front.len() >= TAIL_HOLDBACK;
        let fits = batched == 0 || batched + front.len() <= PASS_BATCH;
        if !(may_go && fits) {
            return None;
        }
        self.held_len -= front.len();
        self.held.pop_front()
    }

    /// The body ended (or broke off): the held tail as one piece, and the
    /// byte passed on just before it (`None` when the tail is the whole
    /// body). Nothing is held afterwards until [`Holdback::keep`].
    pub fn finish(&mut self) -> (Bytes, Option<u8>) {
        self.finished = true;
        let tail = match self.held.len() {
            0 => Bytes::new(),
            1 => self.held.pop_front().unwrap_or_default(),
            _ => {
                let mut tail = BytesMut::with_capacity(self.held_len);
                for chunk in self.held.drain(..) {
                    tail.extend_from_slice(&chunk);
                }
                tail.freeze()
            }
        };
        self.held.clear();
        self.held_len = 0;
        (tail, self.passed_last)
    }

    /// After [`Holdback::finish`]: the part of the tail that may still go.
    pub fn keep(&mut self, tail: Bytes) {
        self.push(tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(holdback: &mut Holdback) -> Vec<Bytes> {
        std::iter::from_fn(|| holdback.pass()).collect()
    }

    #[test]
    fn the_tail_is_held_and_the_rest_goes_in_batches() {
        let mut holdback = Holdback::new();
        let chunk = Bytes::from(vec![b'x'; 4096]);
        for _ in 0..16 {
            holdback.push(chunk.clone());
        }
        // 64 KiB arrived: all of it is the tail.
        assert!(holdback.pass().is_none());
        for _ in 0..(PASS_BATCH * 2 / 4096) {
            holdback.push(chunk.clone());
        }
        let passed = drain(&mut holdback);
        assert_eq!(passed.len(), 2, "merged into batches");
        assert!(passed.iter().all(|b| b.len() == PASS_BATCH));
        assert!(holdback.wants_more());
        let (tail, before) = holdback.finish();
        assert_eq!(tail.len(), TAIL_HOLDBACK);
        assert_eq!(before, Some(b'x'));
        assert!(!holdback.wants_more());
        holdback.keep(tail.slice(..10));
        assert_eq!(drain(&mut holdback), vec![tail.slice(..10)]);
        assert!(holdback.pass().is_none());
    }

    #[test]
    fn the_first_piece_goes_as_soon_as_it_may() {
        let mut holdback = Holdback::new();
        let chunk = Bytes::from(vec![b'x'; 4096]);
        for _ in 0..16 {
            holdback.push(chunk.clone());
            assert!(holdback.wants_more(), "all of it is still the tail");
        }
        holdback.push(chunk.clone());
        assert!(
            !holdback.wants_more(),
            "the first 4 KiB may go: no gathering"
        );
        assert_eq!(holdback.pass().map(|p| p.len()), Some(4096));
        holdback.push(chunk.clone());
        assert!(holdback.wants_more(), "later pieces are gathered");
    }

    #[test]
    fn a_chunk_larger_than_a_batch_goes_whole_and_order_is_kept() {
        let mut holdback = Holdback::new();
        let mut sent = Vec::new();
        for (i, len) in [10usize, PASS_BATCH + 7, 3, TAIL_HOLDBACK, 5]
            .into_iter()
            .enumerate()
        {
            let chunk = Bytes::from(vec![i as u8; len]);
            sent.extend_from_slice(&chunk);
            holdback.push(chunk);
        }
        let mut got = Vec::new();
        for piece in drain(&mut holdback) {
            assert!(piece.len() <= PASS_BATCH + 7);
            got.extend_from_slice(&piece);
        }
        let (tail, before) = holdback.finish();
        assert_eq!(before, got.last().copied());
        got.extend_from_slice(&tail);
        assert_eq!(got, sent);
    }

    #[test]
    fn a_small_body_is_held_whole() {
        let mut holdback = Holdback::new();
        holdback.push(Bytes::from_static(b"{\"a\":1}\n"));
        assert!(holdback.pass().is_none());
        let (tail, before) = holdback.finish();
        assert_eq!(&tail[..], b"{\"a\":1}\n");
        assert_eq!(before, None);
    }
}
