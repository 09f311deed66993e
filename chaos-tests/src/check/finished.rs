//! I4: every saga Completed or Compensated within the bound after the
//! last fault; the stuck ones reported with their reasons.

use saga_core::Status;

use super::{Facts, Findings, Violation, violation};

/// I4: every saga finished.
pub(super) fn finished(facts: &Facts, f: &mut Findings, v: &mut Vec<Violation>) {
    if !facts.quiesced {
        v.push(violation(
            "I4",
            None,
            "the system did not quiesce within the bound after the last fault".into(),
        ));
    }
    for i in facts.instances.values() {
        *f.outcomes.entry(i.status.to_string()).or_default() += 1;
        if !i.status.is_terminal() {
            let reason = i.stuck_reason.clone().unwrap_or_default();
            if i.status == Status::Stuck {
                f.stuck.push((i.order.clone(), reason.clone()));
            }
            v.push(violation(
                "I4",
                Some(&i.order),
                format!("saga is {} {reason}", i.status),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use saga_core::Status;

    use crate::check::check;
    use crate::check::fixtures::{ORDER, assert_fires, clean};

    #[test]
    fn i4_fires_when_not_quiesced_or_a_saga_is_unfinished() {
        let mut f = clean();
        f.quiesced = false;
        assert_fires(&f, "I4", "did not quiesce");
        let mut f = clean();
        let i = f.instances.get_mut(ORDER).expect("the order");
        i.status = Status::Stuck;
        i.stuck_reason = Some("gave up in doubt".into());
        assert_fires(&f, "I4", "gave up in doubt");
        assert_eq!(
            check(&f).stuck,
            vec![(ORDER.to_owned(), "gave up in doubt".to_owned())]
        );
        let mut f = clean();
        f.instances.get_mut(ORDER).expect("the order").status = Status::Running;
        assert_fires(&f, "I4", "saga is running");
    }
}
