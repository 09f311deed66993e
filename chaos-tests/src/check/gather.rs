//! Reading the facts from ground truth: the services' ledgers, the saga
//! rows and their history, and the harness's own records, installed
//! before the run.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use checkout::deploy::Deployment;
use checkout::shop::OrderStatus;
use saga_core::{HistoryEntry, MessageId, SagaId, Status, StepName};
use uuid::Uuid;

use super::{
    Committed, CutFact, Effect, EffectKind, Facts, HARNESS_SCHEMA, Instance, Left, Recorded,
    Violation, ZombieFact,
};

/// Whether the zombie's result, as sent, was written: a history row for
/// its transition inserted on the session that sent it. `writes` maps each
/// transition to the ports of the sessions that inserted its history row.
fn written_by_its_session(z: &ZombieFact, writes: &HashMap<Uuid, Vec<Option<i32>>>) -> bool {
    let (Some(Some(transition)), Some(port)) = (z.record_sent, z.record_port) else {
        return false;
    };
    writes
        .get(&transition)
        .is_some_and(|ports| ports.contains(&Some(i32::from(port))))
}

/// A history row as the harness's copy saw it inserted.
#[derive(Debug, Clone)]
struct Write {
    port: Option<i32>,
    application: Option<String>,
    at: Option<SystemTime>,
}

/// When `worker` wrote a cut transition again: its history row inserted
/// by that worker on a session none of the transition's cuts fell on
/// (`cut_ports`). The worker's store writes a cut transition again only
/// after it looked it up and found it not committed, so by then it had
/// counted the ambiguity. A row on a cut session (committed at the cut) or
/// by another worker says nothing of what this worker counted.
fn written_again_at(
    worker: Option<&str>,
    cut_ports: &[Option<i32>],
    writes: &[Write],
) -> Option<SystemTime> {
    let worker = worker?;
    writes
        .iter()
        .filter(|w| w.application.as_deref() == Some(worker))
        .filter(|w| w.port.is_some() && !cut_ports.contains(&w.port))
        .filter_map(|w| w.at)
        .min()
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

/// Installs the harness's own records: a copy of every outbox row and
/// history row inserted, taken by triggers inside the inserting
/// transaction (so a copy exists exactly when the insert committed), with
/// the port of the session that wrote it.
pub async fn install_records(deployment: &Deployment) -> Result<(), checkout::Error> {
    let db = deployment.pool.get().await?;
    let s = deployment.schemas.saga.quoted();
    let h = HARNESS_SCHEMA;
    db.batch_execute(&format!(
        "CREATE SCHEMA {h};
         CREATE TABLE {h}.outbox_inserts (
             id      uuid NOT NULL,
             saga_id uuid,
             topic   text NOT NULL
         );
         CREATE FUNCTION {h}.copy_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {h}.outbox_inserts VALUES (NEW.id, NEW.saga_id, NEW.topic);
             RETURN NULL;
         END $$;
         CREATE TRIGGER chaos_copy_outbox AFTER INSERT ON {s}.outbox
             FOR EACH ROW EXECUTE FUNCTION {h}.copy_outbox();
         CREATE TABLE {h}.history_inserts (
             transition_id uuid NOT NULL,
             saga_id       uuid NOT NULL,
             client_port   int,
             application   text,
             inserted_at   timestamptz
         );
         CREATE FUNCTION {h}.copy_history() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO {h}.history_inserts VALUES (NEW.transition_id, NEW.saga_id,
                 inet_client_port(), current_setting('application_name'), clock_timestamp());
             RETURN NULL;
         END $$;
         CREATE TRIGGER chaos_copy_history AFTER INSERT ON {s}.saga_history
             FOR EACH ROW EXECUTE FUNCTION {h}.copy_history();"
    ))
    .await?;
    super::lease_log::install(&db, deployment).await?;
    Ok(())
}

/// Reads every fact the checks need.
pub async fn gather(
    deployment: &Deployment,
    quiesced: bool,
    recorded: Recorded,
) -> Result<Facts, checkout::Error> {
    let audit = deployment.audit().await?;
    let ledger_violations = audit
        .violations
        .iter()
        .map(|violation| {
            let text = violation.to_string();
            let detail = text
                .strip_prefix(violation.invariant())
                .map_or(text.clone(), |rest| rest.trim_start().to_owned());
            Violation {
                invariant: violation.invariant(),
                order: violation.order().map(str::to_owned),
                detail,
            }
        })
        .collect();
    let instances = instances(deployment).await?;
    let db = deployment.pool.get().await?;
    let schemas = &deployment.schemas;
    let h = HARNESS_SCHEMA;

    let committed = db
        .query(&format!("SELECT id, saga_id FROM {h}.outbox_inserts"), &[])
        .await?
        .iter()
        .map(|r| Committed {
            id: MessageId::from_uuid(r.get(0)),
            saga: r.get::<_, Option<Uuid>>(1).map(SagaId::from_uuid),
        })
        .collect();
    let delivered = db
        .query(
            &format!(
                "SELECT message_id, order_id FROM {}.sent ORDER BY seq",
                schemas.email.quoted()
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| (MessageId::from_uuid(r.get(0)), r.get(1)))
        .collect();
    let left = db
        .query(
            &format!(
                "SELECT id, topic, coalesce(last_error, ''), dead_at IS NOT NULL FROM {}.outbox",
                schemas.saga.quoted()
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| Left {
            id: r.get(0),
            topic: r.get(1),
            last_error: r.get(2),
            dead: r.get(3),
        })
        .collect();

    let mut effects: BTreeMap<String, Vec<Effect>> = BTreeMap::new();
    for r in db
        .query(
            &format!(
                "SELECT kind, order_id, charge_id, seq, at, amount_cents FROM {}.ledger ORDER BY seq",
                schemas.payment.quoted()
            ),
            &[],
        )
        .await?
    {
        let kind = match r.get::<_, &str>(0) {
            "charge" => EffectKind::Charge,
            _ => EffectKind::Refund,
        };
        effects.entry(r.get(1)).or_default().push(Effect {
            kind,
            of: r.get(2),
            seq: r.get(3),
            at: r.get(4),
            sku: None,
            amount: r.get(5),
        });
    }
    for r in db
        .query(
            &format!(
                "SELECT kind, order_id, reservation_key, seq, at, sku, qty FROM {}.ledger ORDER BY seq",
                schemas.inventory.quoted()
            ),
            &[],
        )
        .await?
    {
        let kind = match r.get::<_, &str>(0) {
            "deduct" => EffectKind::Deduct,
            _ => EffectKind::Release,
        };
        effects.entry(r.get(1)).or_default().push(Effect {
            kind,
            of: r.get(2),
            seq: r.get(3),
            at: r.get(4),
            sku: Some(r.get(5)),
            amount: i64::from(r.get::<_, i32>(6)),
        });
    }

    let shop = db
        .query(
            &format!("SELECT id, status FROM {}.orders", schemas.shop.quoted()),
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let status = match r.get::<_, &str>(1) {
                "confirmed" => OrderStatus::Confirmed,
                _ => OrderStatus::Pending,
            };
            (r.get(0), status)
        })
        .collect();

    let mut writes: HashMap<Uuid, Vec<Option<i32>>> = HashMap::new();
    let mut writers: HashMap<Uuid, Vec<Write>> = HashMap::new();
    for r in db
        .query(
            &format!(
                "SELECT transition_id, client_port, application, inserted_at
                 FROM {h}.history_inserts"
            ),
            &[],
        )
        .await?
    {
        writes.entry(r.get(0)).or_default().push(r.get(1));
        writers.entry(r.get(0)).or_default().push(Write {
            port: r.get(1),
            application: r.get(2),
            at: r.get(3),
        });
    }
    // Per transition, the ports of the sessions its cuts fell on.
    let mut cut_ports: HashMap<Uuid, Vec<Option<i32>>> = HashMap::new();
    for c in &recorded.cuts {
        if let Some(t) = c.transition {
            cut_ports.entry(t).or_default().push(c.port.map(i32::from));
        }
    }
    let orders: HashMap<Uuid, String> = instances
        .values()
        .map(|i| (i.id.as_uuid(), i.order.clone()))
        .collect();
    let (leases, calls) = super::lease_log::read(&db, deployment, &orders).await?;
    let cuts = recorded
        .cuts
        .iter()
        .map(|c| {
            let ports = c.transition.and_then(|t| writes.get(&t));
            CutFact {
                after: c.after,
                order: c.saga.and_then(|s| orders.get(&s).cloned()),
                transition: c.transition,
                worker: c.worker.clone(),
                committed_at_cut: ports.is_some_and(|ports| {
                    c.port.is_some() && ports.contains(&c.port.map(i32::from))
                }),
                in_history: ports.is_some(),
                written_again_at: c.transition.and_then(|t| {
                    written_again_at(
                        c.worker.as_deref(),
                        cut_ports.get(&t).map_or(&[][..], Vec::as_slice),
                        writers.get(&t).map_or(&[][..], Vec::as_slice),
                    )
                }),
            }
        })
        .collect();
    let zombies = recorded
        .zombies
        .iter()
        .map(|z| ZombieFact {
            record_committed: written_by_its_session(z, &writes),
            ..z.clone()
        })
        .collect();
    Ok(Facts {
        quiesced,
        ledger_violations,
        instances,
        committed,
        delivered,
        left,
        effects,
        cuts,
        workers: recorded.workers,
        zombies,
        scenarios: recorded.scenarios,
        shop,
        leases,
        calls,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use uuid::Uuid;

    use super::*;
    use crate::check::fixtures::zombie;

    #[test]
    fn a_zombie_result_counts_as_written_only_if_its_own_session_wrote_it() {
        let z = zombie();
        let transition = Uuid::from_u128(3);
        let mut writes: HashMap<Uuid, Vec<Option<i32>>> = HashMap::new();
        assert!(!written_by_its_session(&z, &writes), "no row");
        // Its first send committed on another session (the reply was
        // lost); the copy held back and sent later was refused.
        writes.insert(transition, vec![Some(41_000)]);
        assert!(!written_by_its_session(&z, &writes));
        writes.insert(transition, vec![Some(41_000), Some(40_000)]);
        assert!(written_by_its_session(&z, &writes));
        let unknown_port = ZombieFact {
            record_port: None,
            ..zombie()
        };
        assert!(!written_by_its_session(&unknown_port, &writes));
    }

    #[test]
    fn a_cut_transition_counts_as_written_again_only_by_its_worker_on_another_session() {
        let at = |s| Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s));
        let write = |port, app: &str, s| Write {
            port: Some(port),
            application: Some(app.to_owned()),
            at: at(s),
        };
        let cut_ports = [Some(40_000), Some(40_001)];
        // Committed at the cut (on a cut session), or written by another
        // worker: not this worker's resolution.
        let writes = [
            write(40_001, "chaos-w0-0", 10),
            write(41_000, "chaos-w1-3", 11),
        ];
        assert_eq!(
            written_again_at(Some("chaos-w0-0"), &cut_ports, &writes),
            None
        );
        // Written again by it on a fresh session: the earliest such row.
        let writes = [
            write(40_000, "chaos-w0-0", 10),
            write(42_000, "chaos-w0-0", 14),
            write(41_000, "chaos-w0-0", 12),
        ];
        assert_eq!(
            written_again_at(Some("chaos-w0-0"), &cut_ports, &writes),
            at(12)
        );
        assert_eq!(written_again_at(None, &cut_ports, &writes), None);
    }
}
