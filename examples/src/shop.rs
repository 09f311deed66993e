//! The checkout service's own database: its orders.
//!
//! Placing an order writes the order row and starts its saga in one
//! transaction (`PgSagaStore::start_in_tx`): there is never an order
//! without a saga, nor a saga without an order.

use saga_core::store::NewSaga;
use saga_core::{Limits, SagaDefinition, StartKey, Started};
use saga_postgres::deadpool_postgres::Pool;
use saga_postgres::{PgSagaStore, SchemaName};

use crate::model::{Checkout, Order};

/// The shop: orders in their own schema.
#[derive(Debug, Clone)]
pub struct Shop {
    pool: Pool,
    schema: SchemaName,
}

/// What the shop knows of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Placed, not yet confirmed.
    Pending,
    /// Confirmed: the saga passed its pivot.
    Confirmed,
}

impl Shop {
    /// The shop on `pool`, its table in `schema`.
    #[must_use]
    pub fn new(pool: Pool, schema: SchemaName) -> Self {
        Shop { pool, schema }
    }

    fn orders(&self) -> String {
        format!("{}.orders", self.schema.quoted())
    }

    /// Creates the orders table if needed.
    pub async fn create_schema(&self) -> Result<(), crate::Error> {
        self.pool
            .get()
            .await?
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {orders} (
                     id          text   PRIMARY KEY,
                     body        jsonb  NOT NULL,
                     total_cents bigint NOT NULL,
                     status      text   NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'confirmed')),
                     placed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
                 );",
                s = self.schema.quoted(),
                orders = self.orders()
            ))
            .await?;
        Ok(())
    }

    /// Writes the order and starts its checkout saga in one transaction.
    /// Placing the same order again returns the saga already started.
    pub async fn place<D>(
        &self,
        store: &PgSagaStore,
        saga: &SagaDefinition<Checkout, D>,
        order: &Order,
    ) -> Result<Started, crate::Error> {
        let key = StartKey::new(&order.id)?;
        let new = NewSaga::new(
            saga,
            key,
            &Checkout::new(order.clone()),
            &Limits::default(),
            saga_core::store::SagaStore::clock(store).now(),
        )?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            &format!(
                "INSERT INTO {} (id, body, total_cents) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                self.orders()
            ),
            &[&order.id, &serde_json::to_value(order)?, &order.total_cents],
        )
        .await?;
        let started = store.start_in_tx(&tx, new).await?;
        tx.commit().await?;
        if started.created {
            saga_core::count_started(saga.name());
        }
        Ok(started)
    }

    /// The order as stored, if it exists.
    pub async fn get(&self, id: &str) -> Result<Option<(Order, OrderStatus)>, crate::Error> {
        let row = self
            .pool
            .get()
            .await?
            .query_opt(
                &format!("SELECT body, status FROM {} WHERE id = $1", self.orders()),
                &[&id],
            )
            .await?;
        row.map(|r| {
            let order: Order = serde_json::from_value(r.get(0))?;
            let status = match r.get::<_, &str>(1) {
                "confirmed" => OrderStatus::Confirmed,
                _ => OrderStatus::Pending,
            };
            Ok((order, status))
        })
        .transpose()
    }

    /// Confirms the order (idempotent). `false` if there is no such order.
    pub async fn confirm(&self, id: &str) -> Result<bool, crate::Error> {
        let n = self
            .pool
            .get()
            .await?
            .execute(
                &format!(
                    "UPDATE {} SET status = 'confirmed' WHERE id = $1",
                    self.orders()
                ),
                &[&id],
            )
            .await?;
        Ok(n == 1)
    }

    /// Every confirmed order's id.
    pub async fn confirmed(&self) -> Result<Vec<String>, crate::Error> {
        Ok(self
            .pool
            .get()
            .await?
            .query(
                &format!(
                    "SELECT id FROM {} WHERE status = 'confirmed' ORDER BY id",
                    self.orders()
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}
