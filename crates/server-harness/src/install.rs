//! Installing the test servers (what `cargo xtask install` runs).
//!
//! * From the system's own Debian 12 packages: `redis-server`, `postgresql` (15),
//!   `protobuf-compiler` and `libprotobuf-dev` (the etcd client crate's build needs `protoc`
//!   and the well-known `.proto` files). `apt-get update` runs only if one is missing.
//!   Installing these packages may start their system services (`invoke-rc.d`); the harness
//!   never uses them: it starts its own servers on other ports.
//! * Not in Debian 12: `etcd-server`/`etcd-client` 3.5 from Debian trixie and `consul` 1.8.7
//!   from Debian bullseye. They are fetched with `apt-get download` using a sources list,
//!   state and cache of our own under `.servers/apt/` (the system's apt configuration is never
//!   changed), then unpacked with `dpkg -x` into `.servers/`. The mirror is the one the
//!   system already uses: the `URIs:` of its Debian source (deb822 `.sources` files or the
//!   one-line `sources.list`), with the suite name replaced; `DISTLOCK_DEBIAN_MIRROR`
//!   overrides it. Signatures are checked by apt against
//!   `/usr/share/keyrings/debian-archive-keyring.gpg` (Debian 12's keyring also holds the
//!   bullseye and trixie keys); `--error-on=any` makes a bad signature fail the install.
//!
//! A second run finds everything in place and returns without touching the network.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::binaries::{Binary, is_executable, servers_dir};
use crate::error::{Error, IoContext, Result};
use crate::process::run_command;
use crate::util::running_as_root;

/// Debian packages from the running system's own release.
pub const SYSTEM_PACKAGES: [&str; 4] = [
    "redis-server",
    "postgresql",
    "protobuf-compiler",
    "libprotobuf-dev",
];

/// A package fetched from another Debian release and unpacked into `.servers/`.
#[derive(Debug, Clone, Copy)]
pub struct ForeignPackage {
    /// The package name.
    pub name: &'static str,
    /// The Debian suite it comes from.
    pub suite: &'static str,
    /// Accepted versions start with this.
    pub version_prefix: &'static str,
    /// The binary it provides, which makes it unnecessary when already found.
    pub provides: Binary,
}

/// The packages unpacked into `.servers/`.
pub const FOREIGN_PACKAGES: [ForeignPackage; 3] = [
    ForeignPackage {
        name: "etcd-server",
        suite: "trixie",
        version_prefix: "3.5.",
        provides: Binary::Etcd,
    },
    ForeignPackage {
        name: "etcd-client",
        suite: "trixie",
        version_prefix: "3.5.",
        provides: Binary::Etcdctl,
    },
    ForeignPackage {
        name: "consul",
        suite: "bullseye",
        version_prefix: "1.8.7",
        provides: Binary::Consul,
    },
];

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// What [`install`] did.
#[derive(Debug, Default, Clone)]
pub struct InstallReport {
    /// System packages that were installed with `apt-get install`.
    pub installed_system: Vec<String>,
    /// Foreign packages downloaded and unpacked (`name=version`).
    pub unpacked: Vec<String>,
    /// Where each binary is now found.
    pub found: Vec<(Binary, PathBuf)>,
    /// Seconds spent.
    pub seconds: f64,
}

impl std::fmt::Display for InstallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.installed_system.is_empty() && self.unpacked.is_empty() {
            writeln!(f, "everything was already installed")?;
        }
        if !self.installed_system.is_empty() {
            writeln!(f, "apt-get installed: {}", self.installed_system.join(" "))?;
        }
        if !self.unpacked.is_empty() {
            writeln!(f, "unpacked into .servers/: {}", self.unpacked.join(" "))?;
        }
        for (b, p) in &self.found {
            writeln!(f, "  {:<14} {}", b.file_name(), p.display())?;
        }
        write!(f, "took {:.1} s", self.seconds)
    }
}

/// Whether a system package's files are present (cheap file checks, no dpkg query).
fn system_package_present(pkg: &str) -> bool {
    match pkg {
        "redis-server" => Binary::RedisServer.locate().is_ok(),
        "postgresql" => Binary::PostgresBinDir.locate().is_ok(),
        "protobuf-compiler" => {
            std::env::var_os("PROTOC").is_some_and(|p| is_executable(Path::new(&p)))
                || on_path("protoc")
        }
        "libprotobuf-dev" => Path::new("/usr/include/google/protobuf/descriptor.proto").exists(),
        _ => false,
    }
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| is_executable(&d.join(name))))
        .unwrap_or(false)
}

/// The system packages whose files are missing.
pub fn missing_system_packages() -> Vec<&'static str> {
    SYSTEM_PACKAGES
        .into_iter()
        .filter(|p| !system_package_present(p))
        .collect()
}

/// The foreign packages whose binaries are not found, or are found with the wrong version
/// (say Debian 12's own etcd 3.4 on `PATH`). A binary set by its override variable is taken
/// as it is: that is the user's explicit choice.
pub fn missing_foreign_packages() -> Vec<ForeignPackage> {
    FOREIGN_PACKAGES
        .into_iter()
        .filter(|p| match p.provides.locate() {
            Err(_) => true,
            Ok(path) => {
                std::env::var_os(p.provides.env_var()).is_none_or(|v| v.is_empty())
                    && !has_version(&path, p)
            }
        })
        .collect()
}

/// Whether the binary at `path` reports a version starting with the package's prefix.
fn has_version(path: &Path, p: &ForeignPackage) -> bool {
    let arg = if p.provides == Binary::Etcd {
        "--version"
    } else {
        "version"
    };
    Command::new(path)
        .arg(arg)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            text.split(|c: char| c.is_whitespace() || c == 'v')
                .any(|word| word.starts_with(p.version_prefix))
        })
        .unwrap_or(false)
}

/// Installs whatever is missing; does nothing (quickly) when all is in place.
pub fn install() -> Result<InstallReport> {
    let started = Instant::now();
    let mut report = InstallReport::default();

    let missing = missing_system_packages();
    if !missing.is_empty() {
        if !running_as_root() {
            return Err(Error::Install(format!(
                "missing Debian packages: {m}. Install them as root: \
                 `sudo apt-get update && sudo apt-get install -y {m}`, then run `cargo xtask install` again",
                m = missing.join(" ")
            )));
        }
        run_command(Command::new("apt-get").args(["update", "-q"]))?;
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_command(&mut cmd)?;
        report.installed_system = missing.iter().map(|s| s.to_string()).collect();
    }

    let foreign = missing_foreign_packages();
    if !foreign.is_empty() {
        let servers = servers_dir().ok_or_else(|| {
            Error::Install(
                "cannot find the workspace root to hold .servers/; set DISTLOCK_SERVERS_DIR".into(),
            )
        })?;
        report.unpacked = fetch_foreign(&servers, &foreign)?;
    }

    for b in Binary::ALL {
        report.found.push((b, b.locate()?));
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A Debian mirror URI as configured on this system (the main archive, not security).
pub fn system_debian_mirror() -> Result<String> {
    if let Some(m) = std::env::var_os("DISTLOCK_DEBIAN_MIRROR").filter(|m| !m.is_empty()) {
        return Ok(m.to_string_lossy().trim_end_matches('/').to_string());
    }
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push((false, t));
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let deb822 = p.extension().is_some_and(|e| e == "sources");
            let one_line = p.extension().is_some_and(|e| e == "list");
            if (deb822 || one_line)
                && let Ok(t) = std::fs::read_to_string(&p)
            {
                texts.push((deb822, t));
            }
        }
    }
    texts
        .iter()
        .find_map(|(deb822, t)| {
            if *deb822 {
                mirror_from_deb822(t)
            } else {
                mirror_from_one_line(t)
            }
        })
        .ok_or_else(|| {
            Error::Install(
                "no Debian archive found in /etc/apt/sources.list or /etc/apt/sources.list.d/*; \
                 set DISTLOCK_DEBIAN_MIRROR to a Debian mirror URI"
                    .into(),
            )
        })
}

/// Whether a suite name is a Debian main-archive suite (not security, not a third party).
fn is_debian_suite(suite: &str) -> bool {
    const RELEASES: [&str; 9] = [
        "buster",
        "bullseye",
        "bookworm",
        "trixie",
        "forky",
        "sid",
        "stable",
        "oldstable",
        "testing",
    ];
    let base = suite.split('-').next().unwrap_or(suite);
    RELEASES.contains(&base) && !suite.ends_with("-security")
}

fn mirror_from_deb822(text: &str) -> Option<String> {
    for para in text.split("\n\n") {
        let mut uris = None;
        let mut suites = None;
        let mut types_deb = false;
        for line in para.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                match k.trim() {
                    "URIs" => uris = Some(v.trim().to_string()),
                    "Suites" => suites = Some(v.trim().to_string()),
                    "Types" => types_deb = v.split_whitespace().any(|t| t == "deb"),
                    "Enabled" if v.trim() == "no" => {
                        uris = None;
                        break;
                    }
                    _ => {}
                }
            }
        }
        if let (Some(u), Some(s), true) = (uris, suites, types_deb)
            && s.split_whitespace().any(is_debian_suite)
            && let Some(first) = u.split_whitespace().next()
        {
            return Some(first.trim_end_matches('/').to_string());
        }
    }
    None
}

fn mirror_from_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.trim();
        let rest = line.strip_prefix("deb ")?;
        let rest = rest.trim_start();
        // Skip "[options]".
        let rest = if rest.starts_with('[') {
            rest.split_once(']')?.1.trim_start()
        } else {
            rest
        };
        let mut parts = rest.split_whitespace();
        let uri = parts.next()?;
        let suite = parts.next()?;
        is_debian_suite(suite).then(|| uri.trim_end_matches('/').to_string())
    })
}

fn apt_options(apt: &Path) -> Vec<String> {
    let mut o = vec![
        format!(
            "Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        format!(
            "Dir::Etc::SourceParts={}",
            apt.join("sources.list.d").display()
        ),
        format!("Dir::State={}", apt.join("state").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "Dir::State::status=/var/lib/dpkg/status".to_string(),
        "Acquire::Languages=none".to_string(),
        "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
        "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_string(),
        "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_string(),
    ];
    if running_as_root() {
        // Our folders are root's; apt's `_apt` sandbox user could not write them.
        o.push("APT::Sandbox::User=root".to_string());
    }
    o.into_iter().flat_map(|x| ["-o".to_string(), x]).collect()
}

/// Downloads and unpacks `packages` into `servers`; returns `name=version` for each.
fn fetch_foreign(servers: &Path, packages: &[ForeignPackage]) -> Result<Vec<String>> {
    let mirror = system_debian_mirror()?;
    let apt = servers.join("apt");
    for d in [
        apt.join("sources.list.d"),
        apt.join("state/lists/partial"),
        apt.join("cache/archives/partial"),
        apt.join("debs"),
    ] {
        std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
    }
    let signed = if Path::new(KEYRING).exists() {
        format!("[signed-by={KEYRING}] ")
    } else {
        // No Debian keyring file: apt falls back to its trusted keys in /etc/apt/trusted.gpg.d,
        // which still verifies the signatures (or fails the update).
        String::new()
    };
    let mut suites: Vec<&str> = packages.iter().map(|p| p.suite).collect();
    suites.sort_unstable();
    suites.dedup();
    let mut list = String::new();
    for s in &suites {
        let _ = writeln!(list, "deb {signed}{mirror} {s} main");
    }
    crate::util::write_file(&apt.join("sources.list"), list)?;
    let opts = apt_options(&apt);
    run_command(
        Command::new("apt-get")
            .args(&opts)
            .args(["update", "-q", "--error-on=any"]),
    )?;

    let mut wanted = Vec::new();
    for p in packages {
        let madison = run_command(
            Command::new("apt-cache")
                .args(&opts)
                .args(["madison", p.name]),
        )?;
        let version = madison
            .lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split('|').map(str::trim).collect();
                (cols.len() >= 3 && cols[0] == p.name && cols[2].contains(p.suite))
                    .then(|| cols[1].to_string())
            })
            .find(|v| v.starts_with(p.version_prefix))
            .ok_or_else(|| {
                Error::Install(format!(
                    "{} {}* is not offered by {mirror} {} (apt-cache madison said: {})",
                    p.name,
                    p.version_prefix,
                    p.suite,
                    madison.trim()
                ))
            })?;
        wanted.push(format!("{}={version}", p.name));
    }
    let debs = apt.join("debs");
    run_command(
        Command::new("apt-get")
            .args(&opts)
            .args(["download", "-q"])
            .args(&wanted)
            .current_dir(&debs),
    )?;
    for w in &wanted {
        let (name, version) = w.split_once('=').unwrap_or((w, ""));
        // apt writes ':' in versions as "%3a".
        let file_version = version.replace(':', "%3a");
        let deb = std::fs::read_dir(&debs)
            .ctx(|| format!("reading {}", debs.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&format!("{name}_{file_version}_")))
            })
            .ok_or_else(|| Error::Install(format!("apt-get download left no .deb for {w}")))?;
        run_command(Command::new("dpkg").arg("-x").arg(&deb).arg(servers))?;
    }
    for p in packages {
        p.provides.locate()?;
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_deb822_sources() {
        let text = "Types: deb\n# comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_from_deb822(text).as_deref(),
            Some("http://mirror.invalid/debian")
        );
        let security_only = "Types: deb\nURIs: http://x.invalid/s\nSuites: bookworm-security\n";
        assert_eq!(mirror_from_deb822(security_only), None);
    }

    #[test]
    fn reads_one_line_sources() {
        let text = "# deb http://old.invalid/debian bookworm main\n\
                    deb [arch=amd64] http://other.invalid/apt cloud-sdk main\n\
                    deb [signed-by=/k.gpg] http://mirror.invalid/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_one_line(text).as_deref(),
            Some("http://mirror.invalid/debian")
        );
    }
}
