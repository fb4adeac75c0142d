"""Runs the training service: `python -m services.train --port 50053 --datastore 127.0.0.1:50051 --device auto`."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common.bundles import BundleModels
from services.common.errors import LabelgridError
from services.common.logging import configure_logging
from services.common.settings import parse_settings
from services.train.api.servicer import create_service
from services.train.app import build_training
from services.train.settings import TrainSettings

log = logging.getLogger("labelgrid.train")


async def serve(settings: TrainSettings) -> None:
    built = await asyncio.to_thread(build_training, settings)
    # MONAI Bundles with a train config become trainers (the --bundle paths are stored in the datastore first).
    bundles = BundleModels(
        built.app, built.datastore, settings.work_dir.resolve(), settings.bundle, settings.bundle_check_seconds
    )
    try:
        await bundles.start()
    except LabelgridError as error:
        raise SystemExit(f"training: {error.message}") from None
    lost = await built.training.start()
    if lost:
        log.warning("jobs lost by the previous process marked failed", extra={"count": len(lost)})
    service = create_service(settings, built.training, built.datastore, built.cache)
    await service.start()
    service.announce_ready(
        f"training (app {settings.app}, devices {', '.join(built.training.pool.names)}, datastore {settings.datastore})"
    )
    try:
        await service.run_until_signal()
    finally:
        await bundles.stop()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(
        TrainSettings, list(sys.argv[1:] if argv is None else argv), description=__doc__.splitlines()[0]
    )
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
