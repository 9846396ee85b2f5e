#!/usr/bin/env bash
# docker/smoke.sh - build the image, run the compose cluster host-networked, train a small job to
# the end, check the outcome, and always tear everything down.
#
#   docker/smoke.sh                       # 3 workers, 3 epochs, 300 s budget for the job
#   WORKERS=5 LEPTON_EPOCHS=2 docker/smoke.sh
#
# Environment (all optional):
#   WORKERS                   workers to scale to (default 3)
#   LEPTON_EPOCHS             epochs of the smoke job (default 3); LEPTON_SHARDS shards per epoch (12)
#   SMOKE_TIMEOUT             seconds the job may take once the cluster is up (default 300)
#   LEPTON_IMAGE              image tag to build and run (default lepton:latest)
#   SMOKE_SKIP_BUILD=1        do not build (the image must exist)
#   LEPTON_COORDINATOR_PORT, LEPTON_PS0_PORT, LEPTON_PS1_PORT
#                             loopback ports (default: three free ones picked at start)
#   DOCKER_HOST               as for the docker CLI
# Needs: docker, docker-compose (v1.29 or newer), python3, timeout (coreutils).
# Exit: 0 when the job succeeded with every check passing and nothing is left behind; 1 otherwise.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WORKERS="${WORKERS:-3}"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-300}"
export LEPTON_IMAGE="${LEPTON_IMAGE:-lepton:latest}"
export LEPTON_EPOCHS="${LEPTON_EPOCHS:-3}"
export LEPTON_SHARDS="${LEPTON_SHARDS:-12}"
PROJECT="lepton-smoke-$(date +%s)-$$"
COMPOSE=(docker-compose -f docker/docker-compose.yml -f docker/docker-compose.host.yml -p "$PROJECT")
SECURE="${SECURE:-0}"   # 1: mutual TLS and role tokens on every service (docker-compose.secure.yml)
STATUS_FLAGS=()
if [ "$SECURE" = "1" ]; then
  COMPOSE+=(-f docker/docker-compose.secure.yml)
  STATUS_FLAGS=(--tls-ca /etc/lepton/ca.pem --tls-cert /etc/lepton/node.pem --tls-key /etc/lepton/node-key.pem
                --token-file /etc/lepton/reader.token)
fi
STARTED=$(date +%s)
BUILD_SECONDS="skipped"
UP=0   # 1 once `up` was attempted: teardown has something to do

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

for tool in docker docker-compose python3 timeout; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
timeout 30 docker info >/dev/null 2>&1 || die "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-<unset>})"

# Three distinct free loopback ports unless given.
if [ -z "${LEPTON_COORDINATOR_PORT:-}" ] || [ -z "${LEPTON_PS0_PORT:-}" ] || [ -z "${LEPTON_PS1_PORT:-}" ]; then
  read -r p0 p1 p2 < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()
EOF
)
  export LEPTON_COORDINATOR_PORT="${LEPTON_COORDINATOR_PORT:-$p0}"
  export LEPTON_PS0_PORT="${LEPTON_PS0_PORT:-$p1}"
  export LEPTON_PS1_PORT="${LEPTON_PS1_PORT:-$p2}"
fi
COORD="127.0.0.1:${LEPTON_COORDINATOR_PORT}"

# ------------------------------------------------------------------------------------- teardown
project_leftovers() {
  local filter="label=com.docker.compose.project=${PROJECT}"
  {
    docker ps -aq --filter "$filter" | sed 's/^/container /'
    docker volume ls -q --filter "$filter" | sed 's/^/volume /'
    docker network ls -q --filter "$filter" | sed 's/^/network /'
  } 2>/dev/null
}

teardown() {
  local rc=$?
  trap - EXIT INT TERM HUP
  set +e
  if [ "$UP" -eq 1 ]; then
    if [ "$rc" -ne 0 ]; then
      log "failure: last log lines of every container"
      timeout 60 "${COMPOSE[@]}" logs --no-color --tail=25 >&2
      timeout 30 "${COMPOSE[@]}" ps >&2
    fi
    log "tearing down project $PROJECT"
    timeout 180 "${COMPOSE[@]}" down -v --remove-orphans -t 15 >/dev/null 2>&1 \
      || log "docker-compose down failed or timed out"
    local left
    left=$(project_leftovers)
    if [ -n "$left" ]; then
      log "left behind after down; removing by label:"; printf '%s\n' "$left" >&2
      docker ps -aq --filter "label=com.docker.compose.project=${PROJECT}" | xargs -r docker rm -f >/dev/null 2>&1
      docker volume ls -q --filter "label=com.docker.compose.project=${PROJECT}" | xargs -r docker volume rm -f >/dev/null 2>&1
      docker network ls -q --filter "label=com.docker.compose.project=${PROJECT}" | xargs -r docker network rm >/dev/null 2>&1
      rc=1
    fi
    if [ -n "$(project_leftovers)" ]; then
      log "FAIL: project $PROJECT still has resources"; rc=1
    else
      log "nothing of project $PROJECT is left (containers, volumes, networks)"
    fi
  fi
  [ -n "${LEPTON_SECRETS_DIR:-}" ] && rm -rf "$LEPTON_SECRETS_DIR"
  log "$([ "$rc" -eq 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - STARTED )) s"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------------------------------- build
if [ "${SMOKE_SKIP_BUILD:-0}" != "1" ]; then
  log "building $LEPTON_IMAGE (docker build --network host)"
  t0=$(date +%s)
  timeout 1200 docker build --network host -q -f docker/Dockerfile -t "$LEPTON_IMAGE" . >/dev/null \
    || die "docker build failed"
  BUILD_SECONDS=$(( $(date +%s) - t0 ))
fi
docker image inspect "$LEPTON_IMAGE" >/dev/null 2>&1 || die "image $LEPTON_IMAGE does not exist"
IMAGE_MB=$(( $(docker image inspect -f '{{.Size}}' "$LEPTON_IMAGE") / 1000000 ))
log "image $LEPTON_IMAGE: ${IMAGE_MB} MB, build ${BUILD_SECONDS} s"

# -------------------------------------------------------------------------------------- secrets
if [ "$SECURE" = "1" ]; then
  export LEPTON_SECRETS_DIR
  LEPTON_SECRETS_DIR=$(mktemp -d /tmp/lepton-smoke-secrets.XXXXXX)
  chmod 0755 "$LEPTON_SECRETS_DIR"  # the containers' user must be able to enter it
  # Made by the image itself (lepton certs, every file 0600), then handed to the containers' user (uid 10001).
  timeout 120 docker run --rm --user 0 --network none --entrypoint sh -v "$LEPTON_SECRETS_DIR:/out" "$LEPTON_IMAGE" \
    -c 'lepton certs --out /out --hosts localhost,127.0.0.1,coordinator,ps-0,ps-1 >/dev/null && chown 10001:10001 /out/*' \
    || die "lepton certs failed"
  log "secure: mutual TLS and role tokens from $LEPTON_SECRETS_DIR"
  # Without a token the coordinator must refuse (checked once the cluster is up).
fi

# ------------------------------------------------------------------------------------------- up
log "project $PROJECT: coordinator $COORD, servers 127.0.0.1:$LEPTON_PS0_PORT and :$LEPTON_PS1_PORT, $WORKERS workers, $LEPTON_EPOCHS epochs"
UP=1
t0=$(date +%s)
# `up -d` returns once every service is created; depends_on waits for coordinator and servers to be healthy.
UP_LOG=$(mktemp)
if ! timeout 300 "${COMPOSE[@]}" up -d --no-build --scale "worker=${WORKERS}" >"$UP_LOG" 2>&1; then
  tail -n 30 "$UP_LOG" >&2; rm -f "$UP_LOG"
  die "docker-compose up failed or took over 300 s"
fi
rm -f "$UP_LOG"
UP_SECONDS=$(( $(date +%s) - t0 ))
log "cluster up in ${UP_SECONDS} s"

cid() {  # container ids of a service (all states)
  docker ps -aq --filter "label=com.docker.compose.project=${PROJECT}" --filter "label=com.docker.compose.service=$1"
}
container_state() {  # "<status> <health or -> <exit code> <restart count>"
  docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.State.ExitCode}} {{.RestartCount}}' "$1"
}
status_json() {
  timeout 60 "${COMPOSE[@]}" exec -T coordinator lepton status --coordinator "$COORD" --json "${STATUS_FLAGS[@]}" 2>/dev/null
}
field() {  # field NAME < status json: state, completions, expected, workers, ps, epoch
  python3 -c '
import json, sys
s = json.load(sys.stdin)
name = sys.argv[1]
job = s.get("job", {})
roles = [m.get("role") for m in s.get("members", []) if m.get("alive")]
print({
    "state": s.get("state"),
    "completions": s.get("shard_completions"),
    "expected": int(job.get("epochs", 0)) * int(job.get("shards_per_epoch", 0)),
    "workers": roles.count("ROLE_WORKER"),
    "ps": roles.count("ROLE_PARAMETER_SERVER"),
    "epoch": s.get("epoch"),
}[name])' "$1"
}

COORD_ID=$(cid coordinator); PS_IDS="$(cid ps-0) $(cid ps-1)"; WORKER_IDS=$(cid worker)
declare -A SEEN_HEALTHY=()
sample_health() {
  for id in $COORD_ID $PS_IDS; do
    read -r st health _ _ < <(container_state "$id")
    [ "$health" = healthy ] && SEEN_HEALTHY[$id]=1
  done
  return 0
}
sample_health  # right after `up`: the workers started only once the servers were healthy
if [ "$SECURE" = "1" ]; then
  denied=$(timeout 60 "${COMPOSE[@]}" exec -T coordinator lepton status --coordinator "$COORD" --json \
    --tls-ca /etc/lepton/ca.pem --tls-cert /etc/lepton/node.pem --tls-key /etc/lepton/node-key.pem 2>&1 || true)
  grep -q "Unauthenticated\|UNAUTHENTICATED\|invalid bearer token" <<<"$denied" || die "a call without a token was not refused: $denied"
  plain=$(timeout 60 "${COMPOSE[@]}" exec -T coordinator lepton status --coordinator "$COORD" --json 2>&1 || true)
  grep -q "cannot reach" <<<"$plain" || die "a plaintext client was not refused: $plain"
  log "secure: no-token call refused (UNAUTHENTICATED), plaintext client refused"
fi
[ -n "$COORD_ID" ] && [ "$(echo $PS_IDS | wc -w)" -eq 2 ] || die "coordinator or parameter server containers missing"
[ "$(echo $WORKER_IDS | wc -w)" -eq "$WORKERS" ] || die "expected $WORKERS worker containers, found $(echo $WORKER_IDS | wc -w)"

# ------------------------------------------------------------------------------------- the run
MAX_WORKERS=0; MAX_PS=0; STATE=""; STATUS=""
deadline=$(( $(date +%s) + SMOKE_TIMEOUT ))
while :; do
  sample_health
  if STATUS=$(status_json) && [ -n "$STATUS" ]; then
    STATE=$(field state <<<"$STATUS")
    w=$(field workers <<<"$STATUS"); p=$(field ps <<<"$STATUS")
    (( w > MAX_WORKERS )) && MAX_WORKERS=$w
    (( p > MAX_PS )) && MAX_PS=$p
    log "job $STATE, epoch $(field epoch <<<"$STATUS"), $(field completions <<<"$STATUS")/$(field expected <<<"$STATUS") completions, live: $p ps $w workers"
    case "$STATE" in
      succeeded) break ;;
      failed|cancelled) die "the job ended $STATE" ;;
    esac
  else
    log "lepton status did not answer yet"
  fi
  [ "$(date +%s)" -lt "$deadline" ] || die "job not done within ${SMOKE_TIMEOUT} s (last state: ${STATE:-unknown})"
  sleep 2
done
JOB_SECONDS=$(( $(date +%s) - t0 ))

# --------------------------------------------------------------------------------------- checks
COMPLETIONS=$(field completions <<<"$STATUS"); EXPECTED=$(field expected <<<"$STATUS")
[ "$COMPLETIONS" -eq "$EXPECTED" ] && [ "$EXPECTED" -gt 0 ] \
  || die "shard_completions $COMPLETIONS != epochs x shards $EXPECTED"
[ "$EXPECTED" -eq $(( LEPTON_EPOCHS * LEPTON_SHARDS )) ] \
  || die "the coordinator ran $EXPECTED shards, the compose files asked for $(( LEPTON_EPOCHS * LEPTON_SHARDS ))"
for id in $COORD_ID $PS_IDS; do
  [ -n "${SEEN_HEALTHY[$id]:-}" ] || die "container $(docker inspect -f '{{.Name}}' "$id") was never seen healthy during the run"
done
[ "$MAX_PS" -eq 2 ] || die "at most $MAX_PS parameter servers were seen alive (expected 2)"
[ "$MAX_WORKERS" -ge 1 ] || die "no worker was seen alive"

# Workers exit 0 on JOB_DONE and servers exit 0 once they see the job is over: wait (bounded) for them.
wait_exit_deadline=$(( $(date +%s) + 60 ))
for id in $PS_IDS $WORKER_IDS; do
  while [ "$(docker inspect -f '{{.State.Status}}' "$id")" != exited ]; do
    [ "$(date +%s)" -lt "$wait_exit_deadline" ] || die "$(docker inspect -f '{{.Name}}' "$id") still running 60 s after the job succeeded"
    sleep 1
  done
done
SUMMARY=""
for id in $COORD_ID $PS_IDS $WORKER_IDS; do
  name=$(docker inspect -f '{{.Name}}' "$id"); name=${name#/}
  read -r st health code restarts < <(container_state "$id")
  SUMMARY+=$(printf '  %-40s %-8s health %-9s exit %-4s restarts %s' "$name" "$st" "$health" "$code" "$restarts")$'\n'
  [ "$restarts" -eq 0 ] || die "$name was restarted $restarts times"
  if [ "$id" = "$COORD_ID" ]; then
    [ "$st" = running ] && [ "$health" = healthy ] || die "the coordinator is not running and healthy after the job ($st/$health)"
  else
    [ "$code" -eq 0 ] || die "$name exited with $code"
  fi
done

python3 - "$STATUS" <<'EOF' >&2
import json, sys
s = json.loads(sys.argv[1])
e = s.get("evaluation") or {}
print(f"  job {s['state']}: {s['shard_completions']} shard completions, "
      f"{s.get('duplicate_completions_rejected', 0)} duplicates rejected, {s.get('reassignments', 0)} reassignments, "
      f"{s.get('members_declared_dead', 0)} members declared dead")
print(f"  {s.get('samples_trained', 0)} samples trained, {s.get('samples_per_second', 0):.0f} samples/s; "
      f"test accuracy {e.get('accuracy', float('nan')):.4f}, macro recall {e.get('macro_recall', float('nan')):.4f}")
EOF
log "summary: image ${IMAGE_MB} MB (build ${BUILD_SECONDS} s), cluster up ${UP_SECONDS} s, job done ${JOB_SECONDS} s after up, max live: ${MAX_PS} ps ${MAX_WORKERS} workers"
printf '%s' "$SUMMARY" >&2
