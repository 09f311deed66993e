//! The orders of a run and what each is meant to do.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{CARD_DECLINED, CARD_GATEWAY_DOWN, CARD_OK, Order, OrderLine, SKU_SOLD_OUT};

use super::Options;

/// What can happen to an order, by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// Everything works.
    Ok,
    /// The card is declined: nothing to undo but the (absent) charge.
    Declined,
    /// An item is out of stock after the card was charged: refunded.
    OutOfStock,
    /// The payment gateway is down for this card: retries, then
    /// compensation once the budget is spent.
    GatewayDown,
}

impl Scenario {
    /// A short description.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Scenario::Ok => "ok",
            Scenario::Declined => "card declined",
            Scenario::OutOfStock => "out of stock",
            Scenario::GatewayDown => "gateway outage",
        }
    }
}

const CATALOGUE: [(&str, i64); 3] = [("mug", 1_200), ("t-shirt", 2_500), ("poster", 800)];

/// The orders of a run: the first four show each scenario (when their rates
/// are not zero), the rest are drawn from the rates.
#[must_use]
pub fn orders(options: &Options) -> Vec<(Order, Scenario)> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let forced: Vec<Scenario> = [
        (Scenario::Ok, 1.0),
        (Scenario::Declined, options.decline_rate),
        (Scenario::OutOfStock, options.out_of_stock_rate),
        (Scenario::GatewayDown, options.outage_rate),
    ]
    .into_iter()
    .filter(|(_, rate)| *rate > 0.0)
    .map(|(s, _)| s)
    .collect();
    (0..options.orders)
        .map(|i| {
            let scenario = forced.get(i).copied().unwrap_or_else(|| {
                let roll: f64 = rng.random();
                let d = options.decline_rate;
                let o = d + options.out_of_stock_rate;
                let g = o + options.outage_rate;
                if roll < d {
                    Scenario::Declined
                } else if roll < o {
                    Scenario::OutOfStock
                } else if roll < g {
                    Scenario::GatewayDown
                } else {
                    Scenario::Ok
                }
            });
            let mut lines: Vec<OrderLine> = (0..rng.random_range(1..=2))
                .map(|_| {
                    let (sku, _) = CATALOGUE[rng.random_range(0..CATALOGUE.len())];
                    OrderLine {
                        sku: sku.to_owned(),
                        qty: rng.random_range(1..=3),
                    }
                })
                .collect();
            lines.sort_by(|a, b| a.sku.cmp(&b.sku));
            lines.dedup_by(|a, b| a.sku == b.sku);
            let mut total: i64 = lines
                .iter()
                .map(|l| {
                    CATALOGUE
                        .iter()
                        .find(|(s, _)| *s == l.sku)
                        .map_or(0, |(_, p)| *p)
                        * i64::from(l.qty)
                })
                .sum();
            if scenario == Scenario::OutOfStock {
                lines.push(OrderLine {
                    sku: SKU_SOLD_OUT.to_owned(),
                    qty: 1,
                });
                total += 9_900;
            }
            let card = match scenario {
                Scenario::Declined => CARD_DECLINED,
                Scenario::GatewayDown => CARD_GATEWAY_DOWN,
                _ => CARD_OK,
            };
            let order = Order {
                id: format!("order-{:04}", i + 1),
                email: format!("customer{}@example.com", i + 1),
                card: card.to_owned(),
                lines,
                total_cents: total,
            };
            (order, scenario)
        })
        .collect()
}

/// Stock for `orders` orders: plenty of each catalogue item, none of the
/// sold-out one.
#[must_use]
pub fn stock(orders: usize) -> BTreeMap<String, i32> {
    let plenty = i32::try_from(orders.saturating_mul(6) + 10).unwrap_or(i32::MAX);
    let mut stock: BTreeMap<String, i32> = CATALOGUE
        .iter()
        .map(|(sku, _)| ((*sku).to_owned(), plenty))
        .collect();
    stock.insert(SKU_SOLD_OUT.to_owned(), 0);
    stock
}
