//! Telling a saga transition's statement among the intercepted ones, and
//! reading its saga and transition ids.

use saga_postgres::testing::proxy::Intercepted;
use uuid::Uuid;

/// SQL text found only in a saga transition's statement (the one that
/// moves the instance and appends its history row): the store writes
/// `INSERT INTO <schema>.saga_history (transition_id, ...`. Workers never
/// start sagas (the shop does, on its own connections), so every worker
/// statement with this text is a transition.
pub const TRANSITION_SQL: &str = "saga_history (transition_id";

/// The number `N` of the first `$N` placeholder after `anchor` and then
/// `then` in `sql`.
fn placeholder_after(sql: &str, anchor: &str, then: &str) -> Option<usize> {
    let rest = &sql[sql.find(anchor)? + anchor.len()..];
    let rest = &rest[rest.find(then)? + then.len()..];
    let rest = &rest[rest.find('$')? + 1..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn uuid_param(statement: &Intercepted, n: Option<usize>) -> Option<Uuid> {
    Uuid::from_slice(statement.param(n?)?).ok()
}

/// The saga and transition ids of a transition's statement: the saga is
/// the `WHERE id = $N` of its update, the transition the first value of
/// its history row's `SELECT`.
#[must_use]
pub fn transition_ids(statement: &Intercepted) -> (Option<Uuid>, Option<Uuid>) {
    let Some(sql) = statement.sql.as_deref() else {
        return (None, None);
    };
    (
        uuid_param(statement, placeholder_after(sql, "UPDATE", "WHERE id = ")),
        uuid_param(statement, placeholder_after(sql, TRANSITION_SQL, "SELECT")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transition statement as the store writes it (abridged).
    const RECORD: &str = "WITH upd AS (
                    UPDATE \"chaos_saga\".saga_instances SET status = $3::text
                    WHERE id = $1::uuid AND lease_token = $2::uuid
                    RETURNING id
                ),
                hist AS (
                INSERT INTO \"chaos_saga\".saga_history (transition_id, saga_id, step, direction, attempt,
                    outcome, error, from_status, to_status, started_at, finished_at)
                SELECT $12::uuid, id, $13::text FROM upd
            ) SELECT 1";

    #[test]
    fn the_saga_and_transition_of_a_cut_statement_are_read_from_its_parameters() {
        assert_eq!(placeholder_after(RECORD, "UPDATE", "WHERE id = "), Some(1));
        assert_eq!(
            placeholder_after(RECORD, TRANSITION_SQL, "SELECT"),
            Some(12)
        );
        let (saga, transition) = (Uuid::from_u128(1), Uuid::from_u128(12));
        let mut statement = Intercepted::default();
        statement.sql = Some(RECORD.into());
        statement.params = (1..=13)
            .map(|n| match n {
                1 => Some(saga.as_bytes().to_vec()),
                12 => Some(transition.as_bytes().to_vec()),
                _ => Some(vec![0; 4]),
            })
            .collect();
        assert_eq!(transition_ids(&statement), (Some(saga), Some(transition)));
        statement.sql = Some("SELECT 1".into());
        assert_eq!(transition_ids(&statement), (None, None));
    }
}
