//! The fault schedule: what goes wrong, and when, drawn from a seed. The
//! same seed, duration, worker count and fault kinds give the same
//! schedule, whatever the versions of the dependencies: the generator
//! ([`SplitMix64`]) and the ways it is drawn from are defined here.

use std::time::Duration;

use checkout::services::Faults;
use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny generator whose
/// output for a seed is fixed by its definition, so a seed names the same
/// schedule on every build.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The generator seeded with `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }

    /// Uniform in `[0, n)` (0 if `n` is 0), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[low, high)`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low))
    }

    /// Uniform in `[low, high)`.
    pub fn range_f64(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// `low..high` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.range(low, high))
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A kind of fault.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum FaultKind {
    /// A worker process killed with SIGKILL at a random moment, then restarted.
    WorkerKill,
    /// A worker process killed with SIGKILL right after a downstream call
    /// applied its effect, before the step's result was recorded.
    CrashAfterEffect,
    /// A worker frozen (SIGSTOP) past its lease, either in the middle of a
    /// step right after its effect, or between the end of the step and the
    /// arrival of its result at the database (the write is held back in
    /// the network meanwhile); another worker takes the saga over; then it
    /// wakes. Its write must be refused.
    ZombieWorker,
    /// The database stopped with `pg_ctl stop -m immediate`, then started.
    PostgresRestart,
    /// A worker's connection dropped around a saga transition's statement
    /// (the one that writes its history row and commits): after it was
    /// sent and before the reply arrived (the reply to a COMMIT is lost),
    /// or just before it was sent.
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
    /// Freeze worker `worker` after its next effect, past its lease.
    ZombieWorker {
        /// Which worker.
        worker: usize,
        /// Where it freezes.
        at: ZombieAt,
    },
    /// Stop the database for `down_for`.
    PostgresRestart {
        /// How long it stays down.
        down_for: Duration,
    },
    /// Cut the connection of the next saga transition's statement, after
    /// (`reply_lost`) or before it reached the server.
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

/// Where a zombie worker freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZombieAt {
    /// In the step, right after its effect: on waking, its lease heartbeat
    /// (or, if the step's end wins the race, its result) is refused.
    Step,
    /// After the step ended, with its result on the way to the database:
    /// the result itself must be refused.
    Record,
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

/// One event of `kind`. The variant of a cut (after or before sending) and
/// of a zombie (frozen in its step or before its result lands) is set
/// later, in time order, by [`schedule`].
fn draw(kind: FaultKind, rng: &mut SplitMix64, workers: usize) -> Fault {
    let worker = rng.below(workers.max(1) as u64) as usize;
    let service = [Service::Payment, Service::Inventory, Service::Email][rng.below(3) as usize];
    let window = rng.millis(500, 3_000);
    match kind {
        FaultKind::WorkerKill => Fault::WorkerKill { worker },
        FaultKind::CrashAfterEffect => Fault::CrashAfterEffect { worker },
        FaultKind::ZombieWorker => Fault::ZombieWorker {
            worker,
            at: ZombieAt::Record,
        },
        FaultKind::PostgresRestart => Fault::PostgresRestart {
            down_for: rng.millis(500, 2_500),
        },
        FaultKind::CommitCut => Fault::CommitCut { reply_lost: true },
        FaultKind::ConnectionReset => Fault::ConnectionReset,
        FaultKind::NetworkLatency => Fault::NetworkLatency {
            latency: rng.millis(5, 60),
            window,
        },
        FaultKind::DownstreamOutage => Fault::Downstream {
            service,
            faults: Faults {
                outage: true,
                ..Faults::default()
            },
            window: rng.millis(300, 1_500),
        },
        FaultKind::DownstreamErrors => Fault::Downstream {
            service,
            faults: Faults {
                error_rate: rng.range_f64(0.1, 0.4),
                ..Faults::default()
            },
            window,
        },
        FaultKind::DownstreamLatency => Fault::Downstream {
            service,
            faults: Faults {
                latency: rng.millis(20, 300),
                ..Faults::default()
            },
            window,
        },
        FaultKind::LostReplies => Fault::Downstream {
            service,
            faults: Faults {
                lose_reply_rate: rng.range_f64(0.1, 0.4),
                ..Faults::default()
            },
            window,
        },
        FaultKind::DuplicateDelivery => Fault::DuplicateDelivery {
            count: rng.range(1, 10) as usize,
        },
        FaultKind::DispatcherCrash => Fault::DispatcherCrash { worker },
    }
}

/// The schedule of `plan`: every kind once (both variants of a cut and of
/// a zombie), spread from 10% to 70% of the duration in a seeded order,
/// then more faults at the given rate, sorted by time.
#[must_use]
pub fn schedule(plan: &Plan) -> Vec<Event> {
    let mut rng = SplitMix64::new(plan.seed);
    let mut kinds = plan.kinds.clone();
    kinds.sort();
    kinds.dedup();
    // Every kind once; the kinds with two variants (a cut after or before
    // sending, a zombie frozen in its step or before its result lands)
    // twice, one of each.
    let mut first = kinds.clone();
    first.extend(
        kinds
            .iter()
            .filter(|k| matches!(k, FaultKind::CommitCut | FaultKind::ZombieWorker)),
    );
    rng.shuffle(&mut first);
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
        let mut pick = rng.below(u64::from(total_weight)) as u32;
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
        let at = plan.duration.mul_f64(rng.unit());
        events.push(Event {
            at,
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
    // The variants alternate in time: a cut after sending, then one before,
    // and so on; a zombie frozen before its result lands, then one frozen
    // in its step. Cuts and zombies go one at a time and the last ones may
    // not fire before the fault phase ends, so a short run still sees both
    // variants of each.
    let (mut cuts, mut zombies) = (0_u64, 0_u64);
    for e in &mut events {
        match &mut e.fault {
            Fault::CommitCut { reply_lost } => {
                *reply_lost = cuts % 2 == 0;
                cuts += 1;
            }
            Fault::ZombieWorker { at, .. } => {
                *at = if zombies % 2 == 0 {
                    ZombieAt::Record
                } else {
                    ZombieAt::Step
                };
                zombies += 1;
            }
            _ => {}
        }
    }
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

    const PINNED_HEAD: [(u128, &str); 4] = [
        (95, "downstream_latency"),
        (3561, "downstream_outage"),
        (3600, "duplicate_delivery"),
        (4429, "dispatcher_crash"),
    ];
    const PINNED_LEN: usize = 60;

    #[test]
    fn the_generator_gives_the_published_splitmix64_sequence() {
        // The reference values of SplitMix64 seeded with 0 and 1234567.
        let mut zero = SplitMix64::new(0);
        assert_eq!(
            [zero.next_u64(), zero.next_u64(), zero.next_u64()],
            [
                0xE220_A839_7B1D_CDAF,
                0x6E78_9E6A_A1B9_65F4,
                0x06C4_5D18_8009_454F
            ]
        );
        let mut other = SplitMix64::new(1_234_567);
        assert_eq!(
            [other.next_u64(), other.next_u64()],
            [6_457_827_717_110_365_317, 3_203_168_211_198_807_973]
        );
    }

    #[test]
    fn draws_stay_in_their_ranges() {
        let mut rng = SplitMix64::new(9);
        for _ in 0..10_000 {
            assert!(rng.below(7) < 7);
            assert!((3..5).contains(&rng.range(3, 5)));
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
        }
        assert_eq!(rng.below(0), 0);
        let mut items: Vec<u32> = (0..20).collect();
        rng.shuffle(&mut items);
        let mut sorted = items.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_ne!(items, sorted, "a shuffle of 20 moves something");
    }

    #[test]
    fn a_seed_names_the_same_schedule_on_every_build() {
        // Pinned: a change here changes what every recorded seed means.
        let events = schedule(&plan(2026));
        let head: Vec<(u128, &str)> = events
            .iter()
            .take(4)
            .map(|e| (e.at.as_millis(), e.fault.kind().name()))
            .collect();
        assert_eq!(head, PINNED_HEAD, "{head:?}");
        assert_eq!(events.len(), PINNED_LEN);
    }

    #[test]
    fn zombies_and_cuts_alternate_their_variants_in_time_order() {
        // The earliest fire first (one at a time): a short run in which only
        // the first two fire still sees both variants.
        for (seed, rate) in [(5, 0.0), (1, 1.0), (2026, 2.0)] {
            let mut p = plan(seed);
            p.rate = rate;
            let events = schedule(&p);
            let zombies: Vec<ZombieAt> = events
                .iter()
                .filter_map(|e| match e.fault {
                    Fault::ZombieWorker { at, .. } => Some(at),
                    _ => None,
                })
                .collect();
            let cuts: Vec<bool> = events
                .iter()
                .filter_map(|e| match e.fault {
                    Fault::CommitCut { reply_lost } => Some(reply_lost),
                    _ => None,
                })
                .collect();
            assert!(
                zombies.len() >= 2 && cuts.len() >= 2,
                "{zombies:?} {cuts:?}"
            );
            for (i, at) in zombies.iter().enumerate() {
                let want = if i % 2 == 0 {
                    ZombieAt::Record
                } else {
                    ZombieAt::Step
                };
                assert_eq!(*at, want, "seed {seed}: {zombies:?}");
            }
            for (i, reply_lost) in cuts.iter().enumerate() {
                assert_eq!(*reply_lost, i % 2 == 0, "seed {seed}: {cuts:?}");
            }
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
