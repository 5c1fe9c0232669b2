-- Least privilege. The relay's own role owns the schema and runs the nodes;
-- an application role may only call the two stable SQL entry points; an
-- auditor role may only read (`pgrelay grants` prints or applies the grants).
--
-- relay.send_to_user() and relay.publish() run with their owner's rights
-- (SECURITY DEFINER), so a caller needs EXECUTE on them and nothing on the
-- tables. Their search_path is pinned (every relay object they use is named
-- with its schema; pg_temp last, so that no caller's temporary object can
-- stand in for a built-in).
ALTER FUNCTION relay.send_to_user(text, jsonb, text, interval)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION relay.publish(text, jsonb, interval)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- PostgreSQL grants EXECUTE on every new function to PUBLIC: no role but the
-- owner may call the internal ones (relay.enqueue, relay.fence, …), nor
-- these two until granted.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA relay FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA relay REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
