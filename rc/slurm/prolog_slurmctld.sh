#!/bin/sh
# PrologSlurmctld for cid: switch the job's nodes to the image its constraint asks for, and wait until they run it.
#
#   slurm.conf:  PrologSlurmctld=/usr/local/lib/cid/prolog_slurmctld.sh     (see slurm.conf.snippet)
#
# Slurm runs this as SlurmUser with a CLEAN environment (SLURM_JOB_* only), so everything cidcapt needs is set
# here, from /etc/default/cid-slurm when it exists (same variable names). SLURM_CONF must be exported: without it
# scontrol, which cidcapt runs to drain the nodes that failed, looks the controller up with a DNS SRV query.
#
# Exit code: cidcapt's (0 the nodes run the image, 1 some failed, 2 bad request, 3 deadline, 4 cidd unreachable,
# 5 refused). Non-zero makes Slurm requeue a batch job (nodes that failed or timed out are drained first).

CID_SLURM_DEFAULTS=${CID_SLURM_DEFAULTS:-/etc/default/cid-slurm}
# shellcheck disable=SC1090
[ -r "$CID_SLURM_DEFAULTS" ] && . "$CID_SLURM_DEFAULTS"

: "${SLURM_CONF:=/etc/slurm/slurm.conf}"
: "${CID_SERVER:=127.0.0.1:38008}"
: "${CID_ROLE:=scheduler}"
: "${CID_TOKEN_FILE:=/etc/cid/scheduler.token}"   # a copy of cidd's scheduler.token, owned by SlurmUser, mode 0600
: "${CID_CA_FILE:=/etc/cid/ca.pem}"                 # the cluster CA (cidd's <state>/tls/ca.pem), public
: "${CID_TIMEOUT:=1800}"                          # seconds; keep below PrologEpilogTimeout
: "${CID_BIN:=/usr/local/bin}"                    # where cidcapt is installed
: "${CID_LOG:=/var/log/cid/slurm-prolog.log}"

PATH="$CID_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export SLURM_CONF CID_SERVER CID_ROLE CID_TOKEN_FILE CID_CA_FILE PATH
[ -n "${CID_SOCKET:-}" ] && export CID_SOCKET   # on the head node: the local socket, no token file

# Progress goes to the log (Slurm throws this program's output away); no log directory: no log.
if ! { : >>"$CID_LOG"; } 2>/dev/null; then CID_LOG=/dev/null; fi
echo "$(date '+%Y-%m-%dT%H:%M:%S%z') prolog job=$SLURM_JOB_ID nodes=$SLURM_JOB_NODELIST user=$SLURM_JOB_USER" \
     "constraints=${SLURM_JOB_CONSTRAINTS:-} restart=${SLURM_JOB_RESTART_COUNT:-0}" >>"$CID_LOG"
exec cidcapt --slurm --timeout "$CID_TIMEOUT" >>"$CID_LOG" 2>&1
