//! The diagrams in `docs/` are generated or checked, not hand-drawn:
//! the checkout flowchart in `docs/walkthrough.md` is exactly what the
//! definition renders, and the state diagram in `docs/ARCHITECTURE.md` has
//! exactly the status machine's edges. Every page of `docs/` is pulled into
//! the doctests, so no Rust block there goes unchecked.

use std::collections::BTreeSet;
use std::path::PathBuf;

use saga_core::machine::{Event, Position, transition};
use saga_core::{Direction, Status, StepKind, Timestamp};

fn doc(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The bodies of the ```mermaid blocks of a markdown page, each line
/// ending with a newline.
fn mermaid_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_end() == "```mermaid" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.extend(current.take()),
            Some(body) => {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unterminated ```mermaid block");
    blocks
}

#[test]
fn the_checkout_diagram_in_the_walkthrough_is_the_definitions_own_rendering() {
    let blocks: Vec<String> = mermaid_blocks(&doc("walkthrough.md"))
        .into_iter()
        .filter(|b| b.contains("%% checkout v"))
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "docs/walkthrough.md must have exactly one ```mermaid block of the checkout saga \
         (the output of `cargo run -p checkout -- diagram`)"
    );
    let rendered = checkout::saga::diagram();
    assert!(
        blocks[0] == rendered,
        "the checkout diagram in docs/walkthrough.md is out of date: regenerate it with \
         `cargo run -p checkout -- diagram` and paste the output into its ```mermaid block.\n\
         --- in docs/walkthrough.md:\n{}--- checkout::saga::diagram():\n{rendered}",
        blocks[0]
    );
}

/// Every (from, to) pair of statuses the machine can take, over a plan
/// with every kind of step.
fn machine_edges() -> BTreeSet<(String, String)> {
    use StepKind::{Compensatable as C, NoCompensation as N, Pivot as P, Retriable as R};
    let plan = [N, C, C, P, R];
    let at = Timestamp::from_micros(1);
    let events = [
        Event::Succeeded,
        Event::RetryScheduled { at },
        Event::Snoozed { until: at },
        Event::FailedForGood {
            reason: "r".into(),
            definitive: true,
        },
        Event::FailedForGood {
            reason: "r".into(),
            definitive: false,
        },
        Event::Cancel {
            reason: "r".into(),
            current_step_started: true,
        },
        Event::Cancel {
            reason: "r".into(),
            current_step_started: false,
        },
        Event::Park { reason: "r".into() },
        Event::Resume,
    ];
    let mut edges = BTreeSet::new();
    for status in Status::ALL {
        for step in 0..plan.len() {
            for direction in [Direction::Forward, Direction::Compensate] {
                for event in &events {
                    if let Ok(t) = transition(&plan, status, Position { step, direction }, event) {
                        edges.insert((format!("{status:?}"), format!("{:?}", t.status)));
                    }
                }
            }
        }
    }
    edges
}

#[test]
fn the_state_diagram_in_the_architecture_page_has_exactly_the_machines_edges() {
    let blocks: Vec<String> = mermaid_blocks(&doc("ARCHITECTURE.md"))
        .into_iter()
        .filter(|b| b.starts_with("stateDiagram-v2"))
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "one stateDiagram-v2 in docs/ARCHITECTURE.md"
    );
    let statuses: BTreeSet<String> = Status::ALL.iter().map(|s| format!("{s:?}")).collect();
    let mut drawn = BTreeSet::new();
    for line in blocks[0].lines() {
        let Some((from, rest)) = line.trim().split_once(" --> ") else {
            continue;
        };
        let to = rest.split(':').next().unwrap_or(rest).trim();
        for state in [from, to] {
            assert!(
                state == "[*]" || statuses.contains(state),
                "`{state}` in docs/ARCHITECTURE.md is not a status of the machine"
            );
        }
        if from != "[*]" && to != "[*]" {
            drawn.insert((from.to_owned(), to.to_owned()));
        }
    }
    assert_eq!(
        drawn,
        machine_edges(),
        "docs/ARCHITECTURE.md's state diagram and saga_core::machine disagree"
    );
}

#[test]
fn every_page_in_docs_is_compiled_as_doctests() {
    let lib = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("examples/src/lib.rs");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut missing = Vec::new();
    let mut pages = 0;
    for entry in std::fs::read_dir(&dir).expect("docs/") {
        let name = entry.expect("docs/ entry").file_name();
        let name = name.to_string_lossy();
        if !name.ends_with(".md") {
            continue;
        }
        pages += 1;
        let include = format!("#[doc = include_str!(\"../../docs/{name}\")]");
        if !lib.contains(&include) {
            missing.push(name.into_owned());
        }
    }
    assert!(pages > 0, "no pages found in {}", dir.display());
    assert!(
        missing.is_empty(),
        "docs pages whose code blocks are never compiled; add them to examples/src/lib.rs: {missing:?}"
    );
}
