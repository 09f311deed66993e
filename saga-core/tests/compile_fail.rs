//! Refused at compile time: a step before the pivot with no compensation
//! decision, a compensation after the pivot, and a definition whose actions
//! need dependencies registered (or built) without them.

#[test]
fn builder_refusals() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/compile_fail/*.rs");
    t.pass("tests/compile_pass/*.rs");
}
