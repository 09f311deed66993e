//! One checkout deployment: the database, the schemas, the fake services,
//! the shop, and the workers that run sagas and dispatch the outbox.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use saga_core::store::SagaStore;
use saga_core::{Clock, Executor, RetryPolicy, SagaDefinition, SystemClock};

use crate::audit::Schemas;
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::outbox::{Dispatcher, Outbox};
use saga_postgres::{ConnectConfig, PgSagaStore, pool_from_config, tokio_postgres};
use saga_test_support::TestCluster;

use crate::audit::Audit;
use crate::clients::Downstream;
use crate::model::Checkout;
use crate::services::{self, Service, email::HttpPublisher};
use crate::shop::Shop;
use crate::{faults, saga};

/// Where the database is.
pub enum Database {
    /// A server given by URL; the deployment's schemas are created there.
    Url(String),
    /// A throwaway local cluster, removed when the process ends.
    Throwaway,
}

/// A database URL for `Debug`, never with its password: as tokio-postgres's
/// parsed configuration, which redacts it, or not at all if it does not
/// parse. The one redaction of database URLs here and in the chaos tests.
pub struct RedactedUrl<'a>(pub &'a str);

impl std::fmt::Debug for RedactedUrl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match tokio_postgres::Config::from_str(self.0) {
            Ok(config) => config.fmt(f),
            Err(_) => f.write_str("<not a PostgreSQL URL>"),
        }
    }
}

/// Never shows the URL's password (see [`RedactedUrl`]).
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Url(url) => f.debug_tuple("Url").field(&RedactedUrl(url)).finish(),
            Database::Throwaway => f.write_str("Throwaway"),
        }
    }
}

/// How workers behave. Serializable, so that a worker in another process
/// can be given the same settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkerSettings {
    /// Steps run at once per worker.
    pub concurrency: usize,
    /// Lease length: how long a dead worker's saga waits before another
    /// worker resumes it.
    pub lease: Duration,
    /// Per-attempt timeout of each step.
    pub step_timeout: Duration,
    /// Per-call timeout of each HTTP call.
    pub http_timeout: Duration,
    /// Retry policy of forward steps.
    pub retry: RetryPolicy,
    /// Retry policy of compensations and of steps past the pivot.
    pub compensation_retry: RetryPolicy,
    /// How often an idle worker polls.
    pub poll_interval: Duration,
    /// Negative control: a fresh idempotency key on every attempt.
    pub fresh_key_per_attempt: bool,
    /// Retry policy of outbox deliveries.
    pub delivery_retry: RetryPolicy,
    /// Negative control: email straight from the step, not via the outbox.
    pub publish_directly: bool,
    /// Negative control: every order refused, or every order completed
    /// whatever the services answered ([`faults::ForceOutcome`]).
    #[serde(default)]
    pub force_outcome: Option<faults::ForceOutcome>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 16,
            lease: Duration::from_secs(3),
            step_timeout: Duration::from_secs(5),
            http_timeout: Duration::from_secs(1),
            retry: saga::demo_retry(),
            compensation_retry: saga::demo_compensation_retry(),
            poll_interval: Duration::from_millis(100),
            fresh_key_per_attempt: false,
            delivery_retry: saga::demo_compensation_retry(),
            publish_directly: false,
            force_outcome: None,
        }
    }
}

/// Where a worker finds everything: serializable, for worker processes.
/// Its `Debug` never shows the database password (see [`RedactedUrl`]).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    /// The database, as the workers reach it.
    pub database_url: String,
    /// The schema prefix (see [`Schemas::with_prefix`]).
    pub prefix: String,
    /// The payment service's base URL.
    pub payment_url: String,
    /// The inventory service's base URL.
    pub inventory_url: String,
    /// The email service's base URL.
    pub email_url: String,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("database_url", &RedactedUrl(&self.database_url))
            .field("prefix", &self.prefix)
            .field("payment_url", &self.payment_url)
            .field("inventory_url", &self.inventory_url)
            .field("email_url", &self.email_url)
            .finish()
    }
}

/// Where a worker can be made to stall or die on purpose.
#[derive(Clone, Default)]
pub struct Hooks {
    /// After each downstream effect, before its step is recorded (applied
    /// as a [`faults::AfterEffect`] layer).
    pub after_effect: Option<faults::EffectHook>,
    /// After each delivered outbox batch, before it is deleted.
    pub after_publish: Option<services::email::PublishHook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("after_effect", &self.after_effect.is_some())
            .field("after_publish", &self.after_publish.is_some())
            .finish()
    }
}

/// A running deployment.
#[derive(Debug)]
pub struct Deployment {
    /// A pool for the deployment's own bookkeeping (placing orders,
    /// auditing).
    pub pool: Pool,
    /// The database's URL.
    pub db_url: String,
    /// The schemas.
    pub schemas: Schemas,
    /// The saga store.
    pub store: PgSagaStore,
    /// The shop.
    pub shop: Shop,
    /// The schema prefix.
    pub prefix: String,
    /// The payment service.
    pub payment: Service,
    /// The inventory service.
    pub inventory: Service,
    /// The email service.
    pub email: Service,
    _cluster: Option<TestCluster>,
}

impl Deployment {
    /// Creates the schemas under `prefix`, stocks the inventory, starts the
    /// fake services.
    pub async fn start(
        database: Database,
        prefix: &str,
        stock: &BTreeMap<String, i32>,
        seed: u64,
    ) -> Result<Deployment, crate::Error> {
        let (db_url, cluster) = match database {
            Database::Url(url) => (url, None),
            Database::Throwaway => {
                let cluster = TestCluster::start()
                    .await
                    .map_err(crate::Error::TestDatabase)?;
                (cluster.url("postgres"), Some(cluster))
            }
        };
        let db_config = ConnectConfig::from_url(&db_url).map_err(saga_postgres::PgError::from)?;
        let schemas = Schemas::with_prefix(prefix)?;
        let pool = pool_from_config(db_config.clone(), 16)?;
        let mut conn = pool.get().await?;
        saga_postgres::migrate(&mut conn, &schemas.saga).await?;
        drop(conn);
        let store = PgSagaStore::new(pool.clone(), schemas.saga.clone());
        store.check_schema().await?;
        let shop = Shop::new(pool.clone(), schemas.shop.clone());
        shop.create_schema().await?;
        let payment = services::payment::start(pool.clone(), schemas.payment.clone(), seed).await?;
        let inventory =
            services::inventory::start(pool.clone(), schemas.inventory.clone(), stock, seed + 1)
                .await?;
        let email = services::email::start(pool.clone(), schemas.email.clone(), seed + 2).await?;
        Ok(Deployment {
            pool,
            db_url: db_url.clone(),
            schemas,
            store,
            shop,
            prefix: prefix.to_owned(),
            payment,
            inventory,
            email,
            _cluster: cluster,
        })
    }

    /// Where workers find this deployment's database and services.
    #[must_use]
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            database_url: self.db_url.clone(),
            prefix: self.prefix.clone(),
            payment_url: self.payment.url(),
            inventory_url: self.inventory.url(),
            email_url: self.email.url(),
        }
    }

    /// The saga definition as a worker with `settings` runs it.
    pub fn saga(
        &self,
        settings: &WorkerSettings,
    ) -> Result<SagaDefinition<Checkout, saga::Deps>, crate::Error> {
        Ok(saga::definition(&policies(settings))?)
    }

    /// A worker with its own connection pool: an executor running checkout
    /// sagas and a dispatcher delivering the outbox to the email service.
    pub fn worker(&self, settings: &WorkerSettings) -> Result<Worker, crate::Error> {
        Worker::new(
            &self.endpoints(),
            settings,
            Hooks::default(),
            Arc::new(SystemClock),
        )
    }

    /// [`Deployment::worker`] with hooks (where it stalls or dies).
    pub fn worker_with_hooks(
        &self,
        settings: &WorkerSettings,
        hooks: Hooks,
    ) -> Result<Worker, crate::Error> {
        Worker::new(&self.endpoints(), settings, hooks, Arc::new(SystemClock))
    }

    /// Whether every saga has finished and every message was delivered.
    pub async fn quiet(&self) -> Result<Progress, crate::Error> {
        let db = self.pool.get().await?;
        let row = db
            .query_one(
                &format!(
                    "SELECT
                        (SELECT count(*) FROM {s}.saga_instances),
                        (SELECT count(*) FROM {s}.saga_instances
                         WHERE status IN ('completed', 'compensated', 'stuck')),
                        (SELECT count(*) FROM {s}.outbox WHERE dead_at IS NULL),
                        (SELECT count(*) FROM {s}.outbox WHERE dead_at IS NOT NULL)",
                    s = self.schemas.saga.quoted()
                ),
                &[],
            )
            .await?;
        Ok(Progress {
            sagas: row.get(0),
            finished: row.get(1),
            undelivered: row.get(2),
            dead_letters: row.get(3),
        })
    }

    /// The keys (order ids) of the outbox messages not delivered yet, dead
    /// letters excluded.
    pub async fn undelivered_keys(&self) -> Result<BTreeSet<String>, crate::Error> {
        let db = self.pool.get().await?;
        Ok(db
            .query(
                &format!(
                    "SELECT DISTINCT key FROM {}.outbox WHERE dead_at IS NULL AND key IS NOT NULL",
                    self.schemas.saga.quoted()
                ),
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// The ledgers, checked.
    pub async fn audit(&self) -> Result<Audit, crate::Error> {
        Audit::collect(&self.pool, &self.schemas).await
    }

    /// Drops the deployment's five schemas and everything in them (saga
    /// store and outbox, shop, payment, inventory, email). Waits at most
    /// 10 s for a lock rather than hang behind a stray session.
    pub async fn drop_schemas(&self) -> Result<(), crate::Error> {
        let s = &self.schemas;
        let names = [&s.saga, &s.shop, &s.payment, &s.inventory, &s.email]
            .map(saga_postgres::SchemaName::quoted)
            .join(", ");
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '10s';
             DROP SCHEMA IF EXISTS {names} CASCADE;"
        ))
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stops the fake services.
    pub fn stop_services(&self) {
        self.payment.stop();
        self.inventory.stop();
        self.email.stop();
    }
}

/// How far a run has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Sagas started.
    pub sagas: i64,
    /// Sagas completed, compensated or stuck.
    pub finished: i64,
    /// Outbox messages not yet delivered (dead letters excluded).
    pub undelivered: i64,
    /// Dead letters.
    pub dead_letters: i64,
}

impl Progress {
    /// Everything finished and delivered.
    #[must_use]
    pub fn is_quiet(&self) -> bool {
        self.finished == self.sagas && self.undelivered == 0
    }
}

/// A worker: runs checkout sagas and dispatches their messages. Its
/// executor runs on `St`: the worker's [`PgSagaStore`], or a decorator
/// around it (see [`Worker::with_store_layer`]).
#[derive(Debug, Clone)]
pub struct Worker<St = PgSagaStore> {
    /// The saga executor.
    pub executor: Executor<St>,
    /// The outbox dispatcher.
    pub dispatcher: Dispatcher<HttpPublisher>,
    store: PgSagaStore,
}

fn policies(settings: &WorkerSettings) -> saga::Policies {
    saga::Policies {
        retry: settings.retry.clone(),
        compensation_retry: settings.compensation_retry.clone(),
        step_timeout: settings.step_timeout,
    }
}

/// The definition a worker runs: the checkout saga, with the faults its
/// settings and hooks ask for layered over it from outside.
fn definition(
    endpoints: &Endpoints,
    settings: &WorkerSettings,
    after_effect: Option<faults::EffectHook>,
) -> Result<SagaDefinition<Checkout, saga::Deps>, crate::Error> {
    let mut saga = saga::definition(&policies(settings))?;
    if let Some(hook) = after_effect {
        saga = saga.layer(faults::AfterEffect::new(hook));
    }
    if settings.publish_directly {
        saga = saga.layer(faults::PublishDirectly::to(endpoints.email_url.clone()));
    }
    if let Some(force) = settings.force_outcome {
        saga = force.layer(saga);
    }
    Ok(saga)
}

impl Worker {
    /// A worker with its own connection pool on `endpoints`, reading
    /// `clock`.
    pub fn new(
        endpoints: &Endpoints,
        settings: &WorkerSettings,
        hooks: Hooks,
        clock: Arc<dyn Clock>,
    ) -> Result<Worker, crate::Error> {
        Worker::with_store_layer(endpoints, settings, hooks, clock, |store| store)
    }
}

impl<St: SagaStore> Worker<St> {
    /// [`Worker::new`], with the executor on `layer(store)`: a decorator
    /// around the worker's saga store, as a test harness wraps it from
    /// outside.
    pub fn with_store_layer(
        endpoints: &Endpoints,
        settings: &WorkerSettings,
        hooks: Hooks,
        clock: Arc<dyn Clock>,
        layer: impl FnOnce(PgSagaStore) -> St,
    ) -> Result<Self, crate::Error> {
        let schemas = Schemas::with_prefix(&endpoints.prefix)?;
        let db_config = ConnectConfig::from_url(&endpoints.database_url)
            .map_err(saga_postgres::PgError::from)?;
        let pool = pool_from_config(db_config.clone(), settings.concurrency + 4)?;
        let mut downstream = Downstream::new(
            endpoints.payment_url.clone(),
            endpoints.inventory_url.clone(),
            settings.http_timeout,
        )?;
        downstream.fresh_key_per_attempt = settings.fresh_key_per_attempt;
        let deps = saga::Deps {
            downstream,
            shop: Shop::new(pool.clone(), schemas.shop.clone()),
        };
        // The worker's clock is its local one: leases and due times are the
        // server's (see saga-postgres's "the server's clock").
        let store = PgSagaStore::builder(pool.clone(), schemas.saga.clone())
            .local_clock(clock.clone())
            .build();
        let executor = Executor::builder(layer(store.clone()))
            .register_with(definition(endpoints, settings, hooks.after_effect)?, deps)
            .concurrency(settings.concurrency)
            .lease_duration(settings.lease)
            .heartbeat_interval(settings.lease / 3)
            .poll_interval(settings.poll_interval)
            .build()?;
        let outbox = Outbox::builder(pool, schemas.saga.clone())
            .local_clock(clock)
            .build();
        let mut publisher = HttpPublisher::new(endpoints.email_url.clone(), settings.http_timeout)?;
        if let Some(hook) = hooks.after_publish {
            publisher = publisher.with_after_publish(hook);
        }
        let dispatcher = Dispatcher::builder(outbox, publisher)
            .poll_interval(settings.poll_interval)
            .lease_for(settings.lease.max(Duration::from_secs(2)) * 4)
            .publish_timeout(settings.lease.max(Duration::from_secs(2)))
            .retry_policy(settings.delivery_retry.clone())
            .listen(db_config)
            .build()
            .map_err(crate::Error::Outbox)?;
        Ok(Worker {
            executor,
            dispatcher,
            store,
        })
    }

    /// What the worker's store had to recover from (ambiguous commits...).
    #[must_use]
    pub fn store_stats(&self) -> saga_postgres::StoreStats {
        self.store.stats()
    }

    /// Runs both until `shutdown` completes. Fails at once, running
    /// neither, if the executor refuses to start (its definition's shape
    /// differs from the stored one, the schema is not migrated).
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), crate::Error> {
        self.executor.check().await?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let executor = self.executor.run(wait(stopped.clone()));
        let dispatcher = self.dispatcher.run(wait(stopped));
        let trigger = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        let (executor, (), ()) = tokio::join!(executor, dispatcher, trigger);
        Ok(executor?)
    }
}

#[cfg(test)]
mod tests {
    use super::{Database, Endpoints, WorkerSettings, definition};
    use crate::saga;

    #[test]
    fn the_checkout_shape_is_built_without_infrastructure_and_is_what_workers_register() {
        // A plain test: no runtime, no database, no service, no client.
        let shape = saga::shape();
        assert_eq!(
            shape
                .steps
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            [
                "validate_order",
                "charge_payment",
                "reserve_inventory",
                "confirm_order",
                "send_confirmation"
            ]
        );
        assert_eq!(saga::diagram(), shape.to_mermaid());
        // What a worker registers, with every fault layered over it, has
        // the same shape. The URLs are never dialled.
        let endpoints = Endpoints {
            database_url: "postgres://nowhere.invalid/none".to_owned(),
            prefix: "none".to_owned(),
            payment_url: "http://nowhere.invalid".to_owned(),
            inventory_url: "http://nowhere.invalid".to_owned(),
            email_url: "http://nowhere.invalid".to_owned(),
        };
        let settings = WorkerSettings {
            publish_directly: true,
            force_outcome: Some(crate::faults::ForceOutcome::CompleteEvery),
            ..WorkerSettings::default()
        };
        let hook: crate::faults::EffectHook = std::sync::Arc::new(|_| Box::pin(async {}));
        let registered = definition(&endpoints, &settings, Some(hook)).unwrap();
        assert_eq!(registered.shape(), &shape);
    }

    #[test]
    fn a_database_url_is_debugged_without_its_password() {
        for url in [
            "postgres://shop:s3cret-pw@db.internal:5433/orders",
            "host=db.internal user=shop password=s3cret-pw dbname=orders",
        ] {
            let shown = format!("{:?}", Database::Url(url.to_owned()));
            assert!(!shown.contains("s3cret-pw"), "{shown}");
            assert!(shown.contains("db.internal"), "{shown}");
        }
        let shown = format!("{:?}", Database::Url("s3cret-pw not a url".to_owned()));
        assert!(!shown.contains("s3cret-pw"), "{shown}");
    }

    #[test]
    fn endpoints_are_debugged_without_the_database_password() {
        let endpoints = Endpoints {
            database_url: "postgres://shop:s3cret-pw@db.internal:5433/orders".to_owned(),
            prefix: "shop".to_owned(),
            payment_url: "http://payment.internal".to_owned(),
            inventory_url: "http://inventory.internal".to_owned(),
            email_url: "http://email.internal".to_owned(),
        };
        let shown = format!("{endpoints:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(shown.contains("db.internal"), "{shown}");
        assert!(shown.contains("payment.internal"), "{shown}");
    }
}
