//! I6 for frozen workers: no zombie's result accepted after another
//! worker took its saga over.

use super::{Facts, Violation, violation};

/// I6: no zombie's stale result accepted.
pub(super) fn zombies(facts: &Facts, v: &mut Vec<Violation>) {
    for z in &facts.zombies {
        // Without a takeover the lease was still the zombie's to use: a
        // late write is then no one else's loss.
        if z.takeover && z.record_committed {
            v.push(violation(
                "I6",
                Some(&z.order),
                format!(
                    "a frozen worker's result ({:?}) was accepted after another worker had taken its saga over",
                    z.at
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::check::fixtures::{assert_fires, clean, fired, zombie};
    use crate::check::{RefusedAt, ZombieFact};
    use crate::schedule::ZombieAt;

    #[test]
    fn i6_fires_for_a_zombie_result_accepted_and_refusals_are_told_apart() {
        let mut f = clean();
        f.zombies.push(zombie());
        assert_eq!(fired(&f), vec![]);
        assert_eq!(f.zombies[0].refused(), Some(RefusedAt::Record));
        let heartbeat = ZombieFact {
            record_sent: None,
            at: ZombieAt::Step,
            ..zombie()
        };
        assert_eq!(heartbeat.refused(), Some(RefusedAt::Heartbeat));
        for unverified in [
            ZombieFact {
                takeover: false,
                ..zombie()
            },
            ZombieFact {
                refusal_reported: false,
                ..zombie()
            },
            ZombieFact {
                frozen: false,
                ..zombie()
            },
        ] {
            assert_eq!(unverified.refused(), None);
        }
        f.zombies[0].record_committed = true;
        assert_eq!(f.zombies[0].refused(), None);
        assert_fires(
            &f,
            "I6",
            "was accepted after another worker had taken its saga over",
        );
        // Nobody took over: the late result is not a violation (nor a
        // verified fencing).
        f.zombies[0].takeover = false;
        assert_eq!(fired(&f), vec![]);
        assert_eq!(f.zombies[0].refused(), None);
    }
}
