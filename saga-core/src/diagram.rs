//! A saga definition drawn as a Mermaid flowchart.

use std::fmt::Write;

use crate::definition::SagaDefinition;
use crate::machine::StepKind;
use crate::shape::SagaShape;

/// The node where a saga is parked for a person, as first drawn.
const STUCK: &str = "stuck[/\"stuck: for an operator\"/]";

impl<S, D> SagaDefinition<S, D> {
    /// The definition as a Mermaid flowchart: its
    /// [shape](SagaDefinition::shape) drawn by [`SagaShape::to_mermaid`].
    #[must_use]
    pub fn to_mermaid(&self) -> String {
        self.shape().to_mermaid()
    }
}

impl SagaShape {
    /// The definition as a Mermaid flowchart: the forward path left to
    /// right (the pivot as a hexagon), then, dotted, where each failure
    /// leads, as [`machine::transition`](crate::machine::transition)
    /// decides:
    ///
    /// - a step up to the pivot that fails for good: to the compensation
    ///   that starts there (its own, if it has one), or to `compensated`
    ///   when there is nothing to undo;
    /// - the pivot giving up *in doubt* (its outcome unknown): to `stuck`;
    /// - a step after the pivot giving up: to `stuck`;
    /// - a compensation giving up: to `stuck`.
    ///
    /// Compensations are chained in reverse, solid, down to `compensated`.
    /// Not drawn: parking an instance the engine cannot run (from any
    /// step), and an operator's resume or cancel out of `stuck`.
    /// Deterministic, so it can be checked into documentation and compared
    /// in a test.
    ///
    /// ```
    /// use saga_core::{SagaDefinition, Step, StepContext, StepError};
    /// async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> { Ok(()) }
    ///
    /// let saga = SagaDefinition::<u8>::builder("pay", 1)
    ///     .step(Step::new("charge", ok).compensate_with(ok))
    ///     .pivot(Step::new("confirm", ok))
    ///     .build()?;
    /// let diagram = saga.to_mermaid();
    /// assert!(diagram.contains(r#"s1{{"confirm<br/>pivot"}}"#));
    /// assert!(diagram.contains("s1 -. fails .-> c0"));
    /// assert!(diagram.contains("s1 -. in doubt .-> stuck"));
    /// assert!(diagram.contains("c0 -. gives up .-> stuck"));
    /// # Ok::<(), saga_core::BuildError>(())
    /// ```
    #[must_use]
    pub fn to_mermaid(&self) -> String {
        let plan: Vec<StepKind> = self.plan().collect();
        let name = |i: usize| self.steps[i].name.as_str();
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "flowchart LR");
        let _ = writeln!(w, "    %% {} v{}", self.kind.name, self.kind.version);
        let _ = writeln!(w, "    start((start)) --> s0");
        for (i, kind) in plan.iter().enumerate() {
            let node = match kind {
                StepKind::Compensatable => format!("s{i}[\"{}\"]", name(i)),
                StepKind::NoCompensation => format!("s{i}[\"{}<br/>no compensation\"]", name(i)),
                StepKind::Pivot => format!("s{i}{{{{\"{}<br/>pivot\"}}}}", name(i)),
                StepKind::Retryable => format!("s{i}[\"{}<br/>retried, never undone\"]", name(i)),
            };
            let _ = writeln!(w, "    {node}");
            if i + 1 < plan.len() {
                let _ = writeln!(w, "    s{i} --> s{}", i + 1);
            } else {
                let _ = writeln!(w, "    s{i} --> completed((completed))");
            }
        }
        let compensatable: Vec<usize> = (0..plan.len())
            .filter(|&i| plan[i].has_compensation())
            .collect();
        for &i in &compensatable {
            let _ = writeln!(w, "    c{i}[\"undo {}\"]", name(i));
        }
        // A node's shape is given where it first appears.
        let mut compensated_drawn = false;
        let mut compensated = || {
            if std::mem::replace(&mut compensated_drawn, true) {
                "compensated"
            } else {
                "compensated((compensated))"
            }
        };
        let mut stuck_drawn = false;
        let mut stuck = || {
            if std::mem::replace(&mut stuck_drawn, true) {
                "stuck"
            } else {
                STUCK
            }
        };
        for (i, kind) in plan.iter().enumerate() {
            if *kind == StepKind::Retryable {
                let _ = writeln!(w, "    s{i} -. gives up .-> {}", stuck());
                continue;
            }
            match compensatable.iter().rev().find(|&&k| k <= i) {
                Some(k) => {
                    let _ = writeln!(w, "    s{i} -. fails .-> c{k}");
                }
                None => {
                    let _ = writeln!(w, "    s{i} -. fails .-> {}", compensated());
                }
            }
            if *kind == StepKind::Pivot {
                let _ = writeln!(w, "    s{i} -. in doubt .-> {}", stuck());
            }
        }
        for pair in compensatable.windows(2).rev() {
            let _ = writeln!(w, "    c{} --> c{}", pair[1], pair[0]);
        }
        if let Some(first) = compensatable.first() {
            let _ = writeln!(w, "    c{first} --> {}", compensated());
        }
        for &i in compensatable.iter().rev() {
            let _ = writeln!(w, "    c{i} -. gives up .-> {}", stuck());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::definition::SagaDefinition;
    use crate::machine::{Event, Position, StepKind, transition};
    use crate::testing::{Script, scripted_saga};
    use crate::{Status, Step, StepContext, StepError};

    #[test]
    fn the_checkout_shape_renders_forward_path_compensations_and_ends() {
        let saga = scripted_saga(&Script::new(), 1);
        let expected = r#"flowchart LR
    %% scripted v1
    start((start)) --> s0
    s0["validate<br/>no compensation"]
    s0 --> s1
    s1["charge"]
    s1 --> s2
    s2["reserve"]
    s2 --> s3
    s3{{"confirm<br/>pivot"}}
    s3 --> s4
    s4["notify<br/>retried, never undone"]
    s4 --> completed((completed))
    c1["undo charge"]
    c2["undo reserve"]
    s0 -. fails .-> compensated((compensated))
    s1 -. fails .-> c1
    s2 -. fails .-> c2
    s3 -. fails .-> c2
    s3 -. in doubt .-> stuck[/"stuck: for an operator"/]
    s4 -. gives up .-> stuck
    c2 --> c1
    c1 --> compensated
    c2 -. gives up .-> stuck
    c1 -. gives up .-> stuck
"#;
        assert_eq!(saga.to_mermaid(), expected);
    }

    async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> {
        Ok(())
    }

    /// A definition whose steps have the roles of `plan`.
    fn saga_of(plan: &[StepKind]) -> SagaDefinition<u8> {
        let mut before = SagaDefinition::<u8>::builder("shape", 1);
        let mut steps = plan.iter().enumerate();
        while let Some((i, kind)) = steps.next() {
            let step = Step::new(format!("step{i}"), ok);
            before = match kind {
                StepKind::Compensatable => before.step(step.compensate_with(ok)),
                StepKind::NoCompensation => before.step(step.no_compensation()),
                StepKind::Pivot => {
                    let mut after = before.pivot(step);
                    for (j, kind) in steps {
                        assert_eq!(*kind, StepKind::Retryable, "{plan:?}");
                        after = after.step(Step::new(format!("step{j}"), ok));
                    }
                    return after.build().unwrap();
                }
                StepKind::Retryable => panic!("a retryable step before the pivot: {plan:?}"),
            };
        }
        before.build().unwrap()
    }

    /// The diagram's node for an instance that is `status` at `position`.
    fn node(status: Status, position: Position) -> String {
        match status {
            Status::Running => format!("s{}", position.step),
            Status::Compensating => format!("c{}", position.step),
            other => other.as_str().to_owned(),
        }
    }

    /// An edge: from, to, whether it is a failure (dotted).
    type Edge = (String, String, bool);

    /// The edges the machine takes on success and on failure for good
    /// (definitive or in doubt), from every forward step and every
    /// compensation of `plan`.
    fn machine_edges(plan: &[StepKind]) -> BTreeSet<Edge> {
        let mut edges = BTreeSet::from([("start".to_owned(), "s0".to_owned(), false)]);
        let failures = [true, false].map(|definitive| Event::FailedForGood {
            reason: "r".into(),
            definitive,
        });
        for step in 0..plan.len() {
            let mut from = vec![(Status::Running, Position::forward(step))];
            if plan[step].has_compensation() {
                from.push((Status::Compensating, Position::compensate(step)));
            }
            for (status, position) in from {
                let here = node(status, position);
                let t = transition(plan, status, position, &Event::Succeeded).unwrap();
                edges.insert((here.clone(), node(t.status, t.position), false));
                for event in &failures {
                    let t = transition(plan, status, position, event).unwrap();
                    edges.insert((here.clone(), node(t.status, t.position), true));
                }
            }
        }
        edges
    }

    /// The edges a flowchart draws, node shapes stripped.
    fn drawn_edges(diagram: &str) -> BTreeSet<Edge> {
        let id = |s: &str| -> String {
            s.trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let mut edges = BTreeSet::new();
        for line in diagram.lines() {
            if let Some((from, rest)) = line.split_once(" -. ") {
                let (_, to) = rest.split_once(" .-> ").expect("a dotted edge");
                assert!(
                    edges.insert((id(from), id(to), true)),
                    "drawn twice: {line}"
                );
            } else if let Some((from, to)) = line.split_once(" --> ") {
                assert!(
                    edges.insert((id(from), id(to), false)),
                    "drawn twice: {line}"
                );
            }
        }
        edges
    }

    /// Every shape of saga up to three steps before the pivot and two
    /// after it.
    fn plans() -> Vec<Vec<StepKind>> {
        use StepKind::{Compensatable as C, NoCompensation as N, Pivot as P, Retryable as R};
        let mut plans = Vec::new();
        for before in 0..=3u32 {
            for bits in 0..(1u32 << before) {
                let head: Vec<StepKind> = (0..before)
                    .map(|b| if bits & (1 << b) == 0 { C } else { N })
                    .collect();
                if !head.is_empty() {
                    plans.push(head.clone());
                }
                for after in 0..=2 {
                    let mut plan = head.clone();
                    plan.push(P);
                    plan.extend(std::iter::repeat_n(R, after));
                    plans.push(plan);
                }
            }
        }
        plans
    }

    #[test]
    fn every_edge_drawn_is_one_the_machine_takes_and_every_failure_is_drawn() {
        let plans = plans();
        assert!(plans.len() > 40, "{}", plans.len());
        for plan in plans {
            let saga = saga_of(&plan);
            assert_eq!(saga.plan(), plan.as_slice());
            let diagram = saga.to_mermaid();
            assert_eq!(
                drawn_edges(&diagram),
                machine_edges(&plan),
                "{plan:?}:\n{diagram}"
            );
        }
    }

    #[test]
    fn each_end_node_has_its_shape_once() {
        for plan in plans() {
            let diagram = saga_of(&plan).to_mermaid();
            for shape in [
                "completed((completed))",
                "compensated((compensated))",
                super::STUCK,
            ] {
                let name = &shape[..shape.find(['(', '[']).unwrap()];
                let mentioned = diagram.contains(&format!(" {name}\n"))
                    || diagram.contains(&format!(" {shape}\n"));
                let shaped = diagram.matches(shape).count();
                assert_eq!(
                    shaped,
                    usize::from(mentioned),
                    "{plan:?} {name}:\n{diagram}"
                );
            }
        }
    }
}
