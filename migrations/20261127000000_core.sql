-- pgrelay's schema. The tables and views below are a documented audit surface
-- (README.md, "SQL audit"); the functions are how messages get in.
--
-- The ordering protocol, in one place:
--
-- Every message belongs to one or more *streams* ('user:<id>', 'topic:<name>',
-- or 'broadcast'). A writer
-- locks the stream rows in `relay.streams` (in sorted order, so writers never
-- deadlock each other) *before* it draws message ids, and holds the lock until it
-- commits. Within one stream, ids are therefore drawn and committed in the same
-- order: a reader that sees id N of a stream has also seen every smaller id of
-- that stream, so a `since` cursor can never skip a message still in flight.
-- The sequence must keep CACHE 1 for the same reason: a cached block would hand
-- a later locker a smaller id.
--
-- A connecting client takes the same lock while it registers, and reads the
-- stream's head. A message is then either committed before the connection was
-- registered (its id is <= head: the client gets it by backfill) or routed to the
-- connection by its writer (its id is > head: it arrives live). No window exists
-- in which a message is seen by neither side.

CREATE SCHEMA IF NOT EXISTS relay;

-- Written by every node on start from its configuration, so that SQL senders
-- (relay.send_to_user) apply the same defaults and limits as HTTP ones.
CREATE TABLE relay.config (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    default_ttl       interval NOT NULL DEFAULT '24 hours',
    retention         interval NOT NULL DEFAULT '72 hours',
    max_message_bytes integer  NOT NULL DEFAULT 65536
);
INSERT INTO relay.config DEFAULT VALUES;

CREATE TABLE relay.nodes (
    id           text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,48}$'),
    -- A fresh value per process start: a node that was declared dead and comes
    -- back (a long pause, a network cut) notices that its row is not its own.
    incarnation  uuid        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    listen_addr  text,
    version      text        NOT NULL
) WITH (fillfactor = 50);

-- One row per live socket. last_seen_at is refreshed in batches (one statement
-- per node per heartbeat); fillfactor 70 keeps those updates HOT.
CREATE TABLE relay.connections (
    id           uuid PRIMARY KEY,
    node_id      text        NOT NULL,
    user_id      text        NOT NULL,
    protocol     text        NOT NULL,
    connected_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    remote_addr  text,
    user_agent   text
) WITH (fillfactor = 70);
CREATE INDEX connections_user_id_idx ON relay.connections (user_id);
CREATE INDEX connections_node_id_idx ON relay.connections (node_id);

-- The per-stream lock and the id of the newest message in the stream.
CREATE TABLE relay.streams (
    stream text PRIMARY KEY,
    head   bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

CREATE SEQUENCE relay.message_id_seq AS bigint CACHE 1;

CREATE TABLE relay.messages (
    id                bigint PRIMARY KEY,
    -- The message's stream when it has exactly one (the common case); NULL when
    -- it has several, which are then listed in relay.message_streams.
    stream            text,
    target            jsonb       NOT NULL,
    target_connection uuid,
    destination       text,
    -- JSON messages (HTTP, SQL, the JSON protocol) keep their data here...
    data              jsonb,
    -- ...and STOMP SEND bodies are kept byte for byte, with their content type.
    body              bytea,
    content_type      text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    source            text        NOT NULL CHECK (source IN ('http', 'sql', 'ws', 'cli')),
    CHECK (data IS NOT NULL OR body IS NOT NULL)
);
CREATE INDEX messages_stream_id_idx ON relay.messages (stream, id) WHERE stream IS NOT NULL;

CREATE TABLE relay.message_streams (
    stream     text   NOT NULL,
    message_id bigint NOT NULL,
    PRIMARY KEY (stream, message_id)
);
CREATE INDEX message_streams_message_id_idx ON relay.message_streams (message_id);

CREATE VIEW relay.stream_messages AS
    SELECT stream, id AS message_id FROM relay.messages WHERE stream IS NOT NULL
    UNION ALL
    SELECT stream, message_id FROM relay.message_streams;

-- Work for nodes. A row with a node_id is for the connections it lists on that
-- node; a row without one is *parked*: a message for a user who had no
-- connection (or whose connection went away before delivery), handed to the
-- user's next connection on any node.
CREATE TABLE relay.outbox (
    -- Names a row, nothing more: nodes claim in message id order, which is
    -- each stream's commit order (see the top of this file).
    id             bigint GENERATED ALWAYS AS IDENTITY (CACHE 64) PRIMARY KEY,
    node_id        text,
    kind           text        NOT NULL DEFAULT 'deliver' CHECK (kind IN ('deliver', 'disconnect')),
    message_id     bigint,
    user_id        text,
    connection_ids uuid[],
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- The message's, so that the sweeper finds expired parked work by index.
    expires_at     timestamptz,
    CHECK (node_id IS NOT NULL OR (kind = 'deliver' AND user_id IS NOT NULL AND message_id IS NOT NULL
                                   AND expires_at IS NOT NULL))
);
CREATE INDEX outbox_node_id_idx ON relay.outbox (node_id, message_id) WHERE node_id IS NOT NULL;
CREATE UNIQUE INDEX outbox_parked_idx ON relay.outbox (user_id, message_id) WHERE node_id IS NULL;
CREATE INDEX outbox_parked_expiry_idx ON relay.outbox (expires_at) WHERE node_id IS NULL;

-- Which connection listens to which topic: writers route a topic message to
-- every node that has a row here for it (one outbox row per node).
CREATE TABLE relay.subscriptions (
    connection_id uuid        NOT NULL,
    topic         text        NOT NULL,
    node_id       text        NOT NULL,
    subscribed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection_id, topic)
);
CREATE INDEX subscriptions_topic_idx ON relay.subscriptions (topic, node_id);
CREATE INDEX subscriptions_node_id_idx ON relay.subscriptions (node_id);

-- The topic names pgrelay accepts: 1-256 bytes of dot-separated segments,
-- none empty, without whitespace or the pattern characters * and >.
CREATE FUNCTION relay.valid_topic(p_topic text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $fn$
    SELECT p_topic IS NOT NULL AND octet_length(p_topic) <= 256
       AND p_topic ~ '^[^.*>[:space:][:cntrl:]]+(\.[^.*>[:space:][:cntrl:]]+)*$'
$fn$;

CREATE TABLE relay.deliveries (
    message_id    bigint      NOT NULL,
    connection_id uuid        NOT NULL,
    user_id       text        NOT NULL,
    node_id       text        NOT NULL,
    delivered_at  timestamptz NOT NULL,
    acked_at      timestamptz,
    PRIMARY KEY (message_id, connection_id)
) WITH (fillfactor = 90);
-- Deliveries arrive in time order, so a BRIN index finds "since T" (audit
-- queries, `pgrelay tail`) for almost no upkeep on the hottest insert path.
CREATE INDEX deliveries_delivered_at_brin ON relay.deliveries USING brin (delivered_at)
    WITH (pages_per_range = 16);

CREATE VIEW relay.message_states AS
    SELECT m.id,
           CASE
               WHEN EXISTS (SELECT 1 FROM relay.deliveries d WHERE d.message_id = m.id AND d.acked_at IS NOT NULL) THEN 'acked'
               WHEN EXISTS (SELECT 1 FROM relay.deliveries d WHERE d.message_id = m.id) THEN 'delivered'
               WHEN m.expires_at <= now() THEN 'expired'
               ELSE 'pending'
           END AS state
      FROM relay.messages m;

-- Stores messages and routes them, in the caller's transaction. Internal: the
-- stable entry points are relay.send_to_user(), relay.publish() and the HTTP
-- API. All arrays are indexed by message; a NULL ttl means
-- relay.config.default_ttl. A message has `data` (JSON) or a raw `body`.
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
        SELECT r.i, r.user_id, c.node_id, c.id AS conn
          FROM rec r JOIN relay.connections c ON c.user_id = r.user_id
         WHERE r.conn IS NULL
        UNION ALL
        SELECT r.i, r.user_id, c.node_id, c.id
          FROM rec r JOIN relay.connections c ON c.id = r.conn
    ), work AS (
        SELECT l.node_id, l.i, l.user_id, array_agg(l.conn) AS conns
          FROM live l
         GROUP BY l.node_id, l.i, l.user_id
        UNION ALL
        SELECT NULL, r.i, r.user_id, NULL
          FROM rec r
         WHERE r.conn IS NULL
           AND NOT EXISTS (SELECT 1 FROM relay.connections c WHERE c.user_id = r.user_id)
        UNION ALL
        SELECT DISTINCT s.node_id, t.i, NULL::text, NULL::uuid[]
          FROM unnest(top_msg, top_name) AS t(i, name)
          JOIN relay.subscriptions s ON s.topic = t.name
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

-- Sends `data` to every connection of `user_id`, in the caller's transaction:
-- commit and it goes, roll back and it never existed.
CREATE FUNCTION relay.send_to_user(user_id text, data jsonb, destination text DEFAULT NULL, ttl interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    cfg relay.config%ROWTYPE;
BEGIN
    SELECT * INTO STRICT cfg FROM relay.config;
    IF user_id IS NULL OR user_id = '' THEN
        RAISE EXCEPTION 'relay.send_to_user: user_id must not be empty' USING ERRCODE = '22023';
    END IF;
    IF data IS NULL THEN
        RAISE EXCEPTION 'relay.send_to_user: data must not be NULL (use ''null''::jsonb)' USING ERRCODE = '22023';
    END IF;
    IF octet_length(data::text) > cfg.max_message_bytes THEN
        RAISE EXCEPTION 'relay.send_to_user: data is % bytes, over the limit of %', octet_length(data::text), cfg.max_message_bytes
            USING ERRCODE = '54000';
    END IF;
    IF ttl IS NOT NULL AND (ttl <= interval '0' OR ttl > cfg.retention) THEN
        RAISE EXCEPTION 'relay.send_to_user: ttl must be positive and at most the retention (%)', cfg.retention
            USING ERRCODE = '22023';
    END IF;
    RETURN (relay.enqueue(ARRAY[jsonb_build_object('user', user_id)], ARRAY[destination], ARRAY[data], ARRAY[ttl], 'sql'))[1];
END
$fn$;

-- Publishes `data` to every connection subscribed to `topic`, in the caller's
-- transaction.
CREATE FUNCTION relay.publish(topic text, data jsonb, ttl interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    cfg relay.config%ROWTYPE;
BEGIN
    SELECT * INTO STRICT cfg FROM relay.config;
    IF NOT relay.valid_topic(topic) THEN
        RAISE EXCEPTION 'relay.publish: invalid topic name %', topic USING ERRCODE = '22023';
    END IF;
    IF data IS NULL THEN
        RAISE EXCEPTION 'relay.publish: data must not be NULL (use ''null''::jsonb)' USING ERRCODE = '22023';
    END IF;
    IF octet_length(data::text) > cfg.max_message_bytes THEN
        RAISE EXCEPTION 'relay.publish: data is % bytes, over the limit of %', octet_length(data::text), cfg.max_message_bytes
            USING ERRCODE = '54000';
    END IF;
    IF ttl IS NOT NULL AND (ttl <= interval '0' OR ttl > cfg.retention) THEN
        RAISE EXCEPTION 'relay.publish: ttl must be positive and at most the retention (%)', cfg.retention
            USING ERRCODE = '22023';
    END IF;
    RETURN (relay.enqueue(ARRAY[jsonb_build_object('topic', topic)], ARRAY[NULL::text], ARRAY[data], ARRAY[ttl], 'sql'))[1];
END
$fn$;

-- Registers a subscription under its topic's stream lock and returns the
-- stream's head: messages up to it are before the subscription (a `since`
-- backfill gets them), later ones are routed to the subscriber's node.
CREATE FUNCTION relay.attach_subscription(p_connection uuid, p_node text, p_topic text) RETURNS bigint
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_head bigint;
BEGIN
    INSERT INTO relay.streams AS s (stream) VALUES ('topic:' || p_topic)
    ON CONFLICT (stream) DO UPDATE SET head = s.head
    RETURNING s.head INTO v_head;
    INSERT INTO relay.subscriptions (connection_id, topic, node_id)
    VALUES (p_connection, p_topic, p_node)
    ON CONFLICT DO NOTHING;
    RETURN v_head;
END
$fn$;

-- Registers a connection under its user's stream lock and returns the stream's
-- head: messages up to it are the client's backfill, later ones arrive live.
-- Also returns the broadcast stream's head: broadcasts up to it were sent
-- before this connection existed.
CREATE FUNCTION relay.attach_connection(
    p_id uuid, p_node text, p_user text, p_protocol text, p_remote text, p_agent text, p_since bigint,
    p_max_connections integer,
    OUT user_head bigint, OUT broadcast_head bigint, OUT parked boolean
)
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_head bigint;
BEGIN
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

    -- A client resuming with a cursor gets everything after it from the stream;
    -- what was parked for it is covered by that.
    IF p_since IS NOT NULL THEN
        DELETE FROM relay.outbox WHERE node_id IS NULL AND user_id = p_user AND message_id <= v_head;
    END IF;
    user_head := v_head;
    broadcast_head := coalesce((SELECT head FROM relay.streams WHERE stream = 'broadcast'), 0);
    -- Most connects have nothing waiting: they can skip the backfill query.
    parked := p_since IS NULL
              AND EXISTS (SELECT 1 FROM relay.outbox WHERE node_id IS NULL AND user_id = p_user);
END
$fn$;

-- Hands a node's unfinished work back and forgets its connections: used when a
-- node stops, when a node id starts again after a crash, and when a dead node is
-- reaped. Undelivered user messages are parked for their users' next connect;
-- a client that resumes with `since` gets them from its stream in any case.
CREATE FUNCTION relay.release_node(p_node text) RETURNS void
LANGUAGE sql
AS $fn$
    INSERT INTO relay.outbox (node_id, message_id, user_id, expires_at)
    SELECT NULL, o.message_id, o.user_id, m.expires_at
      FROM relay.outbox o
      JOIN relay.messages m ON m.id = o.message_id
     WHERE o.node_id = p_node AND o.kind = 'deliver' AND o.user_id IS NOT NULL
       AND m.target_connection IS NULL AND m.expires_at > now()
    ON CONFLICT (user_id, message_id) WHERE node_id IS NULL DO NOTHING;
    DELETE FROM relay.outbox WHERE node_id = p_node;
    DELETE FROM relay.subscriptions WHERE node_id = p_node;
    DELETE FROM relay.connections WHERE node_id = p_node;
$fn$;

-- Idempotency-Key of the HTTP API: the same key (per API key) within the
-- retention names the same messages.
CREATE TABLE relay.idempotency_keys (
    scope        text        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    message_ids  bigint[]    NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created_at_idx ON relay.idempotency_keys (created_at);

-- HTTP API keys added at run time (`pgrelay keys`), besides PGRELAY_API_KEYS.
-- Only a SHA-256 digest of each key is stored; nodes reload the live ones
-- every few seconds, so a revocation takes effect without a restart.
CREATE TABLE relay.api_keys (
    name       text PRIMARY KEY,
    key_digest bytea       NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- Which node runs the sweeper (it also holds an advisory lock: the lock decides,
-- this row shows).
CREATE TABLE relay.sweeper (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    node_id      text        NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    last_run_at  timestamptz,
    last_report  jsonb
);

-- High churn: vacuum the hot tables early and often, so that space freed by
-- claims and retention is reused instead of growing the files.
ALTER TABLE relay.outbox SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.05);
ALTER TABLE relay.messages SET (autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE relay.deliveries SET (autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE relay.connections SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE relay.subscriptions SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE relay.streams SET (autovacuum_vacuum_scale_factor = 0.05);
