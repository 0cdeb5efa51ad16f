#!/bin/sh
# Helper of Slurm's node_features/helpers plugin (helpers.conf: Helper=/usr/local/lib/cid/cid-slurm-helper.sh),
# and RebootProgram (slurm.conf: RebootProgram="/usr/local/lib/cid/cid-slurm-helper.sh --reboot").
# slurmd runs it on the node, with no argument to read the active features and with a feature to activate one.
# Settings come from /etc/default/cid-slurm; the node name is the short host name unless CID_NODE is set.
# slurmd reads the active features from stdout and throws stderr away: messages go to CID_LOG.

CID_SLURM_DEFAULTS=${CID_SLURM_DEFAULTS:-/etc/default/cid-slurm}
# shellcheck disable=SC1090
[ -r "$CID_SLURM_DEFAULTS" ] && . "$CID_SLURM_DEFAULTS"

: "${CID_SERVER:=127.0.0.1:38008}"
: "${CID_ROLE:=scheduler}"
: "${CID_TOKEN_FILE:=/etc/cid/scheduler.token}"
: "${CID_CA_FILE:=/etc/cid/ca.pem}"                 # the cluster CA (cidd's <state>/tls/ca.pem), public
: "${CID_BIN:=/usr/local/bin}"
: "${CID_LOG:=/var/log/cid/slurm-helper.log}"
PATH="$CID_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export CID_SERVER CID_ROLE CID_TOKEN_FILE CID_CA_FILE PATH
[ -n "${CID_NODE:-}" ] && export CID_NODE
[ -n "${CID_REBOOT_COMMAND:-}" ] && export CID_REBOOT_COMMAND
if ! { : >>"$CID_LOG"; } 2>/dev/null; then CID_LOG=/dev/null; fi
exec cid-slurm-helper "$@" 2>>"$CID_LOG"
