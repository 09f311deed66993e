//! The schema the tables live in: a validated identifier, never
//! interpolated unchecked.

use std::fmt;
use std::str::FromStr;

use crate::error::PgError;

/// The longest schema name accepted: short enough that derived names (the
/// outbox notification channel, `<schema>_outbox`) stay within PostgreSQL's
/// 63-byte identifier limit.
pub const MAX_SCHEMA_LEN: usize = 48;

/// A PostgreSQL schema name: 1 to 48 bytes of lowercase ASCII letters,
/// digits and `_`, starting with a letter or `_`, not `pg_*` nor
/// `information_schema`. Used quoted in every statement.
///
/// ```
/// use saga_postgres::SchemaName;
/// assert_eq!(SchemaName::new("saga").unwrap().quoted(), "\"saga\"");
/// assert!(SchemaName::new("saga; DROP TABLE x").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Validates `name`.
    pub fn new(name: impl AsRef<str>) -> Result<Self, PgError> {
        let name = name.as_ref();
        let bad = |reason| PgError::InvalidSchemaName {
            name: name.chars().take(80).collect(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("must not be empty"));
        }
        if name.len() > MAX_SCHEMA_LEN {
            return Err(bad("longer than 48 bytes"));
        }
        let first = name.as_bytes()[0];
        if !(first.is_ascii_lowercase() || first == b'_') {
            return Err(bad("must start with a lowercase ASCII letter or `_`"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(bad(
                "only lowercase ASCII letters, digits and `_` are allowed",
            ));
        }
        if name.starts_with("pg_") || name == "information_schema" {
            return Err(bad("reserved by PostgreSQL"));
        }
        Ok(SchemaName(name.to_owned()))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted identifier, ready for SQL.
    #[must_use]
    pub fn quoted(&self) -> String {
        // Validation leaves no character that needs escaping.
        format!("\"{}\"", self.0)
    }

    /// The `LISTEN`/`NOTIFY` channel on which transactions that enqueue
    /// outbox messages notify dispatchers.
    #[must_use]
    pub fn outbox_channel(&self) -> String {
        format!("{}_outbox", self.0)
    }
}

impl Default for SchemaName {
    /// `saga`.
    fn default() -> Self {
        SchemaName("saga".to_owned())
    }
}

impl fmt::Debug for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SchemaName({:?})", self.0)
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SchemaName {
    type Err = PgError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchemaName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_identifiers_are_accepted() {
        for ok in ["saga", "_s", "orders_v2", "a"] {
            assert!(SchemaName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Saga",
            "1saga",
            "sa-ga",
            "sa\"ga",
            "saga;drop",
            "pg_catalog",
            "information_schema",
            "é",
            &"s".repeat(49),
        ] {
            assert!(SchemaName::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(SchemaName::default().outbox_channel(), "saga_outbox");
    }
}
