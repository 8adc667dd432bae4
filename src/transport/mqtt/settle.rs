//! When the retained messages a fresh subscription brings are all in.
//!
//! MQTT does not say when a SUBSCRIBE's retained messages are done. Every
//! reader of the fleet's retained state (fleet status, a campaign's start,
//! its controller after each reconnect) must not decide on half of it, and
//! should not wait long either: a fixed quiet time is paid by every
//! command, and is too short on a slow link all the same.
//!
//! A marker shortens the wait: right after its subscriptions the client
//! publishes a nonce to a topic of its own that it subscribes to as well
//! (`PREFIX/FLEET/sync/CLIENT`). A broker that queues a subscription's
//! retained messages while it handles the SUBSCRIBE (mosquitto does)
//! delivers them before the marker, which it handles after them. Brokers
//! that send retained messages on their own time (a cluster's retainer)
//! may let the marker overtake some, so the marker does not settle alone:
//! retained messages must also have paused for [`AFTER_MARKER`]. Without
//! the marker (an ACL that withholds the topic, a marker lost with a
//! connection), a pause of [`QUIET`] settles, as before there was one.
//!
//! No clock runs before the broker acknowledged every subscription of the
//! connection: the SUBSCRIBEs queue behind whatever the client still had
//! to send (a persistent session resends its unacknowledged publishes
//! first, which took seconds after a broker restart under load), and a
//! quiet pause before the broker even saw them means nothing.
//!
//! Pure: facts and the time in, a verdict out.

use std::time::{Duration, Instant};

/// Retained messages that paused this long, with the marker seen, are in.
pub(crate) const AFTER_MARKER: Duration = Duration::from_millis(100);
/// Without the marker, a pause this long settles.
pub(crate) const QUIET: Duration = Duration::from_millis(700);

#[derive(Debug)]
pub(crate) struct Settle {
    topic: String,
    nonce: String,
    last_retained: Instant,
    marker_seen: bool,
    quiet: Duration,
    /// SUBACKs still to come before any pause counts.
    subacks_due: usize,
}

impl Settle {
    /// `topic` is the client's own marker topic, `nonce` this attempt's
    /// payload (a marker of an earlier connection, queued for a persistent
    /// session, must not count), `subscriptions` the SUBSCRIBEs of this
    /// connection so far, the marker's own included.
    pub(crate) fn new(topic: String, nonce: String, subscriptions: usize, now: Instant) -> Settle {
        Settle {
            topic,
            nonce,
            last_retained: now,
            marker_seen: false,
            quiet: QUIET,
            subacks_due: subscriptions,
        }
    }

    /// Takes in a SUBACK of this connection. Once all have come, retained
    /// messages are on their way and pauses count from now.
    pub(crate) fn observe_suback(&mut self, now: Instant) {
        if self.subacks_due > 0 {
            self.subacks_due -= 1;
            if self.subacks_due == 0 {
                self.last_retained = now;
            }
        }
    }

    /// A fresh marker for the same subscriptions (no new SUBSCRIBE, so no
    /// retained messages to wait for): once it is back, every message the
    /// broker took before it was sent has reached this reader. For a
    /// reader whose client publishes through another connection that just
    /// reconnected: what the broker accepted from the old one shows up
    /// before the new marker. SUBACKs still due stay due.
    pub(crate) fn renew(&mut self, nonce: String, now: Instant) {
        self.nonce = nonce;
        self.marker_seen = false;
        if self.subscribed() {
            self.last_retained = now;
        }
    }

    /// Whether the broker acknowledged every subscription.
    pub(crate) fn subscribed(&self) -> bool {
        self.subacks_due == 0
    }

    /// The pause that settles without the marker (default [`QUIET`]).
    pub(crate) fn with_quiet(mut self, quiet: Duration) -> Settle {
        self.quiet = quiet.max(AFTER_MARKER);
        self
    }

    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    pub(crate) fn nonce(&self) -> &str {
        &self.nonce
    }

    /// Takes in one message. Returns whether it was a marker (of this
    /// attempt or an old one), which the caller ignores.
    pub(crate) fn observe(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
        now: Instant,
    ) -> bool {
        if topic == self.topic {
            if payload == self.nonce.as_bytes() {
                self.marker_seen = true;
            }
            return true;
        }
        // Live traffic of a busy fleet never pauses; only what the broker
        // retained is part of what the subscription brings.
        if retain {
            self.last_retained = now;
        }
        false
    }

    /// When it will be settled if nothing else arrives: never before the
    /// subscriptions were acknowledged (callers bound the whole wait).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        if !self.subscribed() {
            return None;
        }
        let wait = if self.marker_seen {
            AFTER_MARKER
        } else {
            self.quiet
        };
        Some(self.last_retained + wait)
    }

    pub(crate) fn settled(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "beamup/acme/sync/c1";

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A reader whose one subscription the broker acknowledged at `t0`.
    fn acked(nonce: &str, t0: Instant) -> Settle {
        let mut s = Settle::new(T.into(), nonce.into(), 1, t0);
        s.observe_suback(t0);
        s
    }

    #[test]
    fn nothing_settles_before_every_subscription_is_acknowledged() {
        // Three SUBSCRIBEs (two filters and the marker's) queued behind
        // seconds of resent publishes: the quiet before them is no answer.
        let t0 = Instant::now();
        let mut s = Settle::new(T.into(), "n1".into(), 3, t0);
        assert_eq!(s.deadline(), None);
        assert!(!s.settled(t0 + ms(5_000)));
        s.observe_suback(t0 + ms(2_000));
        s.observe_suback(t0 + ms(2_001));
        assert!(!s.subscribed());
        assert!(!s.settled(t0 + ms(5_000)));
        s.observe_suback(t0 + ms(5_000));
        assert!(s.subscribed());
        // The quiet counts from the last acknowledgement.
        assert!(!s.settled(t0 + ms(5_000) + QUIET - ms(1)));
        assert!(s.settled(t0 + ms(5_000) + QUIET));
        // A SUBACK beyond the count (a SUBSCRIBE resent from an earlier
        // connection) changes nothing.
        s.observe_suback(t0 + ms(9_000));
        assert!(s.settled(t0 + ms(5_000) + QUIET));
    }

    #[test]
    fn the_marker_settles_once_retained_messages_paused_briefly() {
        let t0 = Instant::now();
        let mut s = acked("n1", t0);
        assert!(!s.observe("beamup/acme/device/a/state", b"{}", true, t0 + ms(5)));
        assert!(s.observe(T, b"n1", false, t0 + ms(10)));
        assert!(!s.settled(t0 + ms(50)));
        assert!(s.settled(t0 + ms(105)));
    }

    #[test]
    fn retained_messages_after_the_marker_keep_it_unsettled() {
        // A broker that lets the marker overtake its retainer.
        let t0 = Instant::now();
        let mut s = acked("n1", t0);
        s.observe(T, b"n1", false, t0 + ms(1));
        for i in 1..20 {
            s.observe("beamup/acme/device/a/state", b"{}", true, t0 + ms(50 * i));
            assert!(!s.settled(t0 + ms(50 * i + 60)));
        }
        assert!(s.settled(t0 + ms(50 * 19 + 100)));
    }

    #[test]
    fn without_the_marker_only_the_long_quiet_settles() {
        let t0 = Instant::now();
        let s = acked("n1", t0);
        assert!(!s.settled(t0 + ms(300)));
        assert!(s.settled(t0 + QUIET));
    }

    #[test]
    fn a_renewed_marker_settles_only_when_it_is_back() {
        let t0 = Instant::now();
        let mut s = acked("n1", t0);
        s.observe(T, b"n1", false, t0 + ms(1));
        assert!(s.settled(t0 + ms(101)));
        s.renew("n2".into(), t0 + ms(200));
        assert!(!s.settled(t0 + ms(400)));
        // The old marker, late, does not count for the new one.
        s.observe(T, b"n1", false, t0 + ms(450));
        assert!(!s.settled(t0 + ms(500)));
        s.observe(T, b"n2", false, t0 + ms(600));
        assert!(s.settled(t0 + ms(600)));
        // Renewed before the SUBACKs came, it still waits for them.
        let mut s = Settle::new(T.into(), "n1".into(), 2, t0);
        s.renew("n2".into(), t0 + ms(10));
        s.observe(T, b"n2", false, t0 + ms(20));
        assert!(!s.settled(t0 + ms(5_000)));
        s.observe_suback(t0 + ms(30));
        s.observe_suback(t0 + ms(40));
        assert!(s.settled(t0 + ms(140)));
    }

    #[test]
    fn an_old_marker_and_live_traffic_do_not_settle() {
        let t0 = Instant::now();
        let mut s = acked("n2", t0);
        // An earlier connection's marker, queued for a persistent session.
        assert!(s.observe(T, b"n1", false, t0 + ms(1)));
        assert!(!s.settled(t0 + ms(200)));
        // Live (not retained) messages do not hold it back either.
        s.observe("beamup/acme/device/a/events", b"{}", false, t0 + ms(650));
        assert!(s.settled(t0 + QUIET));
    }
}
