-- The outbox is a queue: it empties and fills again all the time. Giving its
-- empty tail pages back to the operating system buys nothing, and a vacuum
-- that truncates a table takes an ACCESS EXCLUSIVE lock on it, which every
-- claim and every send would queue behind.
ALTER TABLE relay.outbox SET (vacuum_truncate = false);
