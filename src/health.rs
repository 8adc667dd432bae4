//! The health gate: a new release is committed only after every configured
//! check has passed *continuously* for the soak window, within the timeout.
//!
//! The decision (has the release been healthy long enough? has time run
//! out?) is [`Gate`], a pure state machine fed with timestamps and results;
//! the checks themselves (HTTP, TCP, a command) are the effects around it.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use serde::Deserialize;

use crate::limits::LIMITS;

/// `[health]` of agent.toml: the checks, the soak window and the timeout.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthConfig {
    /// `http://host:port/path`: healthy when it answers 200.
    pub(crate) http: Option<String>,
    /// `host:port`: healthy when it accepts a connection.
    pub(crate) tcp: Option<String>,
    /// Shell command: healthy when it exits 0. `BEAMUP_VERSION` is set to
    /// the version being checked.
    pub(crate) command: Option<String>,
    /// The HTTP body must name the new version.
    #[serde(default)]
    pub(crate) expect_version: bool,
    /// How long the release has to become healthy and stay healthy for the
    /// soak window.
    #[serde(
        default = "default_health_timeout",
        deserialize_with = "crate::durations::deserialize"
    )]
    pub(crate) timeout: Duration,
    /// How long it must stay healthy, continuously, before commit.
    #[serde(
        default = "default_soak",
        deserialize_with = "crate::durations::deserialize"
    )]
    pub(crate) soak: Duration,
    /// Time between checks.
    #[serde(
        default = "default_interval",
        deserialize_with = "crate::durations::deserialize"
    )]
    pub(crate) interval: Duration,
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_soak() -> Duration {
    Duration::from_secs(5)
}

fn default_interval() -> Duration {
    Duration::from_millis(500)
}

/// Where an `http://host:port/path` check goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpTarget {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) path: String,
}

impl HttpTarget {
    pub(crate) fn parse(url: &str) -> Result<HttpTarget, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?} must start with http:// (health checks are local)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(HttpTarget {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// One HTTP/1.1 GET: the status code and body (bounded).
pub(crate) async fn http_get(t: &HttpTarget, timeout: Duration) -> Result<(u16, String), String> {
    let fetch = async {
        let mut s = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", t.host, t.port))?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nUser-Agent: beamup\r\n\r\n",
            t.path, t.host, t.port
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::new();
        (&mut s)
            .take(LIMITS.health_response_bytes as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_response(&buf)
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))?
}

fn parse_response(buf: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(buf);
    let status_line = text.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", truncate(status_line, 80)))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Whether `body` names `version` as a whole token (so `1.1.0` is not
/// found in `11.1.0` or `1.1.0-rc1`).
pub(crate) fn names_version(body: &str, version: &str) -> bool {
    let boundary = |c: Option<char>| {
        c.is_none_or(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_')))
    };
    body.match_indices(version).any(|(i, _)| {
        boundary(body[..i].chars().next_back())
            && boundary(body[i + version.len()..].chars().next())
    })
}

/// The configured checks, for one version.
pub(crate) struct Checks {
    http: Option<HttpTarget>,
    tcp: Option<String>,
    command: Option<String>,
    expect_version: Option<String>,
    version: String,
    per_check_timeout: Duration,
}

impl Checks {
    pub(crate) fn new(cfg: &HealthConfig, version: &str) -> Checks {
        Checks {
            http: cfg.http.as_deref().and_then(|u| HttpTarget::parse(u).ok()),
            tcp: cfg.tcp.clone(),
            command: cfg.command.clone(),
            expect_version: cfg.expect_version.then(|| version.to_string()),
            version: version.to_string(),
            per_check_timeout: cfg.interval.max(Duration::from_secs(2)),
        }
    }

    /// Runs every configured check once; the first failure, described.
    pub(crate) async fn run_once(&self) -> Result<(), String> {
        if let Some(t) = &self.http {
            let (status, body) = http_get(t, self.per_check_timeout)
                .await
                .map_err(|e| format!("http check: {e}"))?;
            if status != 200 {
                return Err(format!(
                    "http check: status {status}: {}",
                    truncate(body.trim(), 200)
                ));
            }
            if let Some(v) = &self.expect_version
                && !names_version(&body, v)
            {
                return Err(format!(
                    "http check: the body does not name version {v}: {}",
                    truncate(body.trim(), 200)
                ));
            }
        }
        if let Some(addr) = &self.tcp {
            tokio::time::timeout(self.per_check_timeout, TcpStream::connect(addr.as_str()))
                .await
                .map_err(|_| format!("tcp check {addr}: no answer"))?
                .map_err(|e| format!("tcp check {addr}: {e}"))?;
        }
        if let Some(cmd) = &self.command {
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c")
                .arg(cmd)
                .env("BEAMUP_VERSION", &self.version)
                .kill_on_drop(true);
            let out = tokio::time::timeout(
                self.per_check_timeout.max(Duration::from_secs(10)),
                c.output(),
            )
            .await
            .map_err(|_| format!("command check `{cmd}`: did not finish"))?
            .map_err(|e| format!("command check `{cmd}`: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "command check `{cmd}`: {}: {}",
                    out.status,
                    truncate(String::from_utf8_lossy(&out.stderr).trim(), 200)
                ));
            }
        }
        Ok(())
    }
}

/// What the gate concludes after an observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Healthy for the whole soak window.
    Pass,
    /// Keep checking.
    Wait,
    /// Out of time; the last failure, or why the window was not reached.
    Fail(String),
}

/// Pure soak/timeout logic over observations.
#[derive(Debug)]
pub(crate) struct Gate {
    start: Instant,
    timeout: Duration,
    soak: Duration,
    healthy_since: Option<Instant>,
    last_failure: Option<String>,
    checks: u32,
}

impl Gate {
    pub(crate) fn new(start: Instant, timeout: Duration, soak: Duration) -> Gate {
        Gate {
            start,
            timeout,
            soak,
            healthy_since: None,
            last_failure: None,
            checks: 0,
        }
    }

    pub(crate) fn observe(&mut self, now: Instant, result: Result<(), String>) -> Verdict {
        self.checks += 1;
        match result {
            Ok(()) => {
                let since = *self.healthy_since.get_or_insert(now);
                if now.duration_since(since) >= self.soak {
                    return Verdict::Pass;
                }
            }
            Err(e) => {
                self.healthy_since = None;
                self.last_failure = Some(e);
            }
        }
        if now.duration_since(self.start) >= self.timeout {
            return Verdict::Fail(match (&self.last_failure, self.healthy_since) {
                (Some(e), None) => format!(
                    "unhealthy after {}: {e}",
                    humantime::format_duration(self.timeout)
                ),
                (Some(e), Some(_)) => format!(
                    "did not stay healthy for {} within {} (last failure: {e})",
                    humantime::format_duration(self.soak),
                    humantime::format_duration(self.timeout)
                ),
                (None, _) => format!(
                    "not healthy for {} within {}",
                    humantime::format_duration(self.soak),
                    humantime::format_duration(self.timeout)
                ),
            });
        }
        Verdict::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_targets() {
        let t = HttpTarget::parse("http://127.0.0.1:8081/health").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8081, "/health")
        );
        assert_eq!(HttpTarget::parse("http://localhost").unwrap().path, "/");
        assert!(HttpTarget::parse("https://x/").is_err());
        assert!(HttpTarget::parse("http://x:99999/").is_err());
    }

    #[test]
    fn version_must_be_a_whole_token() {
        assert!(names_version(r#"{"version":"1.1.0"}"#, "1.1.0"));
        assert!(names_version("ok 1.1.0\n", "1.1.0"));
        assert!(!names_version(r#"{"version":"11.1.0"}"#, "1.1.0"));
        assert!(!names_version(r#"{"version":"1.1.0-rc1"}"#, "1.1.0"));
        assert!(!names_version(r#"{"version":"1.1.00"}"#, "1.1.0"));
    }

    #[test]
    fn response_parsing() {
        let (s, b) =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\nfailing").unwrap();
        assert_eq!((s, b.as_str()), (503, "failing"));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn gate_needs_continuous_health_for_the_soak() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut g = Gate::new(t0, Duration::from_secs(10), Duration::from_secs(3));
        assert_eq!(g.observe(s(0), Ok(())), Verdict::Wait);
        assert_eq!(g.observe(s(2), Ok(())), Verdict::Wait);
        // A failure restarts the soak window.
        assert_eq!(g.observe(s(3), Err("503".into())), Verdict::Wait);
        assert_eq!(g.observe(s(4), Ok(())), Verdict::Wait);
        assert_eq!(g.observe(s(6), Ok(())), Verdict::Wait);
        assert_eq!(g.observe(s(7), Ok(())), Verdict::Pass);
    }

    #[test]
    fn gate_fails_with_the_last_reason() {
        let t0 = Instant::now();
        let mut g = Gate::new(t0, Duration::from_secs(2), Duration::from_secs(1));
        g.observe(t0, Err("status 503".into()));
        match g.observe(t0 + Duration::from_secs(2), Err("status 503".into())) {
            Verdict::Fail(why) => assert!(why.contains("unhealthy after 2s: status 503"), "{why}"),
            v => panic!("{v:?}"),
        }
        // Flapping: healthy now, but the window never completed in time.
        let mut g = Gate::new(t0, Duration::from_secs(2), Duration::from_secs(5));
        g.observe(t0, Err("x".into()));
        match g.observe(t0 + Duration::from_secs(2), Ok(())) {
            Verdict::Fail(why) => assert!(why.contains("did not stay healthy for 5s"), "{why}"),
            v => panic!("{v:?}"),
        }
    }
}
