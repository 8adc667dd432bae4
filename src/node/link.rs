//! The managed node as the install engine sees it: a (re)connecting
//! distribution link, the facts the engine decides on, and the
//! start/stop/wait effects around restarts.
//!
//! A node may vanish at any moment (a `code_change` crash makes it restart
//! itself; a cold upgrade stops it on purpose), so every call goes through
//! [`NodeLink::conn`], which reconnects when the last connection closed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::node::calls::{self, NodeError, Release, ReleaseStatus};
use crate::node::dist::{ConnectOptions, Connection, DistError, Term};

/// What the running node told us about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Running {
    /// The release version release_handler has as permanent.
    pub(crate) permanent: String,
    /// The version the node is executing (`current`, else the permanent one).
    pub(crate) current: String,
    pub(crate) erts: String,
}

/// How to reach, start and stop the node (from `[node]` and `[release]`
/// of agent.toml, the cookie already read).
#[derive(Clone, Debug)]
pub(crate) struct LinkSettings {
    /// `name@host`.
    pub(crate) name: String,
    pub(crate) cookie: String,
    pub(crate) epmd_port: u16,
    pub(crate) call_timeout: Duration,
    pub(crate) start_timeout: Duration,
    /// Shell commands (`sh -c`, in `root`).
    pub(crate) start: String,
    pub(crate) stop: String,
    /// The release root.
    pub(crate) root: PathBuf,
}

pub(crate) struct NodeLink {
    name: String,
    cookie: String,
    opts: ConnectOptions,
    pub(crate) call_timeout: Duration,
    pub(crate) start_timeout: Duration,
    start_cmd: String,
    stop_cmd: String,
    root: PathBuf,
    conn: Option<Connection>,
}

/// Polling period while waiting for a node to come up or go down.
const POLL: Duration = Duration::from_millis(100);

impl NodeLink {
    pub(crate) fn new(s: LinkSettings) -> NodeLink {
        NodeLink {
            opts: ConnectOptions {
                epmd_port: s.epmd_port,
                connect_timeout: Duration::from_secs(5).min(s.call_timeout),
                ..ConnectOptions::default()
            },
            name: s.name,
            cookie: s.cookie,
            call_timeout: s.call_timeout,
            start_timeout: s.start_timeout,
            start_cmd: s.start,
            stop_cmd: s.stop,
            root: s.root,
            conn: None,
        }
    }

    /// A live connection, reconnecting if the previous one closed.
    pub(crate) async fn conn(&mut self) -> std::result::Result<&Connection, DistError> {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.closed_reason().is_some())
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            self.conn = Some(Connection::connect(&self.name, &self.cookie, &self.opts).await?);
        }
        Ok(self.conn.as_ref().expect("just set"))
    }

    /// Forgets the connection (after the node restarted).
    pub(crate) fn reset(&mut self) {
        self.conn = None;
    }

    pub(crate) fn node_error(&self, doing: &str, e: impl Into<NodeError>) -> Error {
        Error::Node {
            node: self.name.clone(),
            doing: doing.to_string(),
            detail: e.into().to_string(),
        }
    }

    pub(crate) async fn which_releases(&mut self) -> std::result::Result<Vec<Release>, NodeError> {
        let t = self.call_timeout;
        let conn = self.conn().await?;
        calls::which_releases(conn, t).await
    }

    pub(crate) async fn set_unpacked(
        &mut self,
        rel_file: &std::path::Path,
    ) -> std::result::Result<String, NodeError> {
        let t = self.call_timeout;
        calls::set_unpacked(self.conn().await?, rel_file, &[], t).await
    }

    pub(crate) async fn install_release(
        &mut self,
        vsn: &str,
    ) -> std::result::Result<calls::Installed, NodeError> {
        let t = self.call_timeout;
        calls::install_release(self.conn().await?, vsn, t).await
    }

    pub(crate) async fn make_permanent(&mut self, vsn: &str) -> std::result::Result<(), NodeError> {
        let t = self.call_timeout;
        calls::make_permanent(self.conn().await?, vsn, t).await
    }

    pub(crate) async fn set_removed(&mut self, vsn: &str) -> std::result::Result<(), NodeError> {
        let t = self.call_timeout;
        calls::set_removed(self.conn().await?, vsn, t).await
    }

    pub(crate) async fn reload_release_handler(&mut self) -> std::result::Result<(), NodeError> {
        let t = self.call_timeout;
        calls::reload_release_handler(self.conn().await?, t).await
    }

    /// What the node runs and has as permanent, and its ERTS version.
    pub(crate) async fn running(&mut self) -> std::result::Result<Running, NodeError> {
        let t = self.call_timeout;
        let conn = self.conn().await?;
        // Four independent questions, in flight together on one connection.
        let (releases, script, apps, erts) = tokio::join!(
            calls::which_releases(conn, t),
            calls::script_id(conn, t),
            calls::which_applications(conn, t),
            conn.rpc("erlang", "system_info", vec![Term::atom("version")], t),
        );
        let (_, booted) = script?;
        let apps: Vec<String> = apps?
            .into_iter()
            .map(|a| format!("{}-{}", a.name, a.vsn))
            .collect();
        let erts = erts?;
        let erts = erts
            .as_charlist()
            .ok_or_else(|| NodeError::UnexpectedReply {
                call: "erlang:system_info(version)".into(),
                reply: erts.to_string(),
            })?;
        Ok(running_from(&releases?, &booted, &apps, erts))
    }

    pub(crate) async fn os_pid(&mut self) -> Option<u32> {
        let t = self.call_timeout;
        let conn = self.conn().await.ok()?;
        calls::os_getpid(conn, t).await.ok()
    }

    /// Whether the node answers at all (EPMD, handshake and an rpc).
    pub(crate) async fn is_up(&mut self) -> bool {
        let t = self.call_timeout.min(Duration::from_secs(5));
        match self.conn().await {
            Ok(c) => c.rpc("erlang", "node", vec![], t).await.is_ok(),
            Err(_) => false,
        }
    }

    /// Waits until the node has finished booting (`init:get_status()` says
    /// `started`): EPMD registration comes before the applications are up.
    pub(crate) async fn wait_up(&mut self, within: Duration) -> std::result::Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            self.reset_if_closed();
            let last = match self.conn().await {
                Ok(c) => match c
                    .rpc("init", "get_status", vec![], Duration::from_secs(2))
                    .await
                {
                    Ok(t) if is_started(&t) => return Ok(()),
                    Ok(t) => format!("booting ({t})"),
                    Err(e) => {
                        self.conn = None;
                        e.to_string()
                    }
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {} did not come up within {}: {last}",
                    self.name,
                    humantime::format_duration(within)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn reset_if_closed(&mut self) {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.closed_reason().is_some())
        {
            self.conn = None;
        }
    }

    /// Stops the node: the configured stop command, then `init:stop()`,
    /// then SIGKILL of its OS process, each given time to work. Returns
    /// once the node no longer answers and its process is gone.
    pub(crate) async fn stop(&mut self) -> std::result::Result<(), String> {
        let pid = self.os_pid().await;
        let grace = self.start_timeout.min(Duration::from_secs(30));
        if let Err(e) = run_shell(&self.stop_cmd, &self.root, grace).await {
            tracing::warn!("stop command failed ({e}); asking the node to stop");
            if let Ok(c) = self.conn().await {
                let _ = c.rpc("init", "stop", vec![], Duration::from_secs(2)).await;
            }
        }
        if self.wait_down(pid, grace).await {
            return Ok(());
        }
        if let Some(pid) = pid {
            tracing::warn!("node {} did not stop; killing OS process {pid}", self.name);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            if self.wait_down(Some(pid), Duration::from_secs(10)).await {
                return Ok(());
            }
        }
        Err(format!("node {} did not stop", self.name))
    }

    async fn wait_down(&mut self, pid: Option<u32>, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            self.conn = None;
            let process_gone = pid.is_none_or(|p| !pid_alive(p));
            if process_gone && !self.is_up().await {
                self.conn = None;
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts the node with the configured command and waits until it has
    /// booted.
    pub(crate) async fn start(&mut self) -> std::result::Result<(), String> {
        self.conn = None;
        run_shell(&self.start_cmd, &self.root, self.start_timeout)
            .await
            .map_err(|e| format!("start command failed: {e}"))?;
        self.wait_up(self.start_timeout).await
    }
}

/// `which_releases` + the booted version + the loaded applications -> what
/// runs. A hot install shows as a `current` release until it is made
/// permanent; after that the boot script id still names the release the
/// node booted, so when the permanent and the booted release differ, the
/// loaded application versions tell which one runs (a cold boot of a
/// not-yet-permanent release shows only in `init:script_id()`).
pub(crate) fn running_from(
    releases: &[Release],
    booted: &str,
    apps: &[String],
    erts: String,
) -> Running {
    let permanent = releases
        .iter()
        .find(|r| r.status == ReleaseStatus::Permanent)
        .map(|r| r.vsn.clone())
        .unwrap_or_else(|| booted.to_string());
    let loaded = |vsn: &str| {
        releases
            .iter()
            .find(|r| r.vsn == vsn)
            .is_some_and(|r| apps.iter().all(|a| r.libs.contains(a)))
    };
    let current = match releases.iter().find(|r| r.status == ReleaseStatus::Current) {
        Some(r) => r.vsn.clone(),
        None if booted != permanent && loaded(&permanent) && !loaded(booted) => permanent.clone(),
        None => booted.to_string(),
    };
    Running {
        permanent,
        current,
        erts,
    }
}

fn is_started(t: &Term) -> bool {
    t.as_tuple()
        .and_then(|t| t.first())
        .is_some_and(|s| s.is_atom("started"))
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Runs a configured command with `sh -c` in the release root, bounded in
/// time. Output goes to our log, not to the terminal of the person
/// running beamup.
pub(crate) async fn run_shell(
    cmd: &str,
    dir: &std::path::Path,
    within: Duration,
) -> std::result::Result<(), String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("`{cmd}`: {e}"))?;
    let out = tokio::time::timeout(within, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "`{cmd}` did not finish within {}",
                humantime::format_duration(within)
            )
        })?
        .map_err(|e| format!("`{cmd}`: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    tracing::debug!(
        "`{cmd}`: {}; stdout: {} stderr: {}",
        out.status,
        stdout.trim(),
        stderr.trim()
    );
    if out.status.success() {
        Ok(())
    } else {
        let text = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        Err(format!(
            "`{cmd}` {}: {}",
            out.status,
            text.trim().chars().take(300).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(vsn: &str, status: ReleaseStatus) -> Release {
        Release {
            name: "thermo".into(),
            vsn: vsn.into(),
            libs: vec!["kernel-8.5.3".into(), format!("thermo-{vsn}")],
            status,
        }
    }

    fn run(rels: &[Release], booted: &str, loaded: &str) -> (String, String) {
        let apps = vec!["kernel-8.5.3".into(), format!("thermo-{loaded}")];
        let r = running_from(rels, booted, &apps, "13.1.5".into());
        (r.permanent, r.current)
    }

    #[test]
    fn what_runs_after_each_kind_of_install() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        // Hot install, not yet permanent.
        let hot = [
            rel("1.0.0", ReleaseStatus::Permanent),
            rel("1.1.0", ReleaseStatus::Current),
        ];
        assert_eq!(run(&hot, "1.0.0", "1.1.0"), s("1.0.0", "1.1.0"));
        // Hot install made permanent: the boot script id still says 1.0.0.
        let committed = [
            rel("1.0.0", ReleaseStatus::Old),
            rel("1.1.0", ReleaseStatus::Permanent),
        ];
        assert_eq!(run(&committed, "1.0.0", "1.1.0"), s("1.1.0", "1.1.0"));
        // Permanent 1.1.0, but the node booted 1.0.0 (a stale boot script).
        assert_eq!(run(&committed, "1.0.0", "1.0.0"), s("1.1.0", "1.0.0"));
        // Cold boot of a release that is only unpacked.
        let cold = [
            rel("1.0.0", ReleaseStatus::Permanent),
            rel("2.0.0", ReleaseStatus::Unpacked),
        ];
        assert_eq!(run(&cold, "2.0.0", "2.0.0"), s("1.0.0", "2.0.0"));
    }
}
