//! Zombies: a worker frozen at its effect point until another worker has
//! taken its saga over, then woken and watched until its write is refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use checkout::deploy::Deployment;
use saga_postgres::tags;
use saga_test_support::proxy::transition_ids;
use uuid::Uuid;

use super::Run;
use super::workers::incarnation_name;
use crate::check::ZombieFact;
use crate::schedule::{FaultKind, ZombieAt};

/// The lease on a saga, as its row says.
#[derive(Debug, Clone, Copy)]
struct LeaseRow {
    saga: Uuid,
    token: Option<Uuid>,
    owner: Option<Uuid>,
    version: i64,
}

/// The saga of `order`: its id, lease token and owner, and version.
async fn lease_of(
    deployment: &Deployment,
    order: &str,
) -> Result<Option<LeaseRow>, checkout::Error> {
    let db = deployment.pool.get().await?;
    let row = db
        .query_opt(
            &format!(
                "SELECT id, lease_token, lease_owner, version FROM {}.saga_instances
                 WHERE start_key = $1",
                deployment.schemas.saga.quoted()
            ),
            &[&order],
        )
        .await?;
    Ok(row.map(|r| LeaseRow {
        saga: r.get(0),
        token: r.get(1),
        owner: r.get(2),
        version: r.get(3),
    }))
}

/// Results written for `saga` by sessions other than `zombie`'s (the
/// harness's copy of every history insert keeps the session's
/// `application_name`).
async fn written_by_others(
    deployment: &Deployment,
    saga: Uuid,
    zombie: &str,
) -> Result<i64, checkout::Error> {
    let db = deployment.pool.get().await?;
    Ok(db
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.history_inserts
                 WHERE saga_id = $1 AND application IS DISTINCT FROM $2",
                crate::check::HARNESS_SCHEMA
            ),
            &[&saga, &zombie],
        )
        .await?
        .get(0))
}

/// Waits (up to `bound`) until another worker than the zombie (`me`,
/// whose sessions are named `name`) has claimed the saga: seen either as
/// a new version under a live lease with another token and another owner,
/// or as a result another worker wrote for it since the freeze (its claim
/// and its result may both fall between two looks at the row). A new
/// version with no lease alone is not one: it may be the zombie's own
/// result, committed before it froze.
async fn wait_for_takeover(
    deployment: &Deployment,
    order: &str,
    (me, name): (Uuid, &str),
    before: LeaseRow,
    mut others_before: Option<i64>,
    bound: Duration,
) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if let Ok(Some(now)) = lease_of(deployment, order).await
            && now.version > before.version
            && now.token.is_some()
            && now.token != before.token
            && now.owner.is_some_and(|owner| owner != me)
        {
            return true;
        }
        if let Ok(others) = written_by_others(deployment, before.saga, name).await {
            match others_before {
                None => others_before = Some(others),
                Some(n) if others > n => return true,
                Some(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A zombie: worker `i` stopped at its effect point on `order`. Frozen
/// there (`Step`) or once its result is on the way (`Record`), until
/// another worker has taken the saga over; then woken, and watched until
/// it reports its write refused.
pub(super) async fn zombie(
    run: Arc<Run>,
    lease: Duration,
    i: usize,
    incarnation: u64,
    order: String,
    at: ZombieAt,
) {
    let workers = &run.workers;
    let deployment = &run.deployment;
    let mut fact = ZombieFact {
        order: order.clone(),
        at,
        frozen: false,
        takeover: false,
        record_sent: None,
        record_port: None,
        record_committed: false,
        refusal_reported: false,
    };
    workers.set_paused(i, true);
    // The worker is in its step and holds the saga's lease right now.
    let mut lease_now = None;
    for _ in 0..20 {
        match lease_of(deployment, &order).await {
            Ok(found) => {
                lease_now = found;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    // A zombie only if the lease is this worker's: faults (a restart, lost
    // heartbeats) may have let it lapse and another worker claim the saga
    // while this one was on its way to the effect point.
    let me = workers
        .worker_ids
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(i, incarnation))
        .copied();
    let held = match (me, lease_now) {
        (Some(me), Some(before)) if before.owner == Some(me) => {
            before.token.map(|token| (me, before, token))
        }
        _ => None,
    };
    let Some((me, before, token)) = held else {
        workers.send(i, "resume").await;
        workers.set_paused(i, false);
        workers.zombie_done().await;
        return;
    };
    let saga_id = before.saga.to_string();
    let name = incarnation_name(i, incarnation);
    // Results others wrote for the saga so far (none should come while the
    // worker holds the lease; one that does is a takeover).
    let others_before = written_by_others(deployment, before.saga, &name).await.ok();
    // Its result, if it ever sends one, is held back until released.
    let mut hold = Some(run.proxy.hold(tags::TRANSITION, token.as_bytes()));
    // Frozen at either point, the worker is woken once another has taken
    // the saga over (or the bound has passed).
    let takeover = || {
        wait_for_takeover(
            deployment,
            &order,
            (me, &name),
            before,
            others_before,
            lease * 8,
        )
    };
    match at {
        ZombieAt::Step => {
            if workers.signal(i, incarnation, "STOP").await {
                fact.frozen = true;
                run.tally.fired(FaultKind::ZombieWorker);
                fact.takeover = takeover().await;
                workers.signal(i, incarnation, "CONT").await;
            }
            workers.send(i, "resume").await;
        }
        ZombieAt::Record => {
            workers.send(i, "resume").await;
            let reached = match hold.as_mut() {
                Some(h) => tokio::time::timeout(lease * 2, h.reached()).await.ok(),
                None => None,
            };
            if let Some(statement) = reached {
                fact.record_sent = Some(transition_ids(&statement).1);
                fact.record_port = statement.upstream_port;
                if workers.signal(i, incarnation, "STOP").await {
                    fact.frozen = true;
                    run.tally.fired(FaultKind::ZombieWorker);
                    fact.takeover = takeover().await;
                }
                // The result reaches the database now, after the takeover.
                hold = None;
                workers.signal(i, incarnation, "CONT").await;
            }
        }
    }
    // Until the worker reports its write refused: a result it sends now
    // goes through at once (the takeover has happened).
    let deadline = Instant::now() + lease * 5;
    while Instant::now() < deadline && !workers.reported_lease_lost(i, incarnation, &saga_id) {
        let notified = workers.lease_lost.notified();
        let poll = tokio::time::sleep(Duration::from_millis(200));
        match hold.as_mut() {
            Some(h) => tokio::select! {
                statement = h.reached() => {
                    fact.record_sent = Some(transition_ids(&statement).1);
                    fact.record_port = statement.upstream_port;
                    hold = None;
                }
                () = notified => {}
                () = poll => {}
            },
            None => tokio::select! {
                () = notified => {}
                () = poll => {}
            },
        }
    }
    fact.refusal_reported = workers.reported_lease_lost(i, incarnation, &saga_id);
    drop(hold);
    workers.set_paused(i, false);
    if fact.frozen {
        run.tally.touch();
    }
    run.zombies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(fact);
    workers.zombie_done().await;
}
