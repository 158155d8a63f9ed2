//! The server's pools: one [`RunspacePool`] per profile, opened at launch (or, `--lazy`, on first use),
//! closed when idle longer than `--idle-timeout` and opened again on demand, and replaced when a reload
//! changes its profile (the old pool drains: it closes once no request uses it).
//!
//! [`Pools::get`] is the one way in: it hands out a [`Lease`], which keeps the pool from being closed
//! as idle while it is held.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use psbridge::{PoolBuilder, PoolStats, RunspacePool};

use super::policy::Policy;
use crate::profile::Profile;

/// A profile that cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum PoolsError {
    /// No such profile is served.
    #[error("this server has no profile `{name}`; it serves: {served}")]
    Unknown { name: String, served: String },
    /// Its workers could not be started and connected.
    #[error("profile {name}: the workers could not start: {source}")]
    Open {
        name: String,
        #[source]
        source: psbridge::Error,
    },
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Closing,
}

/// One served profile: how to open its pool, who may run what, and the pool while it is open.
pub struct Served {
    /// The profile's name.
    pub name: String,
    /// The profile as read (secrets not in it).
    pub profile: Profile,
    /// What clients may run.
    pub policy: Policy,
    /// How its pool is opened (secrets read again at every connect).
    builder: PoolBuilder,
    /// Started at launch (not `--lazy`): the health check waits for it.
    pub eager: bool,
    /// Most workers (processes) of its pool.
    pub workers: usize,
    /// Runspaces per worker: up to `workers x runspaces` commands run at once.
    pub runspaces: usize,
    /// The open pool, if any; the lock is held while one is being opened.
    pool: tokio::sync::Mutex<Option<Arc<RunspacePool>>>,
    /// The open pool, for readers that must not wait for an open in progress (statistics).
    current: Mutex<Option<Arc<RunspacePool>>>,
    /// Leases held now.
    users: AtomicUsize,
    last_used: Mutex<Instant>,
    /// Its pool has opened at least once.
    ready: AtomicBool,
    /// Replaced by a reload or closed for shutdown: it opens no more pools.
    retired: AtomicBool,
}

impl Served {
    /// A profile to serve; nothing starts yet.
    /// `size` is (most workers, runspaces per worker).
    pub fn new(profile: Profile, policy: Policy, builder: PoolBuilder, size: (usize, usize), eager: bool) -> Served {
        let (workers, runspaces) = size;
        Served {
            name: profile.name.clone().unwrap_or_default(),
            profile,
            policy,
            builder,
            eager,
            workers,
            runspaces,
            pool: tokio::sync::Mutex::new(None),
            current: Mutex::new(None),
            users: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            ready: AtomicBool::new(false),
            retired: AtomicBool::new(false),
        }
    }

    /// The open pool, opening it first if needed.
    async fn open(&self) -> Result<Arc<RunspacePool>, PoolsError> {
        let mut slot = self.pool.lock().await;
        if self.retired.load(Ordering::SeqCst) {
            return Err(PoolsError::Closing);
        }
        if let Some(pool) = slot.as_ref() {
            return Ok(pool.clone());
        }
        tracing::info!(profile = %self.name, "opening the pool");
        let pool = Arc::new(self.builder.clone().build().await.map_err(|source| PoolsError::Open { name: self.name.clone(), source })?);
        *slot = Some(pool.clone());
        *lock(&self.current) = Some(pool.clone());
        self.ready.store(true, Ordering::SeqCst);
        Ok(pool)
    }

    /// Takes the open pool away (to close it) when `due` says so, under the open lock (a request that
    /// arrives meanwhile waits, then opens a new one).
    async fn take_if(&self, due: impl FnOnce(&Arc<RunspacePool>) -> bool) -> Option<Arc<RunspacePool>> {
        let mut slot = self.pool.lock().await;
        if !slot.as_ref().is_some_and(due) {
            return None;
        }
        *lock(&self.current) = None;
        slot.take()
    }

    /// Whether its pool has opened once (the health check's question for a profile started at launch).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The open pool's statistics; `None` while it is closed.
    pub fn stats(&self) -> Option<PoolStats> {
        lock(&self.current).as_ref().map(|pool| pool.stats())
    }

    /// Requests using it now.
    pub fn users(&self) -> usize {
        self.users.load(Ordering::SeqCst)
    }

    /// How long since a request last used it.
    pub fn idle_for(&self) -> Duration {
        if self.users() > 0 { Duration::ZERO } else { lock(&self.last_used).elapsed() }
    }

    /// Closes its pool if it is open (running commands get the pool's shutdown grace).
    async fn close(&self) {
        if let Some(pool) = self.take_if(|_| true).await {
            pool.close().await;
        }
    }

    /// Closes its pool when it has been idle for `limit`.
    async fn close_if_idle(&self, limit: Duration) {
        if let Some(pool) = self.take_if(|_| self.idle_for() >= limit).await {
            tracing::info!(profile = %self.name, idle = ?limit, "closing the idle pool");
            pool.close().await;
        }
    }
}

/// A pool handed to a request: derefs to the [`RunspacePool`]. While any lease is held the pool is not
/// closed as idle.
pub struct Lease {
    pool: Arc<RunspacePool>,
    served: Arc<Served>,
}

impl Lease {
    /// Drops this pool for good after it gave up on starting workers (every later command would fail
    /// the same way): the next request opens a fresh one.
    pub async fn discard(self) {
        if let Some(pool) = self.served.take_if(|current| Arc::ptr_eq(current, &self.pool)).await {
            tokio::spawn(async move { pool.close().await });
        }
    }
}

impl std::ops::Deref for Lease {
    type Target = RunspacePool;

    fn deref(&self) -> &RunspacePool {
        &self.pool
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *lock(&self.served.last_used) = Instant::now();
        self.served.users.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every served profile, by name.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<Inner>,
}

struct Inner {
    served: Mutex<BTreeMap<String, Arc<Served>>>,
    /// Set by [`Pools::close_all`]: nothing opens any more.
    closing: AtomicBool,
}

impl Pools {
    /// The registry of `served` profiles; nothing is started (see [`start_eager`](Self::start_eager)).
    pub fn new(served: Vec<Served>) -> Pools {
        let served = served.into_iter().map(|s| (s.name.clone(), Arc::new(s))).collect();
        Pools { inner: Arc::new(Inner { served: Mutex::new(served), closing: AtomicBool::new(false) }) }
    }

    /// The pool of `profile`, opened first if needed.
    ///
    /// # Errors
    /// [`PoolsError::Unknown`] for a profile this server does not serve, [`PoolsError::Open`] when its
    /// workers cannot start, [`PoolsError::Closing`] during shutdown.
    pub async fn get(&self, profile: &str) -> Result<Lease, PoolsError> {
        let served = self.served(profile)?;
        served.users.fetch_add(1, Ordering::SeqCst);
        // From here the use is given back whatever happens (an error, a dropped request).
        let guard = UseGuard(Some(served.clone()));
        let pool = served.open().await?;
        Ok(guard.into_lease(pool))
    }

    /// The served profile `name` (its policy and statistics), without opening anything.
    pub fn served(&self, name: &str) -> Result<Arc<Served>, PoolsError> {
        if self.inner.closing.load(Ordering::SeqCst) {
            return Err(PoolsError::Closing);
        }
        let served = lock(&self.inner.served);
        served.get(name).cloned().ok_or_else(|| PoolsError::Unknown { name: name.to_owned(), served: served.keys().cloned().collect::<Vec<_>>().join(", ") })
    }

    /// Every served profile, by name.
    pub fn all(&self) -> Vec<Arc<Served>> {
        lock(&self.inner.served).values().cloned().collect()
    }

    /// Opens the pools of the profiles started at launch, in parallel; the first failure is returned
    /// (the others keep opening).
    pub async fn start_eager(&self) -> Result<(), PoolsError> {
        let eager: Vec<Arc<Served>> = self.all().into_iter().filter(|s| s.eager).collect();
        let opened = futures_util::future::join_all(eager.iter().map(|s| s.open())).await;
        opened.into_iter().find_map(Result::err).map_or(Ok(()), Err)
    }

    /// Whether every profile started at launch has opened its pool.
    pub fn healthy(&self) -> bool {
        !self.inner.closing.load(Ordering::SeqCst) && self.all().iter().filter(|s| s.eager).all(|s| s.ready())
    }

    /// Replaces the served profiles with `fresh` (a reload): profiles that did not change keep their pool;
    /// added and changed ones take effect now (opened now when `eager`); the pools of changed and removed
    /// ones drain in the background (closed once no request uses them). Returns the names of the
    /// profiles added, changed and removed.
    pub fn replace(&self, fresh: Vec<Served>) -> Reloaded {
        let mut reloaded = Reloaded::default();
        let mut retired = Vec::new();
        {
            let mut served = lock(&self.inner.served);
            let mut next = BTreeMap::new();
            for new in fresh {
                match served.remove(&new.name) {
                    Some(old) if old.profile.spec == new.profile.spec && old.eager == new.eager && old.workers == new.workers && old.runspaces == new.runspaces => {
                        // Unchanged: the pool stays (the rules come from the same spec, or from --allow-all,
                        // which a reload does not change).
                        next.insert(old.name.clone(), old);
                    }
                    Some(old) => {
                        reloaded.changed.push(new.name.clone());
                        retired.push(old);
                        next.insert(new.name.clone(), Arc::new(new));
                    }
                    None => {
                        reloaded.added.push(new.name.clone());
                        next.insert(new.name.clone(), Arc::new(new));
                    }
                }
            }
            for (name, old) in std::mem::take(&mut *served) {
                reloaded.removed.push(name);
                retired.push(old);
            }
            *served = next;
        }
        for old in retired {
            old.retired.store(true, Ordering::SeqCst);
            tokio::spawn(drain(old));
        }
        for name in reloaded.added.iter().chain(&reloaded.changed) {
            if let Ok(served) = self.served(name)
                && served.eager
            {
                tokio::spawn(async move {
                    if let Err(error) = served.open().await {
                        tracing::error!(%error, "reload");
                    }
                });
            }
        }
        reloaded
    }

    /// Closes pools idle for longer than `limit`, every `limit / 4` (at most every 30 s), for ever.
    pub async fn close_idle(self, limit: Duration) {
        let period = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            for served in self.all() {
                served.close_if_idle(limit).await;
            }
        }
    }

    /// Takes no more requests and closes every pool: running commands get the pools' shutdown grace,
    /// then are cancelled; every worker is disconnected.
    pub async fn close_all(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let all = self.all();
        for served in &all {
            served.retired.store(true, Ordering::SeqCst);
        }
        futures_util::future::join_all(all.iter().map(|s| s.close())).await;
    }
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// Closes a retired profile's pool once no request uses it.
async fn drain(old: Arc<Served>) {
    while old.users() > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::info!(profile = %old.name, "closing the pool of the old configuration");
    old.close().await;
}

/// A use counted in [`Served::users`], given back when dropped unless it became a [`Lease`].
struct UseGuard(Option<Arc<Served>>);

impl UseGuard {
    fn into_lease(mut self, pool: Arc<RunspacePool>) -> Lease {
        Lease { pool, served: self.0.take().expect("a guard becomes one lease") }
    }
}

impl Drop for UseGuard {
    fn drop(&mut self) {
        if let Some(served) = self.0.take() {
            served.users.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
