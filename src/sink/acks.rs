//! One batch's broker answers, gathered from librdkafka's delivery callbacks.
//!
//! rdkafka's `FutureProducer` gives every message its own oneshot channel and
//! boxed future, and the task awaiting a batch is woken for each of them.
//! Here a batch shares one [`Acks`]: each message carries a small [`Ack`]
//! (librdkafka's delivery opaque) naming its place in the batch, and the
//! waiter is woken once, when the last message of the batch is answered.
//! Callgrind put the per-message futures at about a sixth of the relay's
//! instructions per event (BENCHMARKS.md).

use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use tokio::sync::oneshot;

/// What the broker said about one message: `(index in the batch, answer)`.
pub type Answer = (usize, Result<(), KafkaError>);

/// The answers of one batch, collected until every message sent is answered.
pub struct Acks {
    state: Mutex<Gathering>,
}

struct Gathering {
    answers: Vec<Answer>,
    /// Messages handed to librdkafka and not answered yet.
    outstanding: usize,
    /// No more messages will be added ([`Acks::seal`]).
    sealed: bool,
    /// Taken when the batch completes.
    done: Option<oneshot::Sender<Vec<Answer>>>,
}

/// The delivery opaque of one message: where its answer goes.
///
/// Dropped without an answer (librdkafka was destroyed with the message
/// still queued), it answers [`KafkaError::Canceled`], so a waiter never
/// hangs on a message nobody will report.
pub struct Ack {
    batch: Arc<Acks>,
    index: usize,
    settled: bool,
}

impl Acks {
    /// An empty batch and the receiver of its answers (sent once the batch
    /// is sealed and every message in it answered; answers in arrival order).
    pub fn new() -> (Arc<Acks>, oneshot::Receiver<Vec<Answer>>) {
        let (done, answered) = oneshot::channel();
        let state = Gathering { answers: Vec::new(), outstanding: 0, sealed: false, done: Some(done) };
        (Arc::new(Acks { state: Mutex::new(state) }), answered)
    }

    /// The opaque for the message at `index`, which is about to be sent.
    pub fn ack(self: &Arc<Self>, index: usize) -> Box<Ack> {
        self.with(|state| state.outstanding += 1);
        Box::new(Ack { batch: Arc::clone(self), index, settled: false })
    }

    /// No more messages join this batch; completes it if all are answered.
    pub fn seal(&self) {
        self.with(|state| state.sealed = true);
    }

    fn with(&self, change: impl FnOnce(&mut Gathering)) {
        // Only a panic inside these few lines could poison the lock.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut state);
        if state.sealed && state.outstanding == 0 {
            if let Some(done) = state.done.take() {
                let answers = std::mem::take(&mut state.answers);
                drop(state);
                // The waiter may have given up (an aborted transaction); nothing to do then.
                let _ = done.send(answers);
            }
        }
    }
}

impl Ack {
    /// Records the broker's answer for this message.
    pub fn answer(mut self, result: Result<(), KafkaError>) {
        self.settle(Some(result));
    }

    /// The message was never handed to librdkafka (the caller reports why).
    pub fn withdraw(mut self) {
        self.settle(None);
    }

    fn settle(&mut self, result: Option<Result<(), KafkaError>>) {
        if self.settled {
            return;
        }
        self.settled = true;
        let index = self.index;
        self.batch.with(|state| {
            state.outstanding -= 1;
            if let Some(result) = result {
                state.answers.push((index, result));
            }
        });
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        self.settle(Some(Err(KafkaError::Canceled)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::RDKafkaErrorCode;

    fn answers(mut received: Vec<Answer>) -> Vec<(usize, bool)> {
        received.sort_by_key(|(index, _)| *index);
        received.into_iter().map(|(index, result)| (index, result.is_ok())).collect()
    }

    #[tokio::test]
    async fn the_batch_completes_once_sealed_and_every_message_is_answered() {
        let (acks, mut answered) = Acks::new();
        let first = acks.ack(0);
        let second = acks.ack(1);
        second.answer(Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)));
        first.answer(Ok(()));
        assert!(answered.try_recv().is_err(), "not sealed yet: more messages may join");
        acks.seal();
        assert_eq!(answers(answered.await.unwrap()), vec![(0, true), (1, false)]);
    }

    #[tokio::test]
    async fn withdrawn_messages_are_not_waited_for_and_dropped_ones_are_canceled() {
        let (acks, answered) = Acks::new();
        acks.ack(0).withdraw();
        let unanswered = acks.ack(1);
        acks.ack(2).answer(Ok(()));
        acks.seal();
        drop(unanswered);
        let received = answered.await.unwrap();
        assert!(received.iter().any(|(i, r)| *i == 1 && matches!(r, Err(KafkaError::Canceled))));
        assert_eq!(answers(received), vec![(1, false), (2, true)]);
    }

    #[tokio::test]
    async fn an_empty_sealed_batch_completes_at_once() {
        let (acks, answered) = Acks::new();
        acks.seal();
        assert!(answered.await.unwrap().is_empty());
    }
}
