//! In-process wake-ups: a long-poll of an agent sleeps on its slot until
//! work or a cancel for it exists, and watchers of a job (`--wait`,
//! `--follow`) sleep until it changes. The store stays the truth; a wake-up
//! only says "look again", so a lost one costs latency, never correctness.
//! Wake-ups come from one place: the store's commit hook calls
//! [`Hub::apply`] with what each commit changed, and on PostgreSQL the
//! changes other replicas commit arrive the same way (LISTEN/NOTIFY).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use drover_store::jobs::LogTarget;
use drover_store::Changes;
use tokio::sync::{broadcast, Notify, Semaphore};

/// What changed about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    Changed(String),
    /// The job reached a final state (sent after its `Changed`).
    Ended(String),
    Log(String),
    /// A run needs the engine's attention (submitted, cancel asked).
    RunChanged(String),
    /// A run's event stream grew.
    RunEvent(String),
    /// Another replica changed too much to list: look at everything.
    Everything,
}

impl JobEvent {
    /// The job this is about, if it is about a job.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            JobEvent::Changed(id) | JobEvent::Log(id) => Some(id),
            JobEvent::Ended(_)
            | JobEvent::RunChanged(_)
            | JobEvent::RunEvent(_)
            | JobEvent::Everything => None,
        }
    }
}

/// One agent's wake-up and what it last said about its capacity.
#[derive(Debug, Default)]
pub struct AgentSlot {
    pub notify: Notify,
    capacity: AtomicU32,
    free: AtomicU32,
}

/// Most attempts whose log target is kept (the map is emptied when full:
/// a forgotten one is looked up again).
const MAX_LOG_TARGETS: usize = 10_000;

/// Wake-ups and events of this server process.
#[derive(Debug)]
pub struct Hub {
    /// Where each running attempt's output goes and how much of it this
    /// server stored, looked up once per attempt. With several replicas
    /// the bytes counted here may lag the others', so a stream may pass
    /// its cap by what the other replicas stored meanwhile.
    log_targets: Mutex<HashMap<String, LogTarget>>,
    agents: Mutex<HashMap<String, Arc<AgentSlot>>>,
    events: broadcast::Sender<JobEvent>,
    /// Long-polls held right now.
    pub polls_waiting: AtomicI64,
    /// Bounds the long-polls held at once.
    pub poll_permits: Arc<Semaphore>,
    /// Wakes the webhook sender.
    pub deliveries: Notify,
}

impl Hub {
    pub fn new(max_long_polls: usize) -> Hub {
        Hub {
            log_targets: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashMap::new()),
            events: broadcast::channel(4096).0,
            polls_waiting: AtomicI64::new(0),
            poll_permits: Arc::new(Semaphore::new(max_long_polls)),
            deliveries: Notify::new(),
        }
    }

    /// The kept log target of an attempt, if any.
    pub fn log_target(&self, attempt_id: &str) -> Option<LogTarget> {
        let targets = self.log_targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.get(attempt_id).cloned()
    }

    pub fn keep_log_target(&self, attempt_id: &str, target: LogTarget) {
        let mut targets = self.log_targets.lock().unwrap_or_else(|p| p.into_inner());
        if targets.len() >= MAX_LOG_TARGETS {
            targets.clear();
        }
        targets.insert(attempt_id.to_owned(), target);
    }

    /// Counts bytes stored for a stream (0 stdout, 1 stderr).
    pub fn log_stored(&self, attempt_id: &str, stream: usize, bytes: i64) {
        let mut targets = self.log_targets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = targets.get_mut(attempt_id) {
            t.used[stream.min(1)] += bytes;
        }
    }

    /// The attempt has its result: its output is complete.
    pub fn forget_log_target(&self, attempt_id: &str) {
        let mut targets = self.log_targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.remove(attempt_id);
    }

    pub fn slot(&self, agent_id: &str) -> Arc<AgentSlot> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.entry(agent_id.to_owned()).or_default().clone()
    }

    /// Makes the agent's (next) long-poll look for work again.
    pub fn wake(&self, agent_id: &str) {
        self.slot(agent_id).notify.notify_one();
    }

    /// Makes every agent's long-poll look for work again.
    pub fn wake_all(&self) {
        let slots: Vec<Arc<AgentSlot>> = {
            let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            agents.values().cloned().collect()
        };
        for slot in slots {
            slot.notify.notify_one();
        }
    }

    pub fn job_changed(&self, job_id: &str) {
        let _ = self.events.send(JobEvent::Changed(job_id.to_owned()));
    }

    pub fn log_appended(&self, job_id: &str) {
        let _ = self.events.send(JobEvent::Log(job_id.to_owned()));
    }

    pub fn run_changed(&self, run_id: &str) {
        let _ = self.events.send(JobEvent::RunChanged(run_id.to_owned()));
    }

    pub fn run_event(&self, run_id: &str) {
        let _ = self.events.send(JobEvent::RunEvent(run_id.to_owned()));
    }

    pub fn deliveries_queued(&self) {
        self.deliveries.notify_one();
    }

    /// Sends the wake-ups a commit calls for. The store calls this after
    /// every commit (and for other replicas' commits heard through
    /// PostgreSQL): the one place wake-ups come from.
    pub fn apply(&self, c: &Changes) {
        if c.all_agents || c.everything {
            self.wake_all();
        } else {
            for agent in &c.agents {
                self.wake(agent);
            }
        }
        for job in &c.jobs {
            self.job_changed(job);
        }
        for job in &c.ended {
            let _ = self.events.send(JobEvent::Ended(job.clone()));
        }
        for job in &c.logs {
            self.log_appended(job);
        }
        for run in &c.runs {
            self.run_changed(run);
        }
        for run in &c.run_events {
            self.run_event(run);
        }
        if c.everything {
            let _ = self.events.send(JobEvent::Everything);
        }
        if c.deliveries || c.everything {
            self.deliveries_queued();
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    pub fn note_capacity(&self, agent_id: &str, capacity: u32, free: u32) {
        let slot = self.slot(agent_id);
        slot.capacity.store(capacity, Ordering::Relaxed);
        slot.free.store(free, Ordering::Relaxed);
    }

    /// (capacity, free slots) the agent reported at its last poll, if any.
    pub fn capacity_of(&self, agent_id: &str) -> Option<(u32, u32)> {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.get(agent_id).and_then(|s| {
            let cap = s.capacity.load(Ordering::Relaxed);
            (cap > 0).then(|| (cap, s.free.load(Ordering::Relaxed)))
        })
    }
}

/// Waits until `job_id` has an event or `deadline` passes. Returns false on
/// timeout. Subscribe before checking the store, then call this.
pub async fn wait_for_job(
    rx: &mut broadcast::Receiver<JobEvent>,
    job_id: &str,
    deadline: tokio::time::Instant,
) -> bool {
    wait_until(rx, deadline, |ev| ev.job_id() == Some(job_id)).await
}

/// Waits until the job ended; false when the deadline passed.
pub async fn wait_for_end(
    rx: &mut broadcast::Receiver<JobEvent>,
    job_id: &str,
    deadline: tokio::time::Instant,
) -> bool {
    wait_until(
        rx,
        deadline,
        |ev| matches!(ev, JobEvent::Ended(id) if id == job_id),
    )
    .await
}

/// Waits for an event `wanted` accepts, or one after which anything may
/// have happened (another replica's "everything", missed events): true;
/// false when `deadline` passed or the hub closed.
async fn wait_until(
    rx: &mut broadcast::Receiver<JobEvent>,
    deadline: tokio::time::Instant,
    wanted: impl Fn(&JobEvent) -> bool,
) -> bool {
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return false,
            Ok(Ok(ev)) if wanted(&ev) || ev == JobEvent::Everything => return true,
            Ok(Ok(_)) => continue,
            // Missed events: look again to be safe.
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => return true,
            Ok(Err(broadcast::error::RecvError::Closed)) => return false,
        }
    }
}
