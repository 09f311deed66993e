//! The statements the proxy intercepts, the cuts it records, and how to
//! read a saga transition's ids from its statement.

use saga_postgres::tags;
use uuid::Uuid;

/// A statement the proxy intercepted (cut or held).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Intercepted {
    /// Its SQL text, if known (the Query's, or that of the Parse behind
    /// the executed portal).
    pub sql: Option<String>,
    /// Its bind parameters as sent (`None` for NULL), in the format the
    /// client chose (tokio-postgres sends binary: a `uuid` is its 16
    /// bytes). Empty for a simple Query.
    pub params: Vec<Option<Vec<u8>>>,
    /// The `application_name` of the client's startup message.
    pub application_name: Option<String>,
    /// The local port of the proxy's connection to the server: what the
    /// server reports as `inet_client_port()` for this session.
    pub upstream_port: Option<u16>,
}

impl Intercepted {
    /// The parameter `$n` (numbered from 1, as in SQL).
    pub fn param(&self, n: usize) -> Option<&[u8]> {
        self.params.get(n.checked_sub(1)?)?.as_deref()
    }
}

/// A cut the proxy carried out (see [`FaultProxy::cuts`](super::FaultProxy::cuts)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CutRecord {
    /// `true` for a cut after the statement was forwarded (its reply is
    /// lost), `false` for one before (it never reached the server).
    pub after: bool,
    /// The statement the cut fell on.
    pub statement: Intercepted,
}

pub(super) fn contains_ignoring_case(haystack: Option<&str>, needle: &str) -> bool {
    haystack.is_some_and(|haystack| {
        haystack
            .to_ascii_lowercase()
            .contains(&needle.to_ascii_lowercase())
    })
}

/// The saga and transition ids of a statement that records a saga
/// transition (its SQL starts with [`tags::TRANSITION`]): its bind
/// parameters `$`[`TRANSITION_SAGA_ID_PARAM`](tags::TRANSITION_SAGA_ID_PARAM)
/// and `$`[`TRANSITION_ID_PARAM`](tags::TRANSITION_ID_PARAM). `(None, None)`
/// for any other statement; `None` for a parameter that is not a UUID.
#[must_use]
pub fn transition_ids(statement: &Intercepted) -> (Option<Uuid>, Option<Uuid>) {
    let is_transition = statement
        .sql
        .as_deref()
        .is_some_and(|sql| sql.trim_start().starts_with(tags::TRANSITION));
    if !is_transition {
        return (None, None);
    }
    let uuid = |n| Uuid::from_slice(statement.param(n)?).ok();
    (
        uuid(tags::TRANSITION_SAGA_ID_PARAM),
        uuid(tags::TRANSITION_ID_PARAM),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_matching_ignores_case() {
        assert!(contains_ignoring_case(Some("commit"), "COMMIT"));
        assert!(!contains_ignoring_case(Some("ROLLBACK"), "COMMIT"));
        assert!(!contains_ignoring_case(None, "COMMIT"));
    }

    fn transition(sql: &str, saga: Uuid, id: Uuid) -> Intercepted {
        Intercepted {
            sql: Some(sql.to_owned()),
            params: (1..=tags::TRANSITION_ID_PARAM + 2)
                .map(|n| match n {
                    n if n == tags::TRANSITION_SAGA_ID_PARAM => Some(saga.as_bytes().to_vec()),
                    n if n == tags::TRANSITION_ID_PARAM => Some(id.as_bytes().to_vec()),
                    _ => Some(vec![0; 4]),
                })
                .collect(),
            ..Intercepted::default()
        }
    }

    #[test]
    fn a_tagged_statement_gives_its_saga_and_transition_ids() {
        let (saga, id) = (Uuid::from_u128(1), Uuid::from_u128(12));
        let sql = format!(
            "{} WITH upd AS (UPDATE s.saga_instances ...) SELECT 1",
            tags::TRANSITION
        );
        assert_eq!(
            transition_ids(&transition(&sql, saga, id)),
            (Some(saga), Some(id))
        );
    }

    #[test]
    fn an_untagged_statement_gives_no_ids_even_with_the_same_parameters() {
        let (saga, id) = (Uuid::from_u128(1), Uuid::from_u128(12));
        for sql in [
            "SELECT 1",
            "WITH upd AS (UPDATE s.saga_instances ...) SELECT 1",
        ] {
            assert_eq!(
                transition_ids(&transition(sql, saga, id)),
                (None, None),
                "{sql}"
            );
        }
        assert_eq!(
            transition_ids(&Intercepted::default()),
            (None, None),
            "no SQL known"
        );
    }

    #[test]
    fn a_parameter_that_is_not_a_uuid_gives_none() {
        let sql = format!("{} SELECT 1", tags::TRANSITION);
        let mut statement = transition(&sql, Uuid::from_u128(1), Uuid::from_u128(12));
        statement.params[tags::TRANSITION_ID_PARAM - 1] = None;
        assert_eq!(transition_ids(&statement), (Some(Uuid::from_u128(1)), None));
    }
}
