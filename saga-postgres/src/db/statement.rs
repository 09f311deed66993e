//! Statements with named parameters, bound by name.
//!
//! A statement's text names its parameters (`$saga_id::uuid`); it is
//! rendered once into PostgreSQL's positional form (`$1::uuid`), numbered
//! in the order the statement declares them. A call binds values by name,
//! and the binder puts them in that order and refuses a missing or unknown
//! name, so that no call site counts positions.

use tokio_postgres::types::ToSql;

use crate::error::PgError;

/// One bound value.
pub(crate) type Param<'a> = &'a (dyn ToSql + Sync);

/// A statement's text in positional form, and the names of its
/// parameters, `$1` first.
#[derive(Debug, Clone)]
pub(crate) struct Statement {
    name: &'static str,
    text: String,
    params: &'static [&'static str],
}

impl Statement {
    /// Renders `template`, whose parameters are written `$name`, with the
    /// parameters numbered in the order of `params`. A `$name` not in
    /// `params` is left as it is (PostgreSQL then refuses the statement,
    /// which the crate's statement tests catch).
    pub(crate) fn new(name: &'static str, template: &str, params: &'static [&'static str]) -> Self {
        Statement {
            name,
            text: render(template, params),
            params,
        }
    }

    /// What the statement is called in logs and errors.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The positional text sent to the server.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The parameter names, `$1` first.
    pub(crate) fn params(&self) -> &'static [&'static str] {
        self.params
    }

    /// `values` in the statement's order: every parameter bound exactly
    /// once, no other name.
    pub(crate) fn bind<'a>(&self, values: &[(&str, Param<'a>)]) -> Result<Vec<Param<'a>>, PgError> {
        let unbound = |param: &str| PgError::Unbound {
            statement: self.name,
            param: param.to_owned(),
        };
        if let Some((extra, _)) = values.iter().find(|(n, _)| !self.params.contains(n)) {
            return Err(unbound(extra));
        }
        self.params
            .iter()
            .map(|want| {
                let mut found = values.iter().filter(|(n, _)| n == want);
                match (found.next(), found.next()) {
                    (Some((_, v)), None) => Ok(*v),
                    _ => Err(unbound(want)),
                }
            })
            .collect()
    }
}

/// `$name` to `$n`; everything else (casts `::type`, `$1`) unchanged.
fn render(template: &str, params: &[&str]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        let ident = &after[..len];
        let named = ident.starts_with(|c: char| c.is_ascii_lowercase() || c == '_');
        match params.iter().position(|p| *p == ident) {
            Some(i) if named => {
                out.push('$');
                out.push_str(&(i + 1).to_string());
            }
            _ => {
                out.push('$');
                out.push_str(ident);
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_positions_in_declared_order() {
        let s = Statement::new(
            "t",
            "SELECT $b::int4, $a::text, $b::int4, $1, 'x'::text",
            &["a", "b"],
        );
        assert_eq!(
            s.text(),
            "SELECT $2::int4, $1::text, $2::int4, $1, 'x'::text"
        );
    }

    #[test]
    fn binds_by_name_in_declared_order() {
        let s = Statement::new("t", "SELECT $a, $b", &["a", "b"]);
        let (a, b) = (1_i32, "two");
        let bound = s.bind(&[("b", &b), ("a", &a)]).unwrap();
        assert_eq!(bound.len(), 2);
        assert_eq!(format!("{:?}", bound[0]), "1");
        assert_eq!(format!("{:?}", bound[1]), "\"two\"");
    }

    #[test]
    fn refuses_missing_duplicate_and_unknown_names() {
        let s = Statement::new("t", "SELECT $a, $b", &["a", "b"]);
        let v = 1_i32;
        for values in [
            vec![("a", &v as Param<'_>)],
            vec![("a", &v as Param<'_>), ("b", &v), ("c", &v)],
            vec![("a", &v as Param<'_>), ("a", &v), ("b", &v)],
        ] {
            assert!(matches!(s.bind(&values), Err(PgError::Unbound { .. })));
        }
    }
}
