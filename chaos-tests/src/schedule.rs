//! The fault schedule: what goes wrong, and when, drawn from a seed. The
//! same seed, duration, worker count and fault kinds give the same
//! schedule.

use std::time::Duration;

use checkout::services::Faults;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A worker process killed with SIGKILL at a random moment, then restarted.
    WorkerKill,
    /// A worker process killed with SIGKILL right after a downstream call
    /// applied its effect, before the step's result was recorded.
    CrashAfterEffect,
    /// A worker stopped with SIGSTOP right after an effect, for longer than
    /// its lease; another worker takes over; then SIGCONT. Its writes must
    /// be refused.
    ZombieWorker,
    /// The database stopped with `pg_ctl stop -m immediate`, then started.
    PostgresRestart,
    /// A worker's connection dropped after a statement (its COMMIT) was
    /// sent and before the reply arrived, or just before it was sent.
    CommitCut,
    /// Every live worker connection reset.
    ConnectionReset,
    /// Latency between workers and the database.
    NetworkLatency,
    /// A downstream service down for a while.
    DownstreamOutage,
    /// A downstream service failing a fraction of requests.
    DownstreamErrors,
    /// A downstream service answering slowly.
    DownstreamLatency,
    /// A downstream service applying effects and losing the replies.
    LostReplies,
    /// Delivered outbox messages delivered again.
    DuplicateDelivery,
    /// A dispatcher killed after publishing a batch, before deleting it.
    DispatcherCrash,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 13] = [
        FaultKind::WorkerKill,
        FaultKind::CrashAfterEffect,
        FaultKind::ZombieWorker,
        FaultKind::PostgresRestart,
        FaultKind::CommitCut,
        FaultKind::ConnectionReset,
        FaultKind::NetworkLatency,
        FaultKind::DownstreamOutage,
        FaultKind::DownstreamErrors,
        FaultKind::DownstreamLatency,
        FaultKind::LostReplies,
        FaultKind::DuplicateDelivery,
        FaultKind::DispatcherCrash,
    ];

    /// The name used in reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::WorkerKill => "worker_kill",
            FaultKind::CrashAfterEffect => "crash_after_effect",
            FaultKind::ZombieWorker => "zombie_worker",
            FaultKind::PostgresRestart => "postgres_restart",
            FaultKind::CommitCut => "commit_cut",
            FaultKind::ConnectionReset => "connection_reset",
            FaultKind::NetworkLatency => "network_latency",
            FaultKind::DownstreamOutage => "downstream_outage",
            FaultKind::DownstreamErrors => "downstream_errors",
            FaultKind::DownstreamLatency => "downstream_latency",
            FaultKind::LostReplies => "lost_replies",
            FaultKind::DuplicateDelivery => "duplicate_delivery",
            FaultKind::DispatcherCrash => "dispatcher_crash",
        }
    }

    /// How often it is drawn, relative to the others.
    fn weight(self) -> u32 {
        match self {
            FaultKind::PostgresRestart => 1,
            FaultKind::DownstreamOutage | FaultKind::ZombieWorker => 2,
            _ => 4,
        }
    }
}

/// A downstream service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    /// Payment.
    Payment,
    /// Inventory.
    Inventory,
    /// Email.
    Email,
}

/// One fault, ready to inject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL worker `worker`, then restart it.
    WorkerKill {
        /// Which worker.
        worker: usize,
    },
    /// Kill worker `worker` after its next effect.
    CrashAfterEffect {
        /// Which worker.
        worker: usize,
    },
    /// Stop worker `worker` after its next effect, past its lease.
    ZombieWorker {
        /// Which worker.
        worker: usize,
    },
    /// Stop the database for `down_for`.
    PostgresRestart {
        /// How long it stays down.
        down_for: Duration,
    },
    /// Cut the next statement's connection, after (`reply_lost`) or
    /// before it reached the server.
    CommitCut {
        /// Whether the statement reached the server.
        reply_lost: bool,
    },
    /// Reset every worker connection.
    ConnectionReset,
    /// Add `latency` between workers and the database for `window`.
    NetworkLatency {
        /// The latency.
        latency: Duration,
        /// How long.
        window: Duration,
    },
    /// Make `service` misbehave for `window`.
    Downstream {
        /// Which service.
        service: Service,
        /// How.
        faults: Faults,
        /// How long.
        window: Duration,
    },
    /// Deliver up to `count` delivered messages again.
    DuplicateDelivery {
        /// How many.
        count: usize,
    },
    /// Kill worker `worker` after its next delivered batch.
    DispatcherCrash {
        /// Which worker.
        worker: usize,
    },
}

impl Fault {
    /// Its kind.
    #[must_use]
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::WorkerKill { .. } => FaultKind::WorkerKill,
            Fault::CrashAfterEffect { .. } => FaultKind::CrashAfterEffect,
            Fault::ZombieWorker { .. } => FaultKind::ZombieWorker,
            Fault::PostgresRestart { .. } => FaultKind::PostgresRestart,
            Fault::CommitCut { .. } => FaultKind::CommitCut,
            Fault::ConnectionReset => FaultKind::ConnectionReset,
            Fault::NetworkLatency { .. } => FaultKind::NetworkLatency,
            Fault::Downstream { faults, .. } => {
                if faults.outage {
                    FaultKind::DownstreamOutage
                } else if faults.lose_reply_rate > 0.0 {
                    FaultKind::LostReplies
                } else if faults.error_rate > 0.0 {
                    FaultKind::DownstreamErrors
                } else {
                    FaultKind::DownstreamLatency
                }
            }
            Fault::DuplicateDelivery { .. } => FaultKind::DuplicateDelivery,
            Fault::DispatcherCrash { .. } => FaultKind::DispatcherCrash,
        }
    }
}

/// A fault and when it starts, from the beginning of the fault phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When.
    pub at: Duration,
    /// What.
    pub fault: Fault,
}

/// What to draw a schedule from.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// Worker processes.
    pub workers: usize,
    /// The kinds to inject; each appears at least once.
    pub kinds: Vec<FaultKind>,
    /// Faults started per second, on average (each at least once anyway).
    pub rate: f64,
}

fn draw(kind: FaultKind, rng: &mut StdRng, workers: usize) -> Fault {
    let worker = rng.random_range(0..workers.max(1));
    let service = [Service::Payment, Service::Inventory, Service::Email][rng.random_range(0..3)];
    let window = Duration::from_millis(rng.random_range(500..3_000));
    match kind {
        FaultKind::WorkerKill => Fault::WorkerKill { worker },
        FaultKind::CrashAfterEffect => Fault::CrashAfterEffect { worker },
        FaultKind::ZombieWorker => Fault::ZombieWorker { worker },
        FaultKind::PostgresRestart => Fault::PostgresRestart {
            down_for: Duration::from_millis(rng.random_range(500..2_500)),
        },
        FaultKind::CommitCut => Fault::CommitCut {
            reply_lost: rng.random_bool(0.5),
        },
        FaultKind::ConnectionReset => Fault::ConnectionReset,
        FaultKind::NetworkLatency => Fault::NetworkLatency {
            latency: Duration::from_millis(rng.random_range(5..60)),
            window,
        },
        FaultKind::DownstreamOutage => Fault::Downstream {
            service,
            faults: Faults {
                outage: true,
                ..Faults::default()
            },
            window: Duration::from_millis(rng.random_range(300..1_500)),
        },
        FaultKind::DownstreamErrors => Fault::Downstream {
            service,
            faults: Faults {
                error_rate: rng.random_range(0.1..0.4),
                ..Faults::default()
            },
            window,
        },
        FaultKind::DownstreamLatency => Fault::Downstream {
            service,
            faults: Faults {
                latency: Duration::from_millis(rng.random_range(20..300)),
                ..Faults::default()
            },
            window,
        },
        FaultKind::LostReplies => Fault::Downstream {
            service,
            faults: Faults {
                lose_reply_rate: rng.random_range(0.1..0.4),
                ..Faults::default()
            },
            window,
        },
        FaultKind::DuplicateDelivery => Fault::DuplicateDelivery {
            count: rng.random_range(1..10),
        },
        FaultKind::DispatcherCrash => Fault::DispatcherCrash { worker },
    }
}

/// The schedule of `plan`: every kind once, spread from 10% to 70% of the
/// duration in a seeded order, then more faults at the given rate,
/// sorted by time.
#[must_use]
pub fn schedule(plan: &Plan) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut kinds = plan.kinds.clone();
    kinds.sort();
    kinds.dedup();
    let mut first = kinds.clone();
    first.shuffle(&mut rng);
    // After the first 10% (workers are up), before the last 30% (the
    // faults' effects are still under way when the phase ends).
    let (begin, span) = (plan.duration.mul_f64(0.1), plan.duration.mul_f64(0.6));
    let mut events: Vec<Event> = first
        .iter()
        .enumerate()
        .map(|(i, kind)| Event {
            at: begin + span.mul_f64((i as f64 + 0.5) / first.len().max(1) as f64),
            fault: draw(*kind, &mut rng, plan.workers),
        })
        .collect();
    let total_weight: u32 = kinds.iter().map(|k| k.weight()).sum();
    let extra = (plan.rate * plan.duration.as_secs_f64()).round() as usize;
    for _ in 0..extra.saturating_sub(events.len()) {
        if total_weight == 0 {
            break;
        }
        let mut pick = rng.random_range(0..total_weight);
        let kind = *kinds
            .iter()
            .find(|k| {
                if pick < k.weight() {
                    true
                } else {
                    pick -= k.weight();
                    false
                }
            })
            .expect("a kind under the total weight");
        events.push(Event {
            at: plan.duration.mul_f64(rng.random_range(0.0..1.0)),
            fault: draw(kind, &mut rng, plan.workers),
        });
    }
    // At most one database restart every ten seconds: each costs the
    // workers a reconnect.
    events.sort_by_key(|e| e.at);
    let mut last_restart: Option<Duration> = None;
    events.retain(|e| {
        if e.fault.kind() != FaultKind::PostgresRestart {
            return true;
        }
        if last_restart.is_some_and(|t| e.at < t + Duration::from_secs(10)) {
            return false;
        }
        last_restart = Some(e.at);
        true
    });
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seed: u64) -> Plan {
        Plan {
            seed,
            duration: Duration::from_secs(30),
            workers: 3,
            kinds: FaultKind::ALL.to_vec(),
            rate: 2.0,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        assert_eq!(schedule(&plan(42)), schedule(&plan(42)));
        assert_ne!(schedule(&plan(42)), schedule(&plan(43)));
    }

    #[test]
    fn every_kind_is_scheduled_and_events_are_in_order_within_the_duration() {
        let events = schedule(&plan(7));
        for kind in FaultKind::ALL {
            assert!(
                events.iter().any(|e| e.fault.kind() == kind),
                "{kind:?} missing"
            );
        }
        assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(events.iter().all(|e| e.at < Duration::from_secs(30)));
        assert!(
            events.len() >= 50,
            "about rate × duration events: {}",
            events.len()
        );
        let restarts: Vec<Duration> = events
            .iter()
            .filter(|e| e.fault.kind() == FaultKind::PostgresRestart)
            .map(|e| e.at)
            .collect();
        assert!(
            restarts
                .windows(2)
                .all(|w| w[1] >= w[0] + Duration::from_secs(10))
        );
    }

    #[test]
    fn only_the_chosen_kinds_are_scheduled() {
        let mut p = plan(1);
        p.kinds = vec![FaultKind::WorkerKill, FaultKind::CommitCut];
        let events = schedule(&p);
        assert!(
            events
                .iter()
                .all(|e| matches!(e.fault.kind(), FaultKind::WorkerKill | FaultKind::CommitCut))
        );
    }
}
