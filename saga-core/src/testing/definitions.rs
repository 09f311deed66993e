//! Conformance cases for definition drift: the fingerprint stored per saga
//! name and version, and claims that take only instances of their own
//! shape. Re-exported from [`conformance`](super::conformance).

use std::time::Duration;

use super::conformance::{Harness, LEASE, StoreFactory};
use super::script::{STEPS, TestState, scripted_saga_swapped, scripted_saga_with};
use crate::error::Error;
use crate::executor::Executor;
use crate::fingerprint::ShapeDifference;
use crate::ids::{StartKey, StepName, WorkerId};
use crate::machine::Status;
use crate::retry::RetryPolicy;
use crate::store::{ClaimRequest, SagaStore};

fn key(order: u32) -> StartKey {
    StartKey::new(format!("order-{order}")).expect("valid key")
}

fn names(names: &[&str]) -> Vec<StepName> {
    names.iter().map(|n| StepName::new(n).unwrap()).collect()
}

/// The first registration of a saga name and version stores its
/// fingerprint; the same shape registers again (other retry policies and
/// timeouts included); another shape is refused with both fingerprints and
/// the first difference, and changes nothing.
pub async fn register_definition_keeps_the_first_shape_and_refuses_another<Fa: StoreFactory>(
    f: &Fa,
) {
    let h = Harness::new(f).await;
    let fp = h.saga.shape().fingerprint();
    assert_eq!(
        h.store.register_definition(h.saga.shape()).await.unwrap(),
        fp
    );
    assert_eq!(
        h.store.register_definition(h.saga.shape()).await.unwrap(),
        fp
    );
    let slower = scripted_saga_with(
        &h.script,
        1,
        &RetryPolicy::builder().max_attempts(9).build().unwrap(),
        Duration::from_secs(120),
    );
    assert_eq!(
        h.store.register_definition(slower.shape()).await.unwrap(),
        fp,
        "policies and timeouts are not part of the identity"
    );

    let swapped = scripted_saga_swapped(&h.script, 1);
    let err = h
        .store
        .register_definition(swapped.shape())
        .await
        .unwrap_err();
    let Error::DefinitionChanged {
        kind,
        stored,
        registered,
        first_difference,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(kind, h.saga.kind());
    assert_eq!(*stored, fp);
    assert_eq!(*registered, swapped.shape().fingerprint());
    assert_eq!(
        **first_difference,
        ShapeDifference::Names {
            index: 1,
            stored: names(&["charge"]),
            registered: names(&["reserve"]),
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("scripted@v1") && text.contains("`charge`"),
        "{text}"
    );

    // Nothing changed: the first shape still registers, and another
    // version is another identity.
    assert_eq!(
        h.store.register_definition(h.saga.shape()).await.unwrap(),
        fp
    );
    let v2 = scripted_saga_swapped(&h.script, 2);
    assert_eq!(
        h.store.register_definition(v2.shape()).await.unwrap(),
        v2.shape().fingerprint()
    );
}

/// A claim takes only the instances started under the fingerprint it gives
/// for their kind; the others are counted by `due_unmatched`, and a kind
/// given without a fingerprint claims nothing.
pub async fn a_claim_takes_only_instances_of_its_own_shape<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let swapped = scripted_saga_swapped(&h.script, 1);
    let ours = h.start(1).await;
    let theirs = h
        .client()
        .start(&swapped, key(2), &TestState::order(2))
        .await
        .unwrap()
        .id;
    let kinds = [h.saga.kind().clone()];
    let (fp, other) = (h.saga.shape().fingerprint(), swapped.shape().fingerprint());
    let (fps, others) = ([fp], [other]);
    let claim = |fingerprints| ClaimRequest {
        worker: WorkerId::new(),
        kinds: &kinds,
        fingerprints,
        limit: 10,
        lease_for: LEASE,
    };
    assert!(
        h.store.claim(claim(&[])).await.unwrap().is_empty(),
        "a kind without a fingerprint claims nothing"
    );
    assert_eq!(
        h.store.due_unmatched(&kinds, &[fp]).await.unwrap(),
        vec![(h.saga.kind().clone(), other, 1)]
    );
    let c = h.store.claim(claim(&fps)).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].lease.saga_id, ours);
    let c = h.store.claim(claim(&others)).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].lease.saga_id, theirs);
    assert!(
        h.store
            .due_unmatched(&kinds, &[fp])
            .await
            .unwrap()
            .is_empty(),
        "leased instances are not due"
    );
}

/// Two deployments of one saga name and version, the second with two steps
/// swapped: the second is refused when it starts, having claimed nothing;
/// the instance the first started completes with every step run once, in
/// the first's order; an instance started under the swapped shape is left
/// alone by the first, and reported.
pub async fn a_worker_with_swapped_steps_is_refused_and_runs_nothing<Fa: StoreFactory>(f: &Fa) {
    let h = Harness::new(f).await;
    let first = h.executor();
    first.check().await.unwrap();
    let id = h.start(1).await;
    let second = Executor::builder_from_arc(h.store.clone())
        .register(scripted_saga_swapped(&h.script, 1))
        .lease_duration(LEASE)
        .heartbeat_interval(LEASE - Duration::from_secs(1))
        .build()
        .unwrap();
    let refused = second.run_until_idle().await.unwrap_err();
    assert!(
        matches!(&refused, Error::DefinitionChanged { kind, .. } if kind == h.saga.kind()),
        "{refused:?}"
    );
    let refused = second.run(std::future::pending()).await.unwrap_err();
    assert!(
        matches!(refused, Error::DefinitionChanged { .. }),
        "{refused:?}"
    );
    assert_eq!(second.stats().claimed, 0);
    assert!(
        h.script.calls().is_empty(),
        "the refused worker ran nothing"
    );

    // A client deployed with the swapped definition starts an instance
    // under its shape: the first worker leaves it, and says so.
    let stray = h
        .client()
        .start(
            &scripted_saga_swapped(&h.script, 1),
            key(2),
            &TestState::order(2),
        )
        .await
        .unwrap()
        .id;
    let report = first.run_until_idle().await.unwrap();
    assert_eq!(h.status(id).await, Status::Completed);
    let expected: Vec<String> = STEPS.iter().map(|s| format!("{s}:forward")).collect();
    assert_eq!(h.script.trace(1), expected, "every step ran once, in order");
    assert!(h.script.trace(2).is_empty());
    let s = h.store.load(stray).await.unwrap().unwrap();
    assert_eq!((s.status, s.attempt), (Status::Running, 0));
    assert_eq!(
        report.unmatched,
        vec![(
            h.saga.kind().clone(),
            scripted_saga_swapped(&h.script, 1).shape().fingerprint(),
            1
        )]
    );
}
