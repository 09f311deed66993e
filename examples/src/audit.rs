//! The ground truth: what the payment, inventory and email ledgers say
//! happened to each order, checked against what should have happened.
//!
//! Reads the services' ledgers and the shop's orders, never the saga
//! engine's view of itself.

use std::collections::BTreeMap;
use std::fmt;

use saga_postgres::SchemaName;
use saga_postgres::deadpool_postgres::Pool;

/// The schemas of one checkout deployment, derived from a prefix.
#[derive(Debug, Clone)]
pub struct Schemas {
    /// The saga store and outbox.
    pub saga: SchemaName,
    /// The shop's orders.
    pub shop: SchemaName,
    /// The payment service.
    pub payment: SchemaName,
    /// The inventory service.
    pub inventory: SchemaName,
    /// The email service (and its inbox).
    pub email: SchemaName,
}

impl Schemas {
    /// `<prefix>_saga`, `<prefix>_shop`, `<prefix>_payment`,
    /// `<prefix>_inventory`, `<prefix>_email`.
    pub fn with_prefix(prefix: &str) -> Result<Self, saga_postgres::PgError> {
        let s = |name: &str| SchemaName::new(format!("{prefix}_{name}"));
        Ok(Schemas {
            saga: s("saga")?,
            shop: s("shop")?,
            payment: s("payment")?,
            inventory: s("inventory")?,
            email: s("email")?,
        })
    }
}

/// SQL that makes `table` of `schema` append-only, as every ledger read
/// here must be: a trigger refuses any `UPDATE`, `DELETE` or `TRUNCATE` of
/// it (SQLSTATE `P0001`, "... is append-only"). Each service runs it when it
/// creates its ledger; running it again is harmless.
#[must_use]
pub fn append_only(schema: &SchemaName, table: &str) -> String {
    let s = schema.quoted();
    format!(
        "CREATE OR REPLACE FUNCTION {s}.refuse_ledger_change() RETURNS trigger
             LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE EXCEPTION '%.% is append-only: % refused',
                     TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP;
             END $$;
         DROP TRIGGER IF EXISTS append_only ON {s}.{table};
         CREATE TRIGGER append_only
             BEFORE UPDATE OR DELETE OR TRUNCATE ON {s}.{table}
             FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_ledger_change();"
    )
}

/// What the ledgers say about one order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderLedger {
    /// The order's total.
    pub total_cents: i64,
    /// Whether the shop confirmed it.
    pub confirmed: bool,
    /// Charges made (each a distinct idempotency key).
    pub charges: usize,
    /// Sum charged.
    pub charged_cents: i64,
    /// Sum refunded.
    pub refunded_cents: i64,
    /// Per SKU: ordered quantity.
    pub ordered: BTreeMap<String, i64>,
    /// Per SKU: distinct reservations that deducted it.
    pub reservations: BTreeMap<String, usize>,
    /// Per SKU: deducted minus released.
    pub net_deducted: BTreeMap<String, i64>,
    /// Confirmation emails sent.
    pub emails: usize,
}

/// A broken checkout invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// I1: an order was charged more than once.
    ChargedTwice {
        /// The order.
        order: String,
        /// How many charges.
        charges: usize,
    },
    /// I1: charges minus refunds is not the total of a confirmed order, or
    /// not zero for an unconfirmed one.
    WrongNetCharge {
        /// The order.
        order: String,
        /// Whether it was confirmed.
        confirmed: bool,
        /// Charged minus refunded.
        net_cents: i64,
        /// What it should be.
        expected_cents: i64,
    },
    /// I2: one order's SKU was deducted by more than one reservation.
    DeductedTwice {
        /// The order.
        order: String,
        /// The SKU.
        sku: String,
        /// Reservations that deducted it.
        reservations: usize,
    },
    /// I2: deducted minus released is not the ordered quantity (confirmed)
    /// or zero (not confirmed: the stock was not restored).
    WrongNetDeduction {
        /// The order.
        order: String,
        /// The SKU.
        sku: String,
        /// Whether it was confirmed.
        confirmed: bool,
        /// Deducted minus released.
        net: i64,
        /// What it should be.
        expected: i64,
    },
    /// I2: available stock differs from initial minus net deductions.
    StockNotConserved {
        /// The SKU.
        sku: String,
        /// Initial stock.
        initial: i64,
        /// Available now.
        available: i64,
        /// Deducted minus released, over all orders.
        net_deducted: i64,
    },
    /// I3: a confirmed order has not exactly one email, or an unconfirmed
    /// one has any.
    WrongEmailCount {
        /// The order.
        order: String,
        /// Whether it was confirmed.
        confirmed: bool,
        /// Emails sent.
        emails: usize,
    },
}

impl Violation {
    /// Which invariant: `I1`, `I2` or `I3`.
    #[must_use]
    pub fn invariant(&self) -> &'static str {
        match self {
            Violation::ChargedTwice { .. } | Violation::WrongNetCharge { .. } => "I1",
            Violation::DeductedTwice { .. }
            | Violation::WrongNetDeduction { .. }
            | Violation::StockNotConserved { .. } => "I2",
            Violation::WrongEmailCount { .. } => "I3",
        }
    }

    /// The order concerned, if any.
    #[must_use]
    pub fn order(&self) -> Option<&str> {
        match self {
            Violation::ChargedTwice { order, .. }
            | Violation::WrongNetCharge { order, .. }
            | Violation::DeductedTwice { order, .. }
            | Violation::WrongNetDeduction { order, .. }
            | Violation::WrongEmailCount { order, .. } => Some(order),
            Violation::StockNotConserved { .. } => None,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::ChargedTwice { order, charges } => {
                write!(f, "I1 {order}: charged {charges} times")
            }
            Violation::WrongNetCharge {
                order,
                confirmed,
                net_cents,
                expected_cents,
            } => write!(
                f,
                "I1 {order}: charges - refunds = {net_cents}, expected {expected_cents} ({})",
                if *confirmed {
                    "confirmed"
                } else {
                    "not confirmed"
                }
            ),
            Violation::DeductedTwice {
                order,
                sku,
                reservations,
            } => {
                write!(
                    f,
                    "I2 {order}/{sku}: deducted by {reservations} reservations"
                )
            }
            Violation::WrongNetDeduction {
                order,
                sku,
                confirmed,
                net,
                expected,
            } => write!(
                f,
                "I2 {order}/{sku}: deducted - released = {net}, expected {expected} ({})",
                if *confirmed {
                    "confirmed"
                } else {
                    "not confirmed"
                }
            ),
            Violation::StockNotConserved {
                sku,
                initial,
                available,
                net_deducted,
            } => write!(
                f,
                "I2 {sku}: initial {initial} - net deducted {net_deducted} != available {available}"
            ),
            Violation::WrongEmailCount {
                order,
                confirmed,
                emails,
            } => write!(
                f,
                "I3 {order}: {emails} emails, expected {}",
                u8::from(*confirmed)
            ),
        }
    }
}

/// Per SKU: initial and available stock.
pub type Stock = BTreeMap<String, (i64, i64)>;

/// The ledgers of a run, per order, and what they break.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Per order id.
    pub orders: BTreeMap<String, OrderLedger>,
    /// Per SKU: (initial, available).
    pub stock: Stock,
    /// Broken invariants.
    pub violations: Vec<Violation>,
}

impl Audit {
    /// Reads every ledger and checks I1 to I3.
    pub async fn collect(pool: &Pool, schemas: &Schemas) -> Result<Audit, crate::Error> {
        let db = pool.get().await?;
        let mut orders: BTreeMap<String, OrderLedger> = BTreeMap::new();
        for row in db
            .query(
                &format!(
                    "SELECT id, body, total_cents, status FROM {}.orders",
                    schemas.shop.quoted()
                ),
                &[],
            )
            .await?
        {
            let order: crate::model::Order = serde_json::from_value(row.get(1))?;
            let mut ordered = BTreeMap::new();
            for line in &order.lines {
                *ordered.entry(line.sku.clone()).or_default() += i64::from(line.qty);
            }
            orders.insert(
                row.get(0),
                OrderLedger {
                    total_cents: row.get(2),
                    confirmed: row.get::<_, &str>(3) == "confirmed",
                    ordered,
                    ..OrderLedger::default()
                },
            );
        }
        let p = schemas.payment.quoted();
        for row in db
            .query(
                &format!(
                    "SELECT order_id,
                        count(*) FILTER (WHERE kind = 'charge'),
                        coalesce(sum(amount_cents) FILTER (WHERE kind = 'charge'), 0)::int8,
                        coalesce(sum(amount_cents) FILTER (WHERE kind = 'refund'), 0)::int8
                     FROM {p}.ledger GROUP BY order_id"
                ),
                &[],
            )
            .await?
        {
            let o = orders.entry(row.get(0)).or_default();
            o.charges = usize::try_from(row.get::<_, i64>(1)).unwrap_or(usize::MAX);
            o.charged_cents = row.get(2);
            o.refunded_cents = row.get(3);
        }
        let i = schemas.inventory.quoted();
        for row in db
            .query(
                &format!(
                    "SELECT order_id, sku,
                        count(DISTINCT reservation_key) FILTER (WHERE kind = 'deduct'),
                        (coalesce(sum(qty) FILTER (WHERE kind = 'deduct'), 0)
                         - coalesce(sum(qty) FILTER (WHERE kind = 'release'), 0))::int8
                     FROM {i}.ledger GROUP BY order_id, sku"
                ),
                &[],
            )
            .await?
        {
            let o = orders.entry(row.get(0)).or_default();
            let sku: String = row.get(1);
            o.reservations.insert(
                sku.clone(),
                usize::try_from(row.get::<_, i64>(2)).unwrap_or(usize::MAX),
            );
            o.net_deducted.insert(sku, row.get(3));
        }
        let mut stock = Stock::new();
        for row in db
            .query(
                &format!("SELECT sku, initial, available FROM {i}.stock"),
                &[],
            )
            .await?
        {
            stock.insert(
                row.get(0),
                (
                    i64::from(row.get::<_, i32>(1)),
                    i64::from(row.get::<_, i32>(2)),
                ),
            );
        }
        let e = schemas.email.quoted();
        for row in db
            .query(
                &format!("SELECT order_id, count(*) FROM {e}.sent GROUP BY order_id"),
                &[],
            )
            .await?
        {
            orders.entry(row.get(0)).or_default().emails =
                usize::try_from(row.get::<_, i64>(1)).unwrap_or(usize::MAX);
        }
        let violations = check(&orders, &stock);
        Ok(Audit {
            orders,
            stock,
            violations,
        })
    }

    /// Orders charged, their sum, refunds and their sum, over the run.
    #[must_use]
    pub fn payment_totals(&self) -> (usize, i64, i64) {
        self.orders.values().fold((0, 0, 0), |(n, c, r), o| {
            (n + o.charges, c + o.charged_cents, r + o.refunded_cents)
        })
    }
}

/// Checks I1 to I3 on the ledgers.
#[must_use]
pub fn check(orders: &BTreeMap<String, OrderLedger>, stock: &Stock) -> Vec<Violation> {
    let mut v = Vec::new();
    let mut net_by_sku: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, o) in orders {
        let order = || id.clone();
        if o.charges > 1 {
            v.push(Violation::ChargedTwice {
                order: order(),
                charges: o.charges,
            });
        }
        let net = o.charged_cents - o.refunded_cents;
        let expected = if o.confirmed { o.total_cents } else { 0 };
        if net != expected {
            v.push(Violation::WrongNetCharge {
                order: order(),
                confirmed: o.confirmed,
                net_cents: net,
                expected_cents: expected,
            });
        }
        let skus: std::collections::BTreeSet<&String> =
            o.ordered.keys().chain(o.net_deducted.keys()).collect();
        for sku in skus {
            let reservations = o.reservations.get(sku).copied().unwrap_or(0);
            if reservations > 1 {
                v.push(Violation::DeductedTwice {
                    order: order(),
                    sku: sku.clone(),
                    reservations,
                });
            }
            let net = o.net_deducted.get(sku).copied().unwrap_or(0);
            *net_by_sku.entry(sku).or_default() += net;
            let expected = if o.confirmed {
                o.ordered.get(sku).copied().unwrap_or(0)
            } else {
                0
            };
            if net != expected {
                v.push(Violation::WrongNetDeduction {
                    order: order(),
                    sku: sku.clone(),
                    confirmed: o.confirmed,
                    net,
                    expected,
                });
            }
        }
        let expected_emails = usize::from(o.confirmed);
        if o.emails != expected_emails {
            v.push(Violation::WrongEmailCount {
                order: order(),
                confirmed: o.confirmed,
                emails: o.emails,
            });
        }
    }
    for (sku, (initial, available)) in stock {
        let net = net_by_sku.get(sku.as_str()).copied().unwrap_or(0);
        if initial - net != *available {
            v.push(Violation::StockNotConserved {
                sku: sku.clone(),
                initial: *initial,
                available: *available,
                net_deducted: net,
            });
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(confirmed: bool) -> OrderLedger {
        OrderLedger {
            total_cents: 500,
            confirmed,
            charges: 1,
            charged_cents: 500,
            refunded_cents: if confirmed { 0 } else { 500 },
            ordered: [("a".to_owned(), 2)].into(),
            reservations: [("a".to_owned(), 1)].into(),
            net_deducted: [("a".to_owned(), if confirmed { 2 } else { 0 })].into(),
            emails: usize::from(confirmed),
        }
    }

    #[test]
    fn balanced_ledgers_break_nothing() {
        let orders = [
            ("o1".to_owned(), ledger(true)),
            ("o2".to_owned(), ledger(false)),
        ]
        .into();
        let stock = [("a".to_owned(), (10, 8))].into();
        assert_eq!(check(&orders, &stock), []);
    }

    #[test]
    fn each_kind_of_imbalance_is_reported() {
        let mut twice = ledger(true);
        twice.charges = 2;
        twice.charged_cents = 1000;
        let mut unrefunded = ledger(false);
        unrefunded.refunded_cents = 0;
        let mut unreleased = ledger(false);
        unreleased.net_deducted.insert("a".into(), 2);
        unreleased.reservations.insert("a".into(), 2);
        let mut no_email = ledger(true);
        no_email.emails = 0;
        let orders = [
            ("twice".to_owned(), twice),
            ("unrefunded".to_owned(), unrefunded),
            ("unreleased".to_owned(), unreleased),
            ("no_email".to_owned(), no_email),
        ]
        .into();
        let stock = [("a".to_owned(), (10, 8))].into();
        let found: Vec<String> = check(&orders, &stock)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            found.iter().any(|v| v.contains("twice: charged 2 times")),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|v| v.contains("unrefunded: charges - refunds = 500")),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|v| v.contains("unreleased/a: deducted by 2")),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|v| v.contains("unreleased/a: deducted - released = 2")),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|v| v.contains("no_email: 0 emails, expected 1")),
            "{found:#?}"
        );
        assert!(
            found.iter().any(|v| v.starts_with("I2 a: initial 10")),
            "{found:#?}"
        );
    }
}
