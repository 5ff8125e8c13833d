mod common;
use common::*;

#[test]
fn create_propagates_and_does_not_echo() -> TestResult {
    let mut net = Net::new(&["A", "B"]);
    let a1 = net.put("A", "X", "hello");
    let s = net.sync("A", "B");
    assert_eq!(
        (s.changes_sent, s.changes_applied, s.changes_failed),
        (1, 1, 0)
    );
    assert_eq!(net.get("B", "X").as_deref(), Some("hello"));
    let meta = net.r("B").item_meta(&id("X"))?.expect("meta");
    assert_eq!((meta.version, meta.creation), (a1, a1));
    assert!(net.r("B").knowledge().contains(&id("X"), a1));
    let back = net.sync("B", "A");
    assert_eq!(back.changes_sent, 0);
    let again = net.sync("A", "B");
    assert_eq!(again.changes_sent, 0);
    Ok(())
}
