//! The distribution client against real `epmd` and `erl` processes.
//!
//! Every test starts a private `epmd -port P` and its own node registered
//! there, so tests run in parallel and never touch an EPMD or node they did
//! not start. Processes are killed by pid when the guard drops, panics
//! included.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use beamup::node::calls::{self, NodeError, ReleaseStatus};
use beamup::node::dist::{ConnectOptions, Connection, DistError, Term, epmd};
use tokio::time::Instant;

const STARTUP: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(10);

/// A child process we started, SIGKILLed by its pid and reaped on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private epmd plus one node. Dropping it kills both (by pid), the
/// node first.
struct TestNode {
    node: Option<Killed>,
    /// Only held, so it dies with the guard.
    _epmd: Killed,
    epmd_port: u16,
    /// Full node name, `itN_M@localhost`.
    name: String,
    cookie: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_hex() -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

/// Starts `epmd -port P` on a free port; retries if another process took
/// the port between our probe and epmd's bind (epmd then exits).
fn start_epmd() -> (Killed, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = Killed(
            Command::new("epmd")
                .args(["-port", &port.to_string()])
                .env("ERL_EPMD_ADDRESS", "127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn epmd (apt-get install erlang-nox)"),
        );
        let deadline = std::time::Instant::now() + STARTUP;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            if child.0.try_wait().unwrap().is_some() {
                break; // lost the port race; try another
            }
            assert!(
                std::time::Instant::now() < deadline,
                "epmd did not listen on {port} within {STARTUP:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("could not start epmd on a free port");
}

impl TestNode {
    /// Starts epmd and `erl -noshell -name ... -setcookie ...` with
    /// `extra` arguments, and waits until the node is registered.
    async fn start(extra: &[&str]) -> TestNode {
        static N: AtomicU32 = AtomicU32::new(0);
        let (epmd, epmd_port) = start_epmd();
        let alive = format!(
            "it{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let name = format!("{alive}@localhost");
        let cookie = random_hex();
        let node = Killed(
            Command::new("erl")
                .args(["-noshell", "-name", &name, "-setcookie", &cookie])
                .args(["-kernel", "inet_dist_use_interface", "{127,0,0,1}"])
                .args(extra)
                .env("ERL_EPMD_PORT", epmd_port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn erl"),
        );
        let mut t = TestNode {
            node: Some(node),
            _epmd: epmd,
            epmd_port,
            name,
            cookie,
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            match epmd::port_please("localhost", epmd_port, &alive, Duration::from_secs(2)).await {
                Ok(_) => break,
                Err(DistError::NotRegistered { .. }) => {}
                Err(e) => panic!("EPMD lookup while waiting for the node: {e}"),
            }
            if let Some(status) = t.node.as_mut().unwrap().0.try_wait().unwrap() {
                panic!("erl exited before registering: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "node did not register in {STARTUP:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // EPMD registration happens while kernel is still starting; wait
        // for the end of the boot so every test sees a settled node.
        let c = t.connect().await;
        loop {
            let status = c.rpc("init", "get_status", vec![], CALL).await.unwrap();
            if status.as_tuple().is_some_and(|s| s[0].is_atom("started")) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "node did not finish booting: {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn opts(&self) -> ConnectOptions {
        ConnectOptions {
            epmd_port: self.epmd_port,
            ..ConnectOptions::default()
        }
    }

    async fn connect(&self) -> Connection {
        Connection::connect(&self.name, &self.cookie, &self.opts())
            .await
            .expect("connect")
    }

    fn pid(&self) -> u32 {
        self.node.as_ref().unwrap().0.id()
    }

    /// SIGKILL to the node we started, by its pid.
    fn kill_node(&mut self) {
        drop(self.node.take());
    }
}

fn ints(v: &[i64]) -> Term {
    Term::List(v.iter().map(|&i| Term::Int(i)).collect())
}

#[tokio::test]
async fn rpc_round_trip_and_typed_calls() {
    let n = TestNode::start(&[]).await;
    let c = n.connect().await;
    assert_eq!(c.peer_node(), n.name);

    let me = c.rpc("erlang", "node", vec![], CALL).await.unwrap();
    assert_eq!(me, Term::atom(&n.name));
    let rev = c
        .rpc("lists", "reverse", vec![ints(&[1, 2, 3])], CALL)
        .await
        .unwrap();
    assert_eq!(rev, ints(&[3, 2, 1]));
    let text = c
        .rpc(
            "string",
            "uppercase",
            vec![Term::Binary(b"h\xc3\xa9".to_vec())],
            CALL,
        )
        .await
        .unwrap();
    assert_eq!(text, Term::Binary("HÉ".as_bytes().to_vec()));

    // The node's own OS pid: erl execs into the emulator, so it is the
    // child we spawned.
    assert_eq!(calls::os_getpid(&c, CALL).await.unwrap(), n.pid());

    // We are hidden: not in nodes(), but in nodes(hidden).
    let visible = c.rpc("erlang", "nodes", vec![], CALL).await.unwrap();
    assert_eq!(visible, Term::nil());
    let hidden = c
        .rpc("erlang", "nodes", vec![Term::atom("hidden")], CALL)
        .await
        .unwrap();
    assert_eq!(hidden, Term::List(vec![Term::atom(c.local_node())]));

    let apps = calls::which_applications(&c, CALL).await.unwrap();
    assert!(apps.iter().any(|a| a.name == "kernel"), "{apps:?}");
    let (name, vsn) = calls::script_id(&c, CALL).await.unwrap();
    assert!(!name.is_empty() && !vsn.is_empty());

    // A function that raises is a typed badrpc, rendered as Erlang text.
    let e = c
        .rpc("no_such_module", "f", vec![Term::Int(1)], CALL)
        .await
        .unwrap_err();
    match &e {
        DistError::BadRpc { reason, call, .. } => {
            assert_eq!(call, "rpc no_such_module:f/1");
            assert!(
                reason.to_string().starts_with("{'EXIT',{undef,"),
                "{reason}"
            );
        }
        other => panic!("expected badrpc, got {other:?}"),
    }
    assert!(e.to_string().contains("undef"), "{e}");

    // Plain `erl` boots without sasl: release_handler is absent, typed.
    let e = calls::which_releases(&c, CALL).await.unwrap_err();
    assert!(matches!(e, NodeError::ReleaseHandlerNotRunning), "{e:?}");
}

#[tokio::test]
async fn which_releases_on_the_otp_system_release() {
    let n = TestNode::start(&["-boot", "start_sasl", "-sasl", "errlog_type", "error"]).await;
    let c = n.connect().await;
    let rels = calls::which_releases(&c, CALL).await.unwrap();
    assert_eq!(rels.len(), 1, "{rels:?}");
    let r = &rels[0];
    assert_eq!(r.name, "Erlang/OTP");
    assert_eq!(r.status, ReleaseStatus::Permanent);
    assert!(r.libs.iter().any(|l| l.starts_with("kernel-")), "{r:?}");

    // The reply shapes of the error paths, from the real release_handler.
    let e = calls::install_release(&c, "0.0-none", CALL)
        .await
        .unwrap_err();
    assert!(
        matches!(e, NodeError::NoSuchRelease { ref vsn } if vsn == "0.0-none"),
        "{e:?}"
    );
    let e = calls::set_removed(&c, &r.vsn, CALL).await.unwrap_err();
    assert!(
        matches!(e, NodeError::Permanent { ref vsn } if *vsn == r.vsn),
        "{e:?}"
    );
    let e = calls::make_permanent(&c, "0.0-none", CALL)
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::NoSuchRelease { .. }), "{e:?}");
}

#[tokio::test]
async fn wrong_cookie_is_reported_as_cookie_rejected() {
    let n = TestNode::start(&[]).await;
    let e = Connection::connect(&n.name, "not-the-cookie", &n.opts())
        .await
        .err()
        .expect("connect with a wrong cookie must fail");
    assert!(matches!(e, DistError::CookieRejected { .. }), "{e:?}");
    assert!(e.to_string().contains("check the cookie"), "{e}");
}

#[tokio::test]
async fn absent_node_is_not_registered() {
    let n = TestNode::start(&[]).await;
    let e = Connection::connect("nobody@localhost", &n.cookie, &n.opts())
        .await
        .err()
        .expect("must fail");
    assert!(
        matches!(&e, DistError::NotRegistered { name, epmd_port, .. }
            if name == "nobody" && *epmd_port == n.epmd_port),
        "{e:?}"
    );
}

#[tokio::test]
async fn no_epmd_is_unreachable() {
    // A bound socket that never listens: connecting is refused, and no
    // other test can take the port meanwhile.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let opts = ConnectOptions {
        epmd_port: port,
        ..ConnectOptions::default()
    };
    let e = Connection::connect("app@localhost", "c", &opts)
        .await
        .err()
        .expect("must fail");
    assert!(
        matches!(&e, DistError::EpmdUnreachable { port: p, .. } if *p == port),
        "{e:?}"
    );
    assert!(e.to_string().contains(&port.to_string()), "{e}");
}

#[tokio::test]
async fn rpc_timeout_leaves_connection_usable() {
    let n = TestNode::start(&[]).await;
    let c = n.connect().await;
    let e = c
        .rpc(
            "timer",
            "sleep",
            vec![Term::Int(5000)],
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    match &e {
        DistError::Timeout { what, after } => {
            assert!(what.contains("timer:sleep/1"), "{what}");
            assert_eq!(*after, Duration::from_millis(200));
        }
        other => panic!("expected timeout, got {other:?}"),
    }
    let me = c.rpc("erlang", "node", vec![], CALL).await.unwrap();
    assert_eq!(me, Term::atom(&n.name));
    assert!(c.closed_reason().is_none());
}

#[tokio::test]
async fn node_killed_mid_call_is_connection_lost() {
    let mut n = TestNode::start(&[]).await;
    let c = n.connect().await;
    let c2 = c.clone();
    let pending = tokio::spawn(async move {
        c2.rpc(
            "timer",
            "sleep",
            vec![Term::Int(60_000)],
            Duration::from_secs(60),
        )
        .await
    });
    // Wait until the call is running: rex keeps one monitor per call in
    // flight in its state map, next to its `nodes_observer` entry.
    let deadline = Instant::now() + STARTUP;
    loop {
        let state = c
            .rpc("sys", "get_state", vec![Term::atom("rex")], CALL)
            .await
            .unwrap();
        match state {
            Term::Map(m) if m.len() >= 2 => break,
            Term::Map(_) => {}
            other => panic!("unexpected rex state {other}"),
        }
        assert!(Instant::now() < deadline, "the sleep call never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    n.kill_node();
    let e = pending.await.unwrap().unwrap_err();
    assert!(matches!(e, DistError::ConnectionLost { .. }), "{e:?}");
    assert!(e.to_string().contains("timer:sleep/1"), "{e}");
    // Later calls fail at once with the same cause.
    let e = c.rpc("erlang", "node", vec![], CALL).await.unwrap_err();
    assert!(matches!(e, DistError::ConnectionLost { .. }), "{e:?}");
}

#[tokio::test]
async fn idle_connection_survives_the_nodes_net_ticktime() {
    // net_ticktime 4: the node drops a peer silent for ~4 s. Our own ticks
    // are set far apart, so only answering the node's ticks keeps us up.
    let n = TestNode::start(&["-kernel", "net_ticktime", "4"]).await;
    let opts = ConnectOptions {
        tick_interval: Duration::from_secs(3600),
        ..n.opts()
    };
    let c = Connection::connect(&n.name, &n.cookie, &opts)
        .await
        .unwrap();
    let tt = c
        .rpc("net_kernel", "get_net_ticktime", vec![], CALL)
        .await
        .unwrap();
    assert_eq!(tt, Term::Int(4));
    // Idling is the point of this test: three times the tick time.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(c.closed_reason(), None);
    let hidden = c
        .rpc("erlang", "nodes", vec![Term::atom("hidden")], CALL)
        .await
        .unwrap();
    assert_eq!(hidden, Term::List(vec![Term::atom(c.local_node())]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_rpcs_get_their_own_replies() {
    let n = TestNode::start(&[]).await;
    let c = n.connect().await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300i64 {
        let c = c.clone();
        set.spawn(async move {
            // Every third call sleeps so replies come back out of order.
            if i % 3 == 0 {
                let r = c
                    .rpc("timer", "sleep", vec![Term::Int(i % 50)], CALL)
                    .await
                    .unwrap();
                assert_eq!(r, Term::atom("ok"));
            }
            let r = c
                .rpc("lists", "seq", vec![Term::Int(i), Term::Int(i + 2)], CALL)
                .await
                .unwrap();
            (i, r)
        });
    }
    let mut seen = 0;
    while let Some(res) = set.join_next().await {
        let (i, r) = res.unwrap();
        assert_eq!(r, ints(&[i, i + 1, i + 2]), "reply for call {i}");
        seen += 1;
    }
    assert_eq!(seen, 300);
}

#[tokio::test]
async fn oversized_frame_closes_the_connection() {
    let n = TestNode::start(&[]).await;
    let opts = ConnectOptions {
        max_frame_len: 4096,
        ..n.opts()
    };
    let c = Connection::connect(&n.name, &n.cookie, &opts)
        .await
        .unwrap();
    let e = c
        .rpc(
            "lists",
            "duplicate",
            vec![Term::Int(100_000), Term::Int(1)],
            CALL,
        )
        .await
        .unwrap_err();
    match &e {
        DistError::ConnectionLost { reason, .. } => assert!(reason.contains("limit"), "{reason}"),
        other => panic!("expected connection lost, got {other:?}"),
    }
}

#[tokio::test]
async fn reconnecting_repeatedly_works() {
    // Names are reused slot-wise; a quick reconnect may meet the node
    // still holding the previous connection under that name ("alive").
    let n = TestNode::start(&[]).await;
    for _ in 0..5 {
        let c = n.connect().await;
        let me = c.rpc("erlang", "node", vec![], CALL).await.unwrap();
        assert_eq!(me, Term::atom(&n.name));
    }
}
