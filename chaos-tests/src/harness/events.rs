//! What the harness does with each event a worker reports.

use std::sync::Arc;
use std::time::Duration;

use super::Run;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::workers::{Arm, Msg};
use super::zombie::zombie;
use crate::schedule::FaultKind;
use crate::worker::{PointAction, WorkerEvent};

async fn handle_event(
    run: &Arc<Run>,
    lease: Duration,
    i: usize,
    incarnation: u64,
    event: WorkerEvent,
) {
    let workers = &run.workers;
    match event {
        WorkerEvent::Stats { counts, taken_at } => {
            workers
                .counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((i, incarnation), counts);
            if let Some(at) = taken_at {
                workers
                    .reported_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((i, incarnation), at);
            }
        }
        WorkerEvent::EffectPoint {
            action: PointAction::Crash,
            ..
        } => {
            workers.effect_fired(PointAction::Crash).await;
            // It hangs until killed, armed or not.
            if workers
                .kill_and_restart(i, Some(incarnation))
                .await
                .unwrap_or(false)
            {
                run.tally.fired(FaultKind::CrashAfterEffect);
                run.tally.affected(FaultKind::CrashAfterEffect, 1);
            }
        }
        WorkerEvent::EffectPoint {
            action: PointAction::Pause,
            order_id,
            ..
        } => {
            let Some(Arm::Zombie(at)) = workers.effect_fired(PointAction::Pause).await else {
                // Reached after it was disarmed: not a zombie.
                workers.send(i, "resume").await;
                return;
            };
            let task = tokio::spawn(zombie(run.clone(), lease, i, incarnation, order_id, at));
            run.zombie_tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task);
        }
        WorkerEvent::PublishPoint => {
            workers.publish_fired().await;
            if workers
                .kill_and_restart(i, Some(incarnation))
                .await
                .unwrap_or(false)
            {
                run.tally.fired(FaultKind::DispatcherCrash);
                run.tally.affected(FaultKind::DispatcherCrash, 1);
            }
        }
        WorkerEvent::LeaseLost { saga_id, .. } => {
            workers
                .leases_lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((i, incarnation, saga_id));
            workers.lease_lost.notify_waiters();
        }
        WorkerEvent::Stopped => {
            workers
                .stopped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((i, incarnation));
        }
        WorkerEvent::Ready { worker_id } => {
            workers
                .worker_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((i, incarnation), worker_id);
        }
    }
}

/// The workers' events: counters, refused writes, and the armed points
/// where the harness kills or freezes them; handled in order until the
/// channel closes.
pub(super) fn spawn_loop(
    run: Arc<Run>,
    lease: Duration,
    mut events_rx: mpsc::UnboundedReceiver<Msg>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(msg) = events_rx.recv().await {
            let (i, incarnation, event) = match msg {
                Msg::Event(i, n, e) => (i, n, e),
                Msg::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            handle_event(&run, lease, i, incarnation, event).await;
        }
    })
}
