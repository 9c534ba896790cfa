//! Event-driven completion of a plug or unplug.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// How a plug or unplug ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotplugOutcome {
    /// Plug: the guest powered the slot and turned the power indicator on (Linux
    /// does that after enumerating and binding a driver).
    Plugged,
    /// Unplug: the device left the slot (the guest turned slot power off, or the
    /// VMM removed it by surprise). The slot is empty.
    Unplugged,
    /// The operation was withdrawn: an unplug the guest aborted on a second button
    /// press, or whose press it had not read yet (the device stays), or a plug
    /// the VMM took back before the guest powered the slot (the device is gone).
    Cancelled,
    /// Plug: the guest powered the slot off before finishing (Linux does this when
    /// the link does not come up or enumeration fails). The device is gone.
    Aborted,
}

type Callback = Box<dyn FnOnce(HotplugOutcome) + Send>;

#[derive(Default)]
struct State {
    outcome: Option<HotplugOutcome>,
    wakers: Vec<Waker>,
    callbacks: Vec<Callback>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    cv: Condvar,
    eventfd: OnceLock<EventFd>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The requester's side of a plug or unplug. Cloning shares it.
///
/// Completion happens inside the guest's config access or the VMM's call on the
/// port (with the port locked), so callbacks must be short and must not call back
/// into the port; waiting threads, eventfds and futures have no such limit.
#[derive(Clone, Default)]
pub struct Completion {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("outcome", &self.outcome())
            .finish()
    }
}

impl Completion {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn done(outcome: HotplugOutcome) -> Self {
        let c = Self::new();
        c.complete(outcome);
        c
    }

    /// The outcome, if the operation has finished.
    pub fn outcome(&self) -> Option<HotplugOutcome> {
        self.inner.lock().outcome
    }

    /// Blocks until the operation finishes.
    pub fn wait(&self) -> HotplugOutcome {
        let mut s = self.inner.lock();
        loop {
            if let Some(o) = s.outcome {
                return o;
            }
            s = self.inner.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until the operation finishes or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<HotplugOutcome> {
        let s = self.inner.lock();
        let (s, _) = self
            .inner
            .cv
            .wait_timeout_while(s, timeout, |s| s.outcome.is_none())
            .unwrap_or_else(|e| e.into_inner());
        s.outcome
    }

    /// An eventfd that becomes readable when the operation finishes: add it to the
    /// VMM's epoll set. Created on first use.
    pub fn eventfd(&self) -> std::io::Result<&EventFd> {
        // Under the state lock, so a completion racing with creation signals once.
        let s = self.inner.lock();
        if let Some(fd) = self.inner.eventfd.get() {
            return Ok(fd);
        }
        let fd = EventFd::new(EFD_NONBLOCK)?;
        if s.outcome.is_some() {
            fd.write(1)?;
        }
        Ok(self.inner.eventfd.get_or_init(|| fd))
    }

    /// Runs `f` with the outcome when the operation finishes (at once if it has).
    pub fn on_complete(&self, f: impl FnOnce(HotplugOutcome) + Send + 'static) {
        let mut s = self.inner.lock();
        match s.outcome {
            Some(o) => {
                drop(s);
                f(o);
            }
            None => s.callbacks.push(Box::new(f)),
        }
    }

    /// Records the outcome and tells everyone waiting. Later calls are ignored.
    pub(crate) fn complete(&self, outcome: HotplugOutcome) {
        let (wakers, callbacks) = {
            let mut s = self.inner.lock();
            if s.outcome.is_some() {
                return;
            }
            s.outcome = Some(outcome);
            if let Some(fd) = self.inner.eventfd.get() {
                if let Err(e) = fd.write(1) {
                    log::warn!("hot-plug completion: cannot signal its eventfd: {e}");
                }
            }
            (
                std::mem::take(&mut s.wakers),
                std::mem::take(&mut s.callbacks),
            )
        };
        self.inner.cv.notify_all();
        wakers.into_iter().for_each(Waker::wake);
        callbacks.into_iter().for_each(|f| f(outcome));
    }
}

impl Future for Completion {
    type Output = HotplugOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HotplugOutcome> {
        let mut s = self.inner.lock();
        match s.outcome {
            Some(o) => Poll::Ready(o),
            None => {
                if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    s.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_way_of_waiting_sees_the_outcome_once() {
        let c = Completion::new();
        let fd_before = c.eventfd().unwrap().try_clone().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let s2 = seen.clone();
        c.on_complete(move |o| {
            assert_eq!(o, HotplugOutcome::Unplugged);
            s2.fetch_add(1, Ordering::SeqCst);
        });
        let waker_count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(waker_count.clone());
        let mut fut = c.clone();
        assert!(
            Pin::new(&mut fut)
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        assert_eq!(c.wait_timeout(Duration::from_millis(1)), None);
        assert!(fd_before.read().is_err());

        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait());
        c.complete(HotplugOutcome::Unplugged);
        c.complete(HotplugOutcome::Cancelled);
        assert_eq!(t.join().unwrap(), HotplugOutcome::Unplugged);
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert_eq!(waker_count.0.load(Ordering::SeqCst), 1);
        assert_eq!(fd_before.read().unwrap(), 1);
        assert_eq!(
            Pin::new(&mut fut).poll(&mut Context::from_waker(&waker)),
            Poll::Ready(HotplugOutcome::Unplugged)
        );
        // Late subscribers see it at once.
        let late = Completion::done(HotplugOutcome::Plugged);
        assert_eq!(late.eventfd().unwrap().read().unwrap(), 1);
        let s3 = seen.clone();
        late.on_complete(move |_| {
            s3.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_eq!(late.wait(), HotplugOutcome::Plugged);
    }
}
