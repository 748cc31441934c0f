#!/bin/sh
# Entry point of the sloproxy image (deploy/Dockerfile).
#
#   (no arguments) | serve [ARGS...]  run the proxy: sloproxy serve --config "$SLOPROXY_CONFIG" [ARGS...]
#   emulate ARGS...                   run emulated engines: sloproxy emulate ARGS... (compose.emulated.yaml)
#   anything else                     run that command (sloproxy report ..., sh, python ...)
#
# `exec` hands PID 1 to sloproxy itself, so `docker stop` / a pod's SIGTERM reaches the proxy, which
# drains and exits 0. tests/test_deploy.py runs this script outside Docker, with the compose commands.
set -eu

SLOPROXY_CONFIG="${SLOPROXY_CONFIG:-/etc/sloproxy/sloproxy.yaml}"

if [ "$#" -eq 0 ]; then
    set -- serve
fi

case "$1" in
    serve)
        shift
        if [ ! -r "$SLOPROXY_CONFIG" ]; then
            echo "sloproxy-entrypoint: no readable config at SLOPROXY_CONFIG=$SLOPROXY_CONFIG" >&2
            exit 2
        fi
        exec sloproxy serve --config "$SLOPROXY_CONFIG" "$@"
        ;;
    emulate)
        shift
        exec sloproxy emulate "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
