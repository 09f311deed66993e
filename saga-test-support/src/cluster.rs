//! Throwaway PostgreSQL clusters made from the local `initdb`, `pg_ctl` and
//! `postgres` binaries.
//!
//! A cluster lives in a temporary directory owned by a small supervisor
//! shell process (the script below). The supervisor runs `initdb` and
//! `pg_ctl` on request, one command per line on its standard input, and
//! answers `ok` or `error` on its standard output. Its standard input is a
//! pipe whose only writer is this process: when this process drops the
//! cluster, exits or is killed, the pipe closes, `read` returns end-of-file,
//! and the supervisor stops the server (`pg_ctl stop -m immediate`) and
//! deletes the directory. It runs in its own process group, so a Ctrl-C
//! meant for the tests does not kill it before it has cleaned up. Its
//! standard error is this process's; nothing else it starts keeps it (the
//! server and the PostgreSQL tools write to log files), so it is closed for
//! good once this process and the supervisor have both exited.

use std::{
    env, fs,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio_postgres::Config;

use super::{TestDatabase, TestDbError, server};

/// Environment variable naming the directory of `initdb`, `pg_ctl` and
/// `postgres`, searched before `PATH`.
pub(crate) const PG_BIN_DIR_ENV: &str = "SAGA_TEST_PG_BIN_DIR";

/// Environment variable: when `1`, only `$SAGA_TEST_PG_BIN_DIR` is searched
/// for the binaries (not `PATH` nor the usual install locations), to pin
/// one installation, or to see what happens with none.
pub(crate) const PG_BIN_DIR_ONLY_ENV: &str = "SAGA_TEST_PG_BIN_DIR_ONLY";

/// The OS user that runs the cluster when this process runs as root.
const CLUSTER_USER: &str = "postgres";

/// How many times to pick another port when the chosen one was taken
/// between choosing it and the server binding it.
const PORT_ATTEMPTS: usize = 8;

/// Environment variable: when `1`, the shared test server's cluster is left
/// running when the test process exits, for inspection.
pub(crate) const KEEP_CLUSTER_ENV: &str = "SAGA_TEST_KEEP_CLUSTER";

/// The supervisor. Arguments: `$1` the binaries' directory, `$2` the
/// cluster's root directory, `$3` lines to append to `postgresql.conf`,
/// `$4` `keep` to leave the cluster running when the owner goes away.
const SUPERVISOR_SCRIPT: &str = r#"
set -u
# Writing an answer after the owner is gone must not kill us before clean-up.
trap '' PIPE
bin=$1
root=$2
settings=$3
keep=${4:-}
data=$root/data
cleanup() {
    trap - EXIT HUP INT TERM
    if [ -f "$data/postmaster.pid" ]; then
        "$bin/pg_ctl" -D "$data" -m immediate -w stop >>"$root/pg_ctl.log" 2>&1
    fi
    rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
while IFS= read -r cmd; do
    case $cmd in
    init)
        if "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-locale --no-sync \
                --no-instructions >"$root/initdb.log" 2>&1 \
            && printf '%s\n' "$settings" >>"$data/postgresql.conf"; then
            echo ok
        else
            echo error
        fi
        ;;
    "start "*)
        if "$bin/pg_ctl" -D "$data" -l "$root/postgres.log" -o "-p ${cmd#start }" -w -t 60 \
                start >>"$root/pg_ctl.log" 2>&1; then
            echo ok
        else
            echo error
        fi
        ;;
    stop)
        if "$bin/pg_ctl" -D "$data" -m immediate -w stop >>"$root/pg_ctl.log" 2>&1; then
            echo ok
        else
            echo error
        fi
        ;;
    *)
        echo error
        ;;
    esac
done
if [ "$keep" = keep ]; then
    trap - EXIT
    echo "kept the cluster in $data (stop it with: pg_ctl -D $data stop)" >&2
fi
exit 0
"#;

/// A directory holding `initdb`, `pg_ctl` and `postgres` of one installation.
#[derive(Clone, Debug)]
pub(crate) struct PgBin {
    dir: PathBuf,
}

/// Finds the PostgreSQL binaries, or returns the directories searched.
pub(crate) fn find_pg_bin() -> Result<PgBin, Vec<PathBuf>> {
    let candidates = candidate_dirs();
    match candidates.iter().find_map(|dir| pg_bin_in(dir)) {
        Some(found) => Ok(found),
        None => Err(candidates),
    }
}

/// `$SAGA_TEST_PG_BIN_DIR`, `PATH`, then the usual install locations; or,
/// with `SAGA_TEST_PG_BIN_DIR_ONLY=1`, `$SAGA_TEST_PG_BIN_DIR` alone.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = env::var_os(PG_BIN_DIR_ENV) {
        dirs.push(dir.into());
    }
    if env::var(PG_BIN_DIR_ONLY_ENV).is_ok_and(|only| only == "1") {
        return dirs;
    }
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    dirs.extend(versioned_dirs("/usr/lib/postgresql", "", "bin"));
    dirs.push("/usr/local/pgsql/bin".into());
    dirs.extend(versioned_dirs("/usr", "pgsql-", "bin"));
    dirs.extend(versioned_dirs("/usr/pgsql", "", "bin"));
    dirs.push("/opt/homebrew/bin".into());
    dirs.extend(versioned_dirs("/opt/homebrew/opt", "postgresql@", "bin"));
    dirs.push("/usr/local/bin".into());
    dirs.extend(versioned_dirs("/usr/local/opt", "postgresql@", "bin"));
    dirs.push("/Applications/Postgres.app/Contents/Versions/latest/bin".into());
    let mut unique = Vec::with_capacity(dirs.len());
    for dir in dirs {
        if !dir.as_os_str().is_empty() && !unique.contains(&dir) {
            unique.push(dir);
        }
    }
    unique
}

/// `<parent>/<prefix><version>/<sub>` for each version present, newest first.
fn versioned_dirs(parent: &str, prefix: &str, sub: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u32>, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix(prefix)?;
            let key = version
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<_>>>()?;
            Some((key, entry.path().join(sub)))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, dir)| dir).collect()
}

/// The installation `dir/initdb` belongs to (symlinks resolved, so that
/// `pg_ctl` and `postgres` come from the same one), if it is complete.
fn pg_bin_in(dir: &Path) -> Option<PgBin> {
    let initdb = dir.join("initdb");
    if !is_executable(&initdb) {
        return None;
    }
    let real = fs::canonicalize(&initdb).ok()?;
    let real_dir = real.parent()?;
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|binary| is_executable(&real_dir.join(binary)))
        .then(|| PgBin {
            dir: real_dir.to_path_buf(),
        })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Who runs `initdb` and the server.
#[derive(Clone, Copy, Debug)]
enum RunAs {
    /// This process's user.
    Me,
    /// Another user (when this process runs as root).
    User { uid: u32, gid: u32 },
}

fn run_as() -> Result<RunAs, TestDbError> {
    if effective_uid()? != 0 {
        return Ok(RunAs::Me);
    }
    let uid = id(&["-u", CLUSTER_USER])?;
    let gid = id(&["-g", CLUSTER_USER])?;
    match (uid, gid) {
        (Some(uid), Some(gid)) if uid != 0 => Ok(RunAs::User { uid, gid }),
        _ => Err(TestDbError::NoUnprivilegedUser { user: CLUSTER_USER }),
    }
}

/// The effective uid, from `/proc/self/status` or else `id -u`.
fn effective_uid() -> Result<u32, TestDbError> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok());
        if let Some(euid) = euid {
            return Ok(euid);
        }
    }
    id(&["-u"])?.ok_or_else(|| {
        TestDbError::io(
            "finding this process's user id",
            io::Error::other("`id -u` printed no number"),
        )
    })
}

/// Runs `id ARGS`: `None` when it fails (no such user) or prints no number.
fn id(args: &[&str]) -> Result<Option<u32>, TestDbError> {
    let output = Command::new("id")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map_err(|source| TestDbError::io(format!("running `id {}`", args.join(" ")), source))?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .flatten())
}

/// The supervisor process and the two ends of its pipes.
#[derive(Debug)]
struct Supervisor {
    pid: u32,
    child: Mutex<Child>,
    /// `None` once closed.
    pipes: Mutex<Option<Pipes>>,
}

#[derive(Debug)]
struct Pipes {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Supervisor {
    /// Sends one command; `Ok(true)` when the supervisor answers `ok`.
    /// Blocks: call from a blocking thread.
    fn command(&self, command: &str) -> Result<bool, TestDbError> {
        let mut pipes = self.pipes.lock().unwrap_or_else(PoisonError::into_inner);
        let context = || format!("sending `{command}` to the cluster supervisor");
        let Some(pipes) = pipes.as_mut() else {
            return Err(TestDbError::io(
                context(),
                io::Error::new(io::ErrorKind::BrokenPipe, "the supervisor is closed"),
            ));
        };
        writeln!(pipes.stdin, "{command}")
            .and_then(|()| pipes.stdin.flush())
            .map_err(|source| TestDbError::io(context(), source))?;
        let mut answer = String::new();
        let read = pipes
            .stdout
            .read_line(&mut answer)
            .map_err(|source| TestDbError::io(context(), source))?;
        match answer.trim() {
            "ok" => Ok(true),
            "error" => Ok(false),
            _ if read == 0 => Err(TestDbError::io(
                context(),
                io::Error::new(io::ErrorKind::UnexpectedEof, "the supervisor exited"),
            )),
            other => Err(TestDbError::io(
                context(),
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected answer {other:?}"),
                ),
            )),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Closing its standard input tells the supervisor to stop the server
        // and delete the directory; wait for it so that, after a drop, the
        // cluster is gone.
        drop(
            self.pipes
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let _ = self
            .child
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .wait();
    }
}

/// A running (or stopped) throwaway cluster, removed when dropped.
#[derive(Debug)]
pub(crate) struct Cluster {
    root: PathBuf,
    data_dir: PathBuf,
    port: u16,
    supervisor: Arc<Supervisor>,
}

impl Cluster {
    /// Creates and starts a cluster; with `keep_at_exit`, it is left
    /// running when the supervisor's input closes. Blocks: call from a
    /// blocking thread.
    pub(crate) fn start_blocking(bin: &PgBin, keep_at_exit: bool) -> Result<Self, TestDbError> {
        let run_as = run_as()?;
        let temp = tempfile::Builder::new()
            .prefix("saga-pg-")
            .tempdir()
            .map_err(|source| {
                TestDbError::io("creating a temporary directory for the cluster", source)
            })?;
        let root = temp.path().to_path_buf();
        if let RunAs::User { uid, gid } = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid)).map_err(|source| {
                TestDbError::io(
                    format!("giving {} to the `{CLUSTER_USER}` user", root.display()),
                    source,
                )
            })?;
        }
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(SUPERVISOR_SCRIPT)
            .arg("saga-pg-supervisor")
            .arg(&bin.dir)
            .arg(&root)
            .arg(settings(&root))
            .arg(if keep_at_exit { "keep" } else { "" })
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // This process's: the supervisor's own complaints (and the note
            // that a cluster was kept) reach the user, and whoever reads
            // this process's standard error to its end knows that the
            // supervisor has exited, so the clean-up is done.
            .stderr(Stdio::inherit())
            // Out of the terminal's process group: a Ctrl-C aimed at the
            // tests must not kill the supervisor before it cleans up.
            .process_group(0);
        for (key, _) in env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        if let RunAs::User { uid, gid } = run_as {
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().map_err(|source| {
            TestDbError::io("starting the cluster supervisor (/bin/sh)", source)
        })?;
        // From here on the supervisor owns the directory and removes it.
        let _ = temp.keep();
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TestDbError::io(
                "starting the cluster supervisor",
                io::Error::other("its pipes were not created"),
            ));
        };
        let supervisor = Arc::new(Supervisor {
            pid: child.id(),
            child: Mutex::new(child),
            pipes: Mutex::new(Some(Pipes {
                stdin,
                stdout: BufReader::new(stdout),
            })),
        });

        if !supervisor.command("init")? {
            return Err(TestDbError::Cluster {
                step: "initdb",
                log: log_tail(&root.join("initdb.log"), 0),
            });
        }
        let server_log = root.join("postgres.log");
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let offset = fs::metadata(&server_log).map_or(0, |meta| meta.len());
            if supervisor.command(&format!("start {port}"))? {
                return Ok(Self {
                    data_dir: root.join("data"),
                    root,
                    port,
                    supervisor,
                });
            }
            last_log = log_tail(&server_log, offset);
            if !port_was_taken(&last_log) {
                last_log.push_str(&log_tail(&root.join("pg_ctl.log"), 0));
                return Err(TestDbError::Cluster {
                    step: "pg_ctl start",
                    log: last_log,
                });
            }
        }
        Err(TestDbError::Cluster {
            step: "pg_ctl start (every port tried was taken)",
            log: last_log,
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub(crate) fn supervisor_pid(&self) -> u32 {
        self.supervisor.pid
    }

    pub(crate) fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Runs a supervisor command on a blocking thread; on `error`, fails
    /// with the end of `log` (a file in the cluster's directory).
    async fn run(&self, command: String, step: &'static str) -> Result<(), TestDbError> {
        let supervisor = Arc::clone(&self.supervisor);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let offset = fs::metadata(root.join("postgres.log")).map_or(0, |meta| meta.len());
            if supervisor.command(&command)? {
                Ok(())
            } else {
                let mut log = log_tail(&root.join("postgres.log"), offset);
                log.push_str(&log_tail(&root.join("pg_ctl.log"), 0));
                Err(TestDbError::Cluster { step, log })
            }
        })
        .await
        .map_err(TestDbError::Task)?
    }
}

/// Settings for tests, appended to `postgresql.conf`.
fn settings(root: &Path) -> String {
    let socket_dir = root.display().to_string().replace('\'', "''");
    format!(
        "\n# saga-test-support: a throwaway cluster\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{socket_dir}'\n\
         max_connections = 200\n\
         shared_buffers = 32MB\n\
         fsync = off\n\
         timezone = 'UTC'\n\
         log_timezone = 'UTC'\n"
    )
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16, TestDbError> {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| TestDbError::io("choosing a free port on 127.0.0.1", source))
}

fn port_was_taken(server_log: &str) -> bool {
    server_log.contains("could not bind") || server_log.contains("Address already in use")
}

/// The last lines of a log file from `offset` on (empty if unreadable).
fn log_tail(path: &Path, offset: u64) -> String {
    const MAX_LINES: usize = 30;
    let mut text = Vec::new();
    let read = fs::File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(offset))?;
        file.read_to_end(&mut text)
    });
    if read.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(MAX_LINES);
    let mut tail = format!("--- {} ---\n", path.display());
    for line in &lines[start..] {
        tail.push_str(line);
        tail.push('\n');
    }
    tail
}

/// A throwaway PostgreSQL cluster owned by one test, for tests that crash
/// or restart the server.
///
/// It listens on 127.0.0.1 on a port of its own, with trust authentication
/// for the `postgres` superuser. It is stopped and its directory deleted
/// when it is dropped, and also when the test process exits or is killed
/// (see the [module documentation](super)). It needs the local PostgreSQL
/// binaries: without them [`TestCluster::start`] fails with
/// [`TestDbError::NoPostgres`], whatever `DATABASE_URL` says.
#[derive(Debug)]
pub struct TestCluster {
    cluster: Cluster,
}

impl TestCluster {
    /// Creates (`initdb`) and starts a new cluster.
    pub async fn start() -> Result<Self, TestDbError> {
        let bin = find_pg_bin().map_err(|searched| TestDbError::NoPostgres { searched })?;
        let cluster = tokio::task::spawn_blocking(move || Cluster::start_blocking(&bin, false))
            .await
            .map_err(TestDbError::Task)??;
        Ok(Self { cluster })
    }

    /// `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// The TCP port; it stays the same across [`TestCluster::start_again`].
    pub fn port(&self) -> u16 {
        self.cluster.port()
    }

    /// The server's TCP address, e.g. to put a
    /// [`FaultProxy`](super::proxy::FaultProxy) in front of it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()))
    }

    /// A URL for database `dbname` as the `postgres` superuser, e.g.
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self, dbname: &str) -> String {
        self.cluster.url(dbname)
    }

    /// A driver configuration for database `dbname`.
    pub fn config(&self, dbname: &str) -> Config {
        let mut config = Config::new();
        config
            .host(self.host())
            .port(self.port())
            .user("postgres")
            .dbname(dbname);
        config
    }

    /// The cluster's data directory (inside its temporary directory).
    pub fn data_dir(&self) -> &Path {
        self.cluster.data_dir()
    }

    /// The process id of the supervisor that removes the cluster when it
    /// exits (for tests of that clean-up).
    pub fn supervisor_pid(&self) -> u32 {
        self.cluster.supervisor_pid()
    }

    /// Creates a database with a unique name on this cluster; see
    /// [`TestDatabase`].
    pub async fn fresh_database(&self) -> Result<TestDatabase, TestDbError> {
        server::create_database(
            &self.url("postgres"),
            |name| self.url(name),
            " (it is removed with its TestCluster)",
        )
        .await
    }

    /// Kills the server as a crash would (`pg_ctl stop -m immediate`: no
    /// checkpoint; the next start runs crash recovery). Connections die.
    pub async fn stop_immediate(&self) -> Result<(), TestDbError> {
        self.cluster
            .run("stop".to_owned(), "pg_ctl stop -m immediate")
            .await
    }

    /// Starts the server again on the same port and data directory, and
    /// returns once it accepts connections.
    pub async fn start_again(&self) -> Result<(), TestDbError> {
        self.cluster
            .run(format!("start {}", self.port()), "pg_ctl start")
            .await
    }

    /// Whether the server accepts TCP connections now.
    pub fn is_running(&self) -> bool {
        TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_dirs_lists_newest_first() {
        let parent = tempfile::tempdir().unwrap();
        for version in ["9.6", "15", "13", "notes"] {
            fs::create_dir_all(parent.path().join(version).join("bin")).unwrap();
        }
        let found = versioned_dirs(parent.path().to_str().unwrap(), "", "bin");
        let names: Vec<_> = found
            .iter()
            .map(|dir| dir.parent().unwrap().file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["15", "13", "9.6"]);
    }

    #[test]
    fn an_installation_needs_all_three_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let path = dir.path().join(name);
            fs::write(&path, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        };
        make("initdb");
        make("pg_ctl");
        assert!(pg_bin_in(dir.path()).is_none(), "postgres is missing");
        make("postgres");
        let found = pg_bin_in(dir.path()).expect("complete installation");
        assert_eq!(found.dir, fs::canonicalize(dir.path()).unwrap());
    }

    #[test]
    fn a_bind_failure_is_recognised_in_the_server_log() {
        let log = "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use";
        assert!(port_was_taken(log));
        assert!(!port_was_taken(
            "FATAL:  data directory has wrong ownership"
        ));
    }
}
