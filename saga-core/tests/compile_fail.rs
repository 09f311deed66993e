//! The saga builder refuses, at compile time, a step before the pivot with
//! no compensation decision, and a compensation after the pivot.

#[test]
fn builder_refusals() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/compile_fail/*.rs");
    t.pass("tests/compile_pass/*.rs");
}
