//! A connection's deadline that arms the runtime's timer once per period, not once per wait.
//!
//! Why: a keep-alive connection waits twice per request (for the client's next head and for
//! the backend's response), each time with a deadline. `tokio::time::timeout` inserts an entry
//! into the timer wheel and removes it again on every wait, under the time driver's lock. The
//! deadlines of one wait site only move later from request to request, so the timer armed for
//! an earlier deadline can stay armed: when it fires before the deadline now waited for, it is
//! moved to that deadline (HAProxy's task expiry works the same way). A busy connection then
//! touches the wheel about once per timeout period instead of twice per request.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{sleep_until, Instant, Sleep};

/// The deadline passed before the work finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimedOut;

/// One wait site's timer (see the module doc). Never fires after the deadline waited for.
#[derive(Default)]
pub(crate) struct LazyDeadline {
    /// Armed at or before the deadline of the current wait; `None` until the first wait that
    /// has to wait.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The timer holds the waker of the task that owns this deadline (every wait site is one
    /// connection's, waited on by that connection's task): polled since its last reset and not
    /// fired since. Polling it again would only register the same waker, which cost as much as
    /// the rest of the wait; firing takes the waker, and the wait polls it again then.
    armed: bool,
}

impl LazyDeadline {
    /// Runs `work` until it finishes or `deadline` passes.
    pub(crate) async fn until<F: Future>(
        &mut self,
        deadline: Instant,
        work: F,
    ) -> Result<F::Output, TimedOut> {
        self.run(|| deadline, work).await
    }

    /// Runs `work` for at most `limit` from now. Work that finishes at its first poll (a read
    /// whose bytes are already there) neither reads the clock nor touches the timer.
    pub(crate) async fn within<F: Future>(
        &mut self,
        limit: Duration,
        work: F,
    ) -> Result<F::Output, TimedOut> {
        self.run(|| Instant::now() + limit, work).await
    }

    async fn run<F: Future>(
        &mut self,
        mut deadline: impl FnMut() -> Instant,
        work: F,
    ) -> Result<F::Output, TimedOut> {
        let mut work = pin!(work);
        // Computed the first time the work is pending.
        let mut at: Option<Instant> = None;
        // One poll per wake: the work first, then (from the first time it is pending) the
        // timer, so a wait polls its work once before the task sleeps.
        poll_fn(|cx| {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let at = *at.get_or_insert_with(&mut deadline);
            let sleep = match &mut self.sleep {
                Some(sleep) => sleep,
                None => self.sleep.insert(Box::pin(sleep_until(at))),
            };
            // Armed for later than this wait may last: bring it forward (rare; the deadlines
            // of one wait site move later).
            if sleep.deadline() > at {
                sleep.as_mut().reset(at);
                self.armed = false;
            }
            if self.armed && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            self.armed = true;
            while poll_timer(sleep.as_mut(), cx).is_ready() {
                if sleep.deadline() >= at {
                    return Poll::Ready(Err(TimedOut));
                }
                // It fired for an earlier wait's deadline: move it to this one.
                sleep.as_mut().reset(at);
            }
            Poll::Pending
        })
        .await
    }
}

/// Polls `sleep` whatever is left of the task's budget (tokio's coop). A poll the budget
/// refuses returns `Pending` without creating the timer or registering the waker; a wait that
/// then skips polls because it believes the timer armed would never wake.
pub(crate) fn poll_timer(sleep: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<()> {
    Pin::new(&mut tokio::task::unconstrained(sleep)).poll(cx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;

    #[tokio::test(start_paused = true)]
    async fn work_that_finishes_first_is_returned() {
        let mut timer = LazyDeadline::default();
        assert_eq!(
            timer.within(Duration::from_secs(1), async { 7 }).await,
            Ok(7)
        );
        // Nothing had to wait, so nothing was armed.
        assert!(timer.sleep.is_none());
        let slow = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            8
        };
        assert_eq!(timer.within(Duration::from_secs(1), slow).await, Ok(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_first_polled_with_the_task_budget_spent_still_times_out() {
        let mut timer = LazyDeadline::default();
        let start = Instant::now();
        let mut wait = pin!(timer.until(start + Duration::from_secs(1), pending::<()>()));
        // The wait's first poll comes when the task has spent its budget (as after relaying a
        // long response): the timer must be armed all the same.
        poll_fn(|cx| {
            while pin!(tokio::task::consume_budget()).poll(cx).is_ready() {}
            assert!(wait.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        let result = tokio::time::timeout(Duration::from_secs(5), wait).await;
        assert_eq!(result, Ok(Err(TimedOut)));
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_times_out_at_its_deadline_not_before() {
        let mut timer = LazyDeadline::default();
        let start = Instant::now();
        let result = timer.within(Duration::from_secs(3), pending::<()>()).await;
        assert_eq!(result, Err(TimedOut));
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_armed_for_an_earlier_deadline_moves_to_the_later_one() {
        let mut timer = LazyDeadline::default();
        let start = Instant::now();
        // The first wait arms the timer for start + 2 s, and ends at start + 1 s.
        let quick = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(
            timer.until(start + Duration::from_secs(2), quick).await,
            Ok(())
        );
        // The second wait's deadline is start + 5 s: the timer still fires at start + 2 s,
        // and must not end the wait then.
        let result = timer
            .until(start + Duration::from_secs(5), pending::<()>())
            .await;
        assert_eq!(result, Err(TimedOut));
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_that_fired_while_nobody_waited_is_rearmed() {
        let mut timer = LazyDeadline::default();
        let start = Instant::now();
        let quick = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(
            timer.until(start + Duration::from_secs(2), quick).await,
            Ok(())
        );
        // Past the armed time without waiting on it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let done_at_4 = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(
            timer.until(start + Duration::from_secs(6), done_at_4).await,
            Ok(())
        );
        assert_eq!(Instant::now() - start, Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_than_the_armed_one_is_kept() {
        let mut timer = LazyDeadline::default();
        let start = Instant::now();
        let quick = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(
            timer.until(start + Duration::from_secs(60), quick).await,
            Ok(())
        );
        let result = timer
            .until(start + Duration::from_secs(3), pending::<()>())
            .await;
        assert_eq!(result, Err(TimedOut));
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }
}
