//! The stream of orders.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use checkout::demo::Scenario;
use checkout::deploy::{Deployment, WorkerSettings};
use tokio::task::JoinHandle;

use super::{Config, Error};

/// Orders, placed over the first 80% of the fault phase; each retried
/// until it lands (placing is idempotent on the order id). Returns the
/// task placing them and what each order is meant to do (its scenario),
/// which the checks hold its outcome to.
pub(super) fn place(
    config: &Config,
    deployment: &Arc<Deployment>,
    settings: &WorkerSettings,
) -> Result<(JoinHandle<()>, BTreeMap<String, Scenario>), Error> {
    let plan = checkout::demo::orders(&checkout::demo::Options {
        orders: config.orders,
        seed: config.seed,
        ..checkout::demo::Options::default()
    });
    let scenarios = plan
        .iter()
        .map(|(order, scenario)| (order.id.clone(), *scenario))
        .collect();
    let placing = {
        let deployment = deployment.clone();
        let spacing =
            config.duration.mul_f64(0.8) / u32::try_from(config.orders.max(1)).unwrap_or(u32::MAX);
        let saga = deployment.saga(settings)?;
        tokio::spawn(async move {
            for (order, _) in plan {
                let mut backoff = ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(1))
                    .without_max_times()
                    .build();
                while deployment
                    .shop
                    .place(&deployment.store, &saga, &order)
                    .await
                    .is_err()
                {
                    tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))).await;
                }
                tokio::time::sleep(spacing).await;
            }
        })
    };
    Ok((placing, scenarios))
}
