#!/bin/sh
# Start redis-server with the password from REDIS_PASSWORD without putting it on a command line,
# where every user of the host can read it (ps, /proc/<pid>/cmdline): redis-server reads that part
# of its configuration from standard input ("-"). Other options are this script's arguments.
# The password is quoted for Redis: any text without a double quote or a backslash (.env.example
# suggests `openssl rand -hex 32`).
set -eu
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
exec redis-server - "$@" <<CONFIG
requirepass "${REDIS_PASSWORD}"
CONFIG
