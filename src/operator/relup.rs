//! `beamup relup`: the relup and the upgrade tarball for a release built by
//! `mix release` (which makes neither) or by rebar3/relx.
//!
//! Every version must have been built, oldest first, into the same release
//! directory (`_build/prod/rel/REL`), as systools reads the old versions'
//! `.rel` and `.app` files from there. The work:
//!
//! 1. read `releases/VSN/REL.rel` of the target and of every from-version;
//! 2. check that each application whose version changed has an appup in the
//!    target's `lib/APP-VSN/ebin/` covering every from-version, up and down
//!    (systools' own error for a missing one names neither the release
//!    versions nor where the file must go);
//! 3. run `systools:make_relup/4` with the release's own ERTS, writing
//!    `releases/TO/relup`;
//! 4. write `REL-TO.tar.gz` with what `mix release`'s `:tar` step (or
//!    `rebar3 tar`) puts in it, atomically.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{self, AtomicFile};
use crate::limits::LIMITS;
use crate::release::eterm::{self, Term};
use crate::release::metadata::{Rel, parse_rel};
use crate::release::releases_file;

#[derive(Clone, Debug)]
pub struct RelupOptions {
    /// The release directory, e.g. `_build/prod/rel/thermex`.
    pub release_dir: PathBuf,
    /// Versions the relup upgrades from (and downgrades to).
    pub from: Vec<String>,
    pub to: String,
    /// The tarball to write.
    pub out: PathBuf,
    /// Replace an existing `out`.
    pub overwrite: bool,
}

/// What was made.
#[derive(Clone, Debug)]
pub struct RelupReport {
    pub release: String,
    pub relup: PathBuf,
    pub tarball: PathBuf,
    /// Applications whose version changed: (app, from-versions, to-version).
    pub changed_apps: Vec<(String, Vec<String>, String)>,
    /// systools' warnings, one per line.
    pub warnings: Vec<String>,
}

/// Which tool built the release directory; they lay out tarballs
/// differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `mix release`: `releases/COOKIE`, one `bin/REL` for every version.
    Mix,
    /// relx (`rebar3 release`): `bin/REL-VSN`, `releases/RELEASES`.
    Relx,
}

pub fn run(opts: &RelupOptions) -> Result<RelupReport> {
    let dir = &opts.release_dir;
    let fail = |detail: String| Error::Relup {
        path: dir.clone(),
        detail,
    };
    if opts.from.is_empty() {
        return Err(Error::Usage("give at least one --from VSN".into()));
    }
    if opts.from.iter().any(|f| f == &opts.to) {
        return Err(Error::Usage(format!(
            "--from {0} and --to {0} are the same version",
            opts.to
        )));
    }
    if !opts.overwrite && opts.out.symlink_metadata().is_ok() {
        return Err(Error::Exists {
            path: opts.out.clone(),
        });
    }
    if !dir.join("releases").is_dir() {
        return Err(fail(
            "no releases/ directory here; give the release directory that `mix release` or \
             `rebar3 release` built, e.g. _build/prod/rel/NAME"
                .into(),
        ));
    }
    let to = read_rel(dir, &opts.to, None)?;
    let froms = opts
        .from
        .iter()
        .map(|v| read_rel(dir, v, Some(&to.name)))
        .collect::<Result<Vec<_>>>()?;
    for rel in std::iter::once(&to).chain(&froms) {
        for (app, vsn) in &rel.apps {
            let lib = dir.join(format!("lib/{app}-{vsn}"));
            if !lib.join("ebin").is_dir() {
                return Err(fail(format!(
                    "release {} lists {app} {vsn}, but {} is missing; build every version, oldest \
                     first, into this same directory (`mix release --overwrite` keeps the others)",
                    rel.version,
                    lib.display()
                )));
            }
        }
    }

    let changes = changed_apps(&to, &froms);
    for change in &changes {
        let path = appup_path(dir, &change.app, &change.to_vsn);
        let text = match fsutil::read_limited(&path, LIMITS.relup_input_file_bytes, "appup") {
            Ok(bytes) => String::from_utf8(bytes)
                .map_err(|_| fail(format!("{}: not UTF-8 text", path.display())))?,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(missing_appup_message(change, &path)));
            }
            Err(e) => return Err(e),
        };
        check_appup(&text, change).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    }

    let layout = detect_layout(dir);
    let warnings = make_relup(dir, &to, &froms)?;
    let relup = dir.join(format!("releases/{}/relup", to.version));
    if !relup.is_file() {
        return Err(fail(format!(
            "systools reported success but wrote no {}",
            relup.display()
        )));
    }
    write_tarball(dir, &to, layout, &opts.out, opts.overwrite)?;
    Ok(RelupReport {
        release: to.name.clone(),
        relup,
        tarball: opts.out.clone(),
        changed_apps: changes
            .into_iter()
            .map(|c| (c.app, c.from_vsns, c.to_vsn))
            .collect(),
        warnings,
    })
}

/// `releases/VSN/NAME.rel`; the name is the one `.rel` file there (or, for
/// a from-version, the target's name).
fn read_rel(dir: &Path, vsn: &str, name: Option<&str>) -> Result<Rel> {
    let fail = |detail: String| Error::Relup {
        path: dir.to_path_buf(),
        detail,
    };
    if vsn.is_empty() || vsn.contains('/') || vsn == "." || vsn == ".." {
        return Err(Error::Usage(format!("{vsn:?} is not a release version")));
    }
    let vdir = dir.join("releases").join(vsn);
    let rel_path = match name {
        Some(name) => vdir.join(format!("{name}.rel")),
        None => {
            let entries = fs::read_dir(&vdir).map_err(|_| {
                fail(format!(
                    "version {vsn} is not built here ({} is missing); build it into this \
                     directory first",
                    vdir.display()
                ))
            })?;
            let mut rels: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "rel"))
                .collect();
            match rels.len() {
                1 => rels.remove(0),
                0 => return Err(fail(format!("{} holds no NAME.rel", vdir.display()))),
                _ => {
                    return Err(fail(format!(
                        "{} holds several .rel files; which release is it?",
                        vdir.display()
                    )));
                }
            }
        }
    };
    let limit = LIMITS.relup_input_file_bytes;
    let bytes = match fsutil::read_limited(&rel_path, limit, "release file") {
        Ok(b) => b,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail(format!(
                "version {vsn} is not built here ({} is missing); build every version, oldest \
                 first, into this same directory",
                rel_path.display()
            )));
        }
        Err(e) => return Err(e),
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| fail(format!("{}: not UTF-8 text", rel_path.display())))?;
    let rel = parse_rel(&text).map_err(|e| fail(format!("{}: {e}", rel_path.display())))?;
    let stem = rel_path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if rel.version != vsn || rel.name != stem {
        return Err(fail(format!(
            "{} describes {} {}, not {stem} {vsn}",
            rel_path.display(),
            rel.name,
            rel.version
        )));
    }
    Ok(rel)
}

/// An application whose version differs between the target and at least
/// one from-version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppChange {
    pub app: String,
    pub to_vsn: String,
    /// The app's versions in the from-releases that differ from `to_vsn`.
    pub from_vsns: Vec<String>,
    /// The release versions those come from, in the same order.
    pub from_releases: Vec<String>,
}

/// Applications present in the target and in a from-release at another
/// version. Added and removed applications need no appup (systools starts
/// or stops them).
pub fn changed_apps(to: &Rel, froms: &[Rel]) -> Vec<AppChange> {
    let mut out: Vec<AppChange> = Vec::new();
    for (app, to_vsn) in &to.apps {
        let mut change = AppChange {
            app: app.clone(),
            to_vsn: to_vsn.clone(),
            from_vsns: Vec::new(),
            from_releases: Vec::new(),
        };
        for from in froms {
            if let Some((_, v)) = from.apps.iter().find(|(a, _)| a == app)
                && v != to_vsn
            {
                if !change.from_vsns.contains(v) {
                    change.from_vsns.push(v.clone());
                }
                change.from_releases.push(from.version.clone());
            }
        }
        if !change.from_vsns.is_empty() {
            out.push(change);
        }
    }
    out
}

fn appup_path(dir: &Path, app: &str, vsn: &str) -> PathBuf {
    dir.join(format!("lib/{app}-{vsn}/ebin/{app}.appup"))
}

fn missing_appup_message(change: &AppChange, path: &Path) -> String {
    format!(
        "application {app} changed from {from} to {to} (releases {rels}), and there is no appup \
         for it: write {path} with `{{\"{to}\", [{{\"{first}\", Instructions}}], \
         [{{\"{first}\", Instructions}}]}}.` (one entry per old version, up and down; Elixir \
         modules are atoms such as 'Elixir.MyApp.Worker') and copy it into the built \
         lib/{app}-{to}/ebin/ after each release build, then run this again",
        app = change.app,
        from = change.from_vsns.join(", "),
        to = change.to_vsn,
        rels = change.from_releases.join(", "),
        path = path.display(),
        first = change.from_vsns[0],
    )
}

/// The appup is `{ToVsn, [{UpFrom, Instrs}], [{DownTo, Instrs}]}` for the
/// change's target version and covers each of its from-versions both ways.
/// A binary `UpFrom` is a regular expression; it is left to systools.
pub fn check_appup(text: &str, change: &AppChange) -> std::result::Result<(), String> {
    let terms = eterm::parse_terms(text)?;
    let bad = || "expected {Vsn, [{UpFromVsn, Instructions}], [{DownToVsn, Instructions}]}.";
    let [term] = terms.as_slice() else {
        return Err(format!("{} (one term)", bad()));
    };
    let Some([vsn, up, down]) = term.as_tuple() else {
        return Err(bad().into());
    };
    if vsn.as_str() != Some(change.to_vsn.as_str()) {
        return Err(format!(
            "the appup is for version {vsn}, but lib/{}-{}/ holds version {}; its first element \
             must be \"{}\"",
            change.app, change.to_vsn, change.to_vsn, change.to_vsn
        ));
    }
    let section = |t: &Term, what: &str| -> std::result::Result<Vec<Option<String>>, String> {
        t.as_list()
            .ok_or_else(|| format!("the {what} section is not a list; {}", bad()))?
            .iter()
            .map(|e| match e.as_tuple() {
                Some([Term::Binary(_), _]) => Ok(None),
                Some([v, _]) => v
                    .as_str()
                    .map(|s| Some(s.to_string()))
                    .ok_or_else(|| format!("{what} entry {e} does not start with a version")),
                _ => Err(format!("{what} entry {e} is not {{Vsn, Instructions}}")),
            })
            .collect()
    };
    for (t, what, word) in [(up, "upgrade", "from"), (down, "downgrade", "to")] {
        let entries = section(t, what)?;
        let has_regex = entries.iter().any(Option::is_none);
        for from in &change.from_vsns {
            if !has_regex && !entries.iter().any(|e| e.as_deref() == Some(from.as_str())) {
                return Err(format!(
                    "no {what} entry {word} {}'s version {from} (release {}); add {{\"{from}\", \
                     Instructions}} to its {what} list",
                    change.app,
                    change.from_releases.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Tells the two layouts apart by what only mix writes.
pub fn detect_layout(dir: &Path) -> Layout {
    if dir.join("releases/COOKIE").is_file() {
        Layout::Mix
    } else {
        Layout::Relx
    }
}

/// Runs `systools:make_relup/4` in `dir`. Every path and version reaches the
/// Erlang code as a plain argument (after `-extra`), never as code.
const MAKE_RELUP: &str = r#"
[Outdir, To, NFroms | Rest] = init:get_plain_arguments(),
{Froms, Paths} = lists:split(list_to_integer(NFroms), Rest),
Say = fun(Tag, Text) -> io:format("~s ~ts~n", [Tag, unicode:characters_to_binary(Text)]) end,
Code = try systools:make_relup(To, Froms, Froms,
                               [{path, Paths}, {outdir, Outdir}, silent, no_warn_sasl]) of
    {ok, _Relup, Mod, Warnings} ->
        [Say("warning", io_lib:format("~ts", [Mod:format_warning(W)])) || W <- Warnings],
        0;
    ok ->
        0;
    {error, Mod, Error} ->
        Say("error", io_lib:format("~ts", [Mod:format_error(Error)])),
        1;
    Other ->
        Say("error", io_lib:format("~0p", [Other])),
        1
catch
    Class:Reason ->
        Say("error", io_lib:format("~p:~0p", [Class, Reason])),
        1
end,
halt(Code).
"#;

fn make_relup(dir: &Path, to: &Rel, froms: &[Rel]) -> Result<Vec<String>> {
    let fail = |detail: String| Error::Relup {
        path: dir.to_path_buf(),
        detail,
    };
    let abs = fs::canonicalize(dir).ctx(dir, "resolve")?;
    let sasl = to
        .apps
        .iter()
        .find(|(a, _)| a == "sasl")
        .map(|(_, v)| format!("lib/sasl-{v}/ebin"))
        .ok_or_else(|| {
            fail(format!(
                "release {} does not include sasl, and release_handler (part of sasl) is what \
                 installs upgrades; add :sasl to extra_applications (mix) or to the release's \
                 applications (relx)",
                to.version
            ))
        })?;
    let erts_erl = abs.join(format!("erts-{}/bin/erl", to.erts));
    let mut cmd = if erts_erl.is_file() {
        // The release's own ERTS and boot files; the boot variable is mix's
        // (relx boot files use $ROOT, which is this directory for its erl).
        let mut c = Command::new(&erts_erl);
        c.arg("-boot")
            .arg(abs.join(format!("releases/{}/start_clean", to.version)))
            .arg("-boot_var")
            .arg("RELEASE_LIB")
            .arg(abs.join("lib"))
            .arg("-pa")
            .arg(&sasl);
        c
    } else {
        let mut c = Command::new("erl");
        c.args(["-boot", "start_clean"]);
        c
    };
    // Relative paths from here: systools expands `*` in path entries, and
    // the directory's own name may hold anything.
    let lib_ebins = lib_ebin_dirs(dir)?;
    cmd.current_dir(&abs)
        .args(["-noshell", "-noinput", "-eval", MAKE_RELUP, "-extra"])
        .arg(format!("releases/{}", to.version))
        .arg(format!("releases/{0}/{1}", to.version, to.name))
        .arg(froms.len().to_string())
        .args(
            froms
                .iter()
                .map(|f| format!("releases/{}/{}", f.version, f.name)),
        )
        .args(&lib_ebins)
        .env_remove("ERL_FLAGS")
        .env_remove("ERL_AFLAGS")
        .env_remove("ERL_ZFLAGS")
        .env_remove("ERL_LIBS");
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd.output().map_err(|e| {
        fail(format!(
            "cannot run {program} ({e}); systools needs an Erlang runtime: the release's own \
             erts-*/ or erl on PATH"
        ))
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let warnings: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("warning "))
        .map(str::to_string)
        .collect();
    if !output.status.success() {
        let errors: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("error "))
            .collect();
        let detail = if errors.is_empty() {
            format!(
                "{program} failed ({}): {}{}",
                output.status,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )
        } else {
            format!(
                "systools:make_relup failed: {}{}",
                errors.join("; "),
                if warnings.is_empty() {
                    String::new()
                } else {
                    format!(" (warnings: {})", warnings.join("; "))
                }
            )
        };
        return Err(fail(detail));
    }
    Ok(warnings)
}

/// `lib/*/ebin`, relative to the release directory, sorted.
fn lib_ebin_dirs(dir: &Path) -> Result<Vec<String>> {
    let lib = dir.join("lib");
    let mut out = Vec::new();
    for entry in fs::read_dir(&lib).ctx(&lib, "read directory")? {
        let entry = entry.ctx(&lib, "read directory")?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if entry.path().join("ebin").is_dir() {
            out.push(format!("lib/{name}/ebin"));
        }
    }
    out.sort();
    Ok(out)
}

/// One member of the tarball: its name in the archive and where it comes
/// from (a path, or generated content).
enum Member {
    Path(String),
    Generated(String, Vec<u8>),
}

/// What goes into the tarball for `to`, in order.
fn tarball_members(dir: &Path, to: &Rel, layout: Layout) -> Result<Vec<Member>> {
    let mut members = vec![Member::Path("bin".into())];
    if layout == Layout::Relx {
        // relx's bin/REL boots the version it was built for: the target's
        // own copy is bin/REL-TO.
        let own = format!("bin/{}-{}", to.name, to.version);
        if dir.join(&own).is_file() {
            let bytes = fs::read(dir.join(&own)).ctx(dir.join(&own), "read")?;
            members.push(Member::Generated(format!("bin/{}", to.name), bytes));
        }
    }
    members.push(Member::Path(format!("releases/{}", to.version)));
    let erts = format!("erts-{}", to.erts);
    if dir.join(&erts).is_dir() {
        members.push(Member::Path(erts));
    }
    for (app, vsn) in &to.apps {
        members.push(Member::Path(format!("lib/{app}-{vsn}")));
    }
    let start_erl = format!("{} {}", to.erts, to.version).into_bytes();
    match layout {
        Layout::Mix => {
            // As mix's :tar step: every file directly under releases/; the
            // start_erl.data the build of `to` wrote (a later build of
            // another version rewrites it).
            let rdir = dir.join("releases");
            let mut names = Vec::new();
            for entry in fs::read_dir(&rdir).ctx(&rdir, "read directory")? {
                let entry = entry.ctx(&rdir, "read directory")?;
                if entry.file_type().ctx(entry.path(), "stat")?.is_file()
                    && let Some(name) = entry.file_name().to_str()
                    && name != "start_erl.data"
                {
                    names.push(name.to_string());
                }
            }
            names.sort();
            members.extend(
                names
                    .into_iter()
                    .map(|n| Member::Path(format!("releases/{n}"))),
            );
            members.push(Member::Generated(
                "releases/start_erl.data".into(),
                start_erl,
            ));
        }
        Layout::Relx => {
            // As `rebar3 tar`: the top-level .rel, RELEASES and
            // start_erl.data all describe the target alone.
            let rel_src = dir.join(format!("releases/{0}/{1}.rel", to.version, to.name));
            let rel_bytes = fs::read(&rel_src).ctx(&rel_src, "read")?;
            members.push(Member::Generated(
                format!("releases/{}.rel", to.name),
                rel_bytes,
            ));
            members.push(Member::Generated(
                "releases/RELEASES".into(),
                releases_file(to).into_bytes(),
            ));
            members.push(Member::Generated(
                "releases/start_erl.data".into(),
                start_erl,
            ));
        }
    }
    Ok(members)
}

/// A `releases/RELEASES` naming `to` alone as permanent, as relx writes it.
pub fn releases_file(to: &Rel) -> String {
    releases_file::format_releases(&[releases_file::entry_of(to, "permanent")])
}

fn write_tarball(dir: &Path, to: &Rel, layout: Layout, out: &Path, overwrite: bool) -> Result<()> {
    let members = tarball_members(dir, to, layout)?;
    let file = AtomicFile::create(out, 0o644, overwrite)?;
    let tmp = file.tmp_path().to_path_buf();
    let mut builder =
        tar::Builder::new(GzEncoder::new(BufWriter::new(file), Compression::default()));
    // As erl_tar's `dereference`: the archive holds what links point at.
    builder.follow_symlinks(true);
    for member in &members {
        match member {
            Member::Path(name) => {
                let src = dir.join(name);
                let meta = fs::metadata(&src).ctx(&src, "stat")?;
                if meta.is_dir() {
                    append_dir(&mut builder, dir, name, to, layout)?;
                } else {
                    builder
                        .append_path_with_name(&src, name)
                        .ctx(&tmp, "write tarball")?;
                }
            }
            Member::Generated(name, bytes) => {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(if name.starts_with("bin/") {
                    0o755
                } else {
                    0o644
                });
                header.set_mtime(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                );
                builder
                    .append_data(&mut header, name, bytes.as_slice())
                    .ctx(&tmp, "write tarball")?;
            }
        }
    }
    let gz = builder.into_inner().ctx(&tmp, "write tarball")?;
    let writer = gz.finish().ctx(&tmp, "write tarball")?;
    let file = writer
        .into_inner()
        .map_err(|e| Error::io(&tmp, "write tarball", e.into_error()))?;
    file.commit()
}

/// A directory and everything below it, in sorted order. With the relx
/// layout, `bin/REL` is skipped: it comes from `bin/REL-TO` instead.
fn append_dir<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    name: &str,
    to: &Rel,
    layout: Layout,
) -> Result<()> {
    let src = root.join(name);
    let mut entries: Vec<String> = fs::read_dir(&src)
        .ctx(&src, "read directory")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    entries.sort();
    for entry in entries {
        let child = format!("{name}/{entry}");
        let path = root.join(&child);
        if layout == Layout::Relx
            && child == format!("bin/{}", to.name)
            && root
                .join(format!("bin/{}-{}", to.name, to.version))
                .is_file()
        {
            continue;
        }
        let meta = fs::metadata(&path).ctx(&path, "stat")?;
        if meta.is_dir() {
            append_dir(builder, root, &child, to, layout)?;
        } else {
            let mut f = File::open(&path).ctx(&path, "open")?;
            builder
                .append_file(&child, &mut f)
                .ctx(&path, "add to tarball")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(vsn: &str, apps: &[(&str, &str)]) -> Rel {
        Rel {
            name: "thermex".into(),
            version: vsn.into(),
            erts: "13.1.5".into(),
            apps: apps
                .iter()
                .map(|(a, v)| (a.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn only_apps_at_another_version_need_an_appup() {
        let to = rel(
            "1.2.0",
            &[("kernel", "8.5.3"), ("thermex", "1.2.0"), ("new", "1.0.0")],
        );
        let froms = [
            rel(
                "1.0.0",
                &[("kernel", "8.5.3"), ("thermex", "1.0.0"), ("gone", "1")],
            ),
            rel("1.1.0", &[("kernel", "8.5.3"), ("thermex", "1.1.0")]),
        ];
        let changes = changed_apps(&to, &froms);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].app, "thermex");
        assert_eq!(changes[0].from_vsns, ["1.0.0", "1.1.0"]);
        assert_eq!(changes[0].from_releases, ["1.0.0", "1.1.0"]);
    }

    fn change() -> AppChange {
        AppChange {
            app: "thermex".into(),
            to_vsn: "1.1.0".into(),
            from_vsns: vec!["1.0.0".into()],
            from_releases: vec!["1.0.0".into()],
        }
    }

    #[test]
    fn an_appup_must_cover_every_old_version_both_ways() {
        let good = "%% comment\n{\"1.1.0\", [{\"1.0.0\", [{load_module, 'Elixir.Thermex.Api'}]}],\n [{\"1.0.0\", []}]}.";
        check_appup(good, &change()).unwrap();
        let no_down = r#"{"1.1.0", [{"1.0.0", []}], []}."#;
        let e = check_appup(no_down, &change()).unwrap_err();
        assert!(e.contains("downgrade") && e.contains("1.0.0"), "{e}");
        let wrong_vsn = r#"{"1.0.9", [{"1.0.0", []}], [{"1.0.0", []}]}."#;
        assert!(
            check_appup(wrong_vsn, &change())
                .unwrap_err()
                .contains("1.0.9")
        );
        let regex = r#"{"1.1.0", [{<<"1\\.0\\..*">>, []}], [{<<"1\\..*">>, []}]}."#;
        check_appup(regex, &change()).unwrap();
        assert!(check_appup("{\"1.1.0\", [], []}", &change()).is_err());
    }

    #[test]
    fn the_missing_appup_message_says_which_app_and_where() {
        let m = missing_appup_message(
            &change(),
            Path::new("rel/lib/thermex-1.1.0/ebin/thermex.appup"),
        );
        assert!(m.contains("thermex"), "{m}");
        assert!(m.contains("1.0.0") && m.contains("1.1.0"), "{m}");
        assert!(
            m.contains("rel/lib/thermex-1.1.0/ebin/thermex.appup"),
            "{m}"
        );
    }

    #[test]
    fn releases_file_is_a_term_release_handler_reads() {
        let text = releases_file(&rel("1.1.0", &[("kernel", "8.5.3"), ("thermex", "1.1.0")]));
        let terms = eterm::parse_terms(&text).unwrap();
        assert_eq!(
            terms[0].to_string(),
            r#"[{release,"thermex","1.1.0","13.1.5",[{kernel,"8.5.3","./lib/kernel-8.5.3"},{thermex,"1.1.0","./lib/thermex-1.1.0"}],permanent}]"#
        );
    }
}
