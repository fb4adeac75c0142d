"""Runs the datastore service: `python -m services.datastore [--flags]`.

`python -m services.datastore reindex [--flags]` rebuilds the index from the blobs
(to adopt a MONAI Label studies folder or an existing bucket) and exits.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common.logging import configure_logging
from services.common.settings import parse_settings
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
        extra={"backend": settings.backend, "location": datastore.location, "port": service.port},
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
        f"{counts.model_versions} model versions, {counts.removed} stale entries removed"
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] == "reindex" else "serve"
    settings = parse_settings(DatastoreSettings, args, description=__doc__.splitlines()[0])
    configure_logging(settings.log_level, settings.log_format)
    if command == "reindex":
        reindex(settings)
    else:
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
