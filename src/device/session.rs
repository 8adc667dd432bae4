//! The agent's MQTT session: one connection to the broker (through the
//! guard when it can be set up), when to reconnect after losing it, the
//! packet ids of the QoS 1 publishes waiting for their PUBACK, and what the
//! broker allows (its packet size). It knows nothing of offers or reports:
//! callers say what a tracked publish was for, and get that back with its
//! PUBACK.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::transport::mqtt::{self, Backoff, Broker, Conn, ConnError, Event, Qos};

/// Tracked QoS 1 publishes in flight (below mosquitto's default receive
/// maximum of 20).
const TRACKED_MAX: usize = 10;
/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// What a tracked publish carried, handed back with its PUBACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tracked {
    /// The outbox entry with this id: removed once acknowledged.
    Outbox(u64),
    /// The retained state or the online flag: nothing to do on the PUBACK.
    Status,
}

pub(crate) struct MqttSession {
    conn: Conn,
    /// The broker's URL, for log lines and errors.
    url: String,
    connected: bool,
    backoff: Backoff,
    /// When the current connection was made.
    connected_at: Option<Instant>,
    /// While set, the connection is not polled: the next attempt waits.
    reconnect_at: Option<Instant>,
    /// The broker's maximum packet size (MQTT 5 CONNACK), if it named one.
    max_packet: Option<u32>,
    tracked: HashMap<u16, Tracked>,
    /// The broker refused our credentials (cleared by a connection that
    /// succeeds).
    refused: Option<Error>,
}

impl MqttSession {
    /// Connects through the guard at `socket` (so that an oversize message
    /// is dropped instead of ending the connection on every delivery, see
    /// `mqtt::guard`), or directly when the guard cannot be set up.
    pub(crate) fn open(
        broker: &Broker,
        session: &mqtt::Session,
        socket: &Path,
    ) -> Result<MqttSession> {
        let conn = match Conn::guarded(broker, session, socket) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "{e}; connecting directly (a message above the packet limit will then end the connection)"
                );
                Conn::new(broker, session)?
            }
        };
        Ok(Self::with_conn(conn, broker))
    }

    /// Connects directly, without a guard: for many sessions in one
    /// process (the fleet simulator), where a guard per session would
    /// double the sockets and tasks.
    #[cfg(feature = "operator")]
    pub(crate) fn direct(broker: &Broker, session: &mqtt::Session) -> Result<MqttSession> {
        Ok(Self::with_conn(Conn::new(broker, session)?, broker))
    }

    fn with_conn(conn: Conn, broker: &Broker) -> MqttSession {
        MqttSession {
            conn,
            url: broker.url.clone(),
            connected: false,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(5)),
            connected_at: None,
            reconnect_at: None,
            max_packet: None,
            tracked: HashMap::new(),
            refused: None,
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    pub(crate) fn max_packet(&self) -> Option<u32> {
        self.max_packet
    }

    /// When the next connection attempt may start; `None` while the
    /// connection is to be polled.
    pub(crate) fn reconnect_at(&self) -> Option<Instant> {
        self.reconnect_at
    }

    /// The wait before the next attempt is over: poll again.
    pub(crate) fn reconnect_now(&mut self) {
        self.reconnect_at = None;
    }

    /// The next event of the connection (it reconnects when polled after a
    /// loss).
    pub(crate) async fn poll(&mut self) -> std::result::Result<Event, ConnError> {
        self.conn.poll().await
    }

    /// A CONNACK arrived. Without a session on the broker, nothing tracked
    /// before will be acknowledged.
    pub(crate) fn on_connected(&mut self, session_present: bool, max_packet: Option<u32>) {
        tracing::info!(
            "connected to {} (session {})",
            self.url,
            if session_present { "resumed" } else { "new" }
        );
        self.connected = true;
        self.connected_at = Some(Instant::now());
        self.refused = None;
        self.max_packet = max_packet;
        if !session_present {
            self.tracked.clear();
        }
    }

    /// The connection is lost (or could not be made): wait before the next
    /// attempt.
    pub(crate) fn on_disconnect(&mut self, why: ConnError) {
        // The backoff starts over only after a connection that lasted: one
        // the broker drops right after CONNACK again and again keeps
        // growing the delay instead of looping at the shortest one.
        if self
            .connected_at
            .take()
            .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
        {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay();
        if let ConnError::Auth(_) = &why {
            tracing::warn!("the broker refused our credentials; stopping once no install runs");
            self.refused = Some(why.clone().into_error(&self.url));
        } else if self.connected {
            tracing::warn!("lost the broker connection ({why}); reconnecting");
        } else {
            tracing::info!("cannot reach the broker ({why}); retrying in {delay:?}");
        }
        self.connected = false;
        self.reconnect_at = Some(Instant::now() + delay);
    }

    /// The broker refused our credentials, and no connection succeeded
    /// since.
    pub(crate) fn refused(&self) -> bool {
        self.refused.is_some()
    }

    pub(crate) fn take_refused(&mut self) -> Option<Error> {
        self.refused.take()
    }

    pub(crate) fn subscribe(&self, filters: &[String]) {
        for f in filters {
            if let Err(e) = self.conn.subscribe(f, Qos::AtLeastOnce) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Is there a packet id for one more tracked publish?
    pub(crate) fn has_room(&self) -> bool {
        self.free_pkid().is_some()
    }

    /// Publishes at QoS 1 under a free packet id and tracks it until its
    /// PUBACK. Without a free id nothing is built or sent, and `false` is
    /// returned: the caller tries again later.
    pub(crate) fn publish_tracked(
        &mut self,
        topic: &str,
        retain: bool,
        what: Tracked,
        payload: impl FnOnce() -> Vec<u8>,
    ) -> bool {
        let Some(pkid) = self.free_pkid() else {
            return false;
        };
        self.conn.publish_tracked(topic, retain, payload(), pkid);
        self.tracked.insert(pkid, what);
        true
    }

    /// Publishes at QoS 0; a failure is only logged (what was lost is asked
    /// again).
    pub(crate) fn publish_once(&self, topic: &str, payload: Vec<u8>) {
        if let Err(e) = self.conn.publish(topic, Qos::AtMostOnce, false, payload) {
            tracing::debug!("{e}");
        }
    }

    /// The PUBACK of `pkid`: what that publish was for, if it was ours.
    pub(crate) fn acked(&mut self, pkid: u16) -> Option<Tracked> {
        self.tracked.remove(&pkid)
    }

    /// Every tracked publish is acknowledged.
    pub(crate) fn all_acked(&self) -> bool {
        self.tracked.is_empty()
    }

    pub(crate) async fn disconnect(&mut self) {
        self.conn.disconnect().await;
    }

    fn free_pkid(&self) -> Option<u16> {
        if self.tracked.len() >= TRACKED_MAX {
            return None;
        }
        (1..=mqtt::INFLIGHT).find(|p| !self.tracked.contains_key(p))
    }
}
