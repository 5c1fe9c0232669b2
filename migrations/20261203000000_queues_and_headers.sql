-- What Spring's STOMP broker relay (and RabbitMQ's STOMP users) rely on a
-- broker for: headers that travel with a message, queues, and messages that
-- come again when the socket they were written to died unacked.
--
-- Headers: a STOMP SEND's application headers (all but the STOMP-defined
-- ones) are kept with the message and written on every MESSAGE frame.
--
-- Queues: a message sent to queue Q waits in relay.queue_entries until one
-- consumer of Q takes it (competing consumers). A node claims waiting
-- entries for its local consumers (FOR UPDATE SKIP LOCKED, oldest first),
-- marking each with the consumer it went to; the entry goes when the
-- message is written (ack `auto`) or acked (`client`, `client-individual`),
-- and waits again when the consumer NACKs it, unsubscribes, disconnects or
-- its node is reaped. A queue is nothing but its entries and consumers: it
-- exists from its first message or subscription, and is gone once it has
-- neither (relay.queues shows the live ones).
--
-- Unacked user messages: a user's message written to a STOMP subscription
-- with ack `client` or `client-individual` is recorded as needing an ack
-- (relay.deliveries.ack_required). If its connection goes (closes, dies,
-- or its node is reaped) before the ack, the message is parked for the user
-- again (handed_back_at): their next connection gets it, as if it had
-- never been written.

ALTER TABLE relay.messages ADD COLUMN headers jsonb;
-- STOMP over TCP is a way in of its own.
ALTER TABLE relay.messages DROP CONSTRAINT messages_source_check;
ALTER TABLE relay.messages ADD CONSTRAINT messages_source_check
    CHECK (source IN ('http', 'sql', 'ws', 'cli', 'tcp')) NOT VALID;

ALTER TABLE relay.deliveries ADD COLUMN ack_required boolean NOT NULL DEFAULT false;
ALTER TABLE relay.deliveries ADD COLUMN handed_back_at timestamptz;
-- Only the deliveries still awaiting their ack are in it: it stays small.
CREATE INDEX deliveries_awaiting_ack_idx ON relay.deliveries (node_id, connection_id)
    WHERE ack_required AND acked_at IS NULL AND handed_back_at IS NULL;

-- Parks again, for their users, the messages written to `p_connections`
-- (or to any connection of node `p_node`: its sessions are gone) that still
-- await an ack, unless another socket of the user acked them.
CREATE FUNCTION relay.park_unacked(p_connections uuid[], p_node text DEFAULT NULL) RETURNS bigint
LANGUAGE sql
AS $fn$
    WITH unacked AS (
        UPDATE relay.deliveries d SET handed_back_at = now()
         WHERE d.ack_required AND d.acked_at IS NULL AND d.handed_back_at IS NULL
           AND (d.connection_id = ANY (p_connections) OR d.node_id = p_node)
        RETURNING d.message_id, d.user_id
    ), parked AS (
        INSERT INTO relay.outbox (node_id, message_id, user_id, expires_at)
        SELECT DISTINCT NULL::text, u.message_id, u.user_id, m.expires_at
          FROM unacked u
          JOIN relay.messages m ON m.id = u.message_id
         WHERE m.expires_at > now() AND m.target_connection IS NULL
           AND NOT EXISTS (SELECT 1 FROM relay.deliveries a
                            WHERE a.message_id = u.message_id AND a.user_id = u.user_id
                              AND a.acked_at IS NOT NULL)
        ON CONFLICT (user_id, message_id) WHERE node_id IS NULL DO NOTHING
        RETURNING 1
    )
    SELECT count(*) FROM parked;
$fn$;

-- Who consumes which queue: one row per STOMP subscription.
CREATE TABLE relay.queue_consumers (
    connection_id uuid        NOT NULL,
    subscription  text        NOT NULL,
    queue         text        NOT NULL,
    node_id       text        NOT NULL,
    ack_mode      text        NOT NULL CHECK (ack_mode IN ('auto', 'client', 'client-individual')),
    subscribed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection_id, subscription)
);
CREATE INDEX queue_consumers_queue_idx ON relay.queue_consumers (queue, node_id);
CREATE INDEX queue_consumers_node_id_idx ON relay.queue_consumers (node_id);

CREATE TABLE relay.queue_entries (
    queue         text        NOT NULL,
    message_id    bigint      NOT NULL,
    expires_at    timestamptz NOT NULL,
    -- The consumer holding it (written, not yet acked); NULL: waiting.
    connection_id uuid,
    subscription  text,
    node_id       text,
    claimed_at    timestamptz,
    -- How many times it was handed to a consumer (more than once: the
    -- MESSAGE frame says `redelivered:true`).
    deliveries    integer     NOT NULL DEFAULT 0,
    -- The connection that last NACKed it: another consumer gets it first.
    refused_by    uuid,
    PRIMARY KEY (queue, message_id)
);
CREATE INDEX queue_entries_waiting_idx ON relay.queue_entries (queue, message_id) WHERE connection_id IS NULL;
CREATE INDEX queue_entries_held_idx ON relay.queue_entries (connection_id) WHERE connection_id IS NOT NULL;
CREATE INDEX queue_entries_node_idx ON relay.queue_entries (node_id) WHERE node_id IS NOT NULL;
CREATE INDEX queue_entries_expiry_idx ON relay.queue_entries (expires_at);
-- Retention removes a message's entry by its id.
CREATE INDEX queue_entries_message_id_idx ON relay.queue_entries (message_id);
ALTER TABLE relay.queue_entries SET (autovacuum_vacuum_scale_factor = 0.01);

-- The live queues: what waits in each, what its consumers hold, and how
-- many consumers it has.
CREATE VIEW relay.queues AS
    SELECT q.queue,
           count(e.message_id) FILTER (WHERE e.connection_id IS NULL) AS waiting,
           count(e.message_id) FILTER (WHERE e.connection_id IS NOT NULL) AS held,
           (SELECT count(*) FROM relay.queue_consumers c WHERE c.queue = q.queue) AS consumers,
           min(e.message_id) FILTER (WHERE e.connection_id IS NULL) AS oldest_waiting
      FROM (SELECT queue FROM relay.queue_entries UNION SELECT queue FROM relay.queue_consumers) q
      LEFT JOIN relay.queue_entries e ON e.queue = q.queue
     GROUP BY q.queue;

-- Wakes every node with a consumer of one of `p_queues` (one NOTIFY per
-- node), after entries were put back to wait.
CREATE FUNCTION relay.wake_queue_consumers(p_queues text[]) RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    IF p_queues IS NULL OR cardinality(p_queues) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_notify('pgrelay.node.' || x.node_id, '')
       FROM (SELECT DISTINCT c.node_id FROM relay.queue_consumers c JOIN relay.nodes n ON n.id = c.node_id
              WHERE c.queue = ANY (p_queues)) x;
END
$fn$;

-- Registers a queue consumer, fenced like every registration of a node.
CREATE FUNCTION relay.attach_queue_consumer(
    p_connection uuid, p_node text, p_incarnation uuid, p_subscription text, p_queue text, p_ack_mode text
) RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM relay.fence(p_node, p_incarnation);
    IF NOT relay.valid_topic(p_queue) THEN
        RAISE EXCEPTION 'invalid queue name %', p_queue USING ERRCODE = '22023';
    END IF;
    INSERT INTO relay.queue_consumers (connection_id, subscription, queue, node_id, ack_mode)
    VALUES (p_connection, p_subscription, p_queue, p_node, p_ack_mode);
END
$fn$;

-- Puts back what the consumers of `p_node` hold, and removes them: its
-- sessions are gone (a reap, a new registration of the node). Entries
-- another transaction holds are left for the sweeper's next pass (see
-- relay.release_orphaned_queue_entries).
CREATE FUNCTION relay.release_queues(p_node text) RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_released bigint;
    v_queues   text[];
BEGIN
    WITH released AS (
        UPDATE relay.queue_entries e
           SET connection_id = NULL, subscription = NULL, node_id = NULL, claimed_at = NULL
         WHERE e.ctid = ANY (ARRAY(SELECT ctid FROM relay.queue_entries WHERE node_id = p_node
                                      FOR UPDATE SKIP LOCKED))
        RETURNING e.queue
    )
    SELECT count(*), array_agg(DISTINCT queue) INTO v_released, v_queues FROM released;
    DELETE FROM relay.queue_consumers WHERE node_id = p_node;
    PERFORM relay.wake_queue_consumers(v_queues);
    RETURN v_released;
END
$fn$;

-- The safety net: entries held for a consumer that no longer exists (its
-- claim committed after its departure had run) wait again.
CREATE FUNCTION relay.release_orphaned_queue_entries(p_limit integer) RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_released bigint;
    v_queues   text[];
BEGIN
    WITH released AS (
        UPDATE relay.queue_entries e
           SET connection_id = NULL, subscription = NULL, node_id = NULL, claimed_at = NULL
         WHERE e.ctid = ANY (ARRAY(
                SELECT x.ctid FROM relay.queue_entries x
                 WHERE x.connection_id IS NOT NULL AND x.claimed_at < now() - interval '1 second'
                   AND NOT EXISTS (SELECT 1 FROM relay.queue_consumers c
                                    WHERE c.connection_id = x.connection_id AND c.subscription = x.subscription)
                 LIMIT p_limit
                   FOR UPDATE SKIP LOCKED))
        RETURNING e.queue
    )
    SELECT count(*), array_agg(DISTINCT queue) INTO v_released, v_queues FROM released;
    PERFORM relay.wake_queue_consumers(v_queues);
    RETURN v_released;
END
$fn$;

-- A node's hand-back (a reap) puts back what its queue consumers held.
CREATE OR REPLACE FUNCTION relay.release_node(p_node text) RETURNS void
LANGUAGE sql
AS $fn$
    SELECT NULL FROM relay.hand_back(p_node, NULL);
    SELECT relay.release_queues(p_node);
    SELECT relay.park_unacked('{}', p_node);
$fn$;

-- relay.enqueue once more: queue targets ({"queue": "<name>"}) and headers.
DROP FUNCTION relay.enqueue(jsonb[], text[], jsonb[], interval[], text, bytea[], text[], boolean);
CREATE FUNCTION relay.enqueue(
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
    p_nowait        boolean DEFAULT false,
    -- The application headers of each message (a JSON array of [name,
    -- value] pairs, in order), delivered on every STOMP MESSAGE frame.
    p_headers       jsonb[] DEFAULT NULL
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
    que_msg    integer[];  -- queue targets: message index, queue
    que_name   text[];
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
       OR coalesce(cardinality(p_content_types), n) <> n OR coalesce(cardinality(p_headers), n) <> n THEN
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
        ELSIF v_target ? 'queue' THEN
            IF NOT relay.valid_topic(v_target->>'queue') THEN
                RAISE EXCEPTION 'invalid queue name %', v_target->>'queue' USING ERRCODE = '22023';
            END IF;
            que_msg := array_append(que_msg, i);
            que_name := array_append(que_name, v_target->>'queue');
            ms_msg := array_append(ms_msg, i);
            ms_stream := array_append(ms_stream, 'queue:' || (v_target->>'queue'));
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
                                    headers, expires_at, source)
        SELECT ids[t.i], st.stream, t.target, (t.target->>'connection')::uuid, p_destinations[t.i], p_data[t.i],
               p_bodies[t.i], p_content_types[t.i], p_headers[t.i], now() + coalesce(p_ttls[t.i], v_ttl), p_source
          FROM unnest(p_targets) WITH ORDINALITY AS t(target, i)
          JOIN (SELECT m.i, CASE WHEN count(*) = 1 THEN min(m.stream) END AS stream
                  FROM unnest(ms_msg, ms_stream) AS m(i, stream)
                 GROUP BY m.i) st ON st.i = t.i;
    ELSE
        -- One stream per message, listed in message order by the loop above.
        INSERT INTO relay.messages (id, stream, target, destination, data, body, content_type, headers,
                                    expires_at, source)
        SELECT ids[t.i], ms_stream[t.i], t.target, p_destinations[t.i], p_data[t.i],
               p_bodies[t.i], p_content_types[t.i], p_headers[t.i], now() + coalesce(p_ttls[t.i], v_ttl), p_source
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

    -- Queue messages wait in their queue for one consumer (whichever node
    -- claims them first); every node with a consumer of the queue is woken.
    IF que_msg IS NOT NULL THEN
        INSERT INTO relay.queue_entries (queue, message_id, expires_at)
        SELECT q.name, ids[q.i], now() + coalesce(p_ttls[q.i], v_ttl)
          FROM unnest(que_msg, que_name) AS q(i, name);
        SELECT array_agg(DISTINCT x.node_id) INTO v_nodes
          FROM (SELECT unnest(v_nodes) AS node_id
                UNION
                SELECT c.node_id FROM relay.queue_consumers c JOIN relay.nodes nd ON nd.id = c.node_id
                 WHERE c.queue = ANY (que_name)) x;
    END IF;

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
