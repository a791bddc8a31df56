//! Finding the server binaries.
//!
//! Lookup order, first match wins:
//!
//! | binary | 1. variable (must be valid if set) | 2. project folder | 3. `PATH` | 4. Debian location |
//! |---|---|---|---|---|
//! | `redis-server` | `DISTLOCK_REDIS_SERVER` (file) | `.servers/usr/bin/` | `PATH` | `/usr/bin/redis-server` |
//! | `etcd` | `DISTLOCK_ETCD` (file) | `.servers/usr/bin/` | `PATH` | `/usr/bin/etcd` |
//! | `etcdctl` | `DISTLOCK_ETCDCTL` (file) | `.servers/usr/bin/` | `PATH` | `/usr/bin/etcdctl` |
//! | `consul` | `DISTLOCK_CONSUL` (file) | `.servers/usr/bin/` | `PATH` | `/usr/bin/consul` |
//! | PostgreSQL (`initdb`, `postgres`) | `DISTLOCK_PG_BIN_DIR` (folder) | `.servers/usr/lib/postgresql/15/bin/` | — | `/usr/lib/postgresql/15/bin/` then the folder of `initdb` on `PATH` |
//!
//! For PostgreSQL the Debian folder comes before `PATH` because Debian puts only wrapper
//! scripts on `PATH`, and the version there is not pinned.
//!
//! `.servers/` is the project's git-ignored folder that `cargo xtask install` fills, at the
//! workspace root. The root is found from this crate's `CARGO_MANIFEST_DIR` at compile time
//! (two levels up), else by walking up from the current directory to a `Cargo.toml` with a
//! `[workspace]` table. `DISTLOCK_SERVERS_DIR` overrides the folder itself.
//!
//! An override variable that is set but wrong is an error, never a silent fallback: a test
//! must not run against a different binary than the one you asked for.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A server binary the harness can look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Binary {
    /// `redis-server` (Debian package `redis-server`).
    RedisServer,
    /// `etcd` 3.5 (Debian trixie package `etcd-server`, unpacked by `cargo xtask install`).
    Etcd,
    /// `etcdctl` 3.5 (Debian trixie package `etcd-client`).
    Etcdctl,
    /// `consul` 1.8.7 (Debian bullseye package `consul`).
    Consul,
    /// The PostgreSQL 15 binary folder containing `initdb` and `postgres`.
    PostgresBinDir,
}

impl Binary {
    /// Every binary, in install order.
    pub const ALL: [Binary; 5] = [
        Binary::RedisServer,
        Binary::PostgresBinDir,
        Binary::Etcd,
        Binary::Etcdctl,
        Binary::Consul,
    ];

    /// The file name looked for (for PostgreSQL: `initdb`, which must sit next to `postgres`).
    pub fn file_name(self) -> &'static str {
        match self {
            Binary::RedisServer => "redis-server",
            Binary::Etcd => "etcd",
            Binary::Etcdctl => "etcdctl",
            Binary::Consul => "consul",
            Binary::PostgresBinDir => "initdb",
        }
    }

    /// The environment variable that overrides the lookup.
    pub fn env_var(self) -> &'static str {
        match self {
            Binary::RedisServer => "DISTLOCK_REDIS_SERVER",
            Binary::Etcd => "DISTLOCK_ETCD",
            Binary::Etcdctl => "DISTLOCK_ETCDCTL",
            Binary::Consul => "DISTLOCK_CONSUL",
            Binary::PostgresBinDir => "DISTLOCK_PG_BIN_DIR",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Binary::PostgresBinDir => "a folder containing PostgreSQL 15's `initdb` and `postgres`",
            Binary::RedisServer => "an executable `redis-server` file",
            Binary::Etcd => "an executable `etcd` 3.5 file",
            Binary::Etcdctl => "an executable `etcdctl` 3.5 file",
            Binary::Consul => "an executable `consul` file",
        }
    }

    fn display_name(self) -> &'static str {
        match self {
            Binary::PostgresBinDir => "initdb (PostgreSQL 15)",
            other => other.file_name(),
        }
    }

    /// Finds the binary (or, for [`Binary::PostgresBinDir`], the folder) in the documented
    /// order, reading the real environment.
    pub fn locate(self) -> Result<PathBuf> {
        self.locate_with(|k| std::env::var_os(k))
    }

    /// Like [`Binary::locate`], with the environment supplied by the caller (for tests and
    /// tools that must not change the process environment).
    pub fn locate_with(self, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
        let is_dir = self == Binary::PostgresBinDir;
        if let Some(value) = env(self.env_var()).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(value);
            let ok = if is_dir {
                is_executable(&path.join("initdb")) && is_executable(&path.join("postgres"))
            } else {
                is_executable(&path)
            };
            return if ok {
                Ok(path)
            } else {
                Err(Error::BadOverride {
                    env_var: self.env_var(),
                    path,
                    what: self.what(),
                })
            };
        }
        let mut searched = Vec::new();
        let servers = servers_dir_with(&env);
        let path_dirs: Vec<PathBuf> = env("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let candidates: Vec<PathBuf> = if is_dir {
            let mut c = Vec::new();
            if let Some(s) = &servers {
                c.push(s.join("usr/lib/postgresql/15/bin"));
            }
            c.push(PathBuf::from("/usr/lib/postgresql/15/bin"));
            for d in &path_dirs {
                if let Ok(real) = std::fs::canonicalize(d.join("initdb"))
                    && let Some(parent) = real.parent()
                {
                    c.push(parent.to_path_buf());
                }
            }
            c
        } else {
            let name = self.file_name();
            let mut c = Vec::new();
            if let Some(s) = &servers {
                c.push(s.join("usr/bin").join(name));
            }
            c.extend(path_dirs.iter().map(|d| d.join(name)));
            c.push(Path::new("/usr/bin").join(name));
            c
        };
        for c in candidates {
            let ok = if is_dir {
                is_executable(&c.join("initdb")) && is_executable(&c.join("postgres"))
            } else {
                is_executable(&c)
            };
            if ok {
                return Ok(c);
            }
            searched.push(c.display().to_string());
        }
        if !is_dir {
            // PATH entries are many; summarise them.
            searched.retain(|s| !path_dirs.iter().any(|d| Path::new(s).parent() == Some(d)));
            searched.insert(1.min(searched.len()), "$PATH".to_string());
        }
        Err(Error::BinaryNotFound {
            binary: self.display_name(),
            env_var: self.env_var(),
            what: self.what(),
            searched: searched.join(", "),
        })
    }
}

/// Whether `path` is a regular file with an execute bit.
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The workspace root: from `CARGO_MANIFEST_DIR` at compile time if it still exists, else by
/// walking up from the current directory to a `Cargo.toml` with `[workspace]`.
pub fn workspace_root() -> Option<PathBuf> {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(root) = compiled.parent().and_then(Path::parent)
        && is_workspace_root(root)
    {
        return Some(root.to_path_buf());
    }
    let mut dir = std::env::current_dir().ok()?;
    loop {
        if is_workspace_root(&dir) {
            return Some(dir);
        }
        if !dir.pop() {
            return None;
        }
    }
}

fn is_workspace_root(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .map(|t| t.lines().any(|l| l.trim() == "[workspace]"))
        .unwrap_or(false)
}

/// The project's server folder: `DISTLOCK_SERVERS_DIR`, else `<workspace root>/.servers`.
///
/// It may not exist yet.
pub fn servers_dir() -> Option<PathBuf> {
    servers_dir_with(&|k: &str| std::env::var_os(k))
}

fn servers_dir_with(env: &impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    if let Some(v) = env("DISTLOCK_SERVERS_DIR").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(v));
    }
    workspace_root().map(|r| r.join(".servers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_override_is_reported_with_variable_and_install_hint() {
        let err = Binary::Etcd
            .locate_with(|k| (k == "DISTLOCK_ETCD").then(|| "/nonexistent/etcd".into()))
            .expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("DISTLOCK_ETCD"), "{text}");
        assert!(text.contains("/nonexistent/etcd"), "{text}");
        assert!(text.contains("cargo xtask install"), "{text}");
    }

    #[test]
    fn missing_everywhere_names_binary_variable_and_command() {
        let err = Binary::Consul
            .locate_with(|k| match k {
                "PATH" => Some("/nonexistent-a:/nonexistent-b".into()),
                "DISTLOCK_SERVERS_DIR" => Some("/nonexistent-servers".into()),
                _ => None,
            })
            .map(|p| p.display().to_string());
        // /usr/bin/consul may exist on some machines; only check the error when it does not.
        if let Err(err) = err {
            let text = err.to_string();
            assert!(text.contains("`consul`"), "{text}");
            assert!(text.contains("DISTLOCK_CONSUL"), "{text}");
            assert!(text.contains("cargo xtask install"), "{text}");
        }
    }

    #[test]
    fn finds_the_workspace_root() {
        let root = workspace_root().expect("root");
        assert!(root.join("crates/server-harness").is_dir());
    }
}
