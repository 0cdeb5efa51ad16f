"""``cidd agent-token NODE [--out FILE]``: print or write one node's agent token (docs/security.md).

Each node's agent token is HMAC-SHA256(agent master secret, node name) in hex (cidcommon.paths.node_token);
the master secret is ``<state>/secrets/agent.token`` and never leaves the head node. The site copies each
node's token to ``/etc/cid/agent.token`` (mode 0600) on that node.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cidcommon import hostlists
from cidcommon.errors import CidError, TokenFileError
from cidcommon.paths import ensure_token, node_token, token_path, write_private
from cidd.config import ConfigError, load_config

EPILOG = """\
With one node and no --out, the token is printed on stdout. With --out, it is written to FILE (mode 0600);
with several nodes, --out is a directory and each token goes to DIR/NODE.token. Copy each file to
/etc/cid/agent.token (mode 0600, owner root) on its node, e.g.:
  cidd agent-token 'node[001-064]' --out /root/cid-tokens
  for n in $(ls /root/cid-tokens); do scp -p /root/cid-tokens/$n ${n%.token}:/etc/cid/agent.token; done
exit codes: 0 written · 2 bad usage or configuration · 4 unsafe or unreadable master secret
"""


def main(argv: list[str]) -> int:
    """Run ``cidd agent-token``; return the exit code (see EPILOG)."""
    parser = argparse.ArgumentParser(prog="cidd agent-token", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                     description="Produce the agent token of one node (or of a hostlist).")
    parser.add_argument("nodes", metavar="NODE", help="node name, or a hostlist like 'node[001-064]'")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the token file (mode 0600) instead of "
                        "printing it; a directory for several nodes")
    parser.add_argument("--config", "-c", help="cidd's YAML configuration (for state_dir)")
    parser.add_argument("--state-dir", help="override state_dir (where secrets/agent.token lives)")
    args = parser.parse_args(argv)
    try:
        names = hostlists.expand(args.nodes)
        state_dir = Path(args.state_dir) if args.state_dir else load_config(args.config).state_dir
        master = ensure_token(token_path(state_dir, "agent"))
    except TokenFileError as exc:
        print(f"cidd agent-token: error: {exc.message}", file=sys.stderr)
        return 4
    except (ConfigError, CidError) as exc:
        print(f"cidd agent-token: error: {exc.message}", file=sys.stderr)
        return 2
    if args.out is None:
        if len(names) > 1:
            parser.error("several nodes need --out DIR (one NODE.token file each)")
        print(node_token(master, names[0]))
        return 0
    try:
        if len(names) == 1 and not args.out.is_dir():
            write_private(args.out, node_token(master, names[0]) + "\n")
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            args.out.chmod(0o700)
            for name in names:
                write_private(args.out / f"{name}.token", node_token(master, name) + "\n")
    except OSError as exc:
        print(f"cidd agent-token: error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0
