//! Orders, and the checkout saga's state.

use serde::{Deserialize, Serialize};

/// A card token that pays.
pub const CARD_OK: &str = "tok_visa";
/// A card token the payment service declines (a permanent failure).
pub const CARD_DECLINED: &str = "tok_declined";
/// A card token whose gateway is down for the whole run: every charge
/// attempt fails with a 503 until the retry budget is spent.
pub const CARD_GATEWAY_DOWN: &str = "tok_gateway_down";
/// A SKU that is always out of stock.
pub const SKU_SOLD_OUT: &str = "sold-out-sneakers";

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub sku: String,
    /// How many.
    pub qty: u32,
}

/// An order placed by a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order's id, also the saga's start key.
    pub id: String,
    /// Where the confirmation goes.
    pub email: String,
    /// The payment card token.
    pub card: String,
    /// What was ordered.
    pub lines: Vec<OrderLine>,
    /// What it costs, in cents.
    pub total_cents: i64,
}

/// The checkout saga's state: the order, and what the steps learned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    /// The order being checked out.
    pub order: Order,
    /// The payment service's charge id, once charged.
    pub charge_id: Option<String>,
    /// The inventory service's reservation id, once reserved.
    pub reservation_id: Option<String>,
}

impl Checkout {
    /// The state at the start of the saga.
    #[must_use]
    pub fn new(order: Order) -> Self {
        Checkout {
            order,
            charge_id: None,
            reservation_id: None,
        }
    }
}

/// The message `send_confirmation` emits, topic [`ORDER_CONFIRMED`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: String,
    /// Who to email.
    pub email: String,
    /// What was charged.
    pub total_cents: i64,
}

impl OrderConfirmed {
    /// The message confirming `order`.
    #[must_use]
    pub fn of(order: &Order) -> Self {
        OrderConfirmed {
            order_id: order.id.clone(),
            email: order.email.clone(),
            total_cents: order.total_cents,
        }
    }
}

/// The topic of [`OrderConfirmed`] messages.
pub const ORDER_CONFIRMED: &str = "order.confirmed";
