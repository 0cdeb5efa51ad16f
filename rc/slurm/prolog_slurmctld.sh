#!/bin/sh
# PrologSlurmctld for cid: switch the job's nodes to the image its constraint asks for, and wait until they run it.
# The same prolog serves both Slurm modes of docs/slurm.md: in node_features/helpers mode it is what makes sure a
# job never starts on nodes that do not run its image, whatever Slurm believes their active features are.
#
#   slurm.conf:  PrologSlurmctld=/usr/local/lib/cid/prolog_slurmctld.sh     (see slurm.conf.snippet)
#
# Slurm runs this as SlurmUser with a CLEAN environment (SLURM_JOB_* only): everything cidcapt needs comes from
# /etc/default/cid-slurm (same variable names). That path is fixed: Slurm cannot pass CID_SLURM_DEFAULTS (only a
# wrapper script, as the tests use, can). SLURM_CONF must be exported: without it scontrol, which cidcapt runs to
# drain nodes or end a job, looks the controller up with a DNS SRV query.
#
# Exit code: cidcapt's (0 the nodes run the image, 1 some failed, 2 bad request, 3 deadline, 4 cidd unreachable,
# 5 refused, 6 the capture was cancelled with cidcapt --cancel: nothing drained). Non-zero makes Slurm requeue a batch job; before that cidcapt drains the nodes that failed or timed
# out, and ends (does not requeue) a job whose request can never succeed (2, or 5 from the rights rules), with
# the reason in its AdminComment. 126/127: cidcapt could not be run at all: the job's nodes are drained, saying so.
#
# Every line of the log starts with the time, the job and the seconds since this prolog started.

CID_SLURM_DEFAULTS=${CID_SLURM_DEFAULTS:-/etc/default/cid-slurm}
# shellcheck disable=SC1090
[ -r "$CID_SLURM_DEFAULTS" ] && . "$CID_SLURM_DEFAULTS"

: "${SLURM_CONF:=/etc/slurm/slurm.conf}"
: "${CID_SERVER:=127.0.0.1:38008}"
: "${CID_ROLE:=scheduler}"
: "${CID_TOKEN_FILE:=/etc/cid/scheduler.token}"   # a copy of cidd's scheduler.token, owned by SlurmUser, mode 0600
: "${CID_CA_FILE:=/etc/cid/ca.pem}"                 # the cluster CA (cidd's <state>/tls/ca.pem), public
: "${CID_TIMEOUT:=1800}"                          # seconds; keep below PrologEpilogTimeout
: "${CID_BIN:=/usr/local/bin}"                    # where cidcapt is installed (a virtualenv: its bin directory)
: "${CID_LOG:=/var/log/cid/slurm-prolog.log}"

PATH="$CID_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export SLURM_CONF CID_SERVER CID_ROLE CID_TOKEN_FILE CID_CA_FILE PATH
[ -n "${CID_SOCKET:-}" ] && export CID_SOCKET   # on the head node: the local socket, no token file

# Progress goes to the log (Slurm throws this program's output away); no log directory: no log.
if ! { : >>"$CID_LOG"; } 2>/dev/null; then CID_LOG=/dev/null; fi

started=$(date +%s)

# stamp: copy stdin to stdout, each line prefixed with the time, the job and the seconds since the start.
stamp() {
    while IFS= read -r line || [ -n "$line" ]; do
        now=$(date '+%Y-%m-%dT%H:%M:%S%z %s')
        printf '%s job=%s +%ss %s\n' "${now% *}" "${SLURM_JOB_ID:-?}" "$((${now#* } - started))" "$line"
    done
}

log() {
    printf '%s\n' "$*" | stamp >>"$CID_LOG"
}

# why_not_runnable: say why SlurmUser cannot run cidcapt (exit 126 or 127), as precisely as the files allow.
why_not_runnable() {
    user=$(id -un 2>/dev/null || id -u)
    prog=$(command -v cidcapt 2>/dev/null) || prog=""
    if [ -z "$prog" ] || [ ! -e "$prog" ]; then
        echo "there is no cidcapt in CID_BIN=$CID_BIN (nor on PATH): set CID_BIN in $CID_SLURM_DEFAULTS to the" \
             "bin directory of cid's installation (for a virtualenv: VENV/bin)"
        return
    fi
    if [ ! -x "$prog" ] || [ ! -r "$prog" ]; then
        echo "$prog is not readable and executable by $user (SlurmUser)"
        return
    fi
    interp=$(sed -n '1s/^#![[:space:]]*\([^[:space:]]*\).*/\1/p' "$prog" 2>/dev/null)
    if [ -n "$interp" ] && [ ! -x "$interp" ]; then
        echo "its interpreter $interp is not executable by $user (SlurmUser): install cid where SlurmUser can" \
             "read and execute it (a virtualenv under a private home directory is not), or give $user access"
        return
    fi
    echo "$prog could not be executed by $user (SlurmUser); run it as $user to see why"
}

log "prolog nodes=$SLURM_JOB_NODELIST user=$SLURM_JOB_USER constraints=${SLURM_JOB_CONSTRAINTS:-}" \
    "restart=${SLURM_JOB_RESTART_COUNT:-0} timeout=${CID_TIMEOUT}s"

# cidcapt's output goes through stamp into the log; its exit code comes back through descriptor 3.
code=$( { { cidcapt --slurm --timeout "$CID_TIMEOUT" 3>&-; echo "$?" >&3; } 2>&1 | stamp >>"$CID_LOG"; } 3>&1 )
case "$code" in
    ''|*[!0-9]*) code=1 ;;
esac

if [ "$code" = 126 ] || [ "$code" = 127 ]; then
    log "error: cannot run cidcapt (exit $code): $(why_not_runnable)"
    reason="cid: prolog cannot run cidcapt (exit $code), see $CID_LOG on the slurmctld host"
    if said=$(scontrol update NodeName="$SLURM_JOB_NODELIST" State=DRAIN Reason="$reason" 2>&1); then
        log "drained $SLURM_JOB_NODELIST: $reason"
    else
        log "warning: could not drain $SLURM_JOB_NODELIST: $said"
    fi
fi

log "prolog done: exit $code after $(($(date +%s) - started)) s"
exit "$code"
