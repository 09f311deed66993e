//! Running the orders on a deployment, then auditing.

use std::future::Future;
use std::time::{Duration, Instant};

use saga_core::store::SagaStore;
use tokio::sync::{mpsc, watch};

use crate::deploy::{Deployment, Progress, WorkerSettings};

use super::{Cleanup, Crash, Options, OrderReport, Report, Scenario, orders};

/// Runs the orders on `deployment` until they are done, the deadline
/// passes or `interrupt` completes; then stops the workers and audits.
pub(super) async fn drive(
    deployment: &Deployment,
    options: &Options,
    started: Instant,
    mut progress: impl FnMut(Progress),
    interrupt: impl Future<Output = ()>,
) -> Result<Report, crate::Error> {
    for service in [
        &deployment.payment,
        &deployment.inventory,
        &deployment.email,
    ] {
        service.set_faults(options.faults.clone());
    }
    let settings = WorkerSettings {
        http_timeout: options.http_timeout,
        ..WorkerSettings::default()
    };
    let plan = orders(options);

    // The order during which a worker dies: the first plain one after the
    // scenario showcase. Whichever worker reserves its stock is killed.
    let crash_order = (options.crash && options.workers >= 2)
        .then(|| {
            plan.iter()
                .skip(4)
                .find(|(_, s)| *s == Scenario::Ok)
                .or(plan.first())
        })
        .flatten()
        .map(|(o, _)| o.id.clone());
    let mut crash = match &crash_order {
        Some(order) => Crash::DidNotHappen {
            order: order.clone(),
        },
        None if options.crash => Crash::NeedsTwoWorkers,
        None => Crash::NotAsked,
    };
    let (crashed_tx, mut crashed_rx) = mpsc::unbounded_channel();
    let hook = crash_order.map(|order| crate::faults::CrashHook::new(order, crashed_tx));
    let (stop, stopped) = watch::channel(false);
    let mut workers = Vec::new();
    for i in 0..options.workers.max(1) {
        let hooks = crate::deploy::Hooks {
            after_effect: hook.as_ref().map(|h| h.for_worker(i)),
            after_publish: None,
        };
        let worker = deployment.worker_with_hooks(&settings, hooks)?;
        let mut stopped = stopped.clone();
        workers.push(tokio::spawn(async move {
            worker
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }));
    }

    let saga = deployment.saga(&settings)?;
    let mut placed = Vec::with_capacity(plan.len());
    for (order, scenario) in plan {
        let started = deployment
            .shop
            .place(&deployment.store, &saga, &order)
            .await?;
        placed.push((order, scenario, started.id));
    }

    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut interrupt = std::pin::pin!(interrupt);
    let mut interrupted = false;
    let last = loop {
        tokio::select! {
            Some((worker, order)) = crashed_rx.recv() => {
                // This worker has reserved the order's stock and not
                // recorded it: kill it now. Its lease expires; another
                // worker takes over.
                workers[worker].abort();
                crash = Crash::Happened { worker: worker + 1, order };
                continue;
            }
            () = &mut interrupt, if !interrupted => interrupted = true,
            _ = ticker.tick() => {}
        }
        let now = deployment.quiet().await?;
        progress(now);
        if now.is_quiet() || interrupted || started.elapsed() > options.deadline {
            break now;
        }
    };
    let _ = stop.send(true);
    for worker in workers {
        if let Ok(result) = worker.await {
            result?;
        }
    }

    let mut reports = Vec::with_capacity(placed.len());
    for (order, scenario, saga_id) in placed {
        let snapshot = deployment
            .store
            .load(saga_id)
            .await?
            .ok_or(saga_core::Error::NotFound(saga_id))?;
        reports.push(OrderReport {
            order,
            scenario,
            saga_id,
            status: snapshot.status,
            stuck_reason: snapshot.stuck_reason,
            history: deployment.store.history(saga_id).await?,
        });
    }
    let audit = deployment.audit().await?;
    let undelivered_orders = deployment.undelivered_keys().await?;
    Ok(Report {
        orders: reports,
        audit,
        crash,
        workers: options.workers.max(1),
        seed: options.seed,
        elapsed: started.elapsed(),
        deadline: options.deadline,
        stopped_early: !last.is_quiet(),
        interrupted,
        undelivered: last.undelivered,
        undelivered_orders,
        dead_letters: last.dead_letters,
        notes: Vec::new(),
        cleanup: Cleanup::Throwaway,
    })
}
