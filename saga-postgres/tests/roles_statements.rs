//! The guide's grants against every statement the crate sends: each
//! runtime role of `docs/operations.md` may run exactly the statements
//! listed here, and each of its grants is needed by a statement its
//! component sends. `EXPLAIN` checks a statement's privileges without
//! running it, so every statement is tried, with NULL parameters, under
//! every role.

mod roles_support;

use std::collections::BTreeSet;

use roles_support::{Deployment, GRANT_BLOCK, RUNTIME, sql_block};
use saga_postgres::tokio_postgres::Client;
use saga_postgres::tokio_postgres::error::SqlState;

/// The statements no table right is needed for.
const FREE: &[&str] = &["store.server_time", "outbox.server_time"];

/// What each role's component sends (besides [`FREE`]): every grant of
/// the role must be needed by one of them.
fn sends(role: &str) -> &'static [&'static str] {
    match role {
        "saga_worker" => &[
            "check.versions",
            "store.start",
            "store.start_existing",
            "store.claim",
            "store.claimed_by",
            "store.park_malformed",
            "store.heartbeat",
            "store.release",
            "store.record_leased",
            "store.transition_exists",
            "store.current",
            "store.load",
            "store.load_raw",
            "store.history",
            "store.due_unregistered",
            "store.due_unmatched",
            // Executor::check at start: the definition's fingerprint.
            "store.register_definition",
            "store.stored_definition",
            // Your code's enqueue, in its own transaction, and its
            // comparison of a reused id that a concurrent one committed.
            "outbox.enqueue",
            "outbox.enqueue_recheck",
        ],
        "saga_dispatcher" => &[
            "check.versions",
            "outbox.claim_unordered",
            "outbox.claim_by_key",
            "outbox.claimed_by",
            "outbox.settle",
            "outbox.stats",
        ],
        "saga_consumer" => &[
            "check.versions",
            "inbox.claim",
            "inbox.exists",
            "inbox.prune",
        ],
        "saga_operator" => &[
            "check.versions",
            // Executor::resume and cancel (which check the definition's
            // fingerprint first); a saga's messages; a malformed row's raw
            // values (SagaClient::get).
            "store.register_definition",
            "store.stored_definition",
            "store.load",
            "store.load_raw",
            "store.history",
            "store.current",
            "store.transition_exists",
            "store.record_unleased",
            "store.outbox_for",
            // The dead-letter calls.
            "outbox.stats",
            "outbox.dead_letters",
            "outbox.redrive_one",
            "outbox.redrive_all",
            "outbox.purge_one",
            "outbox.purge_all",
            // The guide's queries.
            "guide.stuck",
            "guide.history",
            "guide.due",
            "guide.cleanup",
        ],
        _ => unreachable!("{role}"),
    }
}

/// What each role may run besides what it sends, because the same rights
/// cover it (`docs/operations.md` says so for each).
fn also_allowed(role: &str) -> &'static [&'static str] {
    match role {
        // A resume or a cancel is the transition statement guarded by
        // version; the guide's reads need SELECT only.
        "saga_worker" => &[
            "store.record_unleased",
            "guide.stuck",
            "guide.history",
            "guide.due",
        ],
        // The dead-letter calls set the delivery columns it settles; a
        // saga's messages are outbox rows; the enqueue's comparison of a
        // reused id is a read of them.
        "saga_dispatcher" => &[
            "store.outbox_for",
            "outbox.enqueue_recheck",
            "outbox.dead_letters",
            "outbox.redrive_one",
            "outbox.redrive_all",
            "outbox.purge_one",
            "outbox.purge_all",
        ],
        "saga_consumer" => &[],
        // The columns a transition sets, which a heartbeat, a release or a
        // park sets too, and the outbox INSERT of the transition statement;
        // SELECT-only reads.
        "saga_operator" => &[
            "store.start_existing",
            "store.claimed_by",
            "store.park_malformed",
            "store.heartbeat",
            "store.release",
            "store.record_leased",
            "store.due_unregistered",
            "store.due_unmatched",
            "outbox.enqueue",
            "outbox.enqueue_recheck",
            "outbox.claimed_by",
        ],
        _ => unreachable!("{role}"),
    }
}

/// Every statement: the crate's, the schema check's, and the guide's
/// operator queries, as (name, text, parameter count).
fn statements(schema: &saga_postgres::SchemaName) -> Vec<(String, String, usize)> {
    let mut all = saga_postgres::__statements(schema);
    // `check_schema` (saga_postgres::check_migrations), after its look-up
    // in information_schema, which needs no right.
    all.push((
        "check.versions".into(),
        format!("SELECT version FROM {}.saga_migrations", schema.quoted()),
        0,
    ));
    for (name, needle, params) in [
        ("guide.stuck", "WHERE status = 'stuck'", 0),
        ("guide.history", "FROM saga.saga_history", 1),
        ("guide.due", "next_run_at < now() - interval '1 minute'", 0),
        ("guide.cleanup", "DELETE FROM saga.saga_instances", 0),
    ] {
        let text = sql_block(needle);
        all.push((
            name.into(),
            text.trim().trim_end_matches(';').to_owned(),
            params,
        ));
    }
    all
}

/// Whether `conn`'s role may run `text`: `EXPLAIN` of it with NULL
/// parameters; `Err` with the SQLSTATE otherwise.
async fn explain(conn: &Client, text: &str, params: usize) -> Result<(), String> {
    conn.batch_execute(&format!("PREPARE probe AS {text}"))
        .await
        .unwrap_or_else(|e| panic!("prepare: {e:?}\n{text}"));
    let args = if params == 0 {
        String::new()
    } else {
        format!("({})", vec!["NULL"; params].join(", "))
    };
    let explained = conn
        .batch_execute(&format!("EXPLAIN EXECUTE probe{args}"))
        .await;
    conn.batch_execute("DEALLOCATE probe").await.unwrap();
    explained.map_err(|e| {
        let code = e.code().map(|c| c.code().to_owned());
        assert_eq!(
            e.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "a failure other than a refusal: {e:?}\n{text}"
        );
        code.unwrap_or_default()
    })
}

/// The statements of `all` that `conn`'s role may run.
async fn allowed(conn: &Client, all: &[(String, String, usize)]) -> BTreeSet<String> {
    let mut ok = BTreeSet::new();
    for (name, text, params) in all {
        if explain(conn, text, *params).await.is_ok() {
            ok.insert(name.clone());
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_run_exactly_the_statements_of_its_job() {
    let d = Deployment::new().await;
    let all = statements(&d.schema);
    for role in RUNTIME {
        let conn = d.conn(role).await;
        let got = allowed(&conn, &all).await;
        let want: BTreeSet<String> = FREE
            .iter()
            .chain(sends(role))
            .chain(also_allowed(role))
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(
            got.difference(&want).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "{role} may run more than its job"
        );
        assert_eq!(
            want.difference(&got).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "{role} is refused part of its job"
        );
    }
    d.drop_roles().await;
}

/// One right of a role: (table, privilege, column or none).
type Right = (String, String, Option<String>);

/// The rights `role` holds in the schema `saga`, table-wide and per column.
async fn rights(admin: &Client, role: &str) -> BTreeSet<Right> {
    admin
        .query(
            "SELECT c.relname::text, a.privilege_type::text, NULL::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
                 LATERAL aclexplode(c.relacl) a
             WHERE n.nspname = 'saga'
               AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = $1)
             UNION ALL
             SELECT c.relname::text, a.privilege_type::text, t.attname::text
             FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace,
                 LATERAL aclexplode(t.attacl) a
             WHERE n.nspname = 'saga'
               AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn on(right: &Right) -> String {
    let (table, privilege, column) = right;
    match column {
        Some(column) => format!("{privilege} (\"{column}\") ON saga.{table}"),
        None => format!("{privilege} ON saga.{table}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grant_of_a_role_is_needed_by_a_statement_its_component_sends() {
    let d = Deployment::new().await;
    let all = statements(&d.schema);
    for role in RUNTIME {
        let name = d.roles.name(role).to_owned();
        let held = rights(&d.admin, &name).await;
        assert!(!held.is_empty(), "{role} holds nothing");
        let sent: Vec<&(String, String, usize)> = all
            .iter()
            .filter(|(n, ..)| sends(role).contains(&n.as_str()))
            .collect();
        assert_eq!(sent.len(), sends(role).len(), "{role}: a statement is gone");
        let conn = d.conn(role).await;
        for right in &held {
            d.admin
                .batch_execute(&format!("REVOKE {} FROM {name}", on(right)))
                .await
                .unwrap();
            let mut broken = Vec::new();
            for (stmt, text, params) in &sent {
                if explain(&conn, text, *params).await.is_err() {
                    broken.push(stmt.as_str());
                }
            }
            assert!(
                !broken.is_empty(),
                "{role}: nothing it sends needs {}",
                on(right)
            );
            d.admin
                .batch_execute(&format!("GRANT {} TO {name}", on(right)))
                .await
                .unwrap();
        }
        assert_eq!(rights(&d.admin, &name).await, held, "{role}: restored");
    }
    drop(all);
    d.drop_roles().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grant_block_names_every_table_and_rerunning_it_leaves_exactly_its_rights() {
    let d = Deployment::new().await;
    let tables: Vec<String> = d
        .admin
        .query(
            "SELECT c.relname::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'saga' AND c.relkind IN ('r', 'p') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 5, "{tables:?}");
    let block = sql_block(GRANT_BLOCK);
    for table in &tables {
        let named = block
            .match_indices(&format!("saga.{table}"))
            .any(|(at, m)| {
                !block[at + m.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            });
        assert!(
            named,
            "the guide's grant block does not grant saga.{table} to anyone: a migration \
             added it; say in docs/operations.md which role needs what on it"
        );
    }

    // Run again, after an extra right was granted by hand: the extra is
    // revoked, and every role has what it had.
    let mut before = Vec::new();
    for role in RUNTIME {
        before.push(rights(&d.admin, d.roles.name(role)).await);
    }
    let worker = d.roles.name("saga_worker").to_owned();
    d.admin
        .batch_execute(&format!(
            "GRANT DELETE ON saga.saga_history TO {worker};
             GRANT UPDATE (topic) ON saga.outbox TO {worker};
             GRANT SELECT ON saga.inbox TO {worker};"
        ))
        .await
        .unwrap();
    let migrator = d.pool_as("saga_migrator", 1);
    migrator
        .get()
        .await
        .unwrap()
        .batch_execute(&d.roles.grants_sql())
        .await
        .unwrap();
    for (role, before) in RUNTIME.iter().zip(before) {
        assert_eq!(rights(&d.admin, d.roles.name(role)).await, before, "{role}");
    }
    migrator.close();
    d.drop_roles().await;
}
