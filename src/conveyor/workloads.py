"""The optional workloads settings switch on, added to the user's app where it is loaded.

Each workload registers its tasks through the app's public face, so this module
sits above ``conveyor.app`` and the entry points (CLI, API factory, ``up``) load
apps through :func:`load` rather than ``app.load_app`` alone.
"""

from __future__ import annotations

from conveyor import maintenance
from conveyor.ai import workload as ai
from conveyor.app import Conveyor, load_app
from conveyor.errors import ConfigurationError
from conveyor.notifications import mailing
from conveyor.notifications import workload as notifications
from conveyor.settings import Settings


def load(settings: Settings) -> Conveyor:
    """The app ``CONVEYOR_APP`` names, with the workloads the settings switch on."""
    app = load_app(settings.app)
    install(app, settings)
    return app


def install(app: Conveyor, settings: Settings) -> None:
    """Register the switched-on workloads' tasks into ``app`` (idempotent)."""
    if settings.notifications:
        notifications.install(app, settings)
        mailing.install(app, settings)
    if settings.documents:
        try:  # imported only when switched on: it needs the conveyor[documents] extra
            from conveyor.documents.tasks import install as install_documents
        except ImportError as exc:
            raise ConfigurationError(
                f"CONVEYOR_DOCUMENTS needs the documents extra ({exc}):"
                " pip install 'conveyor[documents]'"
            ) from None
        install_documents(app)
    if settings.maintenance:
        maintenance.install(app, settings)
    if settings.ai_tasks:
        ai.install(app, settings)
