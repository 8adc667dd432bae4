//! Typed `release_handler` (and a few `init`/`application`/`os`) calls on
//! the running node, over a [`Connection`].
//!
//! Each call is an rpc plus a pure decoding function from the reply term to
//! Rust types. The decoders know the reply shapes OTP 25's sasl documents
//! and produces (see `tests/otp/README.md`, where they were observed); anything else
//! becomes [`NodeError::UnexpectedReply`] or [`NodeError::Other`] with the
//! term as Erlang text, never a silent success.
//!
//! Every call takes a timeout. release_handler calls run inside the node's
//! single `release_handler` server with an infinite internal timeout, so a
//! timeout here means "we stopped waiting", not "it did not happen": after
//! a timed-out `install_release` ask `which_releases` before deciding
//! anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::node::dist::{Connection, DistError, Term};

/// Longest rendering of a term inside an error message.
const MAX_TEXT: usize = 2000;

/// Status of a release as release_handler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseStatus {
    /// Booted on (re)start; what `make_permanent` produced.
    Permanent,
    /// Installed with `install_release` but not yet permanent.
    Current,
    /// Known (unpacked / `set_unpacked`) but not installed.
    Unpacked,
    /// Was permanent earlier.
    Old,
}

/// One entry of `release_handler:which_releases()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub name: String,
    pub vsn: String,
    /// Libraries as `"<app>-<vsn>"`, e.g. `"kernel-8.5.3"` (names, not
    /// directories: release_handler strips the paths in this reply).
    pub libs: Vec<String>,
    pub status: ReleaseStatus,
}

/// Successful (or checked) installation: the version the node ran before,
/// and the relup description term of that step.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    pub(crate) from_vsn: String,
    pub(crate) descr: Term,
}

/// An application library living outside the node's `lib/` for
/// `set_unpacked`: `dir` is the directory that contains `<app>-<vsn>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppDir {
    pub(crate) app: String,
    pub(crate) vsn: String,
    pub(crate) dir: PathBuf,
}

/// One entry of `application:which_applications()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    pub name: String,
    pub(crate) description: String,
    pub(crate) vsn: String,
}

/// Outcomes of the calls below that are not plain success.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Dist(#[from] DistError),

    #[error(
        "release_handler is not running on the node; check that the release starts sasl \
         (it must be in the .rel file)"
    )]
    ReleaseHandlerNotRunning,

    #[error(
        "release {vsn} is already known to release_handler (a leftover unpacked release?); \
         it is removed before the next install"
    )]
    ExistingRelease { vsn: String },

    #[error(
        "no relup at {path}: there is no upgrade path from the running release; check that \
         the bundle was built against the version the node runs"
    )]
    NoRelup { path: String },

    #[error(
        "code_change of module {module} failed during the upgrade: {reason_text}; the node \
         restarts itself on its permanent release"
    )]
    CodeChangeFailed { module: String, reason_text: String },

    #[error("release {vsn} is already installed")]
    AlreadyInstalled { vsn: String },

    #[error("release {vsn} is unknown to release_handler; check that it was unpacked")]
    NoSuchRelease { vsn: String },

    #[error(
        "the relup of {vsn} has no instructions from the running release {current}; \
         (re)installing the booted permanent release is not possible"
    )]
    NoMatchingRelup { vsn: String, current: String },

    #[error(
        "the upgrade from {from_vsn} changes ERTS: the node is rebooting its emulator and \
         continues the installation after the restart (needs heart or a supervisor)"
    )]
    ContinueAfterRestart { from_vsn: String },

    #[error("release has status {status}, the call needs it installed first")]
    BadStatus { status: String },

    #[error("release {vsn} is the permanent release and cannot be removed")]
    Permanent { vsn: String },

    #[error("{call} returned an error: {text}")]
    Other { call: String, text: String },

    #[error("{call} returned an unexpected reply: {reply}")]
    UnexpectedReply { call: String, reply: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// `release_handler:which_releases()`.
pub async fn which_releases(
    conn: &Connection,
    timeout: Duration,
) -> Result<Vec<Release>, NodeError> {
    let reply = rh_call(conn, "which_releases", vec![], timeout).await?;
    decode_releases(&reply)
}

/// `release_handler:set_unpacked(RelFile, AppDirs)`: registers a release
/// whose files we placed ourselves. Returns its version.
pub(crate) async fn set_unpacked(
    conn: &Connection,
    rel_file: &Path,
    app_dirs: &[AppDir],
    timeout: Duration,
) -> Result<String, NodeError> {
    if !rel_file.is_absolute() {
        return Err(NodeError::InvalidArgument(format!(
            "release file {} must be an absolute path",
            rel_file.display()
        )));
    }
    let dirs = app_dirs
        .iter()
        .map(|a| {
            Ok(Term::tuple(vec![
                Term::atom(&a.app),
                Term::charlist(&a.vsn),
                path_term(&a.dir)?,
            ]))
        })
        .collect::<Result<Vec<_>, NodeError>>()?;
    let args = vec![path_term(rel_file)?, Term::List(dirs)];
    let reply = rh_call(conn, "set_unpacked", args, timeout).await?;
    decode_set_unpacked(&reply)
}

/// `release_handler:install_release(Vsn)`: runs the relup (hot upgrade or
/// downgrade).
pub async fn install_release(
    conn: &Connection,
    vsn: &str,
    timeout: Duration,
) -> Result<Installed, NodeError> {
    let call = "install_release";
    let reply = rh_call(conn, call, vec![Term::charlist(vsn)], timeout).await?;
    decode_install(call, vsn, &reply)
}

/// `release_handler:make_permanent(Vsn)`.
pub async fn make_permanent(
    conn: &Connection,
    vsn: &str,
    timeout: Duration,
) -> Result<(), NodeError> {
    let call = "make_permanent";
    let reply = rh_call(conn, call, vec![Term::charlist(vsn)], timeout).await?;
    decode_ok(call, &reply)
}

/// `release_handler:set_removed(Vsn)`: release_handler forgets the
/// release and rewrites RELEASES; no file is deleted. beamup never calls
/// `remove_release`, which deletes whatever its view of the other
/// releases does not name (see `bootset`).
pub async fn set_removed(conn: &Connection, vsn: &str, timeout: Duration) -> Result<(), NodeError> {
    let call = "set_removed";
    let reply = rh_call(conn, call, vec![Term::charlist(vsn)], timeout).await?;
    decode_ok(call, &reply)
}

/// Restarts the node's release_handler server under `sasl_sup`, so that
/// it reads `releases/RELEASES` again (it reads it only when it starts).
/// Only sound while no install is in progress: RELEASES never records a
/// release as `current`.
pub(crate) async fn reload_release_handler(
    conn: &Connection,
    timeout: Duration,
) -> Result<(), NodeError> {
    let child = || vec![Term::atom("sasl_sup"), Term::atom("release_handler")];
    let stop = conn
        .rpc("supervisor", "terminate_child", child(), timeout)
        .await?;
    if !stop.is_atom("ok") {
        return Err(NodeError::Other {
            call: "supervisor:terminate_child(sasl_sup, release_handler)".into(),
            text: text(&stop),
        });
    }
    let start = conn
        .rpc("supervisor", "restart_child", child(), timeout)
        .await?;
    match start.as_tuple() {
        Some([ok, _pid]) if ok.is_atom("ok") => Ok(()),
        _ => Err(NodeError::Other {
            call: "supervisor:restart_child(sasl_sup, release_handler)".into(),
            text: text(&start),
        }),
    }
}

/// `init:script_id()`: name and version of the release the node booted,
/// which is what it runs (RELEASES may say otherwise, see the notes).
pub async fn script_id(
    conn: &Connection,
    timeout: Duration,
) -> Result<(String, String), NodeError> {
    let reply = conn.rpc("init", "script_id", vec![], timeout).await?;
    decode_script_id(&reply)
}

/// `application:which_applications()`.
pub async fn which_applications(
    conn: &Connection,
    timeout: Duration,
) -> Result<Vec<Application>, NodeError> {
    let reply = conn
        .rpc("application", "which_applications", vec![], timeout)
        .await?;
    decode_applications(&reply)
}

/// `os:getpid()`: the node's OS process id.
pub async fn os_getpid(conn: &Connection, timeout: Duration) -> Result<u32, NodeError> {
    let reply = conn.rpc("os", "getpid", vec![], timeout).await?;
    decode_getpid(&reply)
}

async fn rh_call(
    conn: &Connection,
    function: &str,
    args: Vec<Term>,
    timeout: Duration,
) -> Result<Term, NodeError> {
    match conn.rpc("release_handler", function, args, timeout).await {
        Err(DistError::BadRpc { reason, .. }) if is_noproc_release_handler(&reason) => {
            Err(NodeError::ReleaseHandlerNotRunning)
        }
        r => Ok(r?),
    }
}

fn path_term(p: &Path) -> Result<Term, NodeError> {
    p.to_str()
        .map(Term::charlist)
        .ok_or_else(|| NodeError::InvalidArgument(format!("path {} is not UTF-8", p.display())))
}

fn text(t: &Term) -> String {
    t.to_text_limited(MAX_TEXT)
}

fn unexpected(call: &str, reply: &Term) -> NodeError {
    NodeError::UnexpectedReply {
        call: format!("release_handler:{call}"),
        reply: text(reply),
    }
}

/// `{'EXIT', {noproc, {gen_server, call, [release_handler | _]}}}`: sasl is
/// not started.
pub(crate) fn is_noproc_release_handler(reason: &Term) -> bool {
    let Some([exit, inner]) = reason.as_tuple() else {
        return false;
    };
    let Some([noproc, call]) = inner.as_tuple() else {
        return false;
    };
    let Some([m, f, args]) = call.as_tuple() else {
        return false;
    };
    exit.is_atom("EXIT")
        && noproc.is_atom("noproc")
        && m.is_atom("gen_server")
        && f.is_atom("call")
        && args
            .as_list()
            .and_then(<[Term]>::first)
            .is_some_and(|s| s.is_atom("release_handler"))
}

/// Decodes `[{Name, Vsn, Libs, Status}]`.
pub(crate) fn decode_releases(reply: &Term) -> Result<Vec<Release>, NodeError> {
    let bad = || unexpected("which_releases", reply);
    let list = reply.as_list().ok_or_else(bad)?;
    list.iter()
        .map(|entry| match entry.as_tuple() {
            Some([name, vsn, libs, status]) => Ok(Release {
                name: name.as_charlist().ok_or_else(bad)?,
                vsn: vsn.as_charlist().ok_or_else(bad)?,
                libs: libs
                    .as_list()
                    .ok_or_else(bad)?
                    .iter()
                    .map(|l| l.as_charlist().ok_or_else(bad))
                    .collect::<Result<_, _>>()?,
                status: match status.as_atom() {
                    Some("permanent") => ReleaseStatus::Permanent,
                    Some("current") => ReleaseStatus::Current,
                    Some("unpacked") => ReleaseStatus::Unpacked,
                    Some("old") => ReleaseStatus::Old,
                    _ => return Err(bad()),
                },
            }),
            _ => Err(bad()),
        })
        .collect()
}

/// Decodes `{ok, Vsn}` / `{error, Reason}` of `set_unpacked`.
pub(crate) fn decode_set_unpacked(reply: &Term) -> Result<String, NodeError> {
    match reply.as_tuple() {
        Some([ok, vsn]) if ok.is_atom("ok") => vsn
            .as_charlist()
            .ok_or_else(|| unexpected("set_unpacked", reply)),
        Some([err, reason]) if err.is_atom("error") => Err(error_reason("set_unpacked", reason)),
        _ => Err(unexpected("set_unpacked", reply)),
    }
}

/// Decodes the replies of `install_release` and `check_install_release`:
/// `{ok, FromVsn, Descr}`, `{continue_after_restart, FromVsn, Descr}`,
/// `{error, Reason}`.
pub(crate) fn decode_install(call: &str, vsn: &str, reply: &Term) -> Result<Installed, NodeError> {
    let from = |t: &Term| t.as_charlist().ok_or_else(|| unexpected(call, reply));
    match reply.as_tuple() {
        Some([ok, from_vsn, descr]) if ok.is_atom("ok") => Ok(Installed {
            from_vsn: from(from_vsn)?,
            descr: descr.clone(),
        }),
        Some([c, from_vsn, _]) if c.is_atom("continue_after_restart") => {
            Err(NodeError::ContinueAfterRestart {
                from_vsn: from(from_vsn)?,
            })
        }
        Some([err, reason]) if err.is_atom("error") => Err(install_error(call, vsn, reason)),
        _ => Err(unexpected(call, reply)),
    }
}

fn install_error(call: &str, vsn: &str, reason: &Term) -> NodeError {
    let t = reason.as_tuple().unwrap_or_default();
    match t {
        [enoent, path] if enoent.is_atom("enoent") => {
            if let Some(path) = path.as_charlist().filter(|p| p.ends_with("relup")) {
                return NodeError::NoRelup { path };
            }
        }
        [tag, _pid, module, _vsn, why] if tag.is_atom("code_change_failed") => {
            return NodeError::CodeChangeFailed {
                module: module.as_atom().map_or_else(|| text(module), str::to_owned),
                reason_text: text(why),
            };
        }
        [tag, _, current] if tag.is_atom("no_matching_relup") => {
            return NodeError::NoMatchingRelup {
                vsn: vsn.to_owned(),
                current: current.as_charlist().unwrap_or_else(|| text(current)),
            };
        }
        _ => {}
    }
    error_reason(call, reason)
}

/// Decodes `ok` / `{error, Reason}` of `make_permanent` and
/// `set_removed`.
pub(crate) fn decode_ok(call: &str, reply: &Term) -> Result<(), NodeError> {
    if reply.is_atom("ok") {
        return Ok(());
    }
    match reply.as_tuple() {
        Some([err, reason]) if err.is_atom("error") => Err(error_reason(call, reason)),
        _ => Err(unexpected(call, reply)),
    }
}

/// The `{Tag, Value}` reasons shared by several release_handler calls.
fn error_reason(call: &str, reason: &Term) -> NodeError {
    let string = |t: &Term| t.as_charlist().unwrap_or_else(|| text(t));
    match reason.as_tuple() {
        Some([tag, v]) => match tag.as_atom() {
            Some("existing_release") => NodeError::ExistingRelease { vsn: string(v) },
            Some("already_installed") => NodeError::AlreadyInstalled { vsn: string(v) },
            Some("no_such_release") => NodeError::NoSuchRelease { vsn: string(v) },
            Some("bad_status") => NodeError::BadStatus { status: text(v) },
            Some("permanent") => NodeError::Permanent { vsn: string(v) },
            _ => other(call, reason),
        },
        _ => other(call, reason),
    }
}

fn other(call: &str, reason: &Term) -> NodeError {
    NodeError::Other {
        call: format!("release_handler:{call}"),
        text: text(reason),
    }
}

/// Decodes `{Name, Vsn}` of `init:script_id()`.
pub(crate) fn decode_script_id(reply: &Term) -> Result<(String, String), NodeError> {
    let bad = || NodeError::UnexpectedReply {
        call: "init:script_id".into(),
        reply: text(reply),
    };
    match reply.as_tuple() {
        Some([name, vsn]) => Ok((
            name.as_charlist().ok_or_else(bad)?,
            vsn.as_charlist().ok_or_else(bad)?,
        )),
        _ => Err(bad()),
    }
}

/// Decodes `[{App, Description, Vsn}]`.
pub(crate) fn decode_applications(reply: &Term) -> Result<Vec<Application>, NodeError> {
    let bad = || NodeError::UnexpectedReply {
        call: "application:which_applications".into(),
        reply: text(reply),
    };
    reply
        .as_list()
        .ok_or_else(bad)?
        .iter()
        .map(|e| match e.as_tuple() {
            Some([app, descr, vsn]) => Ok(Application {
                name: app.as_atom().ok_or_else(bad)?.to_owned(),
                description: descr.as_charlist().ok_or_else(bad)?,
                vsn: vsn.as_charlist().ok_or_else(bad)?,
            }),
            _ => Err(bad()),
        })
        .collect()
}

/// Decodes the string `os:getpid()` returns.
pub(crate) fn decode_getpid(reply: &Term) -> Result<u32, NodeError> {
    reply
        .as_charlist()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| NodeError::UnexpectedReply {
            call: "os:getpid".into(),
            reply: text(reply),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Term {
        Term::atom(s)
    }
    fn s(s: &str) -> Term {
        Term::charlist(s)
    }
    fn t(items: Vec<Term>) -> Term {
        Term::tuple(items)
    }
    fn error(reason: Term) -> Term {
        t(vec![a("error"), reason])
    }

    #[test]
    fn which_releases_reply() {
        let reply = Term::List(vec![
            t(vec![
                s("app"),
                s("1.1.0"),
                Term::List(vec![s("app-1.1.0")]),
                a("current"),
            ]),
            t(vec![s("app"), s("1.0.0"), Term::nil(), a("permanent")]),
            t(vec![s("app"), s("0.9.0"), Term::nil(), a("old")]),
            t(vec![s("app"), s("1.2.0"), Term::nil(), a("unpacked")]),
        ]);
        let r = decode_releases(&reply).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].vsn, "1.1.0");
        assert_eq!(r[0].libs, vec!["app-1.1.0"]);
        let statuses: Vec<_> = r.iter().map(|r| r.status).collect();
        use ReleaseStatus::*;
        assert_eq!(statuses, vec![Current, Permanent, Old, Unpacked]);
        assert!(decode_releases(&Term::nil()).unwrap().is_empty());
        let bad = Term::List(vec![t(vec![s("a"), s("1"), Term::nil(), a("weird")])]);
        assert!(matches!(
            decode_releases(&bad),
            Err(NodeError::UnexpectedReply { .. })
        ));
    }

    #[test]
    fn set_unpacked_replies() {
        let ok = t(vec![a("ok"), s("1.1.0")]);
        assert_eq!(decode_set_unpacked(&ok).unwrap(), "1.1.0");
        let existing = error(t(vec![a("existing_release"), s("1.1.0")]));
        assert!(matches!(
            decode_set_unpacked(&existing),
            Err(NodeError::ExistingRelease { vsn }) if vsn == "1.1.0"
        ));
        let enoent = error(t(vec![a("enoent"), s("/x/app.rel")]));
        let e = decode_set_unpacked(&enoent).unwrap_err();
        assert!(matches!(e, NodeError::Other { .. }), "{e:?}");
        assert!(e.to_string().contains("{enoent,\"/x/app.rel\"}"), "{e}");
    }

    #[test]
    fn install_replies() {
        let ok = t(vec![a("ok"), s("1.0.0"), Term::nil()]);
        let i = decode_install("install_release", "1.1.0", &ok).unwrap();
        assert_eq!(i.from_vsn, "1.0.0");
        assert_eq!(i.descr, Term::nil());

        type Check = fn(&NodeError) -> bool;
        let cases: Vec<(Term, Check)> = vec![
            (
                error(t(vec![a("enoent"), s("/r/releases/1.0.0/relup")])),
                |e| matches!(e, NodeError::NoRelup { path } if path == "/r/releases/1.0.0/relup"),
            ),
            (
                error(t(vec![
                    a("code_change_failed"),
                    a("pid-ish"),
                    a("counter_server"),
                    s("1"),
                    t(vec![a("EXIT"), a("badarith")]),
                ])),
                |e| {
                    matches!(e, NodeError::CodeChangeFailed { module, reason_text }
                        if module == "counter_server" && reason_text == "{'EXIT',badarith}")
                },
            ),
            (
                error(t(vec![a("already_installed"), s("1.1.0")])),
                |e| matches!(e, NodeError::AlreadyInstalled { vsn } if vsn == "1.1.0"),
            ),
            (
                error(t(vec![a("no_such_release"), s("9")])),
                |e| matches!(e, NodeError::NoSuchRelease { vsn } if vsn == "9"),
            ),
            (
                error(t(vec![a("no_matching_relup"), s("1.0.0"), s("1.0.0")])),
                |e| matches!(e, NodeError::NoMatchingRelup { current, .. } if current == "1.0.0"),
            ),
            (
                t(vec![a("continue_after_restart"), s("1.0.0"), Term::nil()]),
                |e| matches!(e, NodeError::ContinueAfterRestart { from_vsn } if from_vsn == "1.0.0"),
            ),
            (
                error(t(vec![a("bad_relup_file"), s("/r/relup")])),
                |e| matches!(e, NodeError::Other { text, .. } if text == "{bad_relup_file,\"/r/relup\"}"),
            ),
            (a("ok"), |e| matches!(e, NodeError::UnexpectedReply { .. })),
        ];
        for (reply, check) in cases {
            let e = decode_install("install_release", "1.1.0", &reply).unwrap_err();
            assert!(check(&e), "{reply} gave {e:?}");
        }
    }

    #[test]
    fn make_permanent_and_set_removed_replies() {
        assert!(decode_ok("make_permanent", &a("ok")).is_ok());
        let e = decode_ok(
            "make_permanent",
            &error(t(vec![a("bad_status"), a("unpacked")])),
        );
        assert!(matches!(e, Err(NodeError::BadStatus { status }) if status == "unpacked"));
        let e = decode_ok("set_removed", &error(t(vec![a("permanent"), s("1.0.0")])));
        assert!(matches!(e, Err(NodeError::Permanent { vsn }) if vsn == "1.0.0"));
        let e = decode_ok("set_removed", &error(t(vec![a("no_such_release"), s("2")])));
        assert!(matches!(e, Err(NodeError::NoSuchRelease { .. })));
        assert!(matches!(
            decode_ok("set_removed", &Term::Int(1)),
            Err(NodeError::UnexpectedReply { .. })
        ));
    }

    #[test]
    fn misc_replies() {
        assert_eq!(
            decode_script_id(&t(vec![s("app"), s("1.0.0")])).unwrap(),
            ("app".to_owned(), "1.0.0".to_owned())
        );
        assert!(decode_script_id(&a("x")).is_err());
        let apps = Term::List(vec![t(vec![
            a("kernel"),
            s("ERTS  CXC 138 10"),
            s("8.5.3"),
        ])]);
        assert_eq!(
            decode_applications(&apps).unwrap(),
            vec![Application {
                name: "kernel".into(),
                description: "ERTS  CXC 138 10".into(),
                vsn: "8.5.3".into()
            }]
        );
        assert_eq!(decode_getpid(&s("4242")).unwrap(), 4242);
        assert!(decode_getpid(&s("x")).is_err());
    }

    #[test]
    fn noproc_release_handler_is_recognised() {
        let reason = t(vec![
            a("EXIT"),
            t(vec![
                a("noproc"),
                t(vec![
                    a("gen_server"),
                    a("call"),
                    Term::List(vec![
                        a("release_handler"),
                        a("which_releases"),
                        a("infinity"),
                    ]),
                ]),
            ]),
        ]);
        assert!(is_noproc_release_handler(&reason));
        assert!(!is_noproc_release_handler(&t(vec![a("EXIT"), a("undef")])));
    }
}
