//! Reading columns by name, with a typed error for what does not fit.

use std::str::FromStr;
use std::time::SystemTime;

use saga_core::Timestamp;
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

use crate::error::{BoxError, PgError};

/// Column `name` of `row`, or [`PgError::CorruptRow`] naming it if the
/// column is missing or its type does not fit.
pub(crate) fn col<'a, T: FromSql<'a>>(row: &'a Row, name: &'static str) -> Result<T, PgError> {
    row.try_get(name).map_err(|e| corrupt(name, e))
}

/// A column that must parse as `T`.
pub(crate) fn parsed<T: FromStr>(row: &Row, name: &'static str) -> Result<T, PgError>
where
    T::Err: Into<BoxError>,
{
    parse(name, col::<&str>(row, name)?)
}

/// A non-negative `int4` column.
pub(crate) fn count(row: &Row, name: &'static str) -> Result<u32, PgError> {
    let n: i32 = col(row, name)?;
    u32::try_from(n).map_err(|e| corrupt(name, e))
}

/// A non-negative `int8` column.
pub(crate) fn count64(row: &Row, name: &'static str) -> Result<u64, PgError> {
    let n: i64 = col(row, name)?;
    u64::try_from(n).map_err(|e| corrupt(name, e))
}

/// A `timestamptz` column.
pub(crate) fn time(row: &Row, name: &'static str) -> Result<Timestamp, PgError> {
    Ok(ts(col(row, name)?))
}

/// A nullable `timestamptz` column.
pub(crate) fn time_opt(row: &Row, name: &'static str) -> Result<Option<Timestamp>, PgError> {
    Ok(col::<Option<SystemTime>>(row, name)?.map(ts))
}

/// The first row, which a statement always returns (an aggregate).
pub(crate) fn only<'a>(rows: &'a [Row], what: &'static str) -> Result<&'a Row, PgError> {
    rows.first()
        .ok_or_else(|| corrupt(what, "the statement returned no row"))
}

pub(crate) fn corrupt(what: &'static str, e: impl Into<BoxError>) -> PgError {
    PgError::CorruptRow {
        what,
        source: e.into(),
    }
}

pub(crate) fn parse<T: FromStr>(what: &'static str, s: &str) -> Result<T, PgError>
where
    T::Err: Into<BoxError>,
{
    s.parse().map_err(|e: T::Err| corrupt(what, e))
}

pub(crate) fn ts(t: SystemTime) -> Timestamp {
    Timestamp::from_system_time(t)
}

/// A duration in whole microseconds, for `$n::int8 * interval '1
/// microsecond'`.
pub(crate) fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
