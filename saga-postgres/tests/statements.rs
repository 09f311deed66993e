//! Every statement the crate sends binds as many parameters as the server
//! expects, and the transition statements carry the stable tag and
//! parameter positions of `saga_postgres::tags`.

mod common;

use saga_postgres::tags;
use saga_postgres::tokio_postgres::types::Type;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_binds_as_many_parameters_as_the_server_expects() {
    let fresh = common::fresh_schema().await;
    let mut client = fresh.pool.get().await.unwrap();
    saga_postgres::migrate(&mut client, &fresh.schema)
        .await
        .unwrap();
    let statements = saga_postgres::__statements(&fresh.schema);
    for component in ["store.", "outbox.", "inbox."] {
        assert!(
            statements
                .iter()
                .any(|(name, ..)| name.starts_with(component)),
            "no statement of {component}"
        );
    }
    for (name, text, bound) in &statements {
        let prepared = client
            .prepare(text)
            .await
            .unwrap_or_else(|e| panic!("{name} does not prepare: {e:?}\n{text}"));
        assert_eq!(
            prepared.params().len(),
            *bound,
            "{name}: the server expects {} parameters, the binder binds {bound}",
            prepared.params().len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_start_with_the_stable_tag_and_keep_their_parameter_positions() {
    let fresh = common::fresh_schema().await;
    let mut client = fresh.pool.get().await.unwrap();
    saga_postgres::migrate(&mut client, &fresh.schema)
        .await
        .unwrap();
    let statements = saga_postgres::__statements(&fresh.schema);
    let tagged: Vec<&str> = statements
        .iter()
        .filter(|(_, text, _)| text.starts_with(tags::TRANSITION))
        .map(|(name, ..)| name.as_str())
        .collect();
    assert_eq!(tagged, ["store.record_leased", "store.record_unleased"]);
    // Nothing else mentions the tag (a statement that is not a transition
    // must not look like one).
    for (name, text, _) in &statements {
        if !tagged.contains(&name.as_str()) {
            assert!(!text.contains(tags::TRANSITION), "{name}");
        }
    }
    for (name, text, _) in statements
        .iter()
        .filter(|(name, ..)| tagged.contains(&name.as_str()))
    {
        let prepared = client.prepare(text).await.unwrap();
        let types = prepared.params();
        assert_eq!(
            types[tags::TRANSITION_SAGA_ID_PARAM - 1],
            Type::UUID,
            "{name}"
        );
        assert_eq!(types[tags::TRANSITION_ID_PARAM - 1], Type::UUID, "{name}");
    }
}
