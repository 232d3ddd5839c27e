#!/usr/bin/env bash
# Submit an odpo run to a Ray cluster as a job.
#
#   deploy/submit.sh CONFIG [--set key=value ...] [--resume] [--wait-for-resources SECONDS]
#
# Uses RAY_ADDRESS (e.g. http://127.0.0.1:8265, the head's dashboard) like `ray job submit`.
# The repo root is shipped as the job's working directory, so odpo's packages and configs (and
# a custom judge module inside the repo) are importable on every worker. To ship a judge module
# that lives elsewhere, add it with RAY_SUBMIT_ARGS, e.g.
#   RAY_SUBMIT_ARGS='--runtime-env-json={"py_modules": ["/path/to/my_judges"]}' deploy/submit.sh cfg.yaml
# Extra `ray job submit` flags (e.g. --no-wait, --submission-id) go in RAY_SUBMIT_ARGS too.
#
# Token authentication (a cluster started with RAY_AUTH_MODE=token, see docs/security.md): put
# the cluster's token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH) before calling
# this script; `ray job submit` reads it from the environment and sends it as a request header.
# The token never goes on a command line, into the job's entrypoint or runtime env, or into any
# output (this script does not echo its environment; do not pass it in RAY_SUBMIT_ARGS).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [--set key=value ...] [--resume]" >&2
    exit 2
fi
if [ -n "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]; then
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"   # the client sends a token only in token mode
fi
cd "$(dirname "$0")/.."
RAY=${RAY:-ray}
[ -x .venv/bin/ray ] && [ "$RAY" = ray ] && RAY=.venv/bin/ray
# A head that was just started may not have its job agent yet: Ray then refuses the submission
# at once ("No available agent to submit job, please try again later"; no job is created). That
# refusal is retried every 2 s for up to ODPO_SUBMIT_WAIT_S seconds (default 120); any other
# outcome is the job's own.
wait_s=${ODPO_SUBMIT_WAIT_S:-120}
deadline=$((SECONDS + wait_s))
out=$(mktemp)
trap 'rm -f "$out"' EXIT
while true; do
    rc=0
    # shellcheck disable=SC2086
    "$RAY" job submit --working-dir . ${RAY_SUBMIT_ARGS:-} -- python -m orchestrator run "$@" 2>&1 | tee "$out" \
        || rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ] || ! grep -q "No available agent to submit job" "$out"; then
        exit "$rc"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "deploy/submit.sh: the Ray head's job agent did not come up within ${wait_s} s (ODPO_SUBMIT_WAIT_S)" >&2
        exit "$rc"
    fi
    echo "deploy/submit.sh: the Ray head has no job agent yet (just started?); submitting again in 2 s" >&2
    sleep 2
done
