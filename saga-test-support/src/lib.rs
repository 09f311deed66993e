//! Test support for `saga-postgres` and its users, as a dev-dependency: a
//! PostgreSQL server with no manual set-up, fresh databases and schemas per
//! test, dedicated clusters that a test may crash, a fault-injecting
//! [`proxy`], and [`negative`] controls that break the store on purpose so
//! that a harness can show it notices.
//!
//! ```toml
//! [dev-dependencies]
//! saga-test-support = "0.1"
//! ```
//!
//! Nothing here is reachable from a production build of `saga-postgres`:
//! the library does not depend on this crate.
//!
//! # Which server
//!
//! [`test_server`] starts, once per test process and on first use, the
//! first of these that is available; every test of the process shares it:
//!
//! 1. `DATABASE_URL`, when set: an admin URL of an existing server, where
//!    this user may create databases. Nothing is started or stopped there.
//! 2. A throwaway cluster made with the local `initdb`, `pg_ctl` and
//!    `postgres`, looked up in `$SAGA_TEST_PG_BIN_DIR`, on `PATH`, then in
//!    the usual install locations (`/usr/lib/postgresql/*/bin`,
//!    `/usr/local/pgsql/bin`, `/usr/pgsql-*/bin`, Homebrew's, Postgres.app);
//!    with `SAGA_TEST_PG_BIN_DIR_ONLY=1`, in `$SAGA_TEST_PG_BIN_DIR` alone.
//!    It listens on 127.0.0.1 on a free port, trusts local connections
//!    for the `postgres` superuser, and runs with settings fit for tests
//!    (`fsync = off`, small shared buffers, 200 connections). When the
//!    tests run as root — which `initdb` refuses — it runs as the
//!    `postgres` OS user.
//! 3. With the `testcontainers` feature, a PostgreSQL container, when a
//!    Docker engine answers on `DOCKER_HOST` or the usual sockets.
//! 4. Otherwise [`TestDbError::NoPostgres`], which says what to install.
//!
//! # Clean-up
//!
//! A throwaway cluster lives in a temporary directory watched by a small
//! supervisor shell process, whose standard input is a pipe held only by
//! the test process. However the test process ends — returning, panicking,
//! or killed with `SIGKILL` — the pipe closes; the supervisor's `read` then
//! returns end-of-file, and it stops the server (`pg_ctl stop -m
//! immediate`) and deletes the directory. It runs in a process group of
//! its own, so a Ctrl-C aimed at the tests does not interrupt it. It
//! shares the test process's standard error, and holds it until it has
//! cleaned up: a parent that reads the test process's standard error to
//! its end has waited for the clean-up too.
//! A [`TestCluster`] is removed the same way, or earlier when dropped.
//!
//! [`TestDatabase`] and [`TestSchema`] are dropped with the value, unless
//! the test failed (the thread is panicking): then they are kept, and
//! their name and URL printed, so that they can be inspected. A throwaway
//! cluster goes with the test process all the same; to inspect what a
//! failed test left, run it again with `SAGA_TEST_KEEP_CLUSTER=1`: the
//! shared cluster is then left running after the tests (its location is
//! printed when it starts; stop it with `pg_ctl -D DIR stop` and delete
//! the directory).
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let db = saga_test_support::fresh_database().await?;
//! let client = db.connect().await?;
//! client.batch_execute("CREATE TABLE t (id int)").await?;
//! # Ok(()) }
//! ```

mod cluster;
#[cfg(feature = "testcontainers")]
mod container;
mod error;
pub mod negative;
pub mod proxy;
mod server;

pub use cluster::TestCluster;
pub use error::TestDbError;
pub use server::{
    ServerSource, TestDatabase, TestSchema, TestServer, fresh_database, fresh_schema, test_server,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_postgres_error_says_what_to_install() {
        let error = TestDbError::NoPostgres {
            searched: Vec::new(),
        };
        assert!(error.to_string().ends_with(
            "install PostgreSQL (initdb, pg_ctl and postgres on PATH, e.g. apt install \
             postgresql / brew install postgresql@15), or set DATABASE_URL to a server where \
             this user may create databases, or enable the `testcontainers` feature with Docker \
             running"
        ));
    }
}
