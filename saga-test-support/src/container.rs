//! The last resort: PostgreSQL in a Docker container (feature
//! `testcontainers`), chosen only when a Docker engine answers.

use std::{
    env,
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    os::unix::{net::UnixStream, process::CommandExt},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use testcontainers::{
    Container, GenericImage, ImageExt,
    core::{IntoContainerPort, WaitFor, wait::LogWaitStrategy},
    runners::SyncRunner,
};

use super::TestDbError;

const IMAGE: &str = "postgres";
const TAG: &str = "16-alpine";

/// Whether a Docker engine answers `GET /_ping` on `DOCKER_HOST` or the
/// usual sockets. Blocks (at most a few seconds).
pub(crate) fn docker_answers() -> bool {
    let timeout = Duration::from_secs(2);
    if let Some(host) = env::var("DOCKER_HOST").ok().filter(|host| !host.is_empty()) {
        if let Some(path) = host.strip_prefix("unix://") {
            return ping_unix(path.into(), timeout);
        }
        if let Some(address) = host.strip_prefix("tcp://") {
            let Some(address) = address
                .to_socket_addrs()
                .ok()
                .and_then(|mut addresses| addresses.next())
            else {
                return false;
            };
            return TcpStream::connect_timeout(&address, timeout).is_ok_and(|stream| {
                stream.set_read_timeout(Some(timeout)).is_ok()
                    && stream.set_write_timeout(Some(timeout)).is_ok()
                    && ping(stream)
            });
        }
        return false;
    }
    let mut sockets = vec![PathBuf::from("/var/run/docker.sock")];
    if let Some(home) = env::var_os("HOME") {
        sockets.push(PathBuf::from(home).join(".docker/run/docker.sock"));
    }
    if let Some(runtime_dir) = env::var_os("XDG_RUNTIME_DIR") {
        sockets.push(PathBuf::from(runtime_dir).join("docker.sock"));
    }
    sockets.into_iter().any(|socket| ping_unix(socket, timeout))
}

fn ping_unix(path: PathBuf, timeout: Duration) -> bool {
    UnixStream::connect(path).is_ok_and(|stream| {
        stream.set_read_timeout(Some(timeout)).is_ok()
            && stream.set_write_timeout(Some(timeout)).is_ok()
            && ping(stream)
    })
}

fn ping(mut stream: impl Read + Write) -> bool {
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = [0_u8; 64];
    let Ok(read) = stream.read(&mut answer) else {
        return false;
    };
    let answer = String::from_utf8_lossy(&answer[..read]);
    answer.starts_with("HTTP/1.") && answer.contains(" 200 ")
}

/// A running PostgreSQL container, kept for the life of the process.
pub(crate) struct RunningContainer {
    _container: Container<GenericImage>,
    host: String,
    port: u16,
    /// Removes the container once this process is gone (see [`reaper`]).
    _reaper: Option<(Child, ChildStdin)>,
}

impl RunningContainer {
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@{}:{}/{dbname}", self.host, self.port)
    }
}

/// Starts a container. Blocks: call from a blocking thread.
pub(crate) fn start() -> Result<RunningContainer, TestDbError> {
    // The image's entrypoint starts a temporary server to initialise the
    // cluster, then the real one: ready is logged twice.
    let ready =
        LogWaitStrategy::stderr("database system is ready to accept connections").with_times(2);
    let container = GenericImage::new(IMAGE, TAG)
        .with_exposed_port(5432.tcp())
        .with_wait_for(WaitFor::log(ready))
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
        .with_cmd(["postgres", "-c", "fsync=off", "-c", "max_connections=200"])
        .with_startup_timeout(Duration::from_secs(120))
        .start()
        .map_err(TestDbError::Container)?;
    let port = container
        .get_host_port_ipv4(5432.tcp())
        .map_err(TestDbError::Container)?;
    let host = container
        .get_host()
        .map_err(TestDbError::Container)?
        .to_string();
    let reaper = reaper(container.id());
    Ok(RunningContainer {
        _container: container,
        host,
        port,
        _reaper: reaper,
    })
}

/// The shared server is never dropped, so testcontainers' own clean-up
/// never runs for it. Like the local cluster's supervisor, a shell waits
/// for its standard input (held by this process) to close, then removes the
/// container with the `docker` CLI. Without the CLI the container outlives
/// the process.
fn reaper(container_id: &str) -> Option<(Child, ChildStdin)> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg("while read -r _; do :; done; docker rm -f -v \"$1\" >/dev/null 2>&1")
        .arg("saga-pg-container-reaper")
        .arg(container_id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()?;
    let stdin = child.stdin.take()?;
    Some((child, stdin))
}

#[cfg(test)]
mod tests {
    use std::{io::BufRead, os::unix::net::UnixListener};

    use super::*;

    /// Serves one connection on a Unix socket with `answer`.
    fn fake_engine(answer: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut request = std::io::BufReader::new(&stream);
            let mut line = String::new();
            request.read_line(&mut line).unwrap();
            assert_eq!(line, "GET /_ping HTTP/1.0\r\n");
            (&stream).write_all(answer).unwrap();
        });
        (dir, path)
    }

    #[test]
    fn an_engine_that_answers_the_ping_is_used() {
        let (_dir, path) = fake_engine(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK");
        assert!(ping_unix(path, Duration::from_secs(5)));
    }

    #[test]
    fn a_socket_that_answers_otherwise_is_not() {
        let (_dir, path) = fake_engine(b"HTTP/1.1 500 Internal Server Error\r\n\r\n");
        assert!(!ping_unix(path, Duration::from_secs(5)));
    }

    #[test]
    fn a_missing_socket_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!ping_unix(
            dir.path().join("docker.sock"),
            Duration::from_secs(1)
        ));
    }
}
