-- Deliveries are listed by an opaque cursor, with no gaps or duplicates
-- (GET /v1/deliveries, `pgrelay tail`). delivered_at cannot order such a
-- listing: it is the time the node wrote to the socket, and the row commits
-- later, in a batch, so a row can appear behind one already listed.
--
-- The cursor follows the transaction that recorded each row instead. Rows
-- are listed in (recorded_xid, message_id, connection_id) order, and only
-- those of transactions older than every transaction still running
-- (pg_snapshot_xmin): that set never grows behind the cursor.
--
-- bigint (xid8 has no BRIN operator class); the column is added without a
-- default so that no existing row is rewritten, and rows recorded before
-- this migration (NULL) come first.
-- Nodes of the previous version may be recording deliveries meanwhile: give
-- up (the node's start fails, and is retried) rather than queue the table's
-- every insert behind this ALTER.
SET LOCAL lock_timeout = '5s';
-- Building the index may take longer than a node's usual statement limit.
SET LOCAL statement_timeout = 0;
ALTER TABLE relay.deliveries ADD COLUMN recorded_xid bigint;
ALTER TABLE relay.deliveries ALTER COLUMN recorded_xid SET DEFAULT (pg_current_xact_id()::text)::bigint;
CREATE INDEX deliveries_recorded_xid_brin ON relay.deliveries USING brin (recorded_xid)
    WITH (pages_per_range = 16);
