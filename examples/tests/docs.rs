//! The diagrams in `docs/` are generated or checked, not hand-drawn:
//! the checkout flowchart in `docs/walkthrough.md` is exactly what the
//! definition renders and draws the status machine's paths, and the state
//! diagram in `docs/ARCHITECTURE.md` has exactly the status machine's
//! edges. Every page of `docs/` and the README is pulled into the
//! doctests, and every code block there is either run as Rust or declared
//! to be in one of a few other languages.

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

/// A flowchart edge: from, to, and whether it is dotted (a failure).
type FlowEdge = (String, String, bool);

/// The flowchart node of an instance that is `status` at `position`.
fn flow_node(status: Status, position: Position) -> String {
    match status {
        Status::Running => format!("s{}", position.step),
        Status::Compensating => format!("c{}", position.step),
        other => other.as_str().to_owned(),
    }
}

/// Where the machine takes a saga of `plan` when each forward step and
/// each compensation succeeds (solid) or fails for good, definitively or in
/// doubt (dotted).
fn flowchart_edges_of_the_machine(plan: &[StepKind]) -> BTreeSet<FlowEdge> {
    let mut edges = BTreeSet::from([("start".to_owned(), "s0".to_owned(), false)]);
    for step in 0..plan.len() {
        let mut from = vec![Position::forward(step)];
        if plan[step].has_compensation() {
            from.push(Position::compensate(step));
        }
        for position in from {
            let status = match position.direction {
                Direction::Forward => Status::Running,
                Direction::Compensate => Status::Compensating,
            };
            let here = flow_node(status, position);
            let t = transition(plan, status, position, &Event::Succeeded).unwrap();
            edges.insert((here.clone(), flow_node(t.status, t.position), false));
            for definitive in [true, false] {
                let failed = Event::FailedForGood {
                    reason: "r".into(),
                    definitive,
                };
                let t = transition(plan, status, position, &failed).unwrap();
                edges.insert((here.clone(), flow_node(t.status, t.position), true));
            }
        }
    }
    edges
}

/// The edges a flowchart draws, node shapes stripped.
fn flowchart_edges_drawn(diagram: &str) -> BTreeSet<FlowEdge> {
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
            edges.insert((id(from), id(to), true));
        } else if let Some((from, to)) = line.split_once(" --> ") {
            edges.insert((id(from), id(to), false));
        }
    }
    edges
}

#[test]
fn the_checkout_diagram_in_the_walkthrough_draws_every_path_of_the_status_machine() {
    let saga = checkout::saga::shape();
    let expected = flowchart_edges_of_the_machine(&saga.plan().collect::<Vec<_>>());
    // The failures that park the saga are among them.
    for edge in [
        ("s3", "stuck"),
        ("s4", "stuck"),
        ("c1", "stuck"),
        ("c2", "stuck"),
    ] {
        assert!(
            expected.contains(&(edge.0.to_owned(), edge.1.to_owned(), true)),
            "{edge:?}"
        );
    }
    let docs = mermaid_blocks(&doc("walkthrough.md"))
        .into_iter()
        .find(|b| b.contains("%% checkout v"))
        .expect("the checkout diagram in docs/walkthrough.md");
    assert_eq!(
        flowchart_edges_drawn(&docs),
        expected,
        "the checkout diagram in docs/walkthrough.md and saga_core::machine disagree"
    );
}

/// Every (from, to) pair of statuses the machine can take, over a plan
/// with every kind of step.
fn machine_edges() -> BTreeSet<(String, String)> {
    use StepKind::{Compensatable as C, NoCompensation as N, Pivot as P, Retryable as R};
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

/// A fenced code block's opening: where it is and its info string.
#[derive(Debug)]
struct Fence {
    line: usize,
    info: String,
}

/// The opening fences (```` ``` ```` or `~~~`, as CommonMark reads them) of
/// a markdown page.
fn fences(markdown: &str) -> Vec<Fence> {
    let mut fences = Vec::new();
    // The open block's fence character and length.
    let mut open: Option<(char, usize)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if indent > 3 {
            continue;
        }
        let rest = &line[indent..];
        let Some(c) = rest.chars().next().filter(|c| *c == '`' || *c == '~') else {
            continue;
        };
        let run = rest.len() - rest.trim_start_matches(c).len();
        if run < 3 {
            continue;
        }
        let info = rest[run..].trim();
        match open {
            None => {
                open = Some((c, run));
                fences.push(Fence {
                    line: i + 1,
                    info: info.to_owned(),
                });
            }
            Some((oc, olen)) if c == oc && run >= olen && info.is_empty() => open = None,
            Some(_) => {}
        }
    }
    assert!(open.is_none(), "an unterminated code block");
    fences
}

/// Languages of blocks that rustdoc leaves alone, as a page may use them.
const NON_RUST: [&str; 4] = ["sh", "sql", "text", "mermaid"];

/// Why rustdoc would not compile and run a block as it stands, if so.
fn unchecked(info: &str) -> Option<String> {
    let tokens: Vec<&str> = info
        .split([',', ' ', '\t'])
        .filter(|t| !t.is_empty())
        .collect();
    match tokens.as_slice() {
        [] => return Some("no language: say `rust` (or one of the non-Rust languages)".into()),
        [lang] if NON_RUST.contains(lang) => return None,
        ["rust", ..] => {}
        [lang, ..] => {
            return Some(format!(
                "`{lang}` is neither `rust` nor one of {NON_RUST:?}; rustdoc would skip it \
                 unchecked (add the language to NON_RUST in examples/tests/docs.rs if it is \
                 really not Rust)"
            ));
        }
    }
    for token in &tokens[1..] {
        let code = token
            .strip_prefix('E')
            .filter(|n| n.len() == 4 && n.chars().all(|c| c.is_ascii_digit()));
        let edition = token
            .strip_prefix("edition")
            .filter(|y| y.parse::<u16>().is_ok());
        if ["compile_fail", "should_panic"].contains(token) || code.is_some() || edition.is_some() {
            continue;
        }
        return Some(format!(
            "`{token}`: the block would not be run (or not be checked as written)"
        ));
    }
    None
}

/// The pages whose code blocks are doctested, and the file that pulls
/// each one in.
fn doctested_pages() -> Vec<(PathBuf, PathBuf, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut pages = vec![(
        root.join("README.md"),
        root.join("saga-core/src/lib.rs"),
        "#[doc = include_str!(\"../../README.md\")]".to_owned(),
    )];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| {
            e.expect("docs/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .collect();
    docs.sort();
    for name in docs {
        pages.push((
            root.join("docs").join(&name),
            root.join("examples/src/lib.rs"),
            format!("#[doc = include_str!(\"../../docs/{name}\")]"),
        ));
    }
    pages
}

#[test]
fn every_page_in_docs_and_the_readme_is_compiled_as_doctests() {
    let pages = doctested_pages();
    assert!(pages.len() > 1, "no pages found in docs/");
    let mut missing = Vec::new();
    for (page, by, include) in &pages {
        let lib = std::fs::read_to_string(by).unwrap_or_else(|e| panic!("{}: {e}", by.display()));
        // The include must be followed, after any other attributes, by a
        // `#[cfg(doctest)]` item.
        let Some(at) = lib.find(include.as_str()) else {
            missing.push(page.display().to_string());
            continue;
        };
        let after = &lib[at + include.len()..];
        let item = after.find("\npub struct").unwrap_or(after.len());
        assert!(
            after[..item].contains("#[cfg(doctest)]"),
            "{} is included by {} but not as a #[cfg(doctest)] item",
            page.display(),
            by.display()
        );
    }
    assert!(
        missing.is_empty(),
        "pages whose code blocks are never compiled; add them to examples/src/lib.rs: {missing:?}"
    );
}

#[test]
fn every_code_block_of_the_docs_and_the_readme_is_run_or_declared_not_rust() {
    let mut problems = Vec::new();
    let mut rust_blocks = 0;
    for (page, _, _) in doctested_pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page
            .strip_prefix(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
            .unwrap_or(&page)
            .display()
            .to_string();
        for fence in fences(&text) {
            if fence.info.starts_with("rust") {
                rust_blocks += 1;
            }
            if let Some(why) = unchecked(&fence.info) {
                problems.push(format!("{name}:{}: ```{}: {why}", fence.line, fence.info));
            }
        }
    }
    assert!(rust_blocks > 10, "only {rust_blocks} Rust blocks found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_code_block_rules_refuse_what_rustdoc_would_not_run() {
    for info in [
        "rust",
        "rust,compile_fail,E0277",
        "rust,should_panic",
        "sql",
        "mermaid",
    ] {
        assert_eq!(unchecked(info), None, "{info}");
    }
    for info in [
        "",
        "rust,ignore",
        "rust,no_run",
        "rust,ignore-x86",
        "ignore",
        "python",
        "sh,rust",
    ] {
        assert!(unchecked(info).is_some(), "{info}");
    }
    let page = "text\n```rust\nlet a = 1;\n````\n~~~sql\n```\n~~~\n    ```text\n";
    let found: Vec<(usize, String)> = fences(page).into_iter().map(|f| (f.line, f.info)).collect();
    assert_eq!(
        found,
        [(2, "rust".to_owned()), (5, "sql".to_owned())],
        "a longer fence closes, the other fence character does not, an indented one is code"
    );
}
