//! The server's periodic background tasks (followers of the metadata store, the event-id
//! pruner, compaction): one loop shape for all of them.
//!
//! A task runs, then waits its period, and stops at the server's shutdown signal while it
//! waits; a run in progress always finishes, so shutdown never cuts a compaction or a
//! metadata read in half. State a task carries from one run to the next (the revision a
//! follower has seen) is passed through each run by value.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A named background task, as the server keeps it to drain at shutdown.
pub(crate) type Task = (&'static str, JoinHandle<()>);

/// When a periodic task runs first.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Start {
    /// At once (state the server needs soon, such as pruning after a long stop).
    Now,
    /// After one period (the server has just done the same work while starting).
    AfterPeriod,
}

/// Spawns `run` every `period` until `stop` changes, threading `state` through the runs.
pub(crate) fn periodic<S, F, Fut>(
    name: &'static str,
    period: Duration,
    start: Start,
    mut stop: watch::Receiver<bool>,
    state: S,
    mut run: F,
) -> Task
where
    S: Send + 'static,
    F: FnMut(S) -> Fut + Send + 'static,
    Fut: Future<Output = S> + Send,
{
    let handle = tokio::spawn(async move {
        let mut state = state;
        if matches!(start, Start::AfterPeriod) && !pause(period, &mut stop).await {
            return;
        }
        loop {
            state = run(state).await;
            if !pause(period, &mut stop).await {
                return;
            }
        }
    });
    (name, handle)
}

/// Waits one period; false when the server is stopping (or its signal is gone).
async fn pause(period: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => true,
        _ = stop.changed() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const PERIOD: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn runs_every_period_with_its_state_and_stops_between_runs() {
        let (tx, rx) = watch::channel(false);
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let t0 = Instant::now();
        let (_, task) = periodic("count", PERIOD, Start::Now, rx, 0u32, move |n| {
            let seen_tx = seen_tx.clone();
            async move {
                seen_tx.send((n, Instant::now())).unwrap();
                n + 1
            }
        });
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(seen.recv().await.unwrap());
        }
        tx.send(true).unwrap();
        task.await.unwrap();
        // Each run is given the state the one before returned.
        let states: Vec<u32> = runs.iter().map(|r| r.0).collect();
        assert_eq!(states, vec![0, 1, 2]);
        // The first at once, then a whole period between runs.
        assert!(runs[0].1 - t0 < PERIOD, "{:?}", runs[0].1 - t0);
        for w in runs.windows(2) {
            assert!(w[1].1 - w[0].1 >= PERIOD, "{:?}", w[1].1 - w[0].1);
        }
        assert!(seen.try_recv().is_err(), "no run after the stop");
    }

    #[tokio::test]
    async fn after_period_waits_first_and_a_stop_before_the_first_run_runs_nothing() {
        let (tx, rx) = watch::channel(false);
        let (_, task) = periodic(
            "never",
            Duration::from_secs(60),
            Start::AfterPeriod,
            rx,
            (),
            |()| async { panic!("ran before its first period") },
        );
        tokio::time::sleep(PERIOD).await;
        tx.send(true).unwrap();
        task.await.unwrap();
    }
}
