//! A throwaway PgBouncer in transaction mode in front of a PostgreSQL server:
//! the pooler tests run nodes through it, as teams behind Neon's pooled
//! endpoint, Supabase's pooler or a Kubernetes PgBouncer do.
//!
//! It forwards every database name to the server (`* =`), authenticates with
//! the server's own user and password (SCRAM, or trust when the URL has no
//! password) and keeps no session state between transactions: what a node
//! sends through it must work without any.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::pgtemp::{chown, free_port, spawn_tied, tail, unprivileged_user};

reason_error!(
    /// Why a throwaway PgBouncer could not be started.
    PgBouncerError
);

impl From<super::pgtemp::PgTempError> for PgBouncerError {
    fn from(error: super::pgtemp::PgTempError) -> Self {
        Self(error.0)
    }
}

/// A running PgBouncer. Dropping it stops it and deletes its files.
pub struct TempPgBouncer {
    root: PathBuf,
    port: u16,
    user: String,
    password: Option<String>,
    pid: i32,
    /// Receives when PgBouncer has exited (in a Mutex only so that a
    /// bouncer can sit in a `static`).
    exited: std::sync::Mutex<mpsc::Receiver<()>>,
}

impl TempPgBouncer {
    /// Starts PgBouncer (`pgbouncer` on PATH, or `PGRELAY_PGBOUNCER`) in
    /// front of the server of `upstream` (a `postgres://` URL). Blocking.
    ///
    /// # Errors
    /// No `pgbouncer` binary, a URL without a host, or PgBouncer not
    /// answering within 20 s (the message then includes its log).
    pub fn start(upstream: &str) -> Result<Self, PgBouncerError> {
        let url = url::Url::parse(upstream).map_err(|e| format!("bad upstream URL: {e}"))?;
        let host = url.host_str().ok_or("the upstream URL names no host")?;
        let upstream_port = url.port().unwrap_or(5432);
        let user = if url.username().is_empty() {
            "postgres".to_owned()
        } else {
            url.username().to_owned()
        };
        let password = url.password().map(str::to_owned);
        // On PATH, or where Debian puts it (/usr/sbin, off a user's PATH).
        let binary = std::env::var("PGRELAY_PGBOUNCER").unwrap_or_else(|_| {
            let on_path = std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join("pgbouncer").is_file())
            });
            if on_path {
                "pgbouncer"
            } else {
                "/usr/sbin/pgbouncer"
            }
            .to_owned()
        });
        let root = std::env::temp_dir().join(format!(
            "pgrelay-pgbouncer-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot restrict {}: {e}", root.display()))?;
        // PgBouncer refuses to run as root.
        let run_as = unprivileged_user()?;
        let port = free_port()?;
        let auth_type = if password.is_some() {
            "scram-sha-256"
        } else {
            "trust"
        };
        let userlist = format!(
            "\"{}\" \"{}\"\n",
            user.replace('"', "\"\""),
            password.as_deref().unwrap_or("").replace('"', "\"\"")
        );
        let config = format!(
            "[databases]\n\
             * = host={host} port={upstream_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = {auth_type}\n\
             auth_file = {root}/userlist.txt\n\
             pool_mode = transaction\n\
             max_client_conn = 4000\n\
             default_pool_size = 60\n\
             max_db_connections = 0\n\
             server_reset_query =\n\
             server_check_delay = 0\n\
             server_login_retry = 1\n\
             logfile = {root}/pgbouncer.log\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
            root = root.display()
        );
        write_private(&root.join("userlist.txt"), &userlist, run_as)?;
        write_private(&root.join("pgbouncer.ini"), &config, run_as)?;
        if let Some((uid, gid)) = run_as {
            chown(&root, uid, gid)?;
        }
        let mut command = Command::new(&binary);
        command
            .arg(root.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some((uid, gid)) = run_as {
            command.uid(uid).gid(gid);
        }
        let (pid, exited) = spawn_tied(command, libc::SIGTERM, "pgbouncer").map_err(|e| {
            format!("cannot run {binary}: {e} (install PgBouncer: apt install pgbouncer)")
        })?;
        let bouncer = Self {
            root,
            port,
            user,
            password,
            pid,
            exited: std::sync::Mutex::new(exited),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if bouncer.has_exited(Duration::ZERO) {
                return Err(format!(
                    "pgbouncer exited during start; its log ends with:\n{}",
                    tail(&bouncer.root.join("pgbouncer.log"))
                )
                .into());
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(bouncer);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "pgbouncer did not listen within 20 s; its log ends with:\n{}",
                    tail(&bouncer.root.join("pgbouncer.log"))
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn has_exited(&self, within: Duration) -> bool {
        self.exited
            .lock()
            .expect("pgbouncer lock")
            .recv_timeout(within)
            .is_ok()
    }

    /// A URL for `database` through the pooler.
    pub fn url(&self, database: &str) -> String {
        match &self.password {
            Some(password) => format!(
                "postgres://{}:{password}@127.0.0.1:{}/{database}",
                self.user, self.port
            ),
            None => format!(
                "postgres://{}@127.0.0.1:{}/{database}",
                self.user, self.port
            ),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process (to pause it: a pooler that stops answering).
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for TempPgBouncer {
    fn drop(&mut self) {
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        if !self.has_exited(Duration::from_secs(5)) {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.has_exited(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn write_private(
    path: &Path,
    text: &str,
    owner: Option<(libc::uid_t, libc::gid_t)>,
) -> Result<(), PgBouncerError> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    if let Some((uid, gid)) = owner {
        chown(path, uid, gid)?;
    }
    Ok(())
}
