//! The demo: a batch of orders with a mix of outcomes, run by several
//! workers, one of which dies mid-run; then a summary from the ledgers.
//!
//! [`run`] starts a deployment, drives the orders through it and
//! cleans up; [`render`] prints the [`Report`].

mod drive;
mod options;
mod orders;
mod render;
mod report;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::deploy::{Database, Deployment, Progress};

pub use options::{Options, Show, banner, warnings};
pub use orders::{Scenario, orders, stock};
pub use render::{render, timeline};
pub use report::{Cleanup, Crash, OrderReport, Report, Verdict};

use drive::drive;
use options::notes;

/// Runs the demo; `progress` is called about four times a second.
pub async fn run(options: Options, progress: impl FnMut(Progress)) -> Result<Report, crate::Error> {
    run_until(options, progress, std::future::pending()).await
}

/// [`run`], stopping early when `interrupt` completes (Ctrl-C): the
/// workers are stopped, the ledgers audited, the schemas dropped (unless
/// kept), and the report says it was interrupted.
pub async fn run_until(
    mut options: Options,
    progress: impl FnMut(Progress),
    interrupt: impl Future<Output = ()>,
) -> Result<Report, crate::Error> {
    let started = Instant::now();
    let prefix = match options.database {
        Database::Throwaway => "checkout".to_owned(),
        Database::Url(_) => format!(
            "checkout_{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        ),
    };
    let by_url = matches!(options.database, Database::Url(_));
    let keep = options.keep;
    let notes = notes(&options);
    let stock = stock(options.orders);
    let database = std::mem::replace(&mut options.database, Database::Throwaway);
    let deployment = Deployment::start(database, &prefix, &stock, options.seed).await?;
    let ran = drive(&deployment, &options, started, progress, interrupt).await;
    deployment.stop_services();
    let cleanup = if !by_url {
        Cleanup::Throwaway
    } else if keep {
        Cleanup::Kept { prefix }
    } else {
        match deployment.drop_schemas().await {
            Ok(()) => Cleanup::Dropped { prefix },
            Err(error) => Cleanup::DropFailed {
                prefix,
                error: Arc::new(error),
            },
        }
    };
    let mut report = ran?;
    report.notes = notes;
    report.cleanup = cleanup;
    Ok(report)
}
