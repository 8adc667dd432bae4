//! A private mosquitto on a free loopback port, a subscriber that records
//! what it sees, and beamup daemons (agent, serve) as child processes.
//! Everything started here is stopped by its PID on drop, also when the
//! test panics.

use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::otp::free_port;

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// TLS material for a broker listener that requires client certificates.
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// A mosquitto broker of our own.
pub struct Broker {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

/// mosquitto's persistence lines of docs/mosquitto/mosquitto.conf.
pub const PERSISTENCE: &str = "persistence true\nautosave_on_changes true\nautosave_interval 100\n";

impl Broker {
    pub fn start() -> Broker {
        Self::start_with("")
    }

    /// Persistence as docs/mosquitto/mosquitto.conf sets it: saved every
    /// 100 changes and on SIGTERM ([`Broker::stop`]); a crash
    /// ([`Broker::kill`]) loses what changed since the last save.
    pub fn persistent() -> Broker {
        Self::start_with(PERSISTENCE)
    }

    /// Persistence saved after every change: every acknowledged message
    /// survives even a crash.
    pub fn durable() -> Broker {
        Self::start_with("persistence true\nautosave_on_changes true\nautosave_interval 1\n")
    }

    pub fn tls(tls: &Tls) -> Broker {
        Self::start_with(&format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
            tls.ca.display(),
            tls.server_cert.display(),
            tls.server_key.display()
        ))
    }

    /// Anonymous clients refused; users and passwords from `password_file`
    /// (see [`password_file`]).
    pub fn with_passwords(password_file: &Path) -> Broker {
        Self::start_with(&format!("password_file {}\n", password_file.display()))
    }

    /// With extra configuration lines.
    pub fn start_with(extra: &str) -> Broker {
        // A save rewrites the broker's whole database: on disk, beside
        // parallel builds, those writes would set the pace of tests that
        // save often. A kill -9 keeps the files all the same.
        let mut dir = super::memory_tempdir("beamup-mosquitto-");
        for _ in 0..5 {
            let port = free_port();
            let anonymous =
                if extra.contains("require_certificate") || extra.contains("password_file") {
                    "false"
                } else {
                    "true"
                };
            let conf = format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous {anonymous}\npersistence_location {}/\nlog_dest file {}/mosquitto.log\nlog_type all\n{extra}",
                dir.path().display(),
                dir.path().display()
            );
            fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
            let mut b = Broker {
                dir,
                port,
                child: None,
            };
            if b.spawn() {
                return b;
            }
            dir = b.take_dir();
        }
        panic!("could not start mosquitto");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill();
        let placeholder = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, placeholder)
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning mosquitto (tests/setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && c.try_wait().unwrap().is_some()
            {
                self.child = None;
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        false
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// SIGTERM: mosquitto saves its persistence database and exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same configuration.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "mosquitto did not restart");
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One message as a subscriber saw it.
#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// Sent again by the broker (a QoS 1 message it had not seen
    /// acknowledged, e.g. before it was restarted): the same message.
    pub dup: bool,
}

impl Msg {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// A subscriber in a thread, recording every message.
pub struct Sub {
    msgs: Arc<Mutex<Vec<Msg>>>,
    stop: Arc<AtomicBool>,
    client: rumqttc::Client,
    thread: Option<thread::JoinHandle<()>>,
}

/// Whether the broker holds a persistent session for `client_id` (asked
/// by connecting under it without a clean session: the CONNACK says).
pub fn session_present(broker: &Broker, client_id: &str) -> bool {
    let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", broker.port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(false);
    let (client, mut conn) = rumqttc::Client::new(o, 8);
    let deadline = Instant::now() + Duration::from_secs(10);
    let present = loop {
        assert!(Instant::now() < deadline, "no CONNACK for {client_id}");
        match conn.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)))) => {
                break c.session_present;
            }
            Ok(Err(e)) => panic!("connecting as {client_id}: {e}"),
            _ => {}
        }
    };
    let _ = client.disconnect();
    present
}

impl Sub {
    pub fn new(broker: &Broker, filters: &[&str]) -> Sub {
        Self::with_session(broker, filters, None)
    }

    /// With a persistent session under `client_id`: QoS 1 messages
    /// published while it is away (broker restart) are delivered later.
    pub fn with_session(broker: &Broker, filters: &[&str], client_id: Option<&str>) -> Sub {
        Self::connect(broker, filters, client_id, None)
    }

    /// Logged in with a username and password.
    pub fn login(broker: &Broker, filters: &[&str], user: &str, password: &str) -> Sub {
        Self::connect(broker, filters, None, Some((user, password)))
    }

    fn connect(
        broker: &Broker,
        filters: &[&str],
        client_id: Option<&str>,
        login: Option<(&str, &str)>,
    ) -> Sub {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = client_id.map_or_else(
            || {
                format!(
                    "test-sub-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                )
            },
            str::to_string,
        );
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", broker.port);
        o.set_max_packet_size(32 << 20, 32 << 20)
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(client_id.is_none());
        if let Some((user, password)) = login {
            o.set_credentials(user, password);
        }
        let (client, mut conn) = rumqttc::Client::new(o, 64);
        for f in filters {
            client.subscribe(*f, rumqttc::QoS::AtLeastOnce).unwrap();
        }
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let subacks = Arc::new(Mutex::new(0usize));
        let (m, s, acks) = (msgs.clone(), stop.clone(), subacks.clone());
        let thread = thread::spawn(move || {
            for ev in conn.iter() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        m.lock().unwrap().push(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            dup: p.dup,
                        })
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        *acks.lock().unwrap() += 1
                    }
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while *subacks.lock().unwrap() < filters.len() {
            assert!(Instant::now() < deadline, "subscriptions not acknowledged");
            thread::sleep(Duration::from_millis(10));
        }
        Sub {
            msgs,
            stop,
            client,
            thread: Some(thread),
        }
    }

    /// Publishes with QoS 1 (waits only for room in the request queue).
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
            .unwrap();
    }

    /// Publishes with QoS 0, as servers send data replies.
    pub fn publish_at_most_once(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
            .unwrap();
    }

    pub fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// Waits until a message satisfies `f`; returns it.
    #[track_caller]
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Msg) -> bool) -> Msg {
        let deadline = Instant::now() + timeout;
        loop {
            // A snapshot: `f` may look at the messages itself.
            let seen = self.messages();
            if let Some(m) = seen.into_iter().find(|m| f(m)) {
                return m;
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = self
                    .messages()
                    .iter()
                    .map(|m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload)))
                    .collect();
                panic!("timed out waiting for {what}; seen:\n{}", seen.join("\n"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A beamup daemon (agent or serve) started by a test.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Runs `beamup ARGS` in `dir` with `env`, stderr to `dir/LOGNAME`.
    pub fn start(dir: &Path, logname: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = dir.join(logname);
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(crate::support::cli::bin());
        cmd.args(args)
            .current_dir(dir)
            .env("RUST_LOG", "beamup=debug,info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: Some(cmd.spawn().unwrap()),
            log,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How often the process has gone to sleep and been woken since it
    /// started (voluntary context switches, all threads).
    pub fn wakeups(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let mut total = 0;
        for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let status =
                fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        total
    }

    #[track_caller]
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged within {timeout:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the daemon to exit by itself; returns its exit code.
    /// Kills it and fails if it is still running after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut().expect("running");
            if let Some(status) = c.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("still running after {timeout:?}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs (`None` once it exited).
    pub fn running_pid(&mut self) -> Option<u32> {
        let c = self.child.as_mut()?;
        match c.try_wait().unwrap() {
            None => Some(c.id()),
            Some(_) => None,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub fn term(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("did not stop within {timeout:?} after SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A mosquitto password file with these users, made with
/// `mosquitto_passwd` (hashed, as the broker expects).
pub fn password_file(path: &Path, users: &[(&str, &str)]) {
    for (i, (user, password)) in users.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd
            .arg("-b")
            .arg(path)
            .args([user, password])
            .output()
            .expect("mosquitto_passwd (tests/setup installs mosquitto)");
        assert!(
            out.status.success(),
            "mosquitto_passwd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate for
/// `client_cn`, made with the openssl command-line tool.
pub fn make_certs(dir: &Path, client_cn: &str) -> (Tls, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (tests/setup installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=beamup test CA",
    ]);
    run(&a);
    // X.509 v3 (extensions) for both: webpki refuses v1 certificates.
    fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn, ext) in [
        ("server", "localhost", "server.ext"),
        ("client", client_cn, "client.ext"),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        run(&a);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            ext,
        ]);
    }
    (
        Tls {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        },
        dir.join("client.pem"),
        dir.join("client.key"),
    )
}
