# Sourced by scripts/dev and scripts/test: finds what this machine lacks and
# installs it (Debian or Ubuntu, as root), or prints the exact command to run
# and exits 1.
#
#   needs <what> ...   with what one of: postgres, pgbouncer, node, chromium, python

missing_packages=()
missing_what=()

have_postgres() {
  [ -n "${PGRELAY_PG_BINDIR:-}" ] && [ -x "$PGRELAY_PG_BINDIR/initdb" ] && return 0
  command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
have_pgbouncer() {
  if [ -n "${PGRELAY_PGBOUNCER:-}" ]; then
    [ -x "$PGRELAY_PGBOUNCER" ] && return 0
    echo "PGRELAY_PGBOUNCER=$PGRELAY_PGBOUNCER is not an executable" >&2
    exit 1
  fi
  command -v pgbouncer >/dev/null 2>&1 && return 0
  # Debian puts it in /usr/sbin, off a user's PATH: name it for the tests.
  [ -x /usr/sbin/pgbouncer ] && export PGRELAY_PGBOUNCER=/usr/sbin/pgbouncer
}
have_node() {
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || return 1
  # Node.js 18 or later (Debian 12 ships 18, the tests were written on 20).
  [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 18 ]
}
have_chromium() {
  [ -n "${CHROMIUM:-}" ] && [ -x "$CHROMIUM" ] && return 0
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}

have_python() {
  # Python 3 with pip: the stock STOMP client's test installs stomp.py
  # (pinned) into target/python with `pip install --target`.
  command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1
}

joined() { local IFS=,; echo "$*" | sed 's/,/, /g'; }

needs() {
  local what
  for what in "$@"; do
    case $what in
      postgres) have_postgres || { missing_what+=("PostgreSQL server binaries"); missing_packages+=(postgresql); } ;;
      pgbouncer) have_pgbouncer || { missing_what+=("PgBouncer"); missing_packages+=(pgbouncer); } ;;
      node) have_node || { missing_what+=("Node.js 18+ with npm"); missing_packages+=(nodejs npm); } ;;
      chromium) have_chromium || { missing_what+=("Chromium"); missing_packages+=(chromium); } ;;
      python) have_python || { missing_what+=("Python 3 with pip"); missing_packages+=(python3 python3-pip); } ;;
      *) echo "needs: unknown requirement $what" >&2; exit 2 ;;
    esac
  done
  [ ${#missing_packages[@]} -eq 0 ] && return 0
  local command="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing_packages[*]}"
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: $(joined "${missing_what[@]}")" >&2
    echo "install them (as root), then run this again:" >&2
    echo "  sudo sh -c '$command'" >&2
    exit 1
  fi
  echo "installing ${missing_packages[*]} (missing: $(joined "${missing_what[@]}"))" >&2
  # postgresql's packages start a cluster where they can; the tests start
  # their own and need none.
  sh -c "$command" >&2
  # What the distribution installed must do (an old Node.js would not).
  local wanted=("$@")
  missing_packages=()
  missing_what=()
  for what in "${wanted[@]}"; do
    "have_$what" || missing_what+=("$what")
  done
  if [ ${#missing_what[@]} -gt 0 ]; then
    echo "still missing after installing: ${missing_what[*]} (see README \"Test it\")" >&2
    exit 1
  fi
}
