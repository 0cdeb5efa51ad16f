"""cidcapt's exit codes: the contract scripts and schedulers rely on, and the one mapping from an outcome or
an error to a code (``exit_code``)."""

from __future__ import annotations

from cidcapt.capture import Outcome
from cidcommon.errors import BAD_REQUEST_CODES, REFUSED_CODES, CidError
from cidcommon.wire import DEFAULT_PORT

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_REQUEST = 2
EXIT_DEADLINE = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_CANCELLED = 6  # the capture was cancelled (cidcapt --cancel): not a failure of the nodes, nothing to drain
EXIT_BUG = 70  # sysexits' EX_SOFTWARE: an unexpected exception in cidcapt itself; retrying will not help
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""\
exit codes:
  0  all nodes are ready in the image
  1  some nodes failed (each is listed with its reason)
  2  bad request: usage, unknown image, bad hostlist, unknown node (nothing was started)
  3  deadline passed (the nodes still pending are listed with their step)
  4  cidd unreachable, authentication failed, or the head node's user database did not answer (retry)
  5  refused: no right to do this (role, rights rules, a private image), or a conflict with another job
  6  the capture was cancelled (cidcapt --cancel; the line before the summary says by whom); the nodes
     are not broken: each says what became of it
  70  a bug in cidcapt (an unexpected exception; its traceback is on stderr): report it, retrying will not help
  130  interrupted (Ctrl-C)
With --slurm the same codes; on 1 and 3 the failed and pending nodes are first drained (scontrol, reason
"cid: ..."), so that Slurm requeues the job onto other nodes; on 6 nothing is drained. --release exits 0
except for bad usage (2). --cancel exits 0 once the capture is cancelled (again: 0), 2 for a job with no
running capture, 5 when the role or user may not cancel it.

A capture that cidd's rights rules refuse (the user may not put this image on one of the nodes, or the image
is private to another user) exits 5 with the rule set that failed; nothing was started.

how cidcapt finds cidd (one address, never a second one; the first that applies):
  1. --socket PATH or --server HOST:PORT
  2. $CID_SOCKET, else $CID_SERVER
  3. the configuration file $CID_CONFIG, else /etc/cid/cidd.yaml when it exists: its client.server; else,
     with a token file (--token-file, $CID_TOKEN_FILE) or socket: false, its listen address; else cidd's
     local socket (socket.path, else <state_dir>/cidd.sock)
  4. no file: with a token file 127.0.0.1:{DEFAULT_PORT}, else the socket <state_dir>/cidd.sock
When that address does not answer, cidcapt exits 4 naming it and where it came from.

environment: CID_CONFIG, CID_SOCKET (the local socket, no token), CID_SERVER (TCP; port {DEFAULT_PORT} when
none is given), CID_ROLE (default the file's client.role, else admin; on the socket the role comes from your
uid, a lower one may be asked), CID_TOKEN_FILE (default client.token_file, else
<state_dir>/secrets/<role>.token), CID_STATE_DIR (default the file's state_dir, else /var/lib/cid for root,
else ~/.local/state/cid), SLURM_JOB_USER or USER (the --user default), CID_CA_FILE (default client.ca, else
tls.ca, else <state_dir>/tls/ca.pem), CID_CERT_FILE and CID_KEY_FILE, CID_PLAIN_TCP=1 (no TLS; also
tls: {{mode: plain}} in the file).
The TCP session with cidd runs over TLS: cidd's certificate must be signed by the CA file and name --server's
host; a server the CA does not vouch for is refused with exit code 4.
"""


def exit_code(result: Outcome | BaseException) -> int:
    """Return the exit code of the contract for how a run ended (an Outcome, or the error that ended it).

    An Outcome maps by its state: ok 0, failed 1, cancelled 6, deadline (or anything else) 3.

    A CidError maps by its code (bad request 2, refused 5, everything else about reaching or trusting cidd 4);
    KeyboardInterrupt is 130; any other exception is a bug in cidcapt (70), never "unreachable, retry".
    """
    if isinstance(result, Outcome):
        return {"ok": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}.get(result.state, EXIT_DEADLINE)
    if isinstance(result, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if not isinstance(result, CidError):
        return EXIT_BUG
    if result.code in BAD_REQUEST_CODES:
        return EXIT_BAD_REQUEST
    if result.code in REFUSED_CODES:
        return EXIT_REFUSED
    return EXIT_UNREACHABLE  # auth, internal, superseded, unreachable, connection lost, a bad peer
