//! A saga definition drawn as a Mermaid flowchart.

use std::fmt::Write;

use crate::definition::SagaDefinition;
use crate::machine::StepKind;

impl<S> SagaDefinition<S> {
    /// The definition as a Mermaid flowchart: the forward path left to
    /// right (the pivot as a hexagon), dotted failure edges to the
    /// compensation that starts there, compensations chained in reverse,
    /// and where the saga ends. Deterministic, so it can be checked into
    /// documentation and compared in a test.
    ///
    /// ```
    /// use saga_core::{SagaDefinition, Step, StepContext, StepError};
    /// async fn ok(_: &mut StepContext, _: &mut u8) -> Result<(), StepError> { Ok(()) }
    ///
    /// let saga = SagaDefinition::<u8>::builder("pay", 1)
    ///     .step(Step::new("charge", ok).compensate_with(ok))
    ///     .pivot(Step::new("confirm", ok))
    ///     .build()?;
    /// assert!(saga.to_mermaid().contains(r#"s1{{"confirm<br/>pivot"}}"#));
    /// # Ok::<(), saga_core::Error>(())
    /// ```
    #[must_use]
    pub fn to_mermaid(&self) -> String {
        let plan = self.plan();
        let name = |i: usize| self.step_name(i).map(|n| n.as_str()).unwrap_or("?");
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "flowchart LR");
        let _ = writeln!(w, "    %% {} v{}", self.name(), self.version());
        let _ = writeln!(w, "    start((start)) --> s0");
        for (i, kind) in plan.iter().enumerate() {
            let node = match kind {
                StepKind::Compensatable => format!("s{i}[\"{}\"]", name(i)),
                StepKind::NoCompensation => format!("s{i}[\"{}<br/>no compensation\"]", name(i)),
                StepKind::Pivot => format!("s{i}{{{{\"{}<br/>pivot\"}}}}", name(i)),
                StepKind::Retriable => format!("s{i}[\"{}<br/>retried, never undone\"]", name(i)),
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
        let mut any_to_compensated = false;
        for (i, kind) in plan.iter().enumerate() {
            if *kind == StepKind::Retriable {
                let _ = writeln!(
                    w,
                    "    s{i} -. gives up .-> stuck[/\"stuck: for an operator\"/]"
                );
                continue;
            }
            match compensatable.iter().rev().find(|&&k| k <= i) {
                Some(k) => {
                    let _ = writeln!(w, "    s{i} -. fails .-> c{k}");
                }
                None => {
                    any_to_compensated = true;
                    let _ = writeln!(w, "    s{i} -. fails .-> compensated((compensated))");
                }
            }
        }
        for pair in compensatable.windows(2).rev() {
            let _ = writeln!(w, "    c{} --> c{}", pair[1], pair[0]);
        }
        if let Some(first) = compensatable.first() {
            let target = if any_to_compensated {
                "compensated"
            } else {
                "compensated((compensated))"
            };
            let _ = writeln!(w, "    c{first} --> {target}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{Script, scripted_saga};

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
    s4 -. gives up .-> stuck[/"stuck: for an operator"/]
    c2 --> c1
    c1 --> compensated
"#;
        assert_eq!(saga.to_mermaid(), expected);
    }
}
