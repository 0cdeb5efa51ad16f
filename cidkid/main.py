"""The ``cidkid`` command: run the node agent (a simulated fleet is ``cid-simfleet``, in cidsim).

The only module of cidkid that touches the global reactor. Exit codes: 0 stopped by SIGTERM/SIGINT, 2 bad
command line (address, hostlist, option value), 4 token file missing or unsafe, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from twisted.application.service import IService

from cidcommon.client_config import ClientConfigError, agent_server
from cidcommon.errors import TokenFileError
from cidcommon.logs import configure
from cidcommon.paths import default_state_dir, node_token, read_token, token_path
from cidcommon.tlsfiles import CA_ENV, CERT_ENV, KEY_ENV, TlsError, default_pki_paths, plain_requested
from cidcommon.twisted_logs import route_twisted_logs
from cidcommon.wire import DEFAULT_PORT
from cidkid import AGENT_VERSION
from cidkid.platform import DEFAULT_INSTALL_TARGET, DEFAULT_KEXEC_DIR, DEFAULT_MARKER, REBOOT_COMMANDS, LinuxPlatform
from cidkid.protocol import REQUEST_TIMEOUT, InstallerCredentials
from cidkid.service import AgentService, client_endpoint, parse_server, tls_options

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 4

DESCRIPTION = """\
cid node agent. Connects to cidd, says which node this is and which image it runs, sends heartbeats with
health figures, and carries out cidd's commands (reboot into the installer or the disk, install an image).
It reconnects forever, with jittered exponential backoff (1 s growing to 60 s).
"""

EPILOG = f"""\
environment:
  CID_SERVER       default for --server (else, on the head node, the client.server or listen address of
                   cidd's configuration file, else 127.0.0.1:{DEFAULT_PORT}; installers take cid.server=)
  CID_CONFIG       that configuration file (default /etc/cid/cidd.yaml when it exists)
  CID_TOKEN_FILE   default for --token-file (else <state dir>/secrets/agent.token)
  CID_STATE_DIR    the state directory (default /var/lib/cid for root, else ~/.local/state/cid)
  CID_CA_FILE      default for --ca (else <state dir>/tls/ca.pem)
  CID_CERT_FILE, CID_KEY_FILE   defaults for --cert and --key (else <state dir>/secrets/agent.pem and
                   agent.key when both exist)
  CID_PLAIN_TCP=1  same as --plain-tcp

The session with cidd runs over TLS: cidd's certificate must be signed by the CA file and name the --server
host. The installer has the CA certificate baked into its initramfs (at <state dir>/tls/ca.pem, or --ca).

exit status:
  0  stopped by SIGTERM or SIGINT     2  bad command line (address, hostlist, value)
  4  token, key or CA file missing or unsafe      1  unexpected error (see the log)
"""


def seconds_arg(text: str) -> float:
    """Return ``text`` as a number of seconds >= 0 (argparse type)."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give a number of seconds >= 0")
    return value


def add_session_options(p: argparse.ArgumentParser) -> None:
    """Add the options of the session with cidd (address, token, TLS, logs), shared with ``cid-simfleet``."""
    p.add_argument("--version", action="version", version=AGENT_VERSION)
    p.add_argument("--server", metavar="HOST:PORT", default=None,
                   help="address of cidd's agent port (default: $CID_SERVER, else the client.server or listen "
                   "address of $CID_CONFIG or /etc/cid/cidd.yaml when it exists, else "
                   f"127.0.0.1:{DEFAULT_PORT}); the one address the agent connects to")
    p.add_argument("--token-file", metavar="PATH", type=Path,
                   help="file holding this node's own agent token, mode 0600, made on the head node with "
                        "'cidd agent-token NODE' (default: $CID_TOKEN_FILE, else <state dir>/secrets/agent.token, "
                        "which is cidd's agent master secret: an agent on the head node derives its node's token "
                        "from it)")
    p.add_argument("--log-format", choices=("json", "console"), default="json",
                   help="one JSON object per line (default), or readable console lines")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="least important events to log (default: %(default)s)")
    p.add_argument("--request-timeout", metavar="S", type=seconds_arg, default=REQUEST_TIMEOUT,
                   help="seconds cidd has to answer a request before the session is dropped and re-opened "
                        "(default: %(default)g; the hello gets at least 120 s: a busy cidd is not a dead one)")
    p.add_argument("--ca", metavar="FILE", type=Path,
                   help="the cluster CA certificate that signed cidd's (default: $CID_CA_FILE, else "
                   "<state dir>/tls/ca.pem)")
    p.add_argument("--cert", metavar="FILE", type=Path,
                   help="this node's agent certificate for mutual TLS, from 'cidd issue-cert NODE' (default: "
                   "$CID_CERT_FILE, else <state dir>/secrets/agent.pem if it exists)")
    p.add_argument("--key", metavar="FILE", type=Path,
                   help="the private key of --cert, mode 0600 (default: $CID_KEY_FILE, else "
                   "<state dir>/secrets/agent.key)")
    p.add_argument("--plain-tcp", action="store_true",
                   help="no TLS: only for a cidd configured with 'tls: {mode: plain}' (default: $CID_PLAIN_TCP)")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of cidkid."""
    p = argparse.ArgumentParser(prog="cidkid", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_session_options(p)
    real = p.add_argument_group("the agent")
    real.add_argument("--node", metavar="NAME", help="node name as cidd's inventory knows it "
                      "(default: the short host name)")
    real.add_argument("--mode", choices=("system", "installer"), default="system",
                      help="'system' on an installed image (default), 'installer' inside the installer initramfs")
    real.add_argument("--marker", metavar="PATH", type=Path, default=DEFAULT_MARKER,
                      help="file whose first line names the installed image (default: %(default)s)")
    real.add_argument("--target", metavar="DIR", type=Path,
                      help="system mode: the file system whose free space heartbeats report (default: /); "
                           "installer mode: the directory images are installed into, emptied first "
                           f"(default: {DEFAULT_INSTALL_TARGET})")
    real.add_argument("--boot-token", metavar="TOKEN",
                      help="installer mode: the single-use boot token cidd put on the kernel command line, used "
                      "instead of an agent token file (the installer holds no long-lived secret)")
    real.add_argument("--kernel-cmdline", metavar="PATH", type=Path,
                      help="read cid.server=, cid.node= and cid.token= from this file (the installer uses "
                      "/proc/cmdline); explicit options win")
    real.add_argument("--reboot-command", metavar="CMD",
                      help="shell command that reboots this node, run with $CID_BOOT=installer|disk and "
                      "$CID_METHOD set (default: 'systemctl reboot', else /sbin/reboot); it is also the last step "
                      "of the grub_reboot and efi_bootnext methods")
    real.add_argument("--grub-boot-dir", metavar="DIR", type=Path,
                      help="method grub_reboot: the /boot directory whose grub/grubenv grub-reboot sets "
                      "(default: grub's own, /boot; in the installer, the installed disk's /boot)")
    real.add_argument("--kexec-dir", metavar="DIR", type=Path, default=DEFAULT_KEXEC_DIR,
                      help="method kexec: where the kernel and initramfs cidd names are downloaded "
                      "(default: %(default)s)")
    real.add_argument("--install-device", metavar="DEV", type=Path,
                      help="installer mode: format DEV (mkfs.ext4 -F -q -L cid-root) and mount it on --target "
                           "before each install, unmount it after (default: install into --target as it is)")
    return p


def apply_kernel_cmdline(args: argparse.Namespace) -> None:
    """Fill --server, --node and --boot-token from the cid.* words of --kernel-cmdline (explicit options win).

    Raises ValueError when the file cannot be read.
    """
    if args.kernel_cmdline is None:
        return
    try:
        words = args.kernel_cmdline.read_text(encoding="utf-8").split()
    except OSError as exc:
        raise ValueError(f"cannot read {args.kernel_cmdline}: {exc.strerror}") from None
    found = dict(word.split("=", 1) for word in words if word.startswith("cid.") and "=" in word)
    if found.get("cid.server") and not args.server_given:
        args.server = found["cid.server"]
    args.node = args.node or found.get("cid.node")
    args.boot_token = args.boot_token or found.get("cid.token")


def default_server(args: argparse.Namespace) -> str:
    """Fill ``args.server`` when neither --server nor cid.server= named it (cidcommon.client_config.agent_server:
    $CID_SERVER, else the configuration file's client.server or listen address, else 127.0.0.1:38008); return
    where it came from. Raises ClientConfigError for an unusable configuration file."""
    if args.server:
        return "--server" if getattr(args, "server_given", True) else "cid.server="
    args.server, origin = agent_server(os.environ)
    return origin


def _token_file(args: argparse.Namespace) -> Path:
    """Return the token file named on the command line, in the environment, or the default one."""
    if args.token_file:
        return Path(args.token_file)
    if os.environ.get("CID_TOKEN_FILE"):
        return Path(os.environ["CID_TOKEN_FILE"])
    return token_path(default_state_dir(), "agent")


def _holds_master(args: argparse.Namespace) -> bool:
    """Return whether the token file is cidd's agent master secret (the default file, on the head node).

    A file named with --token-file or $CID_TOKEN_FILE holds the node's own token (``cidd agent-token NODE``).
    """
    return not args.token_file and not os.environ.get("CID_TOKEN_FILE")


def target_of(args: argparse.Namespace) -> Path:
    """Return --target, else the default of the mode: /mnt/cid-target for the installer, / for a system."""
    if args.target is not None:
        return Path(args.target)
    return DEFAULT_INSTALL_TARGET if args.mode == "installer" else Path("/")


def check_install_options(args: argparse.Namespace) -> None:
    """Raise ValueError for installer options that make no sense together."""
    if args.install_device is not None and args.mode != "installer":
        raise ValueError("--install-device only applies with --mode installer")
    if args.install_device is not None and target_of(args).resolve() == Path("/"):
        raise ValueError("--target must not be / with --install-device")


def tls_files(args: argparse.Namespace, *, own_cert: bool = True) -> tuple[Path, Path | None, Path | None] | None:
    """Return (CA file, agent certificate, agent key) for TLS, or None for --plain-tcp.

    With ``own_cert`` the node's own certificate in the state directory is used when none is named.

    Raises TlsError when the CA file does not exist (a missing CA is never a reason to fall back to clear text).
    """
    if args.plain_tcp or plain_requested(os.environ):
        return None
    defaults = default_pki_paths(default_state_dir())
    ca = args.ca or (Path(os.environ[CA_ENV]) if os.environ.get(CA_ENV) else defaults.ca)
    if not ca.is_file():
        raise TlsError(f"CA file {ca} does not exist; copy the cluster CA certificate from the head node "
                       "(cidd's <state dir>/tls/ca.pem) here, or pass --ca FILE or set CID_CA_FILE "
                       "(--plain-tcp only for a cidd configured with tls mode plain)")
    cert = args.cert or (Path(os.environ[CERT_ENV]) if os.environ.get(CERT_ENV) else None)
    key = args.key or (Path(os.environ[KEY_ENV]) if os.environ.get(KEY_ENV) else None)
    own, own_key = defaults.key.parent / "agent.pem", defaults.key.parent / "agent.key"
    if cert is None and own_cert and own.is_file() and own_key.is_file():
        cert, key = own, own_key
    return ca, cert, key


def build_service(args: argparse.Namespace, reactor: Any, token: str | InstallerCredentials) -> IService:
    """Return the AgentService of this node, connecting to --server.

    Raises ValueError (bad address), TlsError and TokenFileError (TLS files).
    """
    host, port = parse_server(args.server)
    files = tls_files(args)
    tls = None if files is None else tls_options(host, *files)
    reboot = (("/bin/sh", "-c", args.reboot_command),) if args.reboot_command else REBOOT_COMMANDS
    platform = LinuxPlatform(reactor, node=args.node, mode=args.mode, marker=args.marker, target=target_of(args),
                             install_device=args.install_device, reboot_commands=reboot,
                             grub_boot_dir=args.grub_boot_dir, kexec_dir=args.kexec_dir)
    if isinstance(token, str) and _holds_master(args):
        token = node_token(token, platform.node)  # cidd's own master secret: this is the head node
    return AgentService(platform, client_endpoint(reactor, host, port, tls=tls), token, reactor, node=platform.node,
                        server=f"{host}:{port}", request_timeout=args.request_timeout)


def serve(reactor: Any, service: IService, *, on_start: Callable[[], None] | None = None, **fields: Any) -> int:
    """Run ``service`` under the global ``reactor`` until SIGTERM/SIGINT; return the exit status (0, or 1 when
    starting failed). ``on_start`` runs right after the service started; ``fields`` go into the start event.
    """
    route_twisted_logs()
    failed: list[BaseException] = []

    def start() -> None:
        try:
            service.startService()
            if on_start is not None:
                on_start()
        except Exception as exc:
            log.exception("agent.start_failed")
            failed.append(exc)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: service.stopService() if service.running else None)
    log.info("agent.starting", version=AGENT_VERSION, **fields)
    reactor.run()
    log.info("agent.stopped")
    return EXIT_ERROR if failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run cidkid with ``argv`` (default: sys.argv[1:]); return the exit status."""
    args = build_parser().parse_args(argv)
    configure(json=args.log_format == "json", level=args.log_level)
    try:
        args.server_given = any(a == "--server" or a.startswith("--server=") for a in (argv or sys.argv[1:]))
        apply_kernel_cmdline(args)
        server_from = default_server(args)
        if args.boot_token and args.mode != "installer":
            raise ValueError("--boot-token is for the installer (--mode installer); installed systems use "
                             "the agent token file")
        parse_server(args.server)
        check_install_options(args)
    except (ValueError, ClientConfigError) as exc:
        print(f"cidkid: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        token: str | InstallerCredentials = (InstallerCredentials(args.boot_token) if args.boot_token
                                             else read_token(_token_file(args)))
    except TokenFileError as exc:
        print(f"cidkid: {exc.message}", file=sys.stderr)
        return EXIT_AUTH
    from twisted.internet import reactor

    try:
        service = build_service(args, reactor, token)
    except (TlsError, TokenFileError) as exc:
        print(f"cidkid: {exc.message}", file=sys.stderr)
        return EXIT_AUTH
    return serve(reactor, service, server=args.server, server_from=server_from)


if __name__ == "__main__":
    sys.exit(main())
