#!/usr/bin/env bash
# Submit the nightly recsys-core job to a running Ray cluster (VM clusters
# started with `ray up cluster/aws-cluster.yaml`). Meant for cron; see
# cluster/cron/crontab.example. Run it on a host with a checkout of this repo
# and the `ray` CLI (same version as the cluster) that can reach the dashboard.
#
#   RAY_ADDRESS    dashboard URL        (default http://127.0.0.1:8265, e.g. via
#                                        `ray dashboard cluster/aws-cluster.yaml`)
#   RAY_AUTH_MODE  token | disabled     (default token; the token comes from
#                                        ~/.ray/auth_token, RAY_AUTH_TOKEN or
#                                        RAY_AUTH_TOKEN_PATH, as for any Ray client)
#   STORAGE_ROOT   adds --set storage.root=$STORAGE_ROOT (e.g.
#                  s3://my-recsys-bucket/recsys); needed unless the config's
#                  root is already s3:// or absolute: the job's preflight
#                  refuses a relative root on a cluster (exit in seconds)
#   RUN_DATE       the date to (re)run  (default today, UTC); a failed night is
#                  rerun with RUN_DATE=YYYY-MM-DD cluster/cron/nightly.sh
#   ATTEMPTS       submissions per run  (default 2): a failed job is submitted
#                  again once. The rerun resumes: completed stages are skipped,
#                  an interrupted training restores Ray Train's latest
#                  checkpoint, and recommendations switch by one manifest write.
#   LOG_DIR        where logs go        (default ~/recsys-nightly-logs)
#   LOCK_FILE      overlap guard        (default /tmp/recsys-nightly.lock)
#
# Exit status: that of the last `ray job submit` (it waits for the job and
# exits 1 if the job fails), or 75 if a previous run still holds the lock.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_DATE="${RUN_DATE:-$(date -u +%F)}"
ATTEMPTS="${ATTEMPTS:-2}"
LOG_DIR="${LOG_DIR:-$HOME/recsys-nightly-logs}"
LOCK_FILE="${LOCK_FILE:-/tmp/recsys-nightly.lock}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
EXTRA_ARGS=()
if [[ -n "${STORAGE_ROOT:-}" ]]; then EXTRA_ARGS+=(--set "storage.root=$STORAGE_ROOT"); fi

mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/nightly-$RUN_DATE.log"
# Everything goes to the log; only a failure prints one line to the original
# stderr, so cron's MAILTO mails failures and nothing else.
exec 3>&2 >>"$LOG" 2>&1
trap 'rc=$?; [ "$rc" -eq 0 ] || echo "recsys nightly $RUN_DATE failed (exit $rc), log: $LOG" >&3' EXIT

# One run at a time on this host: the lock is held until this script exits.
exec 9>"$LOCK_FILE"
if ! flock -n 9; then
  echo "$(date -u +%FT%TZ) previous run still holds $LOCK_FILE; not submitting"
  exit 75
fi

cd "$REPO"
rc=1
for attempt in $(seq 1 "$ATTEMPTS"); do
  echo "$(date -u +%FT%TZ) submitting run $RUN_DATE from $REPO (attempt $attempt of $ATTEMPTS)"
  # train.use_gpu: one GPU per Ray Train worker (the autoscaler starts GPU
  # nodes for them). train.max_failures: Ray Train restarts its workers from
  # the latest checkpoint when one dies (e.g. a GPU node is lost), up to 3 times.
  if ray job submit \
      --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
      --submission-id "recsys-nightly-$RUN_DATE-$(date -u +%H%M%S)-$attempt" \
      --working-dir "$REPO" \
      --runtime-env "$REPO/cluster/runtime_env.yaml" \
      -- python -m jobs.nightly --config jobs/configs/ml100k.yaml --run-date "$RUN_DATE" \
      --set train.use_gpu=true --set train.max_failures=3 "${EXTRA_ARGS[@]}"; then
    rc=0
    break
  else
    rc=$?
    echo "$(date -u +%FT%TZ) attempt $attempt of run $RUN_DATE failed (exit $rc)"
  fi
done
[ "$rc" -eq 0 ] && echo "$(date -u +%FT%TZ) run $RUN_DATE finished"
exit "$rc"
