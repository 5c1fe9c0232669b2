-- The outbox is a queue: it empties and fills again all the time. Giving its
-- empty tail pages back to the operating system buys nothing, and costs a
-- lot: a vacuum truncating a table holds an ACCESS EXCLUSIVE lock on it, and
-- under load claims and sends then stalled behind it for seconds.
ALTER TABLE relay.outbox SET (vacuum_truncate = false);
