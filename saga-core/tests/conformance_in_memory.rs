//! The in-memory store passes the store conformance suite.

saga_core::store_conformance_tests!(|clock| async move {
    saga_core::InMemorySagaStore::with_clock(clock)
});
