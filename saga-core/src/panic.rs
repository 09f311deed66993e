//! The message of a caught panic.

use std::any::Any;

/// The message a panic was raised with, from its payload (what
/// [`JoinError::into_panic`](tokio::task::JoinError::into_panic) or
/// [`std::panic::catch_unwind`] return): the `&str` or `String` that
/// `panic!` was given, or a placeholder for any other payload.
///
/// The one way the workspace renders a panic of user code (a step, a
/// publisher) into an error message.
///
/// ```
/// let payload = std::panic::catch_unwind(|| panic!("out of {}", "stock")).unwrap_err();
/// assert_eq!(saga_core::panic_message(payload.as_ref()), "out of stock");
/// ```
#[must_use]
pub fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic with a payload that is not a string")
}
