-- Partial failures: a node that is paused, cut off or starved loses nothing.
--
-- Three changes to the protocol of the first migration:
--
-- 1. Claimed work stays in the outbox until it is done. A claim marks its
--    rows (claimed_at); a row is deleted once every connection it lists has
--    been written the message (in the same transaction as the delivery
--    rows) or has gone (then the message is parked for the user). So at
--    every instant, what a node holds for delivery is also in the database:
--    a node that dies, stalls or drops a lagging session leaves its rows,
--    and whoever reaps it parks them.
--
-- 2. Fencing. Every transaction a node runs for itself (claims, connects,
--    subscriptions, parking, departures) first takes a KEY SHARE lock on its
--    row in relay.nodes, under its incarnation (relay.fence). Reaping a node
--    deletes that row, and registering under a new incarnation changes a key
--    column: both take FOR UPDATE, so they wait until the node's transactions
--    in flight have ended, and every later one fails (SQLSTATE PR410). A
--    node's work therefore commits before it is reaped, or not at all.
--    Heartbeats update a non-key column and never wait for any of it.
--
-- 3. The sweeper is a lease (relay.sweeper.lease_until), renewed by its
--    holder's heartbeats, rather than a session advisory lock: it passes on
--    when the holder stops running, whatever its TCP connections do, and it
--    needs no session state (connection poolers).

ALTER TABLE relay.outbox ADD COLUMN claimed_at timestamptz;
-- The registration (incarnation) whose claim took the row: rows an earlier
-- registration of the node claimed become claimable again when it registers
-- anew (its sessions are gone: the new claims park their messages).
ALTER TABLE relay.outbox ADD COLUMN claimed_by uuid;
-- Claims read unclaimed rows only, in message order, however many claimed
-- rows wait for a slow session.
CREATE INDEX outbox_unclaimed_idx ON relay.outbox (node_id, message_id)
    WHERE node_id IS NOT NULL AND claimed_at IS NULL;

-- A key column: changing it (a new registration under the same id) takes
-- FOR UPDATE, which waits for the old incarnation's fenced transactions.
CREATE UNIQUE INDEX nodes_incarnation_key ON relay.nodes (incarnation);

ALTER TABLE relay.sweeper ALTER COLUMN node_id DROP NOT NULL;
ALTER TABLE relay.sweeper ADD COLUMN incarnation uuid;
ALTER TABLE relay.sweeper ADD COLUMN lease_until timestamptz NOT NULL DEFAULT '-infinity';
INSERT INTO relay.sweeper (node_id) VALUES (NULL) ON CONFLICT (singleton) DO NOTHING;

-- Raises PR410 unless `p_node` is registered under `p_incarnation`, and
-- holds a KEY SHARE lock on its row until the caller's transaction ends.
CREATE FUNCTION relay.fence(p_node text, p_incarnation uuid) RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM 1 FROM relay.nodes WHERE id = p_node AND incarnation = p_incarnation FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'node % is no longer registered under incarnation %', p_node, p_incarnation
            USING ERRCODE = 'PR410',
                  HINT = 'the node was declared dead, or another process took its id';
    END IF;
END
$fn$;

-- Like relay.fence, but answers instead of raising: for the delivery log,
-- whose delivery rows are facts worth keeping even from a fenced node.
CREATE FUNCTION relay.node_alive(p_node text, p_incarnation uuid) RETURNS boolean
LANGUAGE sql
AS $fn$
    SELECT EXISTS (SELECT 1 FROM relay.nodes WHERE id = p_node AND incarnation = p_incarnation FOR KEY SHARE)
$fn$;

-- Hands a node's unfinished work back, oldest message first, at most
-- `p_limit` outbox rows (NULL: all): every user message routed to it that
-- no socket of the user has been written is parked for the user's next
-- connection; then its rows, connections and subscriptions go. Rows another
-- transaction holds are parked (the copy reads them as committed) but left
-- in place, for a later call. Callers serialize on the node's transaction
-- advisory lock (see the sweeper and registration).
CREATE FUNCTION relay.hand_back(
    p_node text, p_limit integer DEFAULT NULL,
    OUT work bigint, OUT parked bigint, OUT connections bigint
)
LANGUAGE plpgsql
AS $fn$
BEGIN
    WITH batch AS (
        SELECT id, kind, message_id, user_id
          FROM relay.outbox
         WHERE node_id = p_node
         ORDER BY message_id
         LIMIT p_limit
    ), parking AS (
        INSERT INTO relay.outbox (node_id, message_id, user_id, expires_at)
        SELECT NULL, b.message_id, b.user_id, m.expires_at
          FROM batch b
          JOIN relay.messages m ON m.id = b.message_id
         WHERE b.kind = 'deliver' AND b.user_id IS NOT NULL
           AND m.target_connection IS NULL AND m.expires_at > now()
           AND NOT EXISTS (SELECT 1 FROM relay.deliveries d
                            WHERE d.message_id = b.message_id AND d.user_id = b.user_id)
        ON CONFLICT (user_id, message_id) WHERE node_id IS NULL DO NOTHING
        RETURNING 1
    ), gone AS (
        DELETE FROM relay.outbox
         WHERE id = ANY (ARRAY(SELECT o.id FROM relay.outbox o
                                WHERE o.id IN (SELECT id FROM batch)
                                  FOR UPDATE SKIP LOCKED))
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM parking) INTO work, parked;

    DELETE FROM relay.subscriptions
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM relay.subscriptions WHERE node_id = p_node
                              LIMIT p_limit FOR UPDATE SKIP LOCKED));
    DELETE FROM relay.connections
     WHERE id = ANY (ARRAY(SELECT id FROM relay.connections WHERE node_id = p_node
                            LIMIT p_limit FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS connections = ROW_COUNT;
END
$fn$;

-- The first migration's name for a full hand-back.
CREATE OR REPLACE FUNCTION relay.release_node(p_node text) RETURNS void
LANGUAGE sql
AS $fn$
    SELECT NULL FROM relay.hand_back(p_node, NULL);
$fn$;

-- Connects now carry the node's incarnation, and are fenced by it. They no
-- longer drop parked messages for a client that resumes with `since`: parked
-- rows are exactly the user's messages that no socket of theirs has been
-- written, and each stays until one is.
DROP FUNCTION relay.attach_connection(uuid, text, text, text, text, text, bigint, integer);
CREATE FUNCTION relay.attach_connection(
    p_id uuid, p_node text, p_incarnation uuid, p_user text, p_protocol text, p_remote text, p_agent text,
    p_max_connections integer,
    OUT user_head bigint, OUT broadcast_head bigint, OUT parked boolean
)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_head bigint;
BEGIN
    PERFORM relay.fence(p_node, p_incarnation);
    -- An update, not only a lock: a sender in REPEATABLE READ whose snapshot
    -- predates this connection then fails with a serialization error instead of
    -- routing past it.
    INSERT INTO relay.streams AS s (stream) VALUES ('user:' || p_user)
    ON CONFLICT (stream) DO UPDATE SET head = s.head
    RETURNING s.head INTO v_head;

    -- Counted under the stream lock: two connects cannot both take the last place.
    IF (SELECT count(*) FROM relay.connections WHERE user_id = p_user) >= p_max_connections THEN
        RAISE EXCEPTION 'user % already has % connections', p_user, p_max_connections USING ERRCODE = 'PR429';
    END IF;
    INSERT INTO relay.connections (id, node_id, user_id, protocol, remote_addr, user_agent)
    VALUES (p_id, p_node, p_user, p_protocol, p_remote, p_agent);

    user_head := v_head;
    broadcast_head := coalesce((SELECT head FROM relay.streams WHERE stream = 'broadcast'), 0);
    -- Most connects have nothing waiting: they can skip the parked query.
    parked := EXISTS (SELECT 1 FROM relay.outbox WHERE node_id IS NULL AND user_id = p_user);
END
$fn$;

DROP FUNCTION relay.attach_subscription(uuid, text, text);
CREATE FUNCTION relay.attach_subscription(p_connection uuid, p_node text, p_incarnation uuid, p_topic text)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_head bigint;
BEGIN
    PERFORM relay.fence(p_node, p_incarnation);
    INSERT INTO relay.streams AS s (stream) VALUES ('topic:' || p_topic)
    ON CONFLICT (stream) DO UPDATE SET head = s.head
    RETURNING s.head INTO v_head;
    INSERT INTO relay.subscriptions (connection_id, topic, node_id)
    VALUES (p_connection, p_topic, p_node)
    ON CONFLICT DO NOTHING;
    RETURN v_head;
END
$fn$;

-- relay.enqueue again: stream rows may now be pruned (it inserts them again
-- until it holds every lock); NOWAIT really waits for nothing; and routing
-- skips the connections and subscriptions of nodes no longer registered.
CREATE OR REPLACE FUNCTION relay.enqueue(
    p_targets       jsonb[],
    p_destinations  text[],
    p_data          jsonb[],
    p_ttls          interval[],
    p_source        text,
    p_bodies        bytea[] DEFAULT NULL,
    p_content_types text[] DEFAULT NULL,
    -- Fail at once (SQLSTATE 55P03) rather than wait for a stream another
    -- transaction holds: group commit uses it so that one held stream cannot
    -- stall the messages of others.
    p_nowait        boolean DEFAULT false
) RETURNS bigint[]
LANGUAGE plpgsql
-- Its statements take arrays whose sizes vary call to call: re-planning each
-- one on every call cost more than it won.
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    n          integer := coalesce(cardinality(p_targets), 0);
    v_ttl      interval;
    ids        bigint[];
    rec_msg    integer[];  -- user recipients: message index, user, connection
    rec_user   text[];
    rec_conn   uuid[];
    top_msg    integer[];  -- topic targets: message index, topic
    top_name   text[];
    bc_msg     integer[];  -- broadcast targets: message index
    ms_msg     integer[];  -- every (message index, stream) pair
    ms_stream  text[];
    v_missing  text;
    v_nodes    text[];
    v_node     text;
    v_target   jsonb;
    v_multi    boolean := false;  -- a target names several users, or a connection
    v_streams  integer;
    v_locked   integer;
    v_lock_timeout text;
BEGIN
    IF n = 0 THEN
        RETURN '{}';
    END IF;
    IF coalesce(cardinality(p_destinations), n) <> n OR coalesce(cardinality(p_data), n) <> n
       OR coalesce(cardinality(p_ttls), n) <> n OR coalesce(cardinality(p_bodies), n) <> n
       OR coalesce(cardinality(p_content_types), n) <> n THEN
        RAISE EXCEPTION 'relay.enqueue: argument arrays differ in length' USING ERRCODE = '22023';
    END IF;
    SELECT default_ttl INTO STRICT v_ttl FROM relay.config;

    -- Sort the targets: one user, a topic or the broadcast in this loop (the
    -- common cases, without a query); several users or a connection below.
    FOR i IN 1..n LOOP
        v_target := p_targets[i];
        IF p_data[i] IS NULL AND p_bodies[i] IS NULL THEN
            RAISE EXCEPTION 'relay.enqueue: a message needs data or a body' USING ERRCODE = '22023';
        END IF;
        IF v_target ? 'user' THEN
            rec_msg := array_append(rec_msg, i);
            rec_user := array_append(rec_user, v_target->>'user');
            rec_conn := array_append(rec_conn, NULL::uuid);
            ms_msg := array_append(ms_msg, i);
            ms_stream := array_append(ms_stream, 'user:' || (v_target->>'user'));
        ELSIF v_target ? 'topic' THEN
            IF NOT relay.valid_topic(v_target->>'topic') THEN
                RAISE EXCEPTION 'invalid topic name %', v_target->>'topic' USING ERRCODE = '22023';
            END IF;
            top_msg := array_append(top_msg, i);
            top_name := array_append(top_name, v_target->>'topic');
            ms_msg := array_append(ms_msg, i);
            ms_stream := array_append(ms_stream, 'topic:' || (v_target->>'topic'));
        ELSIF v_target ? 'broadcast' THEN
            bc_msg := array_append(bc_msg, i);
            ms_msg := array_append(ms_msg, i);
            ms_stream := array_append(ms_stream, 'broadcast');
        ELSIF v_target ? 'users' OR v_target ? 'connection' THEN
            v_multi := true;
        ELSE
            RAISE EXCEPTION 'relay.enqueue: unknown target %', v_target USING ERRCODE = '22023';
        END IF;
    END LOOP;

    IF v_multi THEN
        -- Several users (each once), and connection-addressed messages (to
        -- the connection's user's stream).
        WITH x AS (
            SELECT DISTINCT t.i::integer AS i, u.user_id, NULL::uuid AS conn
              FROM unnest(p_targets) WITH ORDINALITY AS t(target, i),
                   jsonb_array_elements_text(t.target->'users') AS u(user_id)
             WHERE t.target ? 'users'
            UNION ALL
            SELECT t.i::integer, c.user_id, c.id
              FROM unnest(p_targets) WITH ORDINALITY AS t(target, i)
              JOIN relay.connections c ON c.id = (t.target->>'connection')::uuid
             WHERE t.target ? 'connection'
        )
        SELECT rec_msg || array_agg(x.i), rec_user || array_agg(x.user_id), rec_conn || array_agg(x.conn),
               ms_msg || array_agg(x.i), ms_stream || array_agg('user:' || x.user_id)
          INTO rec_msg, rec_user, rec_conn, ms_msg, ms_stream
          FROM x;

        SELECT t.target->>'connection' INTO v_missing
          FROM unnest(p_targets) WITH ORDINALITY AS t(target, i)
         WHERE t.target ? 'connection' AND NOT (t.i::integer = ANY (coalesce(rec_msg, '{}')))
         LIMIT 1;
        IF v_missing IS NOT NULL THEN
            RAISE EXCEPTION 'connection % not found', v_missing USING ERRCODE = 'P0002';
        END IF;
        IF EXISTS (SELECT 1 FROM generate_series(1, n) AS g WHERE NOT (g = ANY (coalesce(ms_msg, '{}')))) THEN
            RAISE EXCEPTION 'relay.enqueue: a message has no recipient' USING ERRCODE = '22023';
        END IF;
    END IF;

    -- The stream locks, in sorted order, before any id is drawn (see the top of
    -- this file): new streams first get their row.
    -- (Only new ones: an insert that meets an existing row someone is updating
    -- would wait for them, whatever NOWAIT says.)
    -- With p_nowait, no wait at all: NOWAIT covers the row locks, and a short
    -- lock_timeout the insert of a stream row that another, uncommitted
    -- transaction has just inserted (an insert waits for it whatever NOWAIT
    -- says).
    IF p_nowait THEN
        v_lock_timeout := current_setting('lock_timeout');
        PERFORM set_config('lock_timeout', '10ms', true);
    END IF;
    SELECT count(DISTINCT st) INTO v_streams FROM unnest(ms_stream) AS st;
    -- The sweeper prunes stream rows that keep nothing: one deleted between
    -- the insert and the lock is inserted again, until every stream is locked.
    LOOP
        INSERT INTO relay.streams (stream)
        SELECT DISTINCT st FROM unnest(ms_stream) AS st
         WHERE NOT EXISTS (SELECT 1 FROM relay.streams s WHERE s.stream = st)
         ORDER BY 1
        ON CONFLICT (stream) DO NOTHING;
        IF p_nowait THEN
            PERFORM 1 FROM relay.streams WHERE stream = ANY (ms_stream) ORDER BY stream FOR NO KEY UPDATE NOWAIT;
        ELSE
            PERFORM 1 FROM relay.streams WHERE stream = ANY (ms_stream) ORDER BY stream FOR NO KEY UPDATE;
        END IF;
        GET DIAGNOSTICS v_locked = ROW_COUNT;
        EXIT WHEN v_locked = v_streams;
    END LOOP;
    IF p_nowait THEN
        PERFORM set_config('lock_timeout', v_lock_timeout, true);
    END IF;

    SELECT array_agg(nextval('relay.message_id_seq') ORDER BY g) INTO ids FROM generate_series(1, n) AS g;

    IF v_multi THEN
        INSERT INTO relay.messages (id, stream, target, target_connection, destination, data, body, content_type,
                                    expires_at, source)
        SELECT ids[t.i], st.stream, t.target, (t.target->>'connection')::uuid, p_destinations[t.i], p_data[t.i],
               p_bodies[t.i], p_content_types[t.i], now() + coalesce(p_ttls[t.i], v_ttl), p_source
          FROM unnest(p_targets) WITH ORDINALITY AS t(target, i)
          JOIN (SELECT m.i, CASE WHEN count(*) = 1 THEN min(m.stream) END AS stream
                  FROM unnest(ms_msg, ms_stream) AS m(i, stream)
                 GROUP BY m.i) st ON st.i = t.i;
    ELSE
        -- One stream per message, listed in message order by the loop above.
        INSERT INTO relay.messages (id, stream, target, destination, data, body, content_type, expires_at, source)
        SELECT ids[t.i], ms_stream[t.i], t.target, p_destinations[t.i], p_data[t.i],
               p_bodies[t.i], p_content_types[t.i], now() + coalesce(p_ttls[t.i], v_ttl), p_source
          FROM unnest(p_targets) WITH ORDINALITY AS t(target, i);
    END IF;

    IF v_multi THEN
        INSERT INTO relay.message_streams (stream, message_id)
        SELECT m.stream, ids[m.i]
          FROM unnest(ms_msg, ms_stream) AS m(i, stream)
         WHERE m.i IN (SELECT c.i FROM unnest(ms_msg) AS c(i) GROUP BY c.i HAVING count(*) > 1);
    END IF;

    -- Route, under the stream locks (no connection or subscription can register
    -- unseen): users' connections grouped into one row per node, message and
    -- user, or a parked row for a user with no connection; one row per node
    -- with subscribers for a topic message; one row per node for a broadcast.
    WITH rec AS (
        SELECT * FROM unnest(rec_msg, rec_user, rec_conn) AS r(i, user_id, conn)
    ), live AS (
        -- Connections of registered nodes only: rows a reaped node left
        -- behind are no routing target, even before the sweeper removes them.
        SELECT r.i, r.user_id, c.node_id, c.id AS conn
          FROM rec r JOIN relay.connections c ON c.user_id = r.user_id
          JOIN relay.nodes n ON n.id = c.node_id
         WHERE r.conn IS NULL
        UNION ALL
        SELECT r.i, r.user_id, c.node_id, c.id
          FROM rec r JOIN relay.connections c ON c.id = r.conn
          JOIN relay.nodes n ON n.id = c.node_id
    ), work AS (
        SELECT l.node_id, l.i, l.user_id, array_agg(l.conn) AS conns
          FROM live l
         GROUP BY l.node_id, l.i, l.user_id
        UNION ALL
        SELECT NULL, r.i, r.user_id, NULL
          FROM rec r
         WHERE r.conn IS NULL
           AND NOT EXISTS (SELECT 1 FROM relay.connections c JOIN relay.nodes n ON n.id = c.node_id
                            WHERE c.user_id = r.user_id)
        UNION ALL
        SELECT DISTINCT s.node_id, t.i, NULL::text, NULL::uuid[]
          FROM unnest(top_msg, top_name) AS t(i, name)
          JOIN relay.subscriptions s ON s.topic = t.name
          JOIN relay.nodes n ON n.id = s.node_id
        UNION ALL
        SELECT nd.id, b.i, NULL::text, NULL::uuid[]
          FROM unnest(bc_msg) AS b(i) CROSS JOIN relay.nodes nd
    ), queued AS (
        INSERT INTO relay.outbox (node_id, message_id, user_id, connection_ids, expires_at)
        SELECT w.node_id, ids[w.i], w.user_id, w.conns, now() + coalesce(p_ttls[w.i], v_ttl)
          FROM work w
        RETURNING node_id
    )
    SELECT array_agg(DISTINCT q.node_id) FILTER (WHERE q.node_id IS NOT NULL) INTO v_nodes FROM queued q;

    UPDATE relay.streams s SET head = v.head
      FROM (SELECT m.stream, max(ids[m.i]) AS head
              FROM unnest(ms_msg, ms_stream) AS m(i, stream)
             GROUP BY m.stream) v
     WHERE s.stream = v.stream;

    -- One wake-up per node per transaction; the payload carries nothing,
    -- the outbox is the truth.
    IF v_nodes IS NOT NULL THEN
        FOREACH v_node IN ARRAY v_nodes LOOP
            PERFORM pg_notify('pgrelay.node.' || v_node, '');
        END LOOP;
    END IF;
    RETURN ids;
END
$fn$;
