"""``conveyor worker`` with a chosen Celery pool, for a Conveyor whose CLI has no ``--pool``.

    python conveyor_worker.py POOL CONCURRENCY

peers.py starts this only when ``--conveyor-pool`` is given and ``conveyor worker
--help`` does not list ``--pool``. It does what the CLI's ``worker`` command does
(settings from the environment, logging, the app in ``CONVEYOR_APP``) and hands the
pool to ``conveyor.worker.run_worker``, which already takes one.
"""

from __future__ import annotations

import sys

from conveyor.app import load_app
from conveyor.logs import configure_logging
from conveyor.settings import load_settings
from conveyor.worker import run_worker


def main(argv: list[str]) -> None:
    pool, concurrency = argv[0], int(argv[1])
    settings = load_settings()
    configure_logging(settings)
    app = load_app(settings.app)
    app.configure(settings)
    run_worker(app, concurrency=concurrency, pool=pool)


if __name__ == "__main__":
    main(sys.argv[1:])
