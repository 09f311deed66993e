//! Progress on stderr, every few seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{Config, Run};

/// The progress printer (when asked for) and the phase it names.
pub(super) struct Progress {
    phase: Arc<std::sync::Mutex<&'static str>>,
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Prints progress every few seconds if `config.progress`.
    pub(super) fn spawn(config: &Config, run: &Run, started: Instant) -> Self {
        let phase = Arc::new(std::sync::Mutex::new("faults"));
        let task = config.progress.then(|| {
            let deployment = run.deployment.clone();
            let tally = run.tally.clone();
            let phase = phase.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_secs(5));
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    let phase = *phase.lock().unwrap_or_else(|e| e.into_inner());
                    if let Ok(p) = deployment.quiet().await {
                        eprintln!(
                            "chaos: {:>6.1}s {phase}: {}/{} sagas finished, {} messages to deliver, {} fault events fired",
                            started.elapsed().as_secs_f64(),
                            p.finished,
                            p.sagas,
                            p.undelivered,
                            tally.total()
                        );
                    }
                }
            })
        });
        Progress { phase, task }
    }

    /// The faults have stopped.
    pub(super) fn quiescing(&self) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = "quiescing";
    }

    /// No more progress lines.
    pub(super) fn stop(self) {
        if let Some(task) = self.task {
            task.abort();
        }
    }
}
