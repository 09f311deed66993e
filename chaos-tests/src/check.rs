//! The checkout invariants, checked from ground truth: the services'
//! ledgers (I1–I3, `checkout::audit`), the email sink and the database
//! rows (I4–I6), and the workers' own accounts of ambiguous commits (I7).
//!
//! - I1 per order: charges − refunds = the total if confirmed, else 0;
//!   never two charges.
//! - I2 inventory deducted at most once per (order, SKU); stock conserved,
//!   never negative; restored for compensated orders.
//! - I3 exactly one email per confirmed order, none for the others.
//! - I4 every saga Completed or Compensated within the bound after the
//!   last fault (stuck ones are reported with their reasons).
//! - I5 every committed outbox message delivered at least once; nothing
//!   delivered that was not committed; no dead letters left.
//! - I6 compensations only for started steps, in reverse order; no step
//!   result recorded twice.
//! - I7 every ambiguous commit resolved.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use checkout::audit::Audit;
use checkout::deploy::Deployment;
use saga_core::{Direction, HistoryEntry, MessageId, Outcome, SagaId, Status, StepName};
use serde::Serialize;

use crate::worker::Counts;

/// The invariants, by name.
pub const INVARIANTS: [&str; 7] = ["I1", "I2", "I3", "I4", "I5", "I6", "I7"];

/// The checkout saga's steps, in order.
const STEPS: [&str; 5] = [
    "validate_order",
    "charge_payment",
    "reserve_inventory",
    "confirm_order",
    "send_confirmation",
];

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// `I1` to `I7`.
    pub invariant: &'static str,
    /// The order concerned, if any.
    pub order: Option<String>,
    /// What is wrong.
    pub detail: String,
}

/// A saga instance as the checks see it.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Its id.
    pub id: SagaId,
    /// Its order.
    pub order: String,
    /// Its status.
    pub status: Status,
    /// Why it is stuck, if it is.
    pub stuck_reason: Option<String>,
    /// Its history.
    pub history: Vec<HistoryEntry>,
}

/// What the checks found.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// Every violation.
    pub violations: Vec<Violation>,
    /// Sagas by final status.
    pub outcomes: BTreeMap<String, u64>,
    /// Stuck sagas: order and reason.
    pub stuck: Vec<(String, String)>,
    /// The instances, by order id.
    pub instances: BTreeMap<String, Instance>,
}

impl Findings {
    /// Violations per invariant (every invariant listed, zeros included).
    #[must_use]
    pub fn per_invariant(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> =
            INVARIANTS.iter().map(|i| (*i, 0)).collect();
        for v in &self.violations {
            *counts.entry(v.invariant).or_default() += 1;
        }
        counts
    }
}

/// Reads the instances with their histories.
pub async fn instances(
    deployment: &Deployment,
) -> Result<BTreeMap<String, Instance>, checkout::Error> {
    let db = deployment.pool.get().await?;
    let s = deployment.schemas.saga.quoted();
    let mut out = BTreeMap::new();
    let mut by_id = HashMap::new();
    for row in db
        .query(
            &format!("SELECT id, start_key, status, stuck_reason FROM {s}.saga_instances"),
            &[],
        )
        .await?
    {
        let id = SagaId::from_uuid(row.get(0));
        let order: String = row.get(1);
        let status: Status = row
            .get::<_, &str>(2)
            .parse()
            .map_err(saga_core::Error::from)?;
        by_id.insert(id, order.clone());
        out.insert(
            order.clone(),
            Instance {
                id,
                order,
                status,
                stuck_reason: row.get(3),
                history: Vec::new(),
            },
        );
    }
    for row in db
        .query(
            &format!(
                "SELECT saga_id, transition_id, step, direction, attempt, outcome, error,
                    from_status, to_status, started_at, finished_at
                 FROM {s}.saga_history ORDER BY saga_id, seq"
            ),
            &[],
        )
        .await?
    {
        let id = SagaId::from_uuid(row.get(0));
        let Some(order) = by_id.get(&id) else {
            continue;
        };
        let parse_status = |v: Option<&str>| v.map(|v| v.parse::<Status>()).transpose();
        let entry = HistoryEntry {
            transition_id: saga_core::TransitionId::from_uuid(row.get(1)),
            step: StepName::new(row.get::<_, &str>(2))?,
            direction: row.get::<_, &str>(3).parse()?,
            attempt: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
            outcome: row.get::<_, &str>(5).parse()?,
            error: row.get(6),
            from_status: parse_status(row.get(7))?,
            to_status: row.get::<_, &str>(8).parse()?,
            started_at: saga_core::Timestamp::from_system_time(row.get(9)),
            finished_at: saga_core::Timestamp::from_system_time(row.get(10)),
        };
        if let Some(instance) = out.get_mut(order) {
            instance.history.push(entry);
        }
    }
    Ok(out)
}

/// Checks I1 to I7.
pub async fn check(
    deployment: &Deployment,
    audit: &Audit,
    quiesced: bool,
    counts: &Counts,
) -> Result<Findings, checkout::Error> {
    let mut f = Findings {
        instances: instances(deployment).await?,
        ..Findings::default()
    };
    let mut v = Vec::new();

    // I1–I3: the ledgers.
    for violation in &audit.violations {
        let text = violation.to_string();
        let detail = text
            .strip_prefix(violation.invariant())
            .map_or(text.clone(), |rest| rest.trim_start().to_owned());
        v.push(Violation {
            invariant: violation.invariant(),
            order: violation.order().map(str::to_owned),
            detail,
        });
    }

    // I4: every saga finished.
    if !quiesced {
        v.push(Violation {
            invariant: "I4",
            order: None,
            detail: "the system did not quiesce within the bound after the last fault".into(),
        });
    }
    for i in f.instances.values() {
        *f.outcomes.entry(i.status.to_string()).or_default() += 1;
        if !i.status.is_terminal() {
            let reason = i.stuck_reason.clone().unwrap_or_default();
            if i.status == Status::Stuck {
                f.stuck.push((i.order.clone(), reason.clone()));
            }
            v.push(Violation {
                invariant: "I4",
                order: Some(i.order.clone()),
                detail: format!("saga is {} {reason}", i.status),
            });
        }
    }

    // I5: what was committed was delivered; nothing else was.
    let notify = StepName::new("send_confirmation")?;
    let committed: HashMap<MessageId, &str> = f
        .instances
        .values()
        .filter(|i| {
            i.history.iter().any(|h| {
                h.step == notify
                    && h.direction == Direction::Forward
                    && h.outcome == Outcome::Succeeded
            })
        })
        .map(|i| {
            (
                MessageId::derive(i.id, &notify, Direction::Forward, 0),
                i.order.as_str(),
            )
        })
        .collect();
    let db = deployment.pool.get().await?;
    let delivered: Vec<(MessageId, String)> = db
        .query(
            &format!(
                "SELECT message_id, order_id FROM {}.sent",
                deployment.schemas.email.quoted()
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| (MessageId::from_uuid(r.get(0)), r.get(1)))
        .collect();
    let delivered_ids: HashSet<MessageId> = delivered.iter().map(|(id, _)| *id).collect();
    for (id, order) in &committed {
        if !delivered_ids.contains(id) {
            v.push(Violation {
                invariant: "I5",
                order: Some((*order).to_owned()),
                detail: format!("committed message {id} was never delivered"),
            });
        }
    }
    for (id, order) in &delivered {
        if !committed.contains_key(id) {
            v.push(Violation {
                invariant: "I5",
                order: Some(order.clone()),
                detail: format!("message {id} was delivered but never committed"),
            });
        }
    }
    for row in db
        .query(
            &format!(
                "SELECT id, topic, coalesce(last_error, ''), dead_at IS NOT NULL FROM {}.outbox",
                deployment.schemas.saga.quoted()
            ),
            &[],
        )
        .await?
    {
        let id: uuid::Uuid = row.get(0);
        let dead: bool = row.get(3);
        v.push(Violation {
            invariant: "I5",
            order: None,
            detail: format!(
                "message {id} ({}) {}: {}",
                row.get::<_, &str>(1),
                if dead {
                    "was dead-lettered"
                } else {
                    "is still undelivered"
                },
                row.get::<_, &str>(2)
            ),
        });
    }

    // I6: compensations only for started steps, in reverse; each result once.
    for i in f.instances.values() {
        let index = |step: &StepName| STEPS.iter().position(|s| *s == step.as_str());
        let started: BTreeSet<usize> = i
            .history
            .iter()
            .filter(|h| h.direction == Direction::Forward && h.outcome != Outcome::Created)
            .filter_map(|h| index(&h.step))
            .collect();
        let compensated: Vec<usize> = i
            .history
            .iter()
            .filter(|h| h.direction == Direction::Compensate && h.outcome == Outcome::Succeeded)
            .filter_map(|h| index(&h.step))
            .collect();
        for c in &compensated {
            if !started.contains(c) {
                v.push(Violation {
                    invariant: "I6",
                    order: Some(i.order.clone()),
                    detail: format!("{} was compensated but never started", STEPS[*c]),
                });
            }
        }
        if compensated.windows(2).any(|w| w[1] >= w[0]) {
            v.push(Violation {
                invariant: "I6",
                order: Some(i.order.clone()),
                detail: format!(
                    "compensations out of reverse order: {:?}",
                    compensated.iter().map(|c| STEPS[*c]).collect::<Vec<_>>()
                ),
            });
        }
        let mut results: BTreeMap<(String, Direction), usize> = BTreeMap::new();
        for h in i.history.iter().filter(|h| h.outcome == Outcome::Succeeded) {
            *results
                .entry((h.step.to_string(), h.direction))
                .or_default() += 1;
        }
        for ((step, direction), n) in results {
            if n > 1 {
                v.push(Violation {
                    invariant: "I6",
                    order: Some(i.order.clone()),
                    detail: format!("the result of {step} ({direction}) was recorded {n} times"),
                });
            }
        }
    }

    // I7: every ambiguous commit resolved.
    if counts.ambiguous_unresolved > 0 {
        v.push(Violation {
            invariant: "I7",
            order: None,
            detail: format!(
                "{} ambiguous commits were left unresolved",
                counts.ambiguous_unresolved
            ),
        });
    }
    f.violations = v;
    Ok(f)
}
