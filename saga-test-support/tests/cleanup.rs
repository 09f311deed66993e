//! Throwaway clusters are removed when the test process ends, even when it
//! is killed: a child process (this test binary again, running
//! `child_starts_clusters`) starts the shared cluster and a dedicated one,
//! reports where they are, and exits or is killed with SIGKILL.
//!
//! The clusters' supervisors share the child's standard error, a pipe read
//! here, and hold it until they have cleaned up: its end-of-file says that
//! the child and both supervisors have exited.
#![cfg(target_os = "linux")]

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use saga_test_support::{ServerSource, TestCluster, test_server};

const CHILD_ENV: &str = "SAGA_TESTING_CLEANUP_CHILD";

/// The child's part. Does nothing unless run by the tests below.
#[tokio::test]
async fn child_starts_clusters() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let server = test_server().await.expect("test server");
    assert_eq!(server.source(), ServerSource::LocalCluster);
    println!(
        "CLUSTER {} {} {}",
        server.data_dir().expect("data dir").display(),
        server.port(),
        server.supervisor_pid().expect("supervisor")
    );
    let cluster = TestCluster::start().await.expect("dedicated cluster");
    println!(
        "CLUSTER {} {} {}",
        cluster.data_dir().display(),
        cluster.port(),
        cluster.supervisor_pid()
    );
    // Not dropped: left to the clean-up at process exit.
    std::mem::forget(cluster);
    println!("READY");
    if mode == "hang" {
        std::future::pending::<()>().await;
    }
    // Exit (normally) once the parent closes our standard input.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[derive(Debug)]
struct Started {
    data_dir: PathBuf,
    port: u16,
    supervisor: u32,
}

/// The child process, killed if the test fails before it is done with it,
/// and what its standard error said, once it has ended.
struct ChildGuard(Child, mpsc::Receiver<String>);

impl ChildGuard {
    /// Waits until nobody holds the child's standard error any more (the
    /// child and the supervisors of its clusters have all exited), and
    /// returns what was written to it.
    fn wait_for_cleanup(&self) -> String {
        self.1
            .recv_timeout(Duration::from_secs(60))
            .expect("the child or a cluster supervisor still runs after 60 s")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the child until it reports `READY`.
fn start_child(mode: &str, env: &[(&str, &str)]) -> (ChildGuard, Vec<Started>) {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "child_starts_clusters",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .envs(env.iter().copied())
        // The child must make local clusters, whatever this process uses.
        .env_remove("DATABASE_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the child");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    // Pass the child's (and the supervisors') messages on, and say when
    // the last writer is gone.
    let mut stderr = child.stderr.take().expect("stderr");
    let (ended, end) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buffer = [0_u8; 4096];
        while let Ok(read) = std::io::Read::read(&mut stderr, &mut buffer) {
            if read == 0 {
                break;
            }
            let _ = std::io::stderr().write_all(&buffer[..read]);
            text.extend_from_slice(&buffer[..read]);
        }
        let _ = ended.send(String::from_utf8_lossy(&text).into_owned());
    });
    let mut child = ChildGuard(child, end);
    let mut started = Vec::new();
    let mut line = String::new();
    while stdout
        .read_line(&mut line)
        .expect("read the child's output")
        > 0
    {
        // The test harness may print its own text on the same line.
        if line.trim_end().ends_with("READY") {
            // Keep reading, or the child's harness fails writing its report.
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            return (child, started);
        }
        if let Some((_, fields)) = line.trim_end().split_once("CLUSTER ") {
            let fields: Vec<&str> = fields.split(' ').collect();
            let [data_dir, port, supervisor] = fields[..] else {
                panic!("bad line {line:?}");
            };
            started.push(Started {
                data_dir: data_dir.into(),
                port: port.parse().expect("port"),
                supervisor: supervisor.parse().expect("pid"),
            });
        }
        line.clear();
    }
    let status = child.0.wait().expect("wait for the child");
    panic!("the child ended ({status}) before reporting READY");
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
}

/// Whether the process is gone (or a zombie: it has exited but nobody has
/// reaped it yet).
fn process_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

fn assert_running(started: &[Started]) {
    assert_eq!(started.len(), 2, "the shared cluster and a dedicated one");
    for cluster in started {
        assert!(cluster.data_dir.join("PG_VERSION").is_file(), "{cluster:?}");
        assert!(port_open(cluster.port), "{cluster:?} accepts connections");
        assert!(!process_gone(cluster.supervisor), "{cluster:?}");
    }
}

/// After [`ChildGuard::wait_for_cleanup`]: the clusters are gone. (The
/// supervisors have closed their files, which a process does as it exits;
/// `/proc` may show one as still running for a moment longer, so that is
/// not asserted.)
fn assert_removed(started: &[Started]) {
    for cluster in started {
        assert!(!cluster.data_dir.exists(), "{cluster:?}: data dir removed");
        assert!(
            !cluster.data_dir.parent().expect("root").exists(),
            "{cluster:?}: temporary directory removed"
        );
        assert!(!port_open(cluster.port), "{cluster:?}: port closed");
    }
}

#[test]
fn clusters_are_removed_when_the_process_exits() {
    let (mut child, started) = start_child("exit", &[]);
    assert_running(&started);
    // Closing its standard input lets the child return and exit.
    drop(child.0.stdin.take());
    let status = child.0.wait().expect("wait for the child");
    assert!(status.success(), "the child test passed: {status}");
    child.wait_for_cleanup();
    assert_removed(&started);
}

#[test]
fn clusters_are_removed_when_the_process_is_killed() {
    let (mut child, started) = start_child("hang", &[]);
    assert_running(&started);
    child.0.kill().expect("SIGKILL the child");
    child.0.wait().expect("reap the child");
    child.wait_for_cleanup();
    assert_removed(&started);
}

/// A cluster left running on purpose, stopped and deleted by hand.
struct KeptCluster<'a>(&'a Started);

impl Drop for KeptCluster<'_> {
    fn drop(&mut self) {
        let pid_file = self.0.data_dir.join("postmaster.pid");
        let postmaster = fs::read_to_string(pid_file).ok().and_then(|text| {
            text.lines()
                .next()
                .and_then(|pid| pid.trim().parse::<u32>().ok())
        });
        if let Some(pid) = postmaster {
            // SIGQUIT: immediate shutdown. Best effort, like the rest of
            // this clean-up: nothing is asserted after it.
            let _ = Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
        }
        if let Some(root) = self.0.data_dir.parent() {
            let _ = fs::remove_dir_all(root);
        }
    }
}

#[test]
fn the_shared_cluster_is_kept_when_asked() {
    let (mut child, started) = start_child("exit", &[("SAGA_TEST_KEEP_CLUSTER", "1")]);
    assert_running(&started);
    let [shared, dedicated] = &started[..] else {
        panic!("two clusters: {started:?}");
    };
    let _kept = KeptCluster(shared);
    drop(child.0.stdin.take());
    let status = child.0.wait().expect("wait for the child");
    assert!(status.success(), "the child test passed: {status}");
    let said = child.wait_for_cleanup();
    assert!(
        said.contains(&format!(
            "kept the cluster in {}",
            shared.data_dir.display()
        )),
        "the supervisor says where the kept cluster is: {said}"
    );

    assert_removed(std::slice::from_ref(dedicated));
    assert!(
        shared.data_dir.join("PG_VERSION").is_file(),
        "the shared cluster's data is kept"
    );
    assert!(port_open(shared.port), "and its server still runs");
}
