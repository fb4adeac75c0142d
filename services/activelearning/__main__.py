"""Runs the active learning service: `python -m services.activelearning --port 50054 --datastore 127.0.0.1:50051`."""

from __future__ import annotations

import asyncio
import sys

from services.activelearning.service import start_service
from services.activelearning.settings import ActiveLearningSettings
from services.common.logging import configure_logging
from services.common.settings import parse_settings


async def serve(settings: ActiveLearningSettings) -> None:
    server, service = await start_service(settings)
    server.announce_ready(
        f"activelearning (app {settings.app}, strategies {', '.join(service.app.strategies) or 'none'}, "
        f"scoring on {service.scorer.device}, datastore {settings.datastore})"
    )
    await server.run_until_signal()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(
        ActiveLearningSettings, list(sys.argv[1:] if argv is None else argv), description=__doc__.splitlines()[0]
    )
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
