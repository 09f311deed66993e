//! I8: every order ended as its scenario intends, and the shop agrees.
//!
//! The harness knows what each order was placed to do
//! ([`checkout::demo::orders`] returns its scenario). An `Ok` order must
//! complete: the chaos workers' retry budgets outlast what the faults
//! can do to one step (see `docs/chaos.md`). A declined card, a sold-out
//! item or a payment gateway that stays down must compensate. And the
//! saga's status must be the shop's: a completed saga's order is
//! confirmed in the shop's `orders` table, a compensated one's is still
//! pending. Without this, a build that refuses every order passes every
//! other invariant: nothing charged, nothing deducted, nothing sent,
//! everything terminal.

use checkout::demo::Scenario;
use checkout::shop::OrderStatus;
use saga_core::Status;
use serde::Serialize;

use super::{Facts, Findings, Violation, violation};

/// How the orders of one scenario ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ScenarioOutcomes {
    /// The scenario: `ok`, `declined`, `out_of_stock`, `gateway_down`.
    pub scenario: &'static str,
    /// Orders placed with it.
    pub orders: u64,
    /// Their sagas that completed.
    pub completed: u64,
    /// Their sagas that compensated.
    pub compensated: u64,
    /// Neither: still running or compensating, stuck, or never started.
    pub other: u64,
}

/// Every scenario, in the order the report lists them.
const SCENARIOS: [Scenario; 4] = [
    Scenario::Ok,
    Scenario::Declined,
    Scenario::OutOfStock,
    Scenario::GatewayDown,
];

/// A scenario's name in reports.
#[must_use]
pub fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::Ok => "ok",
        Scenario::Declined => "declined",
        Scenario::OutOfStock => "out_of_stock",
        Scenario::GatewayDown => "gateway_down",
    }
}

/// The terminal status `s` intends.
#[must_use]
pub fn intended(s: Scenario) -> Status {
    match s {
        Scenario::Ok => Status::Completed,
        Scenario::Declined | Scenario::OutOfStock | Scenario::GatewayDown => Status::Compensated,
    }
}

/// The shop's status a saga ending in `status` leaves its order in
/// (`None`: not a terminal status, nothing to compare).
fn shop_status(status: Status) -> Option<OrderStatus> {
    match status {
        Status::Completed => Some(OrderStatus::Confirmed),
        Status::Compensated => Some(OrderStatus::Pending),
        _ => None,
    }
}

fn shop_name(s: OrderStatus) -> &'static str {
    match s {
        OrderStatus::Pending => "pending",
        OrderStatus::Confirmed => "confirmed",
    }
}

/// I8: each order's saga ended as its scenario intends, and the shop's
/// status of the order agrees with it; the outcome table per scenario.
/// Sagas that are not terminal are counted as `other` and left to I4.
pub(super) fn intent(facts: &Facts, f: &mut Findings, v: &mut Vec<Violation>) {
    let mut rows: Vec<ScenarioOutcomes> = SCENARIOS
        .iter()
        .map(|s| ScenarioOutcomes {
            scenario: scenario_name(*s),
            orders: 0,
            completed: 0,
            compensated: 0,
            other: 0,
        })
        .collect();
    for (order, scenario) in &facts.scenarios {
        let row = &mut rows[SCENARIOS
            .iter()
            .position(|s| s == scenario)
            .expect("every scenario is listed")];
        row.orders += 1;
        let label = scenario.label();
        let Some(instance) = facts.instances.get(order) else {
            row.other += 1;
            v.push(violation(
                "I8",
                Some(order),
                format!("placed ({label}) but no saga was started for it"),
            ));
            continue;
        };
        let status = instance.status;
        match status {
            Status::Completed => row.completed += 1,
            Status::Compensated => row.compensated += 1,
            _ => row.other += 1,
        }
        let Some(expected_shop) = shop_status(status) else {
            continue;
        };
        let want = intended(*scenario);
        if status != want {
            v.push(violation(
                "I8",
                Some(order),
                format!("the saga {status}, but its scenario ({label}) must end {want}"),
            ));
        }
        match facts.shop.get(order) {
            None => v.push(violation(
                "I8",
                Some(order),
                format!("the saga {status}, but the shop has no such order"),
            )),
            Some(shop) if *shop != expected_shop => v.push(violation(
                "I8",
                Some(order),
                format!(
                    "the saga {status}, but the shop's order is {} (expected {})",
                    shop_name(*shop),
                    shop_name(expected_shop)
                ),
            )),
            Some(_) => {}
        }
    }
    f.by_scenario = rows;
}

#[cfg(test)]
mod tests {
    use checkout::demo::Scenario;
    use checkout::shop::OrderStatus;
    use saga_core::Status;

    use super::ScenarioOutcomes;
    use crate::check::check;
    use crate::check::fixtures::{ORDER, assert_fires, clean, compensated, fired};

    fn row(findings: &crate::check::Findings, scenario: &str) -> ScenarioOutcomes {
        *findings
            .by_scenario
            .iter()
            .find(|r| r.scenario == scenario)
            .expect("every scenario has a row")
    }

    #[test]
    fn outcomes_as_intended_pass_and_are_tabled_per_scenario() {
        assert_eq!(fired(&clean()), vec![]);
        let f = check(&clean());
        assert_eq!(
            row(&f, "ok"),
            ScenarioOutcomes {
                scenario: "ok",
                orders: 1,
                completed: 1,
                compensated: 0,
                other: 0
            }
        );
        assert_eq!(f.by_scenario.len(), 4, "every scenario listed, zeros too");
        assert_eq!(row(&f, "declined").orders, 0);
        // Each failing scenario must compensate, and does.
        for s in [
            Scenario::Declined,
            Scenario::OutOfStock,
            Scenario::GatewayDown,
        ] {
            let mut facts = compensated();
            facts.scenarios.insert(ORDER.into(), s);
            assert_eq!(fired(&facts), vec![], "{s:?}");
            let r = row(&check(&facts), super::scenario_name(s));
            assert_eq!((r.orders, r.compensated), (1, 1), "{s:?}");
        }
    }

    #[test]
    fn i8_fires_for_an_ok_order_that_compensated() {
        // The build that refuses every order: all else balances.
        let mut f = compensated();
        f.scenarios.insert(ORDER.into(), Scenario::Ok);
        assert_fires(&f, "I8", "its scenario (ok) must end completed");
        assert_eq!(row(&check(&f), "ok").compensated, 1);
    }

    #[test]
    fn i8_fires_for_a_declined_order_that_completed() {
        for s in [
            Scenario::Declined,
            Scenario::OutOfStock,
            Scenario::GatewayDown,
        ] {
            let mut f = clean();
            f.scenarios.insert(ORDER.into(), s);
            assert_fires(&f, "I8", "must end compensated");
            assert_eq!(row(&check(&f), super::scenario_name(s)).completed, 1);
        }
    }

    #[test]
    fn i8_fires_when_the_shop_disagrees_with_the_saga() {
        let mut f = clean();
        f.shop.insert(ORDER.into(), OrderStatus::Pending);
        assert_fires(&f, "I8", "the shop's order is pending (expected confirmed)");
        let mut f = compensated();
        f.shop.insert(ORDER.into(), OrderStatus::Confirmed);
        assert_fires(&f, "I8", "the shop's order is confirmed (expected pending)");
        let mut f = clean();
        f.shop.clear();
        assert_fires(&f, "I8", "the shop has no such order");
    }

    #[test]
    fn i8_fires_for_an_order_placed_without_a_saga() {
        let mut f = clean();
        f.scenarios.insert("order-2".into(), Scenario::Ok);
        assert_fires(&f, "I8", "no saga was started for it");
        assert_eq!(row(&check(&f), "ok").other, 1);
    }

    #[test]
    fn unfinished_sagas_are_counted_as_other_and_left_to_i4() {
        let mut f = clean();
        f.instances.get_mut(ORDER).expect("the order").status = Status::Stuck;
        let found = fired(&f);
        assert!(found.iter().all(|(i, _)| *i == "I4"), "{found:?}");
        assert_eq!(row(&check(&f), "ok").other, 1);
    }
}
