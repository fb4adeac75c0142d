"""Runs the datastore service: `python -m services.datastore [--flags]`.

`python -m services.datastore reindex [--flags]` rebuilds the index from the blobs
(to adopt a MONAI Label studies folder or an existing bucket) and exits.

`python -m services.datastore fsck [--repair] [--checksums] [--min-age SECONDS] [--flags]`
checks the index against the blobs, spools, multipart uploads and leases (see
services/datastore/fsck.py); exit code 0 only when clean (after the repair, with --repair).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.common.logging import configure_logging
from services.common.memory import limit_malloc_arenas
from services.common.settings import parse_settings
from services.datastore.adapters.blobs import STALE_SPOOL_SECONDS
from services.datastore.api.servicer import create_service
from services.datastore.app import build_datastore
from services.datastore.settings import DatastoreSettings

log = logging.getLogger("labelgrid.datastore")


async def serve(settings: DatastoreSettings) -> None:
    datastore = await asyncio.to_thread(build_datastore, settings)
    service = create_service(settings, datastore)
    await service.start()
    log.info(
        "datastore ready",
        extra={
            "backend": settings.backend,
            "location": datastore.location,
            "port": service.port,
        },
    )
    service.announce_ready(f"datastore ({settings.backend}: {datastore.location})")
    await service.run_until_signal()


def reindex(settings: DatastoreSettings) -> None:
    datastore = build_datastore(settings)
    try:
        counts = datastore.reindex()
    finally:
        datastore.close()
    print(
        f"reindexed {datastore.location}: {counts.images} images, {counts.labels} labels, "
        f"{counts.model_versions} model versions, {counts.removed} stale entries removed, "
        f"{len(counts.skipped)} files skipped"
    )
    # Each file left out, with why: an operator adopting a folder must see what did not come in.
    for reason in counts.skipped:
        print(f"  skipped {reason}")


def fsck(settings: DatastoreSettings, options: argparse.Namespace) -> int:
    from services.datastore import fsck as checker

    if settings.backend == "dicomweb":
        print(
            "fsck: the dicomweb backend is not checked (its cache is rebuilt from the PACS)",
            file=sys.stderr,
        )
        return 2
    datastore = build_datastore(settings)
    try:
        run = checker.repair if options.repair else checker.check
        report = run(datastore, checksums=options.checksums, min_age_seconds=options.min_age)
    finally:
        datastore.close()
    for line in report.lines():
        print(line)
    return 0 if report.clean else 1


def _fsck_options(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m services.datastore fsck", add_help=False)
    parser.add_argument(
        "--repair",
        action="store_true",
        help="fix what is safe to fix, then check again",
    )
    parser.add_argument("--checksums", action="store_true", help="hash every blob against the index")
    parser.add_argument(
        "--min-age",
        type=float,
        default=STALE_SPOOL_SECONDS,
        help="spools and multipart uploads younger than this many seconds may be live uploads: skipped",
    )
    return parser.parse_known_args(args)


def main(argv: list[str] | None = None) -> None:
    limit_malloc_arenas()
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in ("reindex", "fsck") else "serve"
    options = None
    if command == "fsck":
        options, args = _fsck_options(args)
    settings = parse_settings(DatastoreSettings, args, description=__doc__.splitlines()[0])
    configure_logging(settings.log_level, settings.log_format)
    if command == "reindex":
        reindex(settings)
    elif options is not None:
        sys.exit(fsck(settings, options))
    else:
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
