//! A throwaway PostgreSQL server started from the machine's own PostgreSQL
//! binaries: what `pgrelay dev` runs on when there is no `DATABASE_URL`, and
//! what the tests use. It lives in a temporary directory, listens on a free
//! loopback port, and dies with the process that started it.
//!
//! It is not open to every local user: connections need a password, generated
//! for each server (in its URL), and its Unix socket lives in the server's
//! private directory. A superuser's session can run programs (`COPY … TO
//! PROGRAM`), so "trust" on a shared machine would hand that to anyone.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

reason_error!(
    /// Why a throwaway PostgreSQL could not be started or stopped.
    PgTempError
);

/// How the server is tuned.
#[derive(Clone, Debug)]
pub struct Options {
    /// Off for tests and demos (nothing here needs to survive a power cut);
    /// on for benchmarks, whose figures must mean something.
    pub fsync: bool,
    pub max_connections: u32,
    /// More server settings, as `name=value`.
    pub settings: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fsync: false,
            max_connections: 400,
            settings: Vec::new(),
        }
    }
}

/// A running throwaway server. Dropping it stops the server and deletes its
/// files.
pub struct TempPostgres {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    run_as: Option<(libc::uid_t, libc::gid_t)>,
    options: Options,
    postmaster: Option<Postmaster>,
    /// The superuser's password, generated at start.
    password: String,
}

struct Postmaster {
    pid: i32,
    /// Receives when the postmaster has exited. In a Mutex only so that a
    /// server can sit in a `static` (the receiver is not `Sync`).
    exited: std::sync::Mutex<mpsc::Receiver<()>>,
}

impl Postmaster {
    fn wait_exit(&self, limit: Duration) -> bool {
        self.exited
            .lock()
            .expect("postmaster lock")
            .recv_timeout(limit)
            .is_ok()
    }

    fn has_exited(&self) -> bool {
        self.exited
            .lock()
            .expect("postmaster lock")
            .try_recv()
            .is_ok()
    }
}

impl TempPostgres {
    /// Creates a cluster and starts it. Blocking: call it from
    /// `spawn_blocking` in async code.
    ///
    /// # Errors
    /// No PostgreSQL binaries on this machine, or the server failing to start
    /// (the message then includes the end of its log).
    pub fn start(options: Options) -> Result<Self, PgTempError> {
        let bindir = find_bindir()?;
        remove_stale_clusters();
        let root = std::env::temp_dir().join(format!(
            "pgrelay-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let run_as = unprivileged_user()?;
        if let Some((uid, gid)) = run_as {
            chown(&root, uid, gid)?;
        }
        // Its socket and files are the server's alone.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot restrict {}: {e}", root.display()))?;
        let password = format!("{:032x}", rand::random::<u128>());
        let mut server = Self {
            root,
            bindir,
            port: 0,
            run_as,
            options,
            postmaster: None,
            password,
        };
        server.initdb()?;
        let mut last_error = PgTempError::from("no attempt to start PostgreSQL");
        for _ in 0..5 {
            server.port = free_port()?;
            match server.start_postmaster() {
                Ok(()) => return Ok(server),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// A connection URL for `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown), keeping its files: [`Self::restart`]
    /// brings it back on the same port with the same data.
    pub fn stop(&mut self) -> Result<(), PgTempError> {
        let Some(postmaster) = self.postmaster.take() else {
            return Ok(());
        };
        // SIGINT is PostgreSQL's fast shutdown: clients are disconnected, data is kept.
        unsafe { libc::kill(postmaster.pid, libc::SIGINT) };
        if !postmaster.wait_exit(Duration::from_secs(30)) {
            unsafe { libc::kill(postmaster.pid, libc::SIGKILL) };
            postmaster.wait_exit(Duration::from_secs(5));
        }
        Ok(())
    }

    /// Starts a stopped server again.
    pub fn restart(&mut self) -> Result<(), PgTempError> {
        self.stop()?;
        self.start_postmaster()
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command.current_dir(&self.root);
        command
    }

    fn initdb(&self) -> Result<(), PgTempError> {
        // The password reaches initdb in a file only its user can read,
        // removed once the cluster exists.
        let pwfile = self.root.join("pwfile");
        std::fs::write(&pwfile, &self.password)
            .map_err(|e| format!("cannot write {}: {e}", pwfile.display()))?;
        let _ = std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600));
        if let Some((uid, gid)) = self.run_as {
            chown(&pwfile, uid, gid)?;
        }
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"));
        let _ = std::fs::remove_file(&pwfile);
        let output = output?;
        if !output.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )
            .into());
        }
        Ok(())
    }

    fn start_postmaster(&mut self) -> Result<(), PgTempError> {
        let log_path = self.root.join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        if let Some((uid, gid)) = self.run_as {
            chown(&log_path, uid, gid)?;
        }
        // What this start writes comes after what earlier ones wrote.
        let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.root.display()))
            .args([
                "-c",
                &format!("max_connections={}", self.options.max_connections),
            ])
            .args([
                "-c",
                &format!("fsync={}", if self.options.fsync { "on" } else { "off" }),
            ])
            .args(["-c", "shared_buffers=128MB"])
            .args(
                self.options
                    .settings
                    .iter()
                    .flat_map(|setting| ["-c", setting.as_str()]),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // Its own process group: a Ctrl-C in the terminal reaches us, and
            // we stop the server after our nodes have deregistered.
            .process_group(0);
        let (pid, exited) = spawn_tied(command, libc::SIGQUIT, "postgres")
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        let postmaster = Postmaster {
            pid,
            exited: std::sync::Mutex::new(exited),
        };

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if postmaster.has_exited() {
                return Err(format!(
                    "postgres exited during start; its log ends with:\n{}",
                    tail(&log_path)
                )
                .into());
            }
            // pg_isready where there is one; the server's own word otherwise
            // (the npm builds of other versions ship without it).
            let ready = if self.bindir.join("pg_isready").is_file() {
                self.command("pg_isready")
                    .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
                    .args(["-p", &self.port.to_string()])
                    .status()
                    .is_ok_and(|s| s.success())
            } else {
                std::fs::read(&log_path).is_ok_and(|log| {
                    String::from_utf8_lossy(log.get(log_start..).unwrap_or_default())
                        .contains("database system is ready to accept connections")
                })
            };
            if ready {
                self.postmaster = Some(postmaster);
                return Ok(());
            }
            if Instant::now() > deadline {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return Err(format!(
                    "postgres did not start within 60 s; its log ends with:\n{}",
                    tail(&log_path)
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Spawns `command` so that it gets `signal` when this process ends (after
/// its uid change, which clears a parent-death signal set before). The
/// parent-death signal follows the *thread* that forked the child, so the
/// child is spawned from a thread that lives exactly as long as it. Answers
/// its pid, and a receiver that receives when it has exited.
pub(crate) fn spawn_tied(
    mut command: Command,
    signal: libc::c_int,
    name: &str,
) -> Result<(i32, mpsc::Receiver<()>), PgTempError> {
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal);
            Ok(())
        });
    }
    let (started_tx, started_rx) = mpsc::channel::<Result<i32, PgTempError>>();
    let (exited_tx, exited) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("pgrelay-{name}"))
        .spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = started_tx.send(Ok(child.id() as i32));
                let _ = child.wait();
                let _ = exited_tx.send(());
            }
            Err(e) => {
                let _ = started_tx.send(Err(e.to_string().into()));
            }
        })
        .map_err(|e| e.to_string())?;
    let pid = started_rx.recv().map_err(|e| e.to_string())??;
    Ok((pid, exited))
}

/// Finds a directory with `initdb` and `postgres`.
pub fn find_bindir() -> Result<PathBuf, PgTempError> {
    let has_tools = |dir: &Path| ["initdb", "postgres"].iter().all(|t| dir.join(t).is_file());
    if let Ok(dir) = std::env::var("PGRELAY_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "PGRELAY_PG_BINDIR={} has no initdb and postgres",
                dir.display()
            )
            .into())
        };
    }
    let mut candidates = Vec::new();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        candidates.push(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    // Distribution layouts, newest version first.
    for pattern_dir in [
        "/usr/lib/postgresql",
        "/opt/homebrew/opt",
        "/usr/local/opt",
        "/usr",
    ] {
        if let Ok(entries) = std::fs::read_dir(pattern_dir) {
            let mut versions: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    pattern_dir == "/usr/lib/postgresql"
                        || name.starts_with("postgresql")
                        || name.starts_with("pgsql")
                })
                .map(|p| p.join("bin"))
                .collect();
            versions.sort_by_key(|p| std::cmp::Reverse(version_of(p)));
            candidates.extend(versions);
        }
    }
    candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
    candidates.into_iter().find(|dir| has_tools(dir)).ok_or_else(|| {
        "no PostgreSQL server binaries (initdb, postgres) found on this machine: install PostgreSQL \
         (e.g. `apt install postgresql`), set PGRELAY_PG_BINDIR, or set DATABASE_URL to an existing database"
            .into()
    })
}

fn version_of(bindir: &Path) -> u32 {
    bindir
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(|n| n.chars().filter(char::is_ascii_digit).collect::<String>())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0)
}

/// `initdb` refuses to run as root: as root, run the server as `postgres`
/// (or `nobody`).
pub(crate) fn unprivileged_user() -> Result<Option<(libc::uid_t, libc::gid_t)>, PgTempError> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in [c"postgres", c"nobody"] {
        let entry = unsafe { libc::getpwnam(name.as_ptr()) };
        if !entry.is_null() {
            let entry = unsafe { &*entry };
            return Ok(Some((entry.pw_uid, entry.pw_gid)));
        }
    }
    Err("running as root and there is no `postgres` or `nobody` user to run PostgreSQL as".into())
}

pub(crate) fn chown(path: &Path, uid: libc::uid_t, gid: libc::gid_t) -> Result<(), PgTempError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("cannot chown {}: {e}", path.display()).into())
}

pub(crate) fn free_port() -> Result<u16, PgTempError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string().into())
}

pub(crate) fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Removes clusters left behind by processes that were killed before they
/// could clean up.
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        // Named pgrelay-pg-<pid>-<random> by the process that owns it.
        let owner = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("pgrelay-pg-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok());
        let Some(owner) = owner else { continue };
        let alive = unsafe { libc::kill(owner, 0) } == 0;
        if !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}
