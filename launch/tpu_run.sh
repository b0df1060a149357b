#!/usr/bin/env bash
# Run `grc train` on every worker of a Cloud TPU VM slice (one process per host; jax.distributed
# finds the other workers by itself). See docs/multihost.md.
#
#   launch/tpu_run.sh run    --tpu NAME --zone ZONE [options] [-- key=value overrides ...]
#   launch/tpu_run.sh status --tpu NAME --zone ZONE      # state, per-worker progress, fetch logs
#   launch/tpu_run.sh stop   --tpu NAME --zone ZONE      # SIGTERM: checkpoint at a common step, exit
#   launch/tpu_run.sh logs   --tpu NAME --zone ZONE      # fetch every worker's log
#
# --dry-run prints every command (a runnable script) instead of running it.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_run.sh {run|status|stop|logs} --tpu NAME [options] [-- overrides...]

TPU:
  --tpu NAME              the TPU VM slice (required)
  --zone ZONE             its zone (default: gcloud's compute/zone)
  --project PROJECT       its project (default: gcloud's core/project)
  --accelerator TYPE      expected type, e.g. v5p-64: checked against the TPU; gives the number of
                          workers (required with --dry-run unless --workers is given)
  --workers N             number of workers (hosts), for types this script does not know
Job (run):
  --config FILE           training config, relative to the repository (default configs/tiny.yaml)
  --run-name NAME         train.run_name (default: the config's)
  --output-dir DIR        train.output_dir; gs://BUCKET/PATH is mounted with gcsfuse on every
                          worker (at /tmp/gcs/BUCKET), so all workers share checkpoints and logs
  --env KEY=VALUE         extra environment for the job (repeatable)
  -- key=value ...        config overrides passed to `grc train`
Code and dependencies (run):
  --sync copy|git         copy: the local working tree (tracked and untracked files that git does
                          not ignore; default); git: clone --repo and check out --ref on the workers
  --ref REF               git ref for --sync git (default: the local HEAD commit; push it first)
  --repo URL              repository for --sync git (default: the local `origin` URL)
  --remote-dir DIR        code directory on the workers, relative to home (default: grc-jax)
  --python PY             Python (>= 3.10) to create the workers' venv with (default: python3)
  --no-install            skip `pip install jax[tpu] -e .` (the venv is already set up)
Other:
  --logs DIR              where per-worker logs are fetched (default: runs/tpu-logs/<tpu>)
  --grace SECONDS         stop: how long to wait for the preemption checkpoint (default 180)
  --follow                run: stream worker 0's log after the start (Ctrl-C leaves the job)
  --dry-run               print the commands instead of running them
EOF
}

die() {
  echo "tpu_run.sh: error: $*" >&2
  exit 2
}

# Shell-quote one word only where needed, so that dry-run output stays readable and runnable
# (`--flag=value` keeps the flag outside the quotes).
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[a-z-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quote a word for a command line that itself goes inside single quotes (remote commands): double
# quotes, with the characters special inside them escaped.
qq() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//\$/\\\$}
    s=${s//\`/\\\`}
    printf '"%s"' "$s"
  fi
}

qqall() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(qq "$w")"; done
  printf '%s' "$out"
}

qall() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

GCLOUD=${GRC_GCLOUD:-gcloud} # tests substitute a stub
VERB=${1:-}
[[ $VERB == -h || $VERB == --help ]] && { usage; exit 0; }
[[ -n $VERB ]] || { usage >&2; exit 2; }
shift
case $VERB in run | status | stop | logs) ;; *) die "unknown verb '$VERB' (run, status, stop, logs)" ;; esac

TPU="" ZONE="" PROJECT="" ACCEL="" WORKERS="" CONFIG=configs/tiny.yaml RUN_NAME="" OUTPUT_DIR=""
SYNC=copy REF="" REPO="" REMOTE_DIR=grc-jax PY=python3 INSTALL=1 LOGS="" GRACE=180 FOLLOW=0
DRY=0
ENVS=() OVERRIDES=()
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --tpu) need "$@"; TPU=$2; shift 2 ;;
    --zone) need "$@"; ZONE=$2; shift 2 ;;
    --project) need "$@"; PROJECT=$2; shift 2 ;;
    --accelerator) need "$@"; ACCEL=$2; shift 2 ;;
    --workers) need "$@"; WORKERS=$2; shift 2 ;;
    --config) need "$@"; CONFIG=$2; shift 2 ;;
    --run-name) need "$@"; RUN_NAME=$2; shift 2 ;;
    --output-dir) need "$@"; OUTPUT_DIR=$2; shift 2 ;;
    --env) need "$@"; [[ $2 == *=* ]] || die "--env takes KEY=VALUE, got '$2'"; ENVS+=("$2"); shift 2 ;;
    --sync) need "$@"; SYNC=$2; shift 2 ;;
    --ref) need "$@"; REF=$2; shift 2 ;;
    --repo) need "$@"; REPO=$2; shift 2 ;;
    --remote-dir) need "$@"; REMOTE_DIR=$2; shift 2 ;;
    --python) need "$@"; PY=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --logs) need "$@"; LOGS=$2; shift 2 ;;
    --grace) need "$@"; GRACE=$2; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown option '$1' (config overrides go after --)" ;;
  esac
done

[[ -n $TPU ]] || die "--tpu NAME is required"
[[ $SYNC == copy || $SYNC == git ]] || die "--sync must be copy or git, got '$SYNC'"
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, got '$GRACE'"
[[ -z $WORKERS || $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"
for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  [[ $o == *=* ]] || die "config override '$o' is not key=value"
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGS=${LOGS:-runs/tpu-logs/$TPU} # runs/ is git-ignored: not copied back to the workers

# Hosts of a slice from its accelerator type: v2/v3/v4/v5p count TensorCores (8 per host: 4 chips
# of 2 cores, or 4 chips x 2 for v2/v3); v5e (v5litepod) and v6e count chips, 4 per host beyond
# the 8-chip single-host shapes.
workers_of() {
  local kind=${1%-*} n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 1
  case $kind in
    v2 | v3 | v4 | v5p) echo $(((n + 7) / 8)) ;;
    v5litepod | v5e | v6e) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    *) return 1 ;;
  esac
}

GFLAGS=()
[[ -n $ZONE ]] && GFLAGS+=("--zone=$ZONE")
[[ -n $PROJECT ]] && GFLAGS+=("--project=$PROJECT")

# Run (or, with --dry-run, print) one command given as words.
run_cmd() {
  if ((DRY)); then
    qall "$@"
    echo
  else
    "$@"
  fi
}

step() { if ((DRY)); then echo "# $*"; else echo "tpu_run.sh: $*" >&2; fi; }

ssh_all() { run_cmd "$GCLOUD" compute tpus tpu-vm ssh "$TPU" "${GFLAGS[@]}" --worker=all --command="$1"; }
ssh_one() {
  run_cmd "$GCLOUD" compute tpus tpu-vm ssh "$TPU" "${GFLAGS[@]}" "--worker=$1" --command="$2"
}
scp_to_all() { run_cmd "$GCLOUD" compute tpus tpu-vm scp "$1" "$TPU:$2" "${GFLAGS[@]}" --worker=all; }

# --- preflight: gcloud present, TPU READY and of the expected type ---------------------------
preflight() {
  local describe=("$GCLOUD" compute tpus tpu-vm describe "$TPU" "${GFLAGS[@]}"
    "--format=value(state,acceleratorType)")
  if ((DRY)); then
    step "check that the TPU is READY (and of type ${ACCEL:-any})"
    qall "${describe[@]}"
    echo
    [[ -n $WORKERS ]] || WORKERS=$(workers_of "$ACCEL") ||
      die "--dry-run needs --accelerator TYPE (one this script knows) or --workers N"
    return
  fi
  command -v "$GCLOUD" >/dev/null 2>&1 ||
    die "gcloud not found (looked for '$GCLOUD' on PATH). Install the Google Cloud CLI" \
      "(https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'."
  local out state type
  out=$("${describe[@]}" 2>&1) ||
    die "cannot describe TPU '$TPU'${ZONE:+ in zone $ZONE}${PROJECT:+ of project $PROJECT}: $out"
  read -r state type <<<"$out"
  [[ $state == READY ]] ||
    die "TPU '$TPU' is ${state:-in an unknown state}, not READY. A preempted spot/preemptible" \
      "TPU must be deleted and recreated (then rerun: training resumes from its last checkpoint)."
  if [[ -n $ACCEL && $type != "$ACCEL" ]]; then
    die "TPU '$TPU' is a $type, not the --accelerator $ACCEL given"
  fi
  [[ -n $WORKERS ]] || WORKERS=$(workers_of "$type") ||
    die "cannot tell how many workers a $type has; pass --workers N"
  echo "tpu_run.sh: TPU $TPU is READY ($type, $WORKERS workers)" >&2
}

# --- remote snippets ----------------------------------------------------------------------------
R=$(qq "$REMOTE_DIR")
PIDFILE="logs/train.pid"
LOGFILE="logs/train.log"
ALIVE="[ -f $PIDFILE ] && kill -0 \"\$(cat $PIDFILE)\" 2>/dev/null"

# A gs:// output directory is mounted at the same path on every worker (mounts do not survive a
# reboot, so this runs at every start).
MOUNT="" TRAIN_OUTPUT="$OUTPUT_DIR"
if [[ $OUTPUT_DIR == gs://* ]]; then
  rest=${OUTPUT_DIR#gs://}
  BUCKET=${rest%%/*}
  SUB=${rest#"$BUCKET"}
  [[ -n $BUCKET ]] || die "--output-dir $OUTPUT_DIR names no bucket"
  TRAIN_OUTPUT="/tmp/gcs/$BUCKET$SUB"
  MOUNT="mkdir -p /tmp/gcs/$BUCKET && (mountpoint -q /tmp/gcs/$BUCKET || gcsfuse --implicit-dirs $(qq "$BUCKET") /tmp/gcs/$BUCKET) && "
fi

sync_code() {
  if [[ $SYNC == copy ]]; then
    local tarball=${TMPDIR:-/tmp}/grc-jax-src-$TPU.tgz
    step "copy the working tree (tracked and untracked files that git does not ignore)"
    local pack
    pack="cd $(q "$ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -czf $(q "$tarball")"
    if ((DRY)); then echo "$pack"; else bash -c "$pack"; fi
    scp_to_all "$tarball" grc-jax-src.tgz
    ssh_all "mkdir -p $R && tar -xzf grc-jax-src.tgz -C $R && rm grc-jax-src.tgz"
  else
    local ref=$REF repo=$REPO
    [[ -n $ref ]] || ref=$(git -C "$ROOT" rev-parse HEAD)
    [[ -n $repo ]] || repo=$(git -C "$ROOT" remote get-url origin 2>/dev/null) ||
      die "--sync git needs --repo URL (no 'origin' remote here)"
    step "check out $ref of $repo"
    ssh_all "([ -d $R/.git ] || git clone -q $(qq "$repo") $R) && cd $R && git fetch -q --tags origin && (git checkout -q --detach $(qq "origin/$ref") 2>/dev/null || git checkout -q --detach $(qq "$ref")) && git log -1 --oneline"
  fi
}

install_deps() {
  step "install jax[tpu] and the project into $REMOTE_DIR/.venv on every worker"
  local gcsfuse=""
  if [[ -n $MOUNT ]]; then
    # shellcheck disable=SC2016 # $(lsb_release ...) is for the worker's shell
    gcsfuse='(command -v gcsfuse >/dev/null || (curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)) && '
  fi
  ssh_all "${gcsfuse}cd $R && ([ -x .venv/bin/python ] || $(qq "$PY") -m venv .venv) && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -c constraints.txt \"jax[tpu]\" -e ."
}

start_job() {
  local args=(.venv/bin/python -m grc_jax.cli train --config "$CONFIG")
  [[ -n $RUN_NAME ]] && args+=("train.run_name=$RUN_NAME")
  [[ -n $TRAIN_OUTPUT ]] && args+=("train.output_dir=$TRAIN_OUTPUT")
  args+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
  local envs=(PYTHONUNBUFFERED=1 "${ENVS[@]+"${ENVS[@]}"}")
  step "start the job on every worker (logs: $REMOTE_DIR/$LOGFILE on each)"
  ssh_all "${MOUNT}cd $R && mkdir -p logs && if $ALIVE; then echo \"\$(hostname): a job is already running (pid \$(cat $PIDFILE)); stop it first\" >&2; exit 1; fi; echo \"=== \$(date -u +%FT%TZ) start\" >> $LOGFILE; nohup env $(qqall "${envs[@]}" "${args[@]}") >> $LOGFILE 2>&1 < /dev/null & echo \$! > $PIDFILE; echo \"\$(hostname): started pid \$(cat $PIDFILE)\""
  if ((FOLLOW)); then
    step "follow worker 0 (Ctrl-C stops following, not the job)"
    ssh_one 0 "tail -n +1 -F $R/$LOGFILE"
  fi
}

show_status() {
  step "per-worker state and last log line"
  ssh_all "cd $R 2>/dev/null && if $ALIVE; then s=running; else s=stopped; fi; echo \"\$(hostname): \$s: \$(tail -n 1 $LOGFILE 2>/dev/null | tr \"\\r\" \"\\n\" | tail -n 1)\""
}

stop_job() {
  step "SIGTERM every worker's job: all agree on a step, checkpoint it, exit (up to ${GRACE}s)"
  ssh_all "cd $R && if $ALIVE; then pid=\$(cat $PIDFILE); kill -TERM \$pid; for i in \$(seq $GRACE); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; if kill -0 \$pid 2>/dev/null; then kill -KILL \$pid; echo \"\$(hostname): killed\"; else echo \"\$(hostname): stopped\"; fi; fi; rm -f $PIDFILE"
}

fetch_logs() {
  step "fetch each worker's log into $LOGS/"
  run_cmd mkdir -p "$LOGS"
  local w
  for ((w = 0; w < WORKERS; w++)); do
    run_cmd "$GCLOUD" compute tpus tpu-vm scp "$TPU:$REMOTE_DIR/$LOGFILE" "$LOGS/worker-$w.log" \
      "${GFLAGS[@]}" "--worker=$w" || echo "tpu_run.sh: worker $w: no log fetched" >&2
  done
}

preflight
case $VERB in
  run)
    sync_code
    ((INSTALL)) && install_deps
    start_job
    ((DRY)) || echo "tpu_run.sh: started on $WORKERS workers; 'launch/tpu_run.sh status --tpu $TPU ...' to check" >&2
    ;;
  status)
    show_status
    fetch_logs
    ;;
  stop)
    stop_job
    fetch_logs
    ;;
  logs) fetch_logs ;;
esac
