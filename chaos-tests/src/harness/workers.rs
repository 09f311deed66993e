//! The worker processes: spawned with their spec, restarted after each
//! kill, told over stdin which points to arm, and heard from over stdout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::Error;
use crate::check::WorkerFact;
use crate::schedule::ZombieAt;
use crate::worker::{Counts, PointAction, SPEC_ENV, WorkerEvent, WorkerSpec};

pub(super) struct Slot {
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) incarnation: u64,
    pub(super) reader: JoinHandle<()>,
}

/// An armed effect point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arm {
    Crash,
    Zombie(ZombieAt),
}

impl Arm {
    pub(super) fn action(self) -> PointAction {
        match self {
            Arm::Crash => PointAction::Crash,
            Arm::Zombie(_) => PointAction::Pause,
        }
    }

    pub(super) fn command(self) -> &'static str {
        match self.action() {
            PointAction::Crash => "crash-after-effect",
            PointAction::Pause => "pause-after-effect",
        }
    }
}

/// Armed points not yet reached. The head of each queue is armed on every
/// live worker; the first worker to reach it fires it.
#[derive(Debug, Default)]
pub(super) struct Arms {
    pub(super) effect: VecDeque<Arm>,
    pub(super) publish: u32,
    /// A zombie is frozen or being watched: the next zombie point waits,
    /// so that some worker is always left to take a zombie's saga over.
    pub(super) zombie_active: bool,
}

impl Arms {
    /// The effect point to arm on the workers now, and where it is in the
    /// queue: the first, or while a zombie is active the first crash.
    pub(super) fn next(&self) -> Option<(usize, Arm)> {
        self.effect
            .iter()
            .copied()
            .enumerate()
            .find(|(_, a)| !(self.zombie_active && matches!(a, Arm::Zombie(_))))
    }

    pub(super) fn to_arm(&self) -> Option<Arm> {
        self.next().map(|(_, arm)| arm)
    }
}

pub(super) enum Msg {
    Event(usize, u64, WorkerEvent),
    /// Answered once every message before it was handled.
    Flush(oneshot::Sender<()>),
}

/// The name a worker incarnation's connections carry
/// (`application_name`).
pub(super) fn incarnation_name(i: usize, incarnation: u64) -> String {
    format!("chaos-w{i}-{incarnation}")
}

/// The worker processes, restarted after each kill.
pub(super) struct Workers {
    pub(super) arms: std::sync::Mutex<Arms>,
    /// Workers frozen as zombies right now: random kills spare them, so
    /// that each zombie lives to make its stale write.
    pub(super) paused: std::sync::Mutex<BTreeSet<usize>>,
    pub(super) exe: PathBuf,
    pub(super) spec: WorkerSpec,
    pub(super) slots: Vec<Mutex<Option<Slot>>>,
    pub(super) events: mpsc::UnboundedSender<Msg>,
    pub(super) counts: std::sync::Mutex<BTreeMap<(usize, u64), Counts>>,
    /// When each incarnation's last reported counters were read (its
    /// clock).
    pub(super) reported_at: std::sync::Mutex<BTreeMap<(usize, u64), std::time::SystemTime>>,
    /// Incarnations that stopped cleanly (their counters are complete).
    pub(super) stopped: std::sync::Mutex<BTreeSet<(usize, u64)>>,
    /// Writes refused, as the workers reported them: (worker, incarnation,
    /// saga id).
    pub(super) leases_lost: std::sync::Mutex<Vec<(usize, u64, String)>>,
    pub(super) lease_lost: Notify,
    /// Each incarnation's executor id: the `lease_owner` of what it claims.
    pub(super) worker_ids: std::sync::Mutex<BTreeMap<(usize, u64), Uuid>>,
    pub(super) incarnations: AtomicU64,
}

impl Workers {
    pub(super) async fn spawn(&self, i: usize) -> Result<(), Error> {
        let incarnation = self.incarnations.fetch_add(1, Ordering::Relaxed);
        let mut spec = self.spec.clone();
        spec.number = i;
        spec.endpoints.database_url = format!(
            "{}?application_name={}",
            spec.endpoints.database_url,
            incarnation_name(i, incarnation)
        );
        let mut child = Command::new(&self.exe)
            .arg("worker")
            .env(SPEC_ENV, serde_json::to_string(&spec)?)
            .env("RUST_LOG", "error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let events = self.events.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<WorkerEvent>(&line) {
                    let _ = events.send(Msg::Event(i, incarnation, event));
                }
            }
        });
        *self.slots[i].lock().await = Some(Slot {
            child,
            stdin,
            incarnation,
            reader,
        });
        // A new incarnation gets the points armed on the others.
        let (effect, publish) = {
            let arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            (arms.to_arm(), arms.publish > 0)
        };
        if let Some(arm) = effect {
            self.send(i, arm.command()).await;
        }
        if publish {
            self.send(i, "crash-after-publish").await;
        }
        Ok(())
    }

    pub(super) async fn broadcast(&self, command: &str) {
        for i in 0..self.slots.len() {
            self.send(i, command).await;
        }
    }

    /// Queues an effect point; arms it everywhere if it is the first.
    pub(super) async fn arm_effect(&self, arm: Arm) {
        let (before, after) = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            let before = arms.to_arm();
            arms.effect.push_back(arm);
            (before, arms.to_arm())
        };
        if let Some(arm) = after
            && before.is_none()
        {
            self.broadcast(arm.command()).await;
        }
    }

    /// An effect point was reached: disarm it everywhere, arm the next;
    /// returns the arm it fired.
    pub(super) async fn effect_fired(&self, action: PointAction) -> Option<Arm> {
        let (fired, next) = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            let fired = match arms.next() {
                Some((index, arm)) if arm.action() == action => arms.effect.remove(index),
                _ => None,
            };
            if matches!(fired, Some(Arm::Zombie(_))) {
                arms.zombie_active = true;
            }
            (fired, arms.to_arm())
        };
        self.broadcast("disarm-effect").await;
        if let Some(next) = next {
            self.broadcast(next.command()).await;
        }
        fired
    }

    pub(super) async fn arm_publish(&self) {
        let first = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            arms.publish += 1;
            arms.publish == 1
        };
        if first {
            self.broadcast("crash-after-publish").await;
        }
    }

    pub(super) async fn publish_fired(&self) {
        let more = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            arms.publish = arms.publish.saturating_sub(1);
            arms.publish > 0
        };
        self.broadcast("disarm-publish").await;
        if more {
            self.broadcast("crash-after-publish").await;
        }
    }

    /// The zombie is done with: the next zombie point may be armed.
    pub(super) async fn zombie_done(&self) {
        let next = {
            let mut arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
            arms.zombie_active = false;
            arms.to_arm()
        };
        if let Some(next) = next {
            self.broadcast(next.command()).await;
        }
    }

    pub(super) fn armed(&self) -> bool {
        let arms = self.arms.lock().unwrap_or_else(|e| e.into_inner());
        !arms.effect.is_empty() || arms.publish > 0
    }

    pub(super) fn clear_arms(&self) {
        *self.arms.lock().unwrap_or_else(|e| e.into_inner()) = Arms::default();
    }

    pub(super) fn is_paused(&self, i: usize) -> bool {
        self.paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&i)
    }

    pub(super) fn set_paused(&self, i: usize, paused: bool) {
        let mut set = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if paused {
            set.insert(i);
        } else {
            set.remove(&i);
        }
    }

    pub(super) fn reported_lease_lost(&self, i: usize, incarnation: u64, saga: &str) -> bool {
        self.leases_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(w, n, s)| *w == i && *n == incarnation && s == saga)
    }

    /// SIGKILL worker `i` (if `incarnation` is given, only that one), then
    /// start it again.
    pub(super) async fn kill_and_restart(
        &self,
        i: usize,
        incarnation: Option<u64>,
    ) -> Result<bool, Error> {
        {
            let mut slot = self.slots[i].lock().await;
            match slot.as_mut() {
                Some(s) if incarnation.is_none_or(|n| n == s.incarnation) => {
                    let _ = s.child.start_kill();
                    let _ = s.child.wait().await;
                    *slot = None;
                }
                _ => return Ok(false),
            }
        }
        self.spawn(i).await?;
        Ok(true)
    }

    pub(super) async fn send(&self, i: usize, command: &str) {
        if let Some(s) = self.slots[i].lock().await.as_mut() {
            let _ = s.stdin.write_all(format!("{command}\n").as_bytes()).await;
            let _ = s.stdin.flush().await;
        }
    }

    pub(super) async fn signal(&self, i: usize, incarnation: u64, signal: &str) -> bool {
        let pid = match self.slots[i].lock().await.as_ref() {
            Some(s) if s.incarnation == incarnation => s.child.id(),
            _ => None,
        };
        let Some(pid) = pid else { return false };
        // A worker that died meanwhile is no error here: the caller
        // learns it from the status.
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    pub(super) fn total(&self) -> Counts {
        let mut total = Counts::default();
        for c in self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            total += *c;
        }
        total
    }

    pub(super) fn facts(&self) -> Vec<WorkerFact> {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let reported_at = self.reported_at.lock().unwrap_or_else(|e| e.into_inner());
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((i, n), counts)| WorkerFact {
                name: incarnation_name(*i, *n),
                survived: stopped.contains(&(*i, *n)),
                counts: *counts,
                reported_at: reported_at.get(&(*i, *n)).copied(),
            })
            .collect()
    }

    /// Asks every worker to stop and waits for it and for its last events
    /// (killing what does not stop).
    pub(super) async fn stop_all(&self) {
        for slot in &self.slots {
            if let Some(s) = slot.lock().await.as_mut() {
                let _ = s.stdin.write_all(b"stop\n").await;
                let _ = s.stdin.flush().await;
            }
        }
        for slot in &self.slots {
            let Some(mut s) = slot.lock().await.take() else {
                continue;
            };
            if tokio::time::timeout(Duration::from_secs(30), s.child.wait())
                .await
                .is_err()
            {
                let _ = s.child.start_kill();
                let _ = s.child.wait().await;
            }
            let _ = s.reader.await;
        }
    }
}

impl Workers {
    /// `count` workers, none started yet, reporting their events to
    /// `events`.
    pub(super) fn new(
        exe: PathBuf,
        spec: WorkerSpec,
        count: usize,
        events: mpsc::UnboundedSender<Msg>,
    ) -> Self {
        Workers {
            exe,
            spec,
            slots: (0..count).map(|_| Mutex::new(None)).collect(),
            events,
            arms: std::sync::Mutex::default(),
            paused: std::sync::Mutex::default(),
            counts: std::sync::Mutex::default(),
            reported_at: std::sync::Mutex::default(),
            stopped: std::sync::Mutex::default(),
            leases_lost: std::sync::Mutex::default(),
            lease_lost: Notify::new(),
            worker_ids: std::sync::Mutex::default(),
            incarnations: AtomicU64::new(0),
        }
    }

    /// Waits until every event reported so far has been handled.
    pub(super) async fn flush_events(&self) {
        let (done, flushed) = oneshot::channel();
        let _ = self.events.send(Msg::Flush(done));
        let _ = flushed.await;
    }
}
