//! Where a lone statement runs. On a direct server, on a connection of the
//! pool, as autocommit: one round trip. Through a transaction-mode pooler,
//! inside a transaction of its own: sqlx parses a statement and binds it in
//! two exchanges, and between them a pooler may hand the server connection
//! to another client (or give us another server) unless a transaction pins
//! it.

use std::ops::{Deref, DerefMut};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

/// A connection to run statements on, ended with [`Scope::end`].
pub enum Scope {
    Session(PoolConnection<Postgres>),
    Transaction(Transaction<'static, Postgres>),
}

/// A connection of `pool`, in a transaction when it is pooled.
pub async fn scope(pool: &PgPool) -> Result<Scope, sqlx::Error> {
    if super::pooled() {
        Ok(Scope::Transaction(super::begin(pool).await?))
    } else {
        Ok(Scope::Session(pool.acquire().await?))
    }
}

impl Scope {
    /// Commits what ran, when it ran in a transaction. Not calling it rolls
    /// the transaction back.
    pub async fn end(self) -> Result<(), sqlx::Error> {
        match self {
            Scope::Session(_) => Ok(()),
            Scope::Transaction(tx) => tx.commit().await,
        }
    }
}

impl Deref for Scope {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self {
            Scope::Session(connection) => connection,
            Scope::Transaction(tx) => tx,
        }
    }
}

impl DerefMut for Scope {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Scope::Session(connection) => connection,
            Scope::Transaction(tx) => tx,
        }
    }
}

/// [`Scope`] on one connection (the liveness connection).
pub enum ScopeOn<'c> {
    Session(&'c mut PgConnection),
    Transaction(Transaction<'c, Postgres>),
}

/// `connection`, in a transaction when it is pooled.
pub async fn scope_on(connection: &mut PgConnection) -> Result<ScopeOn<'_>, sqlx::Error> {
    if super::pooled() {
        Ok(ScopeOn::Transaction(super::begin_on(connection).await?))
    } else {
        Ok(ScopeOn::Session(connection))
    }
}

impl ScopeOn<'_> {
    /// Commits what ran, when it ran in a transaction.
    pub async fn end(self) -> Result<(), sqlx::Error> {
        match self {
            ScopeOn::Session(_) => Ok(()),
            ScopeOn::Transaction(tx) => tx.commit().await,
        }
    }
}

impl Deref for ScopeOn<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self {
            ScopeOn::Session(connection) => connection,
            ScopeOn::Transaction(tx) => tx,
        }
    }
}

impl DerefMut for ScopeOn<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            ScopeOn::Session(connection) => connection,
            ScopeOn::Transaction(tx) => tx,
        }
    }
}
