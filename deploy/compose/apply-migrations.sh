#!/bin/sh
# PostgreSQL container init script (runs once, on an empty data volume):
# applies the project's sqlx migrations from /migrations (MIGRATIONS_DIR) in
# version order, the same files `orders-gateway migrate` applies. The seed (20-seed.sql) runs
# after it.
#
# The official postgres image *sources* non-executable *.sh init scripts, so
# this file neither calls `exit` nor leaves variables behind.
#
# Note: this does not fill sqlx's _sqlx_migrations bookkeeping table. The
# compose database is disposable: reset it with `docker compose down -v`
# rather than running `orders-gateway migrate` against it.
set -e  # (no -u: when sourced it would leak into the image entrypoint)
og_applied=0
for og_migration in "${MIGRATIONS_DIR:-/migrations}"/*.sql; do
  [ -e "$og_migration" ] || continue
  case "$og_migration" in
    *.down.sql) continue ;;  # reversible sqlx migrations: only the .up half
  esac
  # Like sqlx: each migration in one transaction unless it opts out.
  og_tx=--single-transaction
  if head -n 1 "$og_migration" | grep -q '^-- no-transaction'; then og_tx=; fi
  echo "apply-migrations: $og_migration"
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" \
       --dbname "${POSTGRES_DB:-postgres}" $og_tx -f "$og_migration"
  og_applied=$((og_applied + 1))
done
if [ "$og_applied" -eq 0 ]; then
  echo "apply-migrations: no migrations found under ${MIGRATIONS_DIR:-/migrations}" >&2
  false
fi
echo "apply-migrations: $og_applied migration(s) applied"
unset og_applied og_migration og_tx
