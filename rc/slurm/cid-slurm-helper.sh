#!/bin/sh
# Helper of Slurm's node_features/helpers plugin (helpers.conf: Helper=/usr/local/lib/cid/cid-slurm-helper.sh),
# and RebootProgram (slurm.conf: RebootProgram="/usr/local/lib/cid/cid-slurm-helper.sh --reboot").
# slurmd runs it on the node, as root, with slurmd's environment:
#   no argument        print the node's active image feature (cid_other when there is none or cidd cannot say);
#                      Slurm 22.05 also runs RebootProgram this way after a feature change: it never reboots
#   FEATURE            have cid switch the node to FEATURE's image (cid reboots the node); Slurm 23.02 and later
#                      also run RebootProgram this way after a feature change: the same request, nothing new
#   --reboot           what `scontrol reboot` runs: reboot unless cid is switching the node
# Settings come from /etc/default/cid-slurm (fixed path: slurmd cannot pass CID_SLURM_DEFAULTS); CID_TIMEOUT there
# is the switch's deadline (keep Slurm's ResumeTimeout above it). The node name is the short host name unless
# CID_NODE is set. slurmd reads the active features from stdout and throws stderr away: messages go to CID_LOG.

CID_SLURM_DEFAULTS=${CID_SLURM_DEFAULTS:-/etc/default/cid-slurm}
# shellcheck disable=SC1090
[ -r "$CID_SLURM_DEFAULTS" ] && . "$CID_SLURM_DEFAULTS"

: "${CID_SERVER:=127.0.0.1:38008}"
: "${CID_ROLE:=scheduler}"
: "${CID_TOKEN_FILE:=/etc/cid/scheduler.token}"
: "${CID_CA_FILE:=/etc/cid/ca.pem}"                 # the cluster CA (cidd's <state>/tls/ca.pem), public
: "${CID_TIMEOUT:=1800}"                          # seconds a switch may take; keep ResumeTimeout above it
: "${CID_BIN:=/usr/local/bin}"                    # where cid-slurm-helper is installed (a virtualenv: its bin)
: "${CID_LOG:=/var/log/cid/slurm-helper.log}"
PATH="$CID_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export CID_SERVER CID_ROLE CID_TOKEN_FILE CID_CA_FILE CID_TIMEOUT PATH
[ -n "${CID_NODE:-}" ] && export CID_NODE
[ -n "${CID_REBOOT_COMMAND:-}" ] && export CID_REBOOT_COMMAND
if ! { : >>"$CID_LOG"; } 2>/dev/null; then CID_LOG=/dev/null; fi
exec cid-slurm-helper "$@" 2>>"$CID_LOG"
