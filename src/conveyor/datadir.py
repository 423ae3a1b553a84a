"""The data directory and the SQLite database: private, and where the user said.

Both hold job payloads, results and API key hashes, so the directory is kept
0700 and the database file (with its WAL and shared-memory files) 0600: created
so, and tightened when found looser. A SQLite URL whose directory does not
exist is refused rather than created: ``sqlite:///x/y.db`` is relative to the
working directory, and making ``./x`` for someone who meant ``/x`` would put
the data somewhere they do not look.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

from conveyor.errors import ConfigurationError
from conveyor.settings import Settings

DIR_MODE = 0o700
FILE_MODE = 0o600
#: SQLite makes these beside the database, with the database file's mode.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

log = structlog.get_logger("conveyor.datadir")


def prepare(settings: Settings) -> None:
    """Before a process opens its store: check the database path, make both private."""
    database = settings.sqlite_path
    if settings.database_url and database is not None and not database.parent.is_dir():
        raise ConfigurationError(
            f"CONVEYOR_DATABASE_URL: the directory {database.parent} does not exist"
            " (sqlite:///name is relative to the working directory, sqlite:////path absolute)"
        )
    data_dir = settings.data_dir.expanduser().absolute()
    if data_dir.exists() or _keeps_data(settings):
        data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        _tighten(data_dir, DIR_MODE)
    if database is not None:
        try:
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigurationError(
                f"CONVEYOR_DATABASE_URL: cannot create {database}: {exc.strerror}"
            ) from None
        for path in (database, *(Path(f"{database}{end}") for end in SQLITE_COMPANIONS)):
            _tighten(path, FILE_MODE)


def _keeps_data(settings: Settings) -> bool:
    """Whether anything of this configuration lives in the data directory."""
    return settings.database_url is None or settings.embedded or settings.admin_key is None


def _tighten(path: Path, mode: int) -> None:
    """Take group and other permissions away from ``path``, saying so; warn if we cannot."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if not current & 0o077:
        return
    try:
        path.chmod(current & mode)
    except OSError as exc:
        log.warning("data.readable_by_others", path=str(path), mode=oct(current), error=str(exc))
        return
    log.warning(
        "data.permissions_tightened", path=str(path), was=oct(current), now=oct(current & mode)
    )
