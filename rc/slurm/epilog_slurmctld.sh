#!/bin/sh
# EpilogSlurmctld for cid (optional): when cidd's scheduler.release_to_default is on, start switching the job's
# nodes back to the default image (capture "<jobid>.release"), without waiting. Never fails the epilog for a cid
# problem (a warning in the log); returns within about 15 s even when cidd does not answer.
#
#   slurm.conf:  EpilogSlurmctld=/usr/local/lib/cid/epilog_slurmctld.sh
#
# Like the prolog, it runs with a clean environment: settings come from /etc/default/cid-slurm (a fixed path:
# Slurm cannot pass CID_SLURM_DEFAULTS).

CID_SLURM_DEFAULTS=${CID_SLURM_DEFAULTS:-/etc/default/cid-slurm}
# shellcheck disable=SC1090
[ -r "$CID_SLURM_DEFAULTS" ] && . "$CID_SLURM_DEFAULTS"

: "${SLURM_CONF:=/etc/slurm/slurm.conf}"
: "${CID_SERVER:=127.0.0.1:38008}"
: "${CID_ROLE:=scheduler}"
: "${CID_TOKEN_FILE:=/etc/cid/scheduler.token}"
: "${CID_CA_FILE:=/etc/cid/ca.pem}"                 # the cluster CA (cidd's <state>/tls/ca.pem), public
: "${CID_BIN:=/usr/local/bin}"
: "${CID_LOG:=/var/log/cid/slurm-epilog.log}"

PATH="$CID_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export SLURM_CONF CID_SERVER CID_ROLE CID_TOKEN_FILE CID_CA_FILE PATH
[ -n "${CID_SOCKET:-}" ] && export CID_SOCKET   # on the head node: the local socket, no token file

if ! { : >>"$CID_LOG"; } 2>/dev/null; then CID_LOG=/dev/null; fi
echo "$(date '+%Y-%m-%dT%H:%M:%S%z') epilog job=$SLURM_JOB_ID nodes=$SLURM_JOB_NODELIST" >>"$CID_LOG"
exec cidcapt --slurm --release >>"$CID_LOG" 2>&1
