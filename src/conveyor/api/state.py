"""What the routes share: the Conveyor app and the API process's own resources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.events import EventHub
    from conveyor.keys import KeyVerifier
    from conveyor.metrics import Metrics
    from conveyor.settings import Settings
    from conveyor.store import Store


@dataclass(frozen=True)
class ApiState:
    conveyor: Conveyor
    hub: EventHub
    metrics: Metrics
    keys: KeyVerifier

    @property
    def store(self) -> Store:
        return self.conveyor.store

    @property
    def settings(self) -> Settings:
        return self.conveyor.settings


def api_state(connection: HTTPConnection) -> ApiState:
    """The state :func:`conveyor.api.app.create_app` attached to this app."""
    state: ApiState = connection.app.state.conveyor
    return state
