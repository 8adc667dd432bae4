//! One MQTT connection, MQTT 5 or 3.1.1, plain or TLS, behind one small
//! interface: the agent, the server and the operator commands do not care
//! which protocol version rumqttc speaks underneath.
//!
//! Settings that rumqttc leaves at surprising defaults are set explicitly
//! here: packet size limits (10 KiB by default, in both directions), the
//! number of QoS 1 publishes in flight, and the TLS crypto provider (ring,
//! pure Rust and C-free enough to cross-compile; no process-wide default).
//!
//! QoS 1 publishes whose PUBACK matters (the outbox) get their packet id
//! from the caller, so that a PUBACK names exactly the message it
//! acknowledges, across rumqttc's own retransmissions after a reconnect.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod guard;
#[cfg(feature = "operator")]
mod settle;

#[cfg(feature = "operator")]
pub(crate) use settle::Settle;

use rumqttc::v5;

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::limits::LIMITS;

/// QoS 1 publishes rumqttc keeps in flight at most; caller-chosen packet
/// ids must lie in `1..=INFLIGHT`.
pub(crate) const INFLIGHT: u16 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    V5,
    V311,
}

impl Version {
    pub(crate) fn parse(s: &str) -> std::result::Result<Version, String> {
        match s {
            "5" | "5.0" => Ok(Version::V5),
            "3.1.1" | "3" | "4" => Ok(Version::V311),
            _ => Err(format!("MQTT version {s:?} must be 5 or 3.1.1")),
        }
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub(crate) struct Broker {
    pub(crate) url: String,
    pub(crate) version: Version,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) username: Option<String>,
    pub(crate) password_file: Option<PathBuf>,
}

/// A parsed `mqtt://host:port` or `mqtts://host:port` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
}

pub(crate) fn parse_url(url: &str) -> std::result::Result<Endpoint, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "broker URL {url:?} must start with mqtt:// or mqtts://"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(format!("broker URL {url:?} must be mqtt[s]://HOST[:PORT]"));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(h) = rest.strip_prefix('[') {
        // [::1]:1883
        let (h, p) = h
            .split_once(']')
            .ok_or_else(|| format!("broker URL {url:?}: unclosed ["))?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse()
            .map_err(|_| format!("broker URL {url:?}: bad port {p:?}"))?,
    };
    if host.is_empty() {
        return Err(format!("broker URL {url:?} has no host"));
    }
    Ok(Endpoint { tls, host, port })
}

/// How this client presents itself.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub(crate) client_id: String,
    /// Keep the session (subscriptions, queued QoS 1 messages) across
    /// disconnects: `clean_start = false` with a session expiry (MQTT 5),
    /// `clean_session = false` (3.1.1).
    pub(crate) persistent: bool,
    pub(crate) keep_alive: Duration,
    /// Last will: topic, payload, retained, QoS 1.
    pub(crate) will: Option<(String, Vec<u8>)>,
}

/// Quality of service, as far as beamup uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// What the connection reports.
#[derive(Debug)]
pub(crate) enum Event {
    Connected {
        session_present: bool,
        /// MQTT 5: the broker's Maximum Packet Size, if it sets one.
        max_packet: Option<u32>,
    },
    Message {
        topic: String,
        payload: bytes::Bytes,
        retain: bool,
    },
    PubAck(u16),
    /// The broker acknowledged a subscription (see [`Settle`]).
    SubAck,
    /// A message above `LIMITS.mqtt_packet_bytes` that the connection's
    /// guard (see [`Conn::guarded`]) dropped unread; the broker had its
    /// acknowledgement.
    Dropped {
        topic: String,
        size: u64,
    },
    /// A packet of no interest (pings, our own outgoing packets).
    Other,
}

/// Why a connection attempt or a connection failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ConnError {
    /// The broker refused our credentials (or the lack of them): trying
    /// again with the same ones will not help. Says what was presented and
    /// what to check.
    Auth(String),
    /// Anything else (unreachable, reset, timed out, refused for another
    /// reason): worth trying again.
    Other(String),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Auth(d) | ConnError::Other(d) => f.write_str(d),
        }
    }
}

impl ConnError {
    /// The error a command exits with: [`Error::MqttAuth`] (exit code 31)
    /// for refused credentials, [`Error::Mqtt`] (30) otherwise.
    pub(crate) fn into_error(self, url: &str) -> Error {
        match self {
            ConnError::Auth(detail) => Error::MqttAuth {
                url: url.to_string(),
                detail,
            },
            ConnError::Other(detail) => Error::Mqtt {
                url: url.to_string(),
                detail,
            },
        }
    }
}

/// What we present to the broker and what to check, for an error message
/// that says what to fix (never the password itself).
fn credentials_hint(b: &Broker) -> String {
    let check = "check that the broker's password file has this user with this password (mosquitto_passwd) and lets it connect";
    let cert = b.cert_file.as_ref().map(|c| c.display().to_string());
    match (&b.username, &b.password_file, cert) {
        (Some(u), Some(p), None) => {
            format!("username {u:?}, password from {}; {check}", p.display())
        }
        (Some(u), None, None) => format!("username {u:?}, no password; {check}"),
        (Some(u), p, Some(c)) => format!(
            "username {u:?}, {}, client certificate {c}; {check}, and that it accepts the certificate",
            p.as_ref()
                .map_or("no password".to_string(), |p| format!("password from {}", p.display()))
        ),
        (None, _, Some(c)) => format!(
            "client certificate {c}, no username; check that the broker accepts this certificate, or set username and password_file"
        ),
        (None, _, None) => "we sent none (no username, no client certificate); set username and password_file (agent.toml [mqtt], or --username and --password-file), or a client certificate".to_string(),
    }
}

/// A refusal in CONNACK that is about who we are, named for people.
fn auth_refusal(reason: &str) -> Option<&'static str> {
    match reason {
        "BadUserNamePassword" => Some("bad username or password"),
        "NotAuthorized" => Some("not authorized"),
        "BadAuthenticationMethod" => Some("bad authentication method"),
        "Banned" => Some("banned"),
        _ => None,
    }
}

enum Inner {
    V5 {
        client: v5::AsyncClient,
        el: Box<v5::EventLoop>,
    },
    V3 {
        client: rumqttc::AsyncClient,
        el: Box<rumqttc::EventLoop>,
    },
}

/// A connection, reconnecting on every [`Conn::poll`] after an error.
pub(crate) struct Conn {
    inner: Inner,
    url: String,
    /// What we present, for [`ConnError::Auth`].
    credentials: String,
    /// The guard rumqttc connects through, if any, and what it reports.
    guard: Option<(guard::Guard, Arc<Mutex<guard::Shared>>)>,
    /// SUBSCRIBEs queued since the last CONNACK, for [`Settle`].
    subscriptions: std::sync::atomic::AtomicUsize,
}

fn tls_config(b: &Broker) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Usage(format!("TLS: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    match &b.ca_file {
        Some(ca) => {
            let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect())
                .map_err(|e| Error::Config {
                    path: ca.clone(),
                    detail: format!("ca_file: not PEM certificates ({e})"),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::Config {
                    path: ca.clone(),
                    detail: "ca_file holds no usable CA certificate".into(),
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let builder = builder.with_root_certificates(roots);
    match (&b.cert_file, &b.key_file) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect())
                .map_err(|e| Error::Config {
                    path: cert.clone(),
                    detail: format!("cert_file: not PEM certificates ({e})"),
                })?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| Error::Config {
                path: key.clone(),
                detail: format!("key_file: no PEM private key ({e})"),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Usage(format!("TLS client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(Error::Usage(
            "TLS client authentication needs both cert_file and key_file".into(),
        )),
    }
}

/// TCP_NODELAY: requests are small and latency-bound (rumqttc leaves
/// Nagle's algorithm on); a connect timeout of 10 s.
fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n.set_connection_timeout(10);
    n
}

/// The username and the password from `password_file` (its first line,
/// without trailing white space). A password file that other users can read, or
/// one without a username to go with it, is refused before connecting.
fn password(b: &Broker) -> Result<Option<(String, String)>> {
    use std::os::unix::fs::PermissionsExt;
    let Some(user) = &b.username else {
        if let Some(p) = &b.password_file {
            return Err(Error::Config {
                path: p.clone(),
                detail: "password_file is set but username is not; set the username that goes with this password".into(),
            });
        }
        return Ok(None);
    };
    let pass = match &b.password_file {
        Some(p) => {
            let mode = std::fs::metadata(p).ctx(p, "stat")?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(Error::Config {
                    path: p.clone(),
                    detail: format!(
                        "password file permissions {mode:04o} let other users read it; run `chmod 600 {}`",
                        p.display()
                    ),
                });
            }
            let bytes = fsutil::read_limited(p, LIMITS.password_file_bytes, "password file")?;
            let text = String::from_utf8(bytes).map_err(|_| Error::Config {
                path: p.clone(),
                detail: "the password file is not UTF-8 text".into(),
            })?;
            text.lines()
                .next()
                .unwrap_or_default()
                .trim_end()
                .to_string()
        }
        None => String::new(),
    };
    Ok(Some((user.clone(), pass)))
}

impl Conn {
    /// A direct connection: rumqttc to the broker.
    pub(crate) fn new(b: &Broker, s: &Session) -> Result<Conn> {
        Self::open(b, s, None)
    }

    /// A connection through a guard listening on the Unix socket `socket`
    /// (in a directory only this user can enter): messages above
    /// `LIMITS.mqtt_packet_bytes` are dropped as they stream in and
    /// reported as [`Event::Dropped`], instead of ending the connection on
    /// every delivery (see `guard`). Must be called within a tokio runtime.
    pub(crate) fn guarded(b: &Broker, s: &Session, socket: &Path) -> Result<Conn> {
        Self::open(b, s, Some(socket))
    }

    fn open(b: &Broker, s: &Session, socket: Option<&Path>) -> Result<Conn> {
        let ep = parse_url(&b.url).map_err(Error::Usage)?;
        let rustls_config = if ep.tls {
            Some(Arc::new(tls_config(b)?))
        } else {
            None
        };
        let guarded = match socket {
            Some(path) => {
                let shared = Arc::new(Mutex::new(guard::Shared::default()));
                let up = guard::Upstream {
                    host: ep.host.clone(),
                    port: ep.port,
                    tls: rustls_config.clone(),
                };
                let g = guard::Guard::start(
                    path,
                    up,
                    LIMITS.mqtt_packet_bytes as usize,
                    b.version == Version::V5,
                    shared.clone(),
                )
                .map_err(|e| Error::io(path, "listen on (the MQTT connection's guard)", e))?;
                Some((g, shared))
            }
            None => None,
        };
        // Through the guard, rumqttc speaks plain MQTT over the Unix socket;
        // the guard does TCP and TLS.
        let (host, port, tls) = match socket {
            Some(path) => (path.display().to_string(), 0, None),
            None => (
                ep.host.clone(),
                ep.port,
                rustls_config.map(rumqttc::TlsConfiguration::Rustls),
            ),
        };
        let unix = socket.is_some();
        if let Some(ca) = &b.ca_file
            && !ep.tls
        {
            tracing::warn!(
                "ca_file {} is ignored: the broker URL is not mqtts://",
                ca.display()
            );
        }
        let creds = password(b)?;
        // Room for a reconnect's worth of requests without blocking.
        let cap = 256;
        let inner = match b.version {
            Version::V5 => {
                let mut o = v5::MqttOptions::new(&s.client_id, &host, port);
                o.set_keep_alive(s.keep_alive)
                    .set_clean_start(!s.persistent)
                    .set_max_packet_size(Some(LIMITS.mqtt_packet_bytes))
                    .set_outgoing_inflight_upper_limit(INFLIGHT)
                    // The broker's window towards us. Absent, MQTT 5
                    // allows 65,535 in flight: a reconnect's thousands of
                    // retained messages would sit in the socket ahead of
                    // the broker's PINGRESP and PUBACKs.
                    .set_receive_maximum(Some(INFLIGHT));
                if s.persistent {
                    o.set_session_expiry_interval(Some(7 * 24 * 3600));
                }
                o.set_network_options(network_options());
                if let Some(tls) = tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(tls));
                }
                if unix {
                    o.set_transport(rumqttc::Transport::Unix);
                }
                if let Some((u, p)) = creds {
                    o.set_credentials(u, p);
                }
                if let Some((topic, payload)) = &s.will {
                    o.set_last_will(v5::mqttbytes::v5::LastWill::new(
                        topic,
                        payload.clone(),
                        v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                }
                let (client, el) = v5::AsyncClient::new(o, cap);
                Inner::V5 {
                    client,
                    el: Box::new(el),
                }
            }
            Version::V311 => {
                let mut o = rumqttc::MqttOptions::new(&s.client_id, &host, port);
                o.set_keep_alive(s.keep_alive)
                    .set_clean_session(!s.persistent)
                    .set_max_packet_size(
                        LIMITS.mqtt_packet_bytes as usize,
                        LIMITS.mqtt_packet_bytes as usize,
                    )
                    .set_inflight(INFLIGHT);
                if let Some(tls) = tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(tls));
                }
                if unix {
                    o.set_transport(rumqttc::Transport::Unix);
                }
                if let Some((u, p)) = creds {
                    o.set_credentials(u, p);
                }
                if let Some((topic, payload)) = &s.will {
                    o.set_last_will(rumqttc::LastWill::new(
                        topic,
                        payload.clone(),
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                }
                let (client, mut el) = rumqttc::AsyncClient::new(o, cap);
                el.set_network_options(network_options());
                Inner::V3 {
                    client,
                    el: Box::new(el),
                }
            }
        };
        Ok(Conn {
            inner,
            url: b.url.clone(),
            credentials: credentials_hint(b),
            guard: guarded,
            subscriptions: Default::default(),
        })
    }

    /// A message as the caller sees it: a guard's marker is the report of
    /// a dropped message.
    fn message(&self, topic: String, payload: bytes::Bytes, retain: bool) -> Event {
        if let Some((_, shared)) = &self.guard
            && payload.as_ref() == guard::MARKER
        {
            let mut sh = shared.lock().expect("guard lock");
            let size = match sh.dropped.iter().position(|d| d.topic == topic) {
                Some(i) => sh.dropped.remove(i).map_or(0, |d| d.size),
                None => guard::MARKER.len() as u64,
            };
            return Event::Dropped { topic, size };
        }
        Event::Message {
            topic,
            payload,
            retain,
        }
    }

    /// Why the guard could not reach the broker, if that is what failed.
    fn upstream_error(&self, e: ConnError) -> ConnError {
        match (&e, &self.guard) {
            (ConnError::Other(_), Some((_, shared))) => {
                match shared.lock().expect("guard lock").upstream_error.take() {
                    Some(why) => ConnError::Other(why),
                    None => e,
                }
            }
            _ => e,
        }
    }

    /// The next event. After an error the caller should wait (back off)
    /// before polling again, which reconnects.
    pub(crate) async fn poll(&mut self) -> std::result::Result<Event, ConnError> {
        let ev = self
            .poll_inner()
            .await
            .map_err(|e| self.upstream_error(e))?;
        Ok(match ev {
            Event::Message {
                topic,
                payload,
                retain,
            } => self.message(topic, payload, retain),
            ev @ Event::Connected { .. } => {
                self.subscriptions
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                ev
            }
            ev => ev,
        })
    }

    async fn poll_inner(&mut self) -> std::result::Result<Event, ConnError> {
        let credentials = &self.credentials;
        match &mut self.inner {
            Inner::V5 { el, .. } => {
                use v5::mqttbytes::v5::Packet;
                match el.poll().await.map_err(|e| describe_v5(&e, credentials))? {
                    v5::Event::Incoming(Packet::ConnAck(c)) => Ok(Event::Connected {
                        session_present: c.session_present,
                        max_packet: c.properties.and_then(|p| p.max_packet_size),
                    }),
                    v5::Event::Incoming(Packet::Publish(p)) => Ok(Event::Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        retain: p.retain,
                    }),
                    v5::Event::Incoming(Packet::PubAck(a)) => Ok(Event::PubAck(a.pkid)),
                    v5::Event::Incoming(Packet::SubAck(_)) => Ok(Event::SubAck),
                    v5::Event::Incoming(Packet::Disconnect(d)) => Err(ConnError::Other(format!(
                        "the broker disconnected us: {:?}",
                        d.reason_code
                    ))),
                    _ => Ok(Event::Other),
                }
            }
            Inner::V3 { el, .. } => {
                use rumqttc::Packet;
                match el.poll().await.map_err(|e| describe_v3(&e, credentials))? {
                    rumqttc::Event::Incoming(Packet::ConnAck(c)) => Ok(Event::Connected {
                        session_present: c.session_present,
                        max_packet: None,
                    }),
                    rumqttc::Event::Incoming(Packet::Publish(p)) => Ok(Event::Message {
                        topic: p.topic,
                        payload: p.payload,
                        retain: p.retain,
                    }),
                    rumqttc::Event::Incoming(Packet::PubAck(a)) => Ok(Event::PubAck(a.pkid)),
                    rumqttc::Event::Incoming(Packet::SubAck(_)) => Ok(Event::SubAck),
                    _ => Ok(Event::Other),
                }
            }
        }
    }

    /// Queues a QoS 0 publish, or a QoS 1 publish whose acknowledgement the
    /// caller does not track. Fails when the request queue is full. A
    /// payload given as `bytes::Bytes` is queued without a copy.
    pub(crate) fn publish(
        &self,
        topic: &str,
        qos: Qos,
        retain: bool,
        payload: impl Into<bytes::Bytes>,
    ) -> Result<()> {
        let payload: bytes::Bytes = payload.into();
        let r = match &self.inner {
            Inner::V5 { client, .. } => client
                .try_publish(topic, v5_qos(qos), retain, payload)
                .map_err(|e| e.to_string()),
            Inner::V3 { client, .. } => client
                .try_publish(topic, v3_qos(qos), retain, payload)
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| Error::Mqtt {
            url: self.url.clone(),
            detail: format!("publish to {topic}: {e}"),
        })
    }

    #[cfg(feature = "operator")]
    /// Like [`Conn::publish`], waiting for room in the request queue (the
    /// event loop must be polled by another task meanwhile).
    pub(crate) async fn publish_wait(
        client: &Client,
        topic: &str,
        qos: Qos,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<()> {
        let r = match client {
            Client::V5(c) => c
                .publish(topic, v5_qos(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Client::V3(c) => c
                .publish(topic, v3_qos(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| Error::Mqtt {
            url: "(request queue)".into(),
            detail: format!("publish to {topic}: {e}"),
        })
    }

    /// Queues a QoS 1 publish with the packet id `pkid` (in
    /// `1..=INFLIGHT`, not in flight): its PUBACK comes back as
    /// `Event::PubAck(pkid)`. Goes out ahead of queued requests, and is
    /// dropped by rumqttc if the next connection starts a new session (the
    /// caller sends it again on `Connected { session_present: false }`).
    pub(crate) fn publish_tracked(
        &mut self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        pkid: u16,
    ) {
        debug_assert!((1..=INFLIGHT).contains(&pkid));
        match &mut self.inner {
            Inner::V5 { el, .. } => {
                let mut p = v5::mqttbytes::v5::Publish::new(
                    topic,
                    v5::mqttbytes::QoS::AtLeastOnce,
                    payload,
                    None,
                );
                p.retain = retain;
                p.pkid = pkid;
                el.pending.push_back(v5::Request::Publish(p));
            }
            Inner::V3 { el, .. } => {
                let mut p = rumqttc::Publish::new(topic, rumqttc::QoS::AtLeastOnce, payload);
                p.retain = retain;
                p.pkid = pkid;
                el.pending.push_back(rumqttc::Request::Publish(p));
            }
        }
    }

    /// Call right after the subscriptions whose retained messages are to
    /// be waited for: subscribes to `marker_topic` (the client's own) and
    /// publishes a fresh marker there. See [`Settle`].
    #[cfg(feature = "operator")]
    pub(crate) fn begin_settle(&self, marker_topic: String) -> Result<Settle> {
        let n = nonce(8)?;
        self.subscribe(&marker_topic, Qos::AtLeastOnce)?;
        let settle = Settle::new(
            marker_topic,
            n,
            self.subscriptions
                .load(std::sync::atomic::Ordering::Relaxed),
            std::time::Instant::now(),
        );
        self.send_marker(settle)
    }

    #[cfg(feature = "operator")]
    fn send_marker(&self, settle: Settle) -> Result<Settle> {
        self.publish(
            settle.topic(),
            Qos::AtLeastOnce,
            false,
            settle.nonce().as_bytes().to_vec(),
        )?;
        Ok(settle)
    }

    /// Sends a fresh marker on this connection's marker topic, already
    /// subscribed: `settle` renewed (see [`Settle::renew`]), or a new one
    /// that waits for no SUBACK.
    #[cfg(feature = "operator")]
    pub(crate) fn remark(&self, settle: Option<Settle>, marker_topic: String) -> Result<Settle> {
        let n = nonce(8)?;
        let now = std::time::Instant::now();
        let settle = match settle {
            Some(mut s) => {
                s.renew(n, now);
                s
            }
            None => Settle::new(marker_topic, n, 0, now),
        };
        self.send_marker(settle)
    }

    pub(crate) fn subscribe(&self, filter: &str, qos: Qos) -> Result<()> {
        let r = match &self.inner {
            Inner::V5 { client, .. } => client
                .try_subscribe(filter, v5_qos(qos))
                .map_err(|e| e.to_string()),
            Inner::V3 { client, .. } => client
                .try_subscribe(filter, v3_qos(qos))
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| Error::Mqtt {
            url: self.url.clone(),
            detail: format!("subscribe to {filter}: {e}"),
        })?;
        self.subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    #[cfg(feature = "operator")]
    /// A handle for publishing from another task.
    pub(crate) fn client(&self) -> Client {
        match &self.inner {
            Inner::V5 { client, .. } => Client::V5(client.clone()),
            Inner::V3 { client, .. } => Client::V3(client.clone()),
        }
    }

    /// Sends DISCONNECT (no last will) and lets the event loop write it.
    pub(crate) async fn disconnect(&mut self) {
        let _ = match &self.inner {
            Inner::V5 { client, .. } => client.try_disconnect().map_err(|e| e.to_string()),
            Inner::V3 { client, .. } => client.try_disconnect().map_err(|e| e.to_string()),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.poll().await.is_ok() {}
        })
        .await;
    }

    #[cfg(feature = "operator")]
    /// Ends the persistent session of `client_id` on the broker: a
    /// connection with a clean session takes it over and discards it, and
    /// with it the subscriptions for which the broker would otherwise
    /// queue every matching message until the session expires. Best
    /// effort: the error says why it did not happen.
    pub(crate) async fn end_session(b: &Broker, client_id: &str) -> Result<()> {
        let session = Session {
            client_id: client_id.into(),
            persistent: false,
            keep_alive: Duration::from_secs(30),
            will: None,
        };
        let mut conn = Conn::new(b, &session)?;
        let connected = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match conn.poll().await {
                    Ok(Event::Connected { .. }) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        let result = match connected {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into_error(&b.url)),
            Err(_) => Err(Error::Mqtt {
                url: b.url.clone(),
                detail: "no connection within 5 s".into(),
            }),
        };
        conn.disconnect().await;
        result
    }
}

/// `bytes` fresh random bytes in hex: client ids, markers, request ids.
#[cfg(feature = "operator")]
pub(crate) fn nonce(bytes: usize) -> Result<String> {
    let mut n = vec![0u8; bytes];
    getrandom::fill(&mut n).map_err(|e| Error::Internal {
        detail: format!("no OS randomness: {e}"),
    })?;
    Ok(hex::encode(n))
}

#[cfg(feature = "operator")]
/// A cloneable publishing handle.
#[derive(Clone)]
pub(crate) enum Client {
    V5(v5::AsyncClient),
    V3(rumqttc::AsyncClient),
}

#[cfg(feature = "operator")]
impl Client {
    /// Like [`Conn::publish`], from any task: fails when the request
    /// queue is full.
    pub(crate) fn try_publish(
        &self,
        topic: &str,
        qos: Qos,
        retain: bool,
        payload: bytes::Bytes,
    ) -> std::result::Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_publish(topic, v5_qos(qos), retain, payload)
                .map_err(|e| e.to_string()),
            Client::V3(c) => c
                .try_publish(topic, v3_qos(qos), retain, payload)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT behind what is queued already.
    pub(crate) fn try_disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V3(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

fn v5_qos(q: Qos) -> v5::mqttbytes::QoS {
    match q {
        Qos::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
        Qos::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
    }
}

fn v3_qos(q: Qos) -> rumqttc::QoS {
    match q {
        Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
    }
}

fn refused(code: &str, credentials: &str) -> ConnError {
    match auth_refusal(code) {
        Some(why) => ConnError::Auth(format!("{why} (CONNACK {code}): {credentials}")),
        None => ConnError::Other(format!("the broker refused the connection: {code}")),
    }
}

fn describe_v5(e: &v5::ConnectionError, credentials: &str) -> ConnError {
    match e {
        v5::ConnectionError::ConnectionRefused(code) => refused(&format!("{code:?}"), credentials),
        other => ConnError::Other(other.to_string()),
    }
}

fn describe_v3(e: &rumqttc::ConnectionError, credentials: &str) -> ConnError {
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            refused(&format!("{code:?}"), credentials)
        }
        other => ConnError::Other(other.to_string()),
    }
}

/// Reconnect delays: doubling from `min` to `max`, reset on success.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt, with up to 25% jitter so that a
    /// fleet does not reconnect in lockstep after a broker restart.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let mut b = [0u8; 2];
        let _ = getrandom::fill(&mut b);
        let jitter = u64::from(u16::from_le_bytes(b)) * (d.as_millis() as u64 / 4) / 65535;
        d + Duration::from_millis(jitter)
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            Endpoint {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!(parse_url("mqtts://broker.example").unwrap().port, 8883);
        assert_eq!(parse_url("mqtt://h/").unwrap().port, 1883);
        assert_eq!(parse_url("mqtt://[::1]:9").unwrap().host, "::1");
        for bad in [
            "http://h",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://u@h",
            "mqtt://h/t",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    fn broker(user: Option<&str>, password_file: Option<PathBuf>) -> Broker {
        Broker {
            url: "mqtt://127.0.0.1".into(),
            version: Version::V5,
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: user.map(str::to_string),
            password_file,
        }
    }

    #[test]
    fn password_files_are_private_and_read_to_the_first_line_end() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret pass \r\nignored\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            password(&broker(Some("gw-1"), Some(f.clone()))).unwrap(),
            Some(("gw-1".into(), "s3cret pass".into()))
        );
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = password(&broker(Some("gw-1"), Some(f.clone()))).unwrap_err();
            assert_eq!(e.exit_code(), crate::error::exit::CONFIG);
            let text = e.to_string();
            assert!(text.contains("chmod 600"), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
        let e = password(&broker(None, Some(f))).unwrap_err();
        assert!(e.to_string().contains("username is not"), "{e}");
        assert_eq!(password(&broker(None, None)).unwrap(), None);
    }

    #[test]
    fn refused_credentials_say_what_was_presented_and_never_the_password() {
        let b = broker(Some("gw-1"), Some("/etc/beamup/mqtt-password".into()));
        let e = refused("NotAuthorized", &credentials_hint(&b)).into_error(&b.url);
        assert_eq!(e.exit_code(), crate::error::exit::MQTT_AUTH);
        assert_eq!(
            e.to_string(),
            "MQTT broker mqtt://127.0.0.1 refused our credentials: not authorized (CONNACK NotAuthorized): \
             username \"gw-1\", password from /etc/beamup/mqtt-password; check that the broker's password \
             file has this user with this password (mosquitto_passwd) and lets it connect"
        );
        let anonymous = refused(
            "BadUserNamePassword",
            &credentials_hint(&broker(None, None)),
        );
        assert!(
            anonymous.to_string().contains("we sent none"),
            "{anonymous}"
        );
        let other = refused("ServerUnavailable", "x").into_error("u");
        assert_eq!(other.exit_code(), crate::error::exit::MQTT);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert!((100..=125).contains(&d[0]), "{d:?}");
        assert!((200..=250).contains(&d[1]), "{d:?}");
        assert!(
            (350..=437).contains(&d[2]) && (350..=437).contains(&d[3]),
            "{d:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
