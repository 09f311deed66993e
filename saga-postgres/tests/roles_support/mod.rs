//! Shared by the role tests: the SQL blocks of `docs/operations.md`, read
//! from the guide itself (not copied), and a database set up with the
//! guide's roles and grants as written, under unique role names.
//!
//! Roles are cluster-wide: each deployment makes its own, under unique
//! names, and [`Deployment::drop_roles`] drops them when the test passes (a
//! failed run keeps them with its database, for inspection).
#![allow(dead_code, unreachable_pub)]

use std::fmt::Debug;
use std::path::PathBuf;

use saga_postgres::deadpool_postgres::{Object, Pool};
use saga_postgres::outbox::OutboxError;
use saga_postgres::tokio_postgres::Client;
use saga_postgres::tokio_postgres::error::SqlState;
use saga_postgres::{PgError, SchemaName, migrate, pool_from_config};
use saga_test_support::TestDatabase;

/// `docs/operations.md`.
pub fn operations_guide() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The bodies of the guide's ```sql blocks.
pub fn sql_blocks() -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in operations_guide().lines() {
        match &mut current {
            None if line.trim_end() == "```sql" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.extend(current.take()),
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unterminated ```sql block");
    blocks
}

/// The guide's one ```sql block that contains `needle`.
pub fn sql_block(needle: &str) -> String {
    let found: Vec<String> = sql_blocks()
        .into_iter()
        .filter(|b| b.contains(needle))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "docs/operations.md must have exactly one ```sql block with `{needle}`"
    );
    found.into_iter().next().unwrap()
}

/// What finds the guide's role block (run by an administrator).
pub const ADMIN_BLOCK: &str = "CREATE ROLE saga_migrator";
/// What finds the guide's grant block (run by the migration role).
pub const GRANT_BLOCK: &str = "REVOKE ALL ON ALL TABLES IN SCHEMA saga";

/// `sql` with each whole identifier `from` replaced by `to`, and each
/// `'...'` (the guide's elided password) by `password`.
pub fn substitute(sql: &str, names: &[(&str, &str)], password: &str) -> String {
    let sql = sql.replace("'...'", &format!("'{password}'"));
    let mut out = String::with_capacity(sql.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let replaced = names
            .iter()
            .find(|(from, _)| *from == word.as_str())
            .map_or(word.as_str(), |(_, to)| to);
        out.push_str(replaced);
        word.clear();
    };
    for c in sql.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// The guide's runtime roles, by their names in the guide.
pub const RUNTIME: [&str; 4] = [
    "saga_worker",
    "saga_dispatcher",
    "saga_consumer",
    "saga_operator",
];

/// Unique names for the guide's five roles, and their password.
#[derive(Debug, Clone)]
pub struct Roles {
    /// (name in the guide, unique name), the migration role first.
    pub names: Vec<(&'static str, String)>,
    pub password: String,
}

impl Roles {
    pub fn unique() -> Self {
        let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
        let names = std::iter::once("saga_migrator")
            .chain(RUNTIME)
            .map(|guide| (guide, format!("{guide}_{suffix}")))
            .collect();
        Roles {
            names,
            password: uuid::Uuid::now_v7().simple().to_string(),
        }
    }

    /// The unique name of the guide's role `guide`.
    pub fn name(&self, guide: &str) -> &str {
        self.names
            .iter()
            .find(|(g, _)| *g == guide)
            .map(|(_, n)| n.as_str())
            .unwrap_or_else(|| panic!("no role {guide} in the guide"))
    }

    /// The guide's `block`, for these roles on database `db`.
    pub fn substitute(&self, block: &str, db: &str) -> String {
        let mut names: Vec<(&str, &str)> =
            self.names.iter().map(|(g, n)| (*g, n.as_str())).collect();
        names.push(("shop", db));
        substitute(block, &names, &self.password)
    }

    /// The guide's role block, for database `db`.
    pub fn admin_sql(&self, db: &str) -> String {
        self.substitute(&sql_block(ADMIN_BLOCK), db)
    }

    /// The guide's grant block.
    pub fn grants_sql(&self) -> String {
        self.substitute(&sql_block(GRANT_BLOCK), "unused")
    }

    /// Drops the roles (and what was granted to them) in the database
    /// `admin` is connected to.
    pub async fn drop(&self, admin: &Client) {
        let all: Vec<&str> = self.names.iter().map(|(_, n)| n.as_str()).collect();
        admin
            .batch_execute(&format!(
                "DROP OWNED BY {all}; DROP ROLE {all};",
                all = all.join(", ")
            ))
            .await
            .unwrap();
    }
}

/// A fresh database set up as the guide says: the administrator's block,
/// `migrate` as the migration role, then the grant block as the migration
/// role; one pool per runtime role.
pub struct Deployment {
    pools: Vec<(&'static str, Pool)>,
    pub roles: Roles,
    pub schema: SchemaName,
    pub admin: Client,
    // Last: dropping it drops the database (when the test passed).
    pub db: TestDatabase,
}

impl Deployment {
    pub async fn new() -> Self {
        let db = saga_test_support::fresh_database()
            .await
            .expect("a test PostgreSQL server");
        let schema = SchemaName::new("saga").unwrap();
        let admin = db.connect().await.unwrap();
        let roles = Roles::unique();
        admin
            .batch_execute(&roles.admin_sql(db.name()))
            .await
            .unwrap();
        let this = Deployment {
            pools: Vec::new(),
            roles,
            schema,
            admin,
            db,
        };
        let migrator = this.pool_as("saga_migrator", 1);
        let mut conn = migrator.get().await.unwrap();
        migrate(&mut conn, &this.schema).await.unwrap();
        conn.batch_execute(&this.roles.grants_sql()).await.unwrap();
        drop(conn);
        let pools = RUNTIME
            .iter()
            .map(|&role| (role, this.pool_as(role, 4)))
            .collect();
        Deployment { pools, ..this }
    }

    /// A new pool logging in as the guide's role `guide`.
    pub fn pool_as(&self, guide: &str, size: usize) -> Pool {
        let mut config = self.db.config();
        config
            .user(self.roles.name(guide))
            .password(&self.roles.password);
        pool_from_config(config, size).unwrap()
    }

    /// The pool of the runtime role `guide`.
    pub fn pool(&self, guide: &str) -> Pool {
        self.pools
            .iter()
            .find(|(g, _)| *g == guide)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no pool for {guide}"))
    }

    /// A connection as the runtime role `guide`.
    pub async fn conn(&self, guide: &str) -> Object {
        self.pool(guide).get().await.unwrap()
    }

    /// Closes the pools and drops the roles (call it last, when the test
    /// passed).
    pub async fn drop_roles(self) {
        let Deployment {
            pools,
            roles,
            admin,
            db,
            ..
        } = self;
        for (_, pool) in pools {
            pool.close();
        }
        roles.drop(&admin).await;
        drop(admin);
        drop(db);
    }
}

/// Asserts that `result` failed with SQLSTATE 42501
/// (`insufficient_privilege`); `what` names the attempt.
pub fn refused<T: Debug, E: Debug>(
    what: &str,
    result: Result<T, E>,
    code: impl Fn(&E) -> Option<String>,
) {
    match result {
        Ok(v) => panic!("{what}: allowed ({v:?}), should be refused"),
        Err(e) => assert_eq!(
            code(&e).as_deref(),
            Some(SqlState::INSUFFICIENT_PRIVILEGE.code()),
            "{what}: {e:?}"
        ),
    }
}

/// Asserts that the SQL `sql`, run as `conn`'s role, is refused with
/// SQLSTATE 42501.
pub async fn sql_refused(conn: &Client, sql: &str) {
    refused(sql, conn.batch_execute(sql).await, |e| {
        e.code().map(|c| c.code().to_owned())
    });
}

/// The SQLSTATE of each error type, for [`refused`].
pub fn pg_code(e: &PgError) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}
pub fn outbox_code(e: &OutboxError) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}
pub fn core_code(e: &saga_core::Error) -> Option<String> {
    e.code().map(str::to_owned)
}
