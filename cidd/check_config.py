"""``cidd check-config``: check the configuration and the catalog without starting anything.

Reads cidd.yaml (with the same command-line overrides as the daemon; without --config the file every client
reads: $CID_CONFIG, else /etc/cid/cidd.yaml when it exists) and the catalog, then checks that every image's
file is in the image directory with its size. Prints every problem at once and exits 2, or prints a one-line
summary and exits 0. Opens no port and no database.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from cidcatalog.catalog import CatalogError, file_problems, load_catalog
from cidcommon.client_config import CONFIG_ENV, DEFAULT_CONFIG_DIR, ClientConfigError, config_path
from cidd.config import Config, ConfigError
from cidd.images_http import image_dir_of

EXIT_OK, EXIT_BAD = 0, 2


def check(config: Config) -> tuple[list[str], str]:
    """Return (the problems of ``config``'s catalog and image files, a summary line when there are none)."""
    problems: list[str] = []
    images = 0
    if not config.catalog.exists():
        problems.append(f"{config.catalog}: the catalog does not exist yet (cidd would start with no images; "
                        "cid-mkimg writes it)")
    else:
        try:
            catalog = load_catalog(config.catalog)
        except CatalogError as exc:
            problems += [str(problem) for problem in exc.problems]
        else:
            images = len(catalog)
            problems += [str(p) for p in file_problems(catalog, image_dir_of(config), str(config.catalog))]
    nodes = len(config.inventory())
    summary = (f"configuration OK: {nodes} nodes in {len(config.groups)} group(s), {images} image(s) in "
               f"{config.catalog}, files in {image_dir_of(config)}, state in {config.state_dir}")
    return problems, summary


def config_file(args: argparse.Namespace, env: Mapping[str, str], config_dir: Path = DEFAULT_CONFIG_DIR) -> str:
    """Set ``args.config`` to the file to check, as clients find it when --config is not given ($CID_CONFIG, else
    ``<config_dir>/cidd.yaml`` when it exists, else none: the built-in defaults); return how to name it.

    Raises ClientConfigError when $CID_CONFIG names no file.
    """
    if args.config:
        return str(args.config)
    path = config_path(env, config_dir)
    args.config = str(path) if path is not None else None
    if path is None:
        return "the built-in defaults (no configuration file)"
    return f"{path} (from ${CONFIG_ENV})" if env.get(CONFIG_ENV) else str(path)


def run(args: argparse.Namespace, build_config: Callable[[argparse.Namespace], Config],
        say: Callable[[str], None], err: Callable[[str], None], env: Mapping[str, str] | None = None,
        config_dir: Path = DEFAULT_CONFIG_DIR) -> int:
    """Check what ``args`` name (--config, else $CID_CONFIG, else ``<config_dir>/cidd.yaml`` when it exists);
    return 0 when all is well, 2 otherwise (every problem printed with ``err``)."""
    try:
        checked = config_file(args, os.environ if env is None else env, config_dir)
        config = build_config(args)
    except (ConfigError, ClientConfigError) as exc:
        err(exc.message)
        return EXIT_BAD
    problems, summary = check(config)
    for problem in problems:
        err(problem)
    if problems:
        err(f"{len(problems)} problem(s); fix them, then run 'cidd check-config' again")
        return EXIT_BAD
    say(f"{summary}; checked {checked}")
    return EXIT_OK
