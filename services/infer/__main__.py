"""Runs the inference service: `python -m services.infer --port 50052 --datastore 127.0.0.1:50051 --device auto`."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common.bundles import BundleModels
from services.common.errors import LabelgridError
from services.common.logging import configure_logging
from services.common.settings import parse_settings
from services.infer.api.servicer import create_service
from services.infer.app import build_inference
from services.infer.settings import InferSettings

log = logging.getLogger("labelgrid.infer")


async def serve(settings: InferSettings) -> None:
    inference, datastore = await asyncio.to_thread(build_inference, settings)
    # MONAI Bundles: the --bundle paths are stored in the datastore, then every stored bundle is served.
    bundles = BundleModels(
        inference.app,
        datastore,
        settings.work_dir.resolve(),
        settings.bundle,
        settings.bundle_check_seconds,
        with_trainers=False,
    )
    try:
        await bundles.start()
    except LabelgridError as error:
        raise SystemExit(f"inference: {error.message}") from None
    service = create_service(settings, inference, datastore)
    await service.start()
    service.announce_ready(
        f"inference (app {settings.app}, devices {', '.join(inference.scheduler.devices)}, datastore {settings.datastore})"
    )
    try:
        await service.run_until_signal()
    finally:
        await bundles.stop()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(
        InferSettings, list(sys.argv[1:] if argv is None else argv), description=__doc__.splitlines()[0]
    )
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
