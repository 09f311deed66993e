//! A worker process: runs checkout sagas and dispatches the outbox like any
//! production worker, and lets the harness choose the worst moments to kill
//! or stall it.
//!
//! Commands, one per line on stdin: `crash-after-effect` and
//! `pause-after-effect` (after the next downstream call that applied an
//! effect, before the step's result is recorded), `crash-after-publish`
//! (after the next delivered outbox batch, before it is deleted), `resume`
//! (end a pause), `disarm-effect`, `disarm-publish`, `disarm`, `stop`.
//! Events, one JSON object per line on stdout: [`WorkerEvent`], among them
//! every write the engine had refused because the lease was lost
//! ([`WorkerEvent::LeaseLost`], read from the executor's own warning).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkout::deploy::{Endpoints, Hooks, Worker, WorkerSettings};
use saga_core::SystemClock;
use saga_core::store::SagaStore;
use saga_test_support::negative::Unfenced;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

/// The environment variable carrying a worker's [`WorkerSpec`] as JSON.
pub const SPEC_ENV: &str = "CHAOS_WORKER_SPEC";

/// What a worker process runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Where the database and services are.
    pub endpoints: Endpoints,
    /// How the worker behaves (negative controls included).
    pub settings: WorkerSettings,
    /// The worker's number, for reports.
    pub number: usize,
    /// Negative control: the worker's store does not fence
    /// ([`Unfenced`]): results and heartbeats under a lost lease are
    /// accepted.
    #[serde(default)]
    pub unfenced: bool,
}

/// What the worker does at an armed point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointAction {
    /// Hang until killed.
    Crash,
    /// Wait for `resume`.
    Pause,
}

/// The counters a worker reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Instances claimed.
    pub claimed: u64,
    /// Transitions recorded.
    pub recorded: u64,
    /// Results refused because the lease was lost (fenced writes).
    pub leases_lost: u64,
    /// Store operations that failed.
    pub store_errors: u64,
    /// Database operations retried.
    pub retries: u64,
    /// Ambiguous commits found committed.
    pub ambiguous_committed: u64,
    /// Ambiguous commits found not committed (written again).
    pub ambiguous_not_committed: u64,
    /// Ambiguous commits left unresolved.
    pub ambiguous_unresolved: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.claimed += o.claimed;
        self.recorded += o.recorded;
        self.leases_lost += o.leases_lost;
        self.store_errors += o.store_errors;
        self.retries += o.retries;
        self.ambiguous_committed += o.ambiguous_committed;
        self.ambiguous_not_committed += o.ambiguous_not_committed;
        self.ambiguous_unresolved += o.ambiguous_unresolved;
    }
}

/// A line a worker writes on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    /// Started; `worker_id` is its executor's id, the `lease_owner` of
    /// the sagas it claims.
    Ready {
        /// The executor's worker id.
        worker_id: Uuid,
    },
    /// Its counters so far.
    Stats {
        /// The counters.
        counts: Counts,
        /// When they were read (this host's clock, read just before the
        /// counters): every ambiguity the worker resolved before then is
        /// counted.
        #[serde(default)]
        taken_at: Option<std::time::SystemTime>,
    },
    /// An armed effect point was reached.
    EffectPoint {
        /// What it does now.
        action: PointAction,
        /// The order.
        order_id: String,
        /// The step.
        step: String,
    },
    /// An armed publish point was reached: it hangs until killed.
    PublishPoint,
    /// The engine refused this worker's write (a heartbeat or a step's
    /// result) because its lease had lapsed or been taken over, and
    /// dropped the attempt.
    LeaseLost {
        /// The saga instance.
        saga_id: String,
        /// Its step.
        step: String,
        /// Its direction.
        direction: String,
    },
    /// Stopped cleanly.
    Stopped,
}

/// The fields of the executor's `saga_step` span.
#[derive(Debug, Default)]
struct StepFields {
    saga_id: String,
    step: String,
    direction: String,
}

impl tracing::field::Visit for StepFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let slot = match field.name() {
            "saga_id" => &mut self.saga_id,
            "step" => &mut self.step,
            "direction" => &mut self.direction,
            _ => return,
        };
        *slot = format!("{value:?}");
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"));
    }
}

#[derive(Default)]
struct MessageText(String);

impl tracing::field::Visit for MessageText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

/// Turns the executor's "lease lost" warning, inside its `saga_step`
/// span, into a [`WorkerEvent::LeaseLost`].
struct LeaseLostLayer;

impl<S> tracing_subscriber::Layer<S> for LeaseLostLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "saga_step" {
            return;
        }
        let mut fields = StepFields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        let mut message = MessageText::default();
        event.record(&mut message);
        if !message.0.starts_with("lease lost") {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(f) = span.extensions().get::<StepFields>() {
                emit(&WorkerEvent::LeaseLost {
                    saga_id: f.saga_id.clone(),
                    step: f.step.clone(),
                    direction: f.direction.clone(),
                });
                return;
            }
        }
    }
}

/// Logs to stderr as `RUST_LOG` says, and reports refused writes on stdout
/// whatever `RUST_LOG` says.
pub fn init_tracing() {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let leases = tracing_subscriber::filter::Targets::new()
        .with_target("saga_core::executor", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
        )
        .with(LeaseLostLayer.with_filter(leases))
        .init();
}

fn emit(event: &WorkerEvent) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, event);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

#[derive(Debug, Default)]
struct Armed {
    effect: Option<PointAction>,
    publish: bool,
}

fn counts<St: SagaStore>(worker: &Worker<St>) -> Counts {
    let e = worker.executor.stats();
    let s = worker.store_stats();
    Counts {
        claimed: e.claimed,
        recorded: e.recorded,
        leases_lost: e.leases_lost,
        store_errors: e.store_errors,
        retries: s.retries,
        ambiguous_committed: s.ambiguous_committed,
        ambiguous_not_committed: s.ambiguous_not_committed,
        ambiguous_unresolved: s.ambiguous_unresolved,
    }
}

/// Runs a worker process until `stop` (or the end of stdin).
pub async fn main(spec: WorkerSpec) -> Result<(), checkout::Error> {
    let armed = Arc::new(Mutex::new(Armed::default()));
    let resume = Arc::new(Notify::new());
    let effect_hook = {
        let armed = armed.clone();
        let resume = resume.clone();
        Arc::new(move |point: checkout::faults::EffectPoint| {
            let action = armed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .effect
                .take();
            let resume = resume.clone();
            Box::pin(async move {
                let Some(action) = action else { return };
                emit(&WorkerEvent::EffectPoint {
                    action,
                    order_id: point.order_id,
                    step: point.step.to_string(),
                });
                match action {
                    PointAction::Crash => std::future::pending::<()>().await,
                    PointAction::Pause => resume.notified().await,
                }
            }) as saga_core::BoxFuture<'static, ()>
        })
    };
    let publish_hook = {
        let armed = armed.clone();
        Arc::new(move || {
            let fire = std::mem::take(&mut armed.lock().unwrap_or_else(|e| e.into_inner()).publish);
            Box::pin(async move {
                if fire {
                    emit(&WorkerEvent::PublishPoint);
                    std::future::pending::<()>().await;
                }
            }) as saga_core::BoxFuture<'static, ()>
        })
    };
    let hooks = Hooks {
        after_effect: Some(effect_hook),
        after_publish: Some(publish_hook),
    };
    let (endpoints, settings, clock) = (&spec.endpoints, &spec.settings, Arc::new(SystemClock));
    if spec.unfenced {
        let worker =
            Worker::with_store_layer(endpoints, settings, hooks, clock, Unfenced::postgres)?;
        serve(worker, armed, resume).await
    } else {
        serve(
            Worker::new(endpoints, settings, hooks, clock)?,
            armed,
            resume,
        )
        .await
    }
}

/// Serves the harness: reports the worker ready, obeys its commands, and
/// runs the worker until told to stop.
async fn serve<St: SagaStore + Clone>(
    worker: Worker<St>,
    armed: Arc<Mutex<Armed>>,
    resume: Arc<Notify>,
) -> Result<(), checkout::Error> {
    emit(&WorkerEvent::Ready {
        worker_id: worker.executor.worker_id().as_uuid(),
    });

    let (stop, stopped) = watch::channel(false);
    let commands = {
        let armed = armed.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut a = armed.lock().unwrap_or_else(|e| e.into_inner());
                match line.trim() {
                    "crash-after-effect" => a.effect = Some(PointAction::Crash),
                    "pause-after-effect" => a.effect = Some(PointAction::Pause),
                    "crash-after-publish" => a.publish = true,
                    "resume" => resume.notify_one(),
                    "disarm-effect" => a.effect = None,
                    "disarm-publish" => a.publish = false,
                    "disarm" => *a = Armed::default(),
                    "stop" => break,
                    other => tracing::warn!(command = other, "unknown command"),
                }
            }
            // `stop`, or the harness is gone: stop.
            let _ = stop.send(true);
        })
    };
    let stats = {
        let worker = worker.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(200));
            loop {
                ticker.tick().await;
                let taken_at = Some(std::time::SystemTime::now());
                emit(&WorkerEvent::Stats {
                    counts: counts(&worker),
                    taken_at,
                });
            }
        })
    };
    let mut until = stopped;
    worker
        .run(async move {
            let _ = until.wait_for(|s| *s).await;
        })
        .await?;
    stats.abort();
    commands.abort();
    let taken_at = Some(std::time::SystemTime::now());
    emit(&WorkerEvent::Stats {
        counts: counts(&worker),
        taken_at,
    });
    emit(&WorkerEvent::Stopped);
    Ok(())
}

/// The settings chaos workers run with: short leases so that recovery is
/// quick, and retry budgets sized so that the schedule's faults never
/// exhaust a compensation, a delivery, or an `Ok` order's forward step
/// (I8 holds it to completing). The forward steps' budget counts the
/// faults it can absorb, not the time: 16 attempts at most 1 s apart. A
/// lost attempt (its worker killed or frozen, its lease gone) spends one;
/// at rate 10 the former 8 attempts were spent on about 2% of `Ok` orders
/// (4 lost attempts and four 503s, say). A payment gateway that stays
/// down still spends it within about 6 to 13 s.
#[must_use]
pub fn chaos_settings() -> WorkerSettings {
    use saga_core::{Jitter, RetryPolicy};
    let forward = RetryPolicy::builder()
        .initial_delay(Duration::from_millis(100))
        .multiplier(2.0)
        .max_delay(Duration::from_secs(1))
        .max_attempts(16)
        .max_elapsed(Duration::from_secs(60))
        .jitter(Jitter::Equal)
        .build()
        .expect("a valid policy");
    let policy = |attempts, elapsed| {
        RetryPolicy::builder()
            .initial_delay(Duration::from_millis(100))
            .multiplier(2.0)
            .max_delay(Duration::from_secs(2))
            .max_attempts(attempts)
            .max_elapsed(Duration::from_secs(elapsed))
            .jitter(Jitter::Equal)
            .build()
            .expect("a valid policy")
    };
    WorkerSettings {
        concurrency: 16,
        lease: Duration::from_secs(2),
        step_timeout: Duration::from_secs(4),
        http_timeout: Duration::from_millis(800),
        retry: forward,
        compensation_retry: policy(60, 600),
        delivery_retry: policy(100, 900),
        poll_interval: Duration::from_millis(100),
        fresh_key_per_attempt: false,
        publish_directly: false,
        force_outcome: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_spec_is_debugged_without_the_database_password() {
        let spec = WorkerSpec {
            endpoints: Endpoints {
                database_url: "postgres://chaos:s3cret-pw@127.0.0.1:5432/chaos".to_owned(),
                prefix: "chaos".to_owned(),
                payment_url: "http://127.0.0.1:1".to_owned(),
                inventory_url: "http://127.0.0.1:2".to_owned(),
                email_url: "http://127.0.0.1:3".to_owned(),
            },
            settings: WorkerSettings::default(),
            number: 1,
            unfenced: false,
        };
        let shown = format!("{spec:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(shown.contains("127.0.0.1"), "{shown}");
        // The spec itself, which the worker process reads, keeps it.
        assert!(serde_json::to_string(&spec).unwrap().contains("s3cret-pw"));
    }
}
