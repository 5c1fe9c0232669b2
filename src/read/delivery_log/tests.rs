//! The delivery log's outcome rules, without a database.

use super::*;

fn row(id: i64, message_id: i64, connections: &[Uuid]) -> LockedRow {
    LockedRow {
        id,
        node_id: Some("n".into()),
        message_id,
        user_id: "u".into(),
        connection_ids: Some(connections.to_vec()),
    }
}

fn delivered(pairs: &[(i64, Uuid)]) -> Delivered {
    let mut d = Delivered::default();
    for (message, connection) in pairs {
        d.push(*message, *connection, "u", Utc::now());
    }
    d
}

#[test]
fn a_row_goes_with_its_last_connection_and_is_parked_only_if_nobody_got_it() {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let rows = [row(1, 10, &[a, b]), row(2, 11, &[a]), row(3, 12, &[a, b])];
    // a wrote 10; b departed: row 1 is done (a had it, no park); row 2
    // stays (a has not written 11, and did not leave); row 3 keeps a.
    let outcome = Outcome::of(&rows, &delivered(&[(10, a)]), &[b]);
    assert_eq!(outcome.finished, vec![1]);
    assert!(outcome.park_messages.is_empty());
    assert_eq!(outcome.remaining_rows, vec![3]);
    assert_eq!(outcome.remaining_connections, vec![a]);
    // Both leave: every row goes; those nobody was written are parked.
    let outcome = Outcome::of(&rows, &delivered(&[(10, a)]), &[a, b]);
    assert_eq!(outcome.finished, vec![1, 2, 3]);
    assert_eq!(outcome.park_messages, vec![11, 12]);
}

#[test]
fn parked_copies_of_written_messages_go() {
    let a = Uuid::now_v7();
    let parked = LockedRow {
        node_id: None,
        connection_ids: None,
        ..row(7, 10, &[])
    };
    let outcome = Outcome::of(std::slice::from_ref(&parked), &delivered(&[(10, a)]), &[]);
    assert_eq!(outcome.finished, vec![7]);
    let outcome = Outcome::of(&[parked], &delivered(&[(11, a)]), &[]);
    assert!(outcome.finished.is_empty());
}
