//! HTTP clients for the downstream services, as a step would use them:
//! every call carries the step's idempotency key (and, through
//! [`Downstream::under_lease`], the attempt's lease token, for the
//! services' logs), and every answer becomes
//! success, a retryable error, a permanent error, or a timeout whose
//! outcome is unknown.

use std::time::Duration;

use saga_core::{IdempotencyKey, LeaseToken, StepError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::{Order, OrderLine};
use crate::services::inventory::{ReleaseRequest, ReserveRequest};
use crate::services::payment::{ChargeRequest, RefundRequest};

/// A downstream service answered with an error status.
#[derive(Debug, thiserror::Error)]
#[error("{service} answered {status}: {body}")]
pub struct HttpStatusError {
    /// Which service.
    pub service: &'static str,
    /// The status.
    pub status: u16,
    /// The body, for the history.
    pub body: String,
}

/// A call that could not be made or answered.
#[derive(Debug, thiserror::Error)]
#[error("calling {service} failed")]
pub struct CallFailed {
    service: &'static str,
    #[source]
    source: reqwest::Error,
}

/// Where the checkout's downstream services are, and how to call them.
#[derive(Debug, Clone)]
pub struct Downstream {
    http: reqwest::Client,
    payment: String,
    inventory: String,
    /// Negative control: send a fresh key on every attempt instead of the
    /// step's stable idempotency key. Breaks "never charge twice" on purpose.
    pub fresh_key_per_attempt: bool,
    lease: Option<LeaseToken>,
}

impl Downstream {
    /// Clients for the services at these base URLs, with a per-call timeout.
    pub fn new(
        payment: String,
        inventory: String,
        timeout: Duration,
    ) -> Result<Self, crate::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(crate::Error::Http)?;
        Ok(Downstream {
            http,
            payment,
            inventory,
            fresh_key_per_attempt: false,
            lease: None,
        })
    }

    /// These clients, sending `lease` (the calling attempt's
    /// [`StepContext::lease_token`](saga_core::StepContext::lease_token))
    /// with every call in the
    /// [`LEASE_HEADER`](crate::services::LEASE_HEADER), so that the
    /// services' logs tell which attempt made each call. Information only:
    /// the services never refuse a call for its lease.
    #[must_use]
    pub fn under_lease(&self, lease: Option<LeaseToken>) -> Downstream {
        Downstream {
            lease,
            ..self.clone()
        }
    }

    fn key(&self, key: IdempotencyKey) -> String {
        if self.fresh_key_per_attempt {
            uuid::Uuid::now_v7().to_string()
        } else {
            key.to_string()
        }
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        service: &'static str,
        url: String,
        key: String,
        body: &B,
        permanent: &[u16],
    ) -> Result<R, StepError> {
        let mut request = self.http.post(url).header("Idempotency-Key", key);
        if let Some(lease) = self.lease {
            request = request.header(crate::services::LEASE_HEADER, lease.to_string());
        }
        let response = request
            .json(body)
            .send()
            .await
            .map_err(|source| classify(CallFailed { service, source }))?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return response
                .json()
                .await
                .map_err(|source| classify(CallFailed { service, source }));
        }
        let body = response.text().await.unwrap_or_default();
        let err = HttpStatusError {
            service,
            status,
            body,
        };
        if permanent.contains(&status) || (400..500).contains(&status) && status != 429 {
            Err(StepError::permanent(err))
        } else {
            Err(StepError::retryable(err))
        }
    }

    /// Charges the order. A decline (402) or a voided key (409) is
    /// permanent; 5xx and connection failures are retryable; a timeout's
    /// outcome is unknown.
    pub async fn charge(&self, key: IdempotencyKey, order: &Order) -> Result<String, StepError> {
        #[derive(serde::Deserialize)]
        struct Charged {
            charge_id: String,
        }
        let req = ChargeRequest {
            order_id: order.id.clone(),
            amount_cents: order.total_cents,
            card: order.card.clone(),
        };
        let charged: Charged = self
            .post(
                "payment",
                format!("{}/charges", self.payment),
                self.key(key),
                &req,
                &[402, 409],
            )
            .await?;
        Ok(charged.charge_id)
    }

    /// Refunds whatever the charge made with `charge_key` charged; nothing
    /// to refund is fine.
    pub async fn refund(
        &self,
        key: IdempotencyKey,
        charge_key: IdempotencyKey,
    ) -> Result<(), StepError> {
        let req = RefundRequest {
            charge_key: charge_key.as_uuid(),
        };
        let _: serde_json::Value = self
            .post(
                "payment",
                format!("{}/refunds", self.payment),
                self.key(key),
                &req,
                &[],
            )
            .await?;
        Ok(())
    }

    /// Reserves the order's lines. Out of stock (409) is permanent.
    pub async fn reserve(
        &self,
        key: IdempotencyKey,
        order_id: &str,
        lines: &[OrderLine],
    ) -> Result<String, StepError> {
        #[derive(serde::Deserialize)]
        struct Reserved {
            reservation_id: String,
        }
        let req = ReserveRequest {
            order_id: order_id.to_owned(),
            lines: lines.to_vec(),
        };
        let reserved: Reserved = self
            .post(
                "inventory",
                format!("{}/reservations", self.inventory),
                self.key(key),
                &req,
                &[409],
            )
            .await?;
        Ok(reserved.reservation_id)
    }

    /// Releases whatever the reservation made with `reservation_key`
    /// deducted; nothing to release is fine.
    pub async fn release(
        &self,
        key: IdempotencyKey,
        reservation_key: IdempotencyKey,
    ) -> Result<(), StepError> {
        let req = ReleaseRequest {
            reservation_key: reservation_key.as_uuid(),
        };
        let _: serde_json::Value = self
            .post(
                "inventory",
                format!("{}/releases", self.inventory),
                self.key(key),
                &req,
                &[],
            )
            .await?;
        Ok(())
    }
}

/// A timeout's outcome is unknown; anything else that kept the call from
/// completing is worth retrying.
fn classify(e: CallFailed) -> StepError {
    if e.source.is_timeout() {
        StepError::timeout(e)
    } else {
        StepError::retryable(e)
    }
}
