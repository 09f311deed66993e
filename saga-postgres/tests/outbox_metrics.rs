//! What `Dispatcher::run` exports: the outbox gauges, refreshed every
//! `stats_interval`, and the listener's gauge and counter, each labelled with
//! the outbox's schema so that dispatchers of several schemas in one process
//! do not overwrite each other.
//!
//! Each test runs on one thread (tokio's current-thread runtime) with a
//! thread-local metrics recorder that signals every value it is given.

mod outbox_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, SharedString, Unit,
};
use outbox_support::{Env, Fate, Recorder, Running, WAIT, env, msg};
use saga_postgres::metrics as m;
use saga_postgres::outbox::DispatcherBuilder;
use tokio::sync::watch;

/// (metric name, value of its `schema` label or "") -> value.
type Values = BTreeMap<(String, String), f64>;

/// A recorder of gauges and counters whose every change can be waited for.
#[derive(Default)]
struct Signalling {
    values: Arc<watch::Sender<Values>>,
}

/// One gauge or counter of [`Signalling`].
struct Slot {
    key: (String, String),
    values: Arc<watch::Sender<Values>>,
}

impl Slot {
    fn update(&self, f: impl FnOnce(&mut f64)) {
        self.values
            .send_modify(|v| f(v.entry(self.key.clone()).or_insert(0.0)));
    }
}

impl GaugeFn for Slot {
    fn increment(&self, d: f64) {
        self.update(|v| *v += d);
    }
    fn decrement(&self, d: f64) {
        self.update(|v| *v -= d);
    }
    fn set(&self, x: f64) {
        self.update(|v| *v = x);
    }
}

impl CounterFn for Slot {
    #[allow(clippy::cast_precision_loss)]
    fn increment(&self, d: u64) {
        self.update(|v| *v += d as f64);
    }
    #[allow(clippy::cast_precision_loss)]
    fn absolute(&self, x: u64) {
        self.update(|v| *v = x as f64);
    }
}

impl Signalling {
    fn slot(&self, key: &Key) -> Arc<Slot> {
        let schema = key
            .labels()
            .find(|l| l.key() == "schema")
            .map_or_else(String::new, |l| l.value().to_owned());
        Arc::new(Slot {
            key: (key.name().to_owned(), schema),
            values: self.values.clone(),
        })
    }

    fn get(&self, name: &str, env: &Env) -> Option<f64> {
        self.values
            .borrow()
            .get(&(name.to_owned(), env.schema.to_string()))
            .copied()
    }

    /// Waits until `name{schema = env's}` is `value`.
    async fn wait(&self, name: &str, env: &Env, value: f64) {
        let key = (name.to_owned(), env.schema.to_string());
        let mut rx = self.values.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|v| v.get(&key) == Some(&value)))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {name}{{schema={}}} = {value}; have {:?}",
                    env.schema,
                    self.values.borrow()
                )
            })
            .unwrap();
    }
}

impl metrics::Recorder for Signalling {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// `Dispatcher::run` of `builder`'s dispatcher, in the background.
fn run(builder: DispatcherBuilder<Recorder>) -> Running {
    Running::start(builder.build().unwrap())
}

#[tokio::test]
async fn run_exports_the_outbox_gauges_every_stats_interval() {
    let gauges = Signalling::default();
    let _local = metrics::set_default_local_recorder(&gauges);
    let env = env().await;
    let recorder = Recorder::new();
    recorder.set_topic_fate("t", Some(Fate::Permanent));
    env.enqueue(vec![msg("t", 0), msg("t", 1)]).await;

    // Its first cycle is its only one (it does not listen, and polls
    // hourly); only the gauges keep coming.
    let running = run(
        DispatcherBuilder::from_arc(env.outbox.clone(), recorder.clone())
            .poll_interval(Duration::from_secs(3600))
            .stats_interval(Some(Duration::from_millis(20))),
    );
    // Both are dead-lettered by that cycle; a refresh shows it.
    gauges.wait(m::OUTBOX_DEAD, &env, 2.0).await;
    assert_eq!(gauges.get(m::OUTBOX_PENDING, &env), Some(0.0));
    assert_eq!(gauges.get(m::OUTBOX_IN_FLIGHT, &env), Some(0.0));
    assert_eq!(gauges.get(m::OUTBOX_OLDEST_PENDING_AGE, &env), Some(0.0));

    // And later refreshes follow what changes, with nobody asking.
    assert_eq!(env.outbox.purge_all(None).await.unwrap(), 2);
    gauges.wait(m::OUTBOX_DEAD, &env, 0.0).await;
    env.enqueue(vec![
        msg("t", 2).deliver_after(Duration::from_secs(60)).unwrap(),
    ])
    .await;
    gauges.wait(m::OUTBOX_PENDING, &env, 1.0).await;
    assert_eq!(gauges.get(m::OUTBOX_OLDEST_PENDING_AGE, &env), Some(0.0));
    env.clock.advance(Duration::from_secs(75));
    gauges.wait(m::OUTBOX_OLDEST_PENDING_AGE, &env, 15.0).await;
    running.stop().await;
}

#[tokio::test]
async fn the_listener_metrics_are_labelled_with_the_schema() {
    let gauges = Signalling::default();
    let _local = metrics::set_default_local_recorder(&gauges);
    let (a, b) = (env().await, env().await);
    let listening = |env: &Env| {
        run(
            DispatcherBuilder::from_arc(env.outbox.clone(), Recorder::new())
                .stats_interval(None)
                .listen(env.test_schema.config()),
        )
    };
    let (running_a, running_b) = (listening(&a), listening(&b));
    gauges.wait(m::OUTBOX_LISTENER_CONNECTED, &a, 1.0).await;
    gauges.wait(m::OUTBOX_LISTENER_CONNECTED, &b, 1.0).await;
    assert_eq!(gauges.get(m::OUTBOX_LISTENER_CONNECTIONS, &a), Some(1.0));
    assert_eq!(gauges.get(m::OUTBOX_LISTENER_CONNECTIONS, &b), Some(1.0));

    // One stops listening; the other's gauge is its own.
    running_a.stop().await;
    gauges.wait(m::OUTBOX_LISTENER_CONNECTED, &a, 0.0).await;
    assert_eq!(gauges.get(m::OUTBOX_LISTENER_CONNECTED, &b), Some(1.0));
    running_b.stop().await;
    gauges.wait(m::OUTBOX_LISTENER_CONNECTED, &b, 0.0).await;
}
