"""Optuna storage: the one place where what the user gave Optuna (``--storage``, a run's ``study.db``)
becomes a message, and where a damaged study is rebuilt from the trials its run recorded.

Every call that touches a study's storage runs inside :func:`storage_errors`, which turns what
SQLAlchemy, SQLite and Optuna raise for a bad URL, an unknown database kind, a missing driver, an
unreachable server, a file that is not a database (or a damaged one), a read-only database or a
schema of another Optuna version into one :class:`~vesuvius_lab.core.errors.UserError` naming the
storage and what to do. A database that cannot be read at all raises :class:`DamagedStorage`, so
that ``vlab tune`` can rebuild its own ``study.db`` from ``trials.json``.

Each study is tagged with the identity of its tuning (the ``[tune]`` space and the source runs):
a study of the same name made by another tuning (another space, other runs, or not by vesuvius-lab
at all) is refused instead of being continued with trials that mean something else.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator

import optuna

from vesuvius_lab.core.errors import UserError, brief

#: The user attribute of a study that says which tuning it belongs to.
IDENTITY_ATTR = "vlab.identity"
#: How a recorded trial's state is written in trials.json, and read back.
STATES = {state.name: state for state in optuna.trial.TrialState}


class DamagedStorage(UserError):
    """A study database that exists but cannot be read (not a database, truncated, corrupt)."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: the study database is damaged ({reason}). Give another --storage, or restore "
                         "the file from a copy.")


def shown(url: str) -> str:
    """A storage URL as messages and records show it: an SQLite file as its path, a server URL without its
    password (``postgresql://user:secret@host/db`` -> ``postgresql://user@host/db``)."""
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///").split("?")[0] or url
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^/:@]*):[^/@]*@", r"\1@", url, flags=re.IGNORECASE)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _root_text(exc: BaseException) -> str:
    """The database's own words: the message of the innermost driver error, first line only."""
    for cause in _causes(exc):
        if isinstance(cause, sqlite3.Error) or type(cause).__module__.split(".")[0] in ("psycopg", "psycopg2",
                                                                                       "pymysql", "MySQLdb"):
            return brief(cause)
    text = str(getattr(exc, "orig", None) or exc)
    return brief(re.sub(r"^\(\S+\)\s*", "", text))


def _message(where: str, exc: BaseException) -> UserError:
    """The one message for an exception that the storage ``where`` raised."""
    import sqlalchemy.exc as sa

    text = _root_text(exc)
    lower = text.lower()
    if isinstance(exc, sa.NoSuchModuleError):  # before ArgumentError, its base class
        kind = where.split(":", 1)[0]
        return UserError(f"--storage {where}: unknown kind of database {kind!r}. Optuna stores studies in "
                         "sqlite, postgresql, mysql, oracle or mssql databases, e.g. sqlite:///path/study.db.")
    if isinstance(exc, sa.ArgumentError):
        return UserError(f"--storage {where}: not a database URL ({text}). Give an SQLAlchemy URL such as "
                         "sqlite:///path/study.db or postgresql://user@host/database.")
    if isinstance(exc, ImportError):
        module = next((c.name for c in _causes(exc) if isinstance(c, ModuleNotFoundError) and c.name), None)
        return UserError(f"--storage {where}: the Python driver for this database is not installed"
                         f"{f' (no module {module!r})' if module else ''}. Install it into this environment "
                         "(e.g. pip install psycopg for postgresql, pymysql for mysql+pymysql://), or use "
                         "sqlite:///path/study.db.")
    if "not a database" in lower or "malformed" in lower or "file is encrypted" in lower:
        return DamagedStorage(where, text)
    if "readonly" in lower or "read-only" in lower:
        return UserError(f"{where}: the study database is read-only ({text}); every trial must be written to it. "
                         "Make it writable, or give another --storage.")
    if "unable to open database file" in lower:
        return UserError(f"{where}: the study database cannot be opened or created ({text}): its folder is "
                         "missing or cannot be written. Create the folder, or give another --storage.")
    if isinstance(exc, RuntimeError) and "table schema" in lower:
        return UserError(f"{where}: the study database was written by another version of Optuna "
                         f"(this is {optuna.__version__}): {text} Upgrade it with `optuna storage upgrade "
                         "--storage URL`, or give another --storage.")
    if isinstance(exc, (sa.OperationalError, sa.InterfaceError)) or "connect" in lower:
        return UserError(f"{where}: the database server cannot be reached ({text}). Check that it runs and the "
                         "URL's host, port, user and database, or give another --storage.")
    return UserError(f"{where}: the study database failed ({type(exc).__name__}: {text}). Check it, or give "
                     "another --storage.")


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn what a storage raises for the user's database into one message (see the module's docstring)."""
    import sqlalchemy.exc as sa

    try:
        yield
    except (sa.SQLAlchemyError, sqlite3.Error, optuna.exceptions.StorageInternalError) as exc:
        raise _message(shown(url), exc) from None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage at ``url``, its tables created when new; raises a :class:`UserError` (see
    :func:`storage_errors`), :class:`DamagedStorage` for a database that cannot be read."""
    with storage_errors(url):
        try:
            return optuna.storages.RDBStorage(url)
        except ImportError as exc:  # a dialect whose driver is not installed
            raise _message(shown(url), exc) from None
        except RuntimeError as exc:  # a schema of another Optuna version
            if "table schema" not in str(exc):
                raise
            raise _message(shown(url), exc) from None


# --------------------------------------------------------------------------- which tuning a study belongs to


def _belongs(name: str, study: str) -> bool:
    """Whether ``study`` is the main search ``name`` or one of its cross-validation searches."""
    return study == name or re.fullmatch(re.escape(name) + r"-cv\d+", study) is not None


def prepare_studies(url: str, name: str, identity: dict, space_keys: list[str]) -> None:
    """Open the storage at ``url``, refuse what another tuning made there (:func:`check_studies`), and create
    the main study: every problem of the storage, a read-only one included, shows before the search."""
    storage = open_storage(url)
    check_studies(storage, url, name, identity, space_keys)
    with storage_errors(url):
        tag(optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True), identity)


def check_studies(storage: optuna.storages.BaseStorage, url: str, name: str, identity: dict,
                  space_keys: list[str]) -> None:
    """Refuse studies of ``name`` (and its cross-validation studies) in ``storage`` that another tuning made."""
    with storage_errors(url):
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            if not _belongs(name, summary.study_name):
                continue
            problem = _foreign(storage, summary, identity, space_keys)
            if problem:
                raise UserError(f"{shown(url)}: it holds a study named {summary.study_name!r} that {problem}, so its "
                                "trials mean something else than this tuning's. Give another --storage, or delete "
                                f"that study (`optuna delete-study --storage URL --study-name {summary.study_name}`).")


def _foreign(storage, summary, identity: dict, space_keys: list[str]) -> str | None:
    if summary.direction != optuna.study.StudyDirection.MAXIMIZE:
        return "minimizes its objective (vesuvius-lab maximizes the score)"
    recorded = summary.user_attrs.get(IDENTITY_ATTR)
    if recorded is not None:
        if recorded == identity:
            return None
        what = [key for key in ("space", "sources") if recorded.get(key) != identity.get(key)]
        return f"was made by a tuning with another {' and other '.join(what) or 'setting'}"
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    allowed = set(space_keys) | {f"{key}#index" for key in space_keys}
    unknown = sorted({param for trial in study.trials for param in trial.params} - allowed)
    if unknown:
        return f"was not made by vesuvius-lab for this [tune] space (its trials have {', '.join(unknown[:5])})"
    return None


def tag(study: optuna.Study, identity: dict) -> None:
    """Mark a study as this tuning's (once)."""
    if IDENTITY_ATTR not in study.user_attrs:
        study.set_user_attr(IDENTITY_ATTR, identity)


# --------------------------------------------------------------------------- the recorded trials


def journal(study: optuna.Study) -> list[dict[str, Any]]:
    """Every finished trial of a study as trials.json records it, with what it takes to rebuild it."""
    from optuna.distributions import distribution_to_json

    return [{"number": t.number, "state": t.state.name, "score": t.value, "params": t.params,
             "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
             "user_attrs": t.user_attrs} for t in study.trials if t.state.is_finished()]


def rebuild(url: str, studies: dict[str, list[dict]], identity: dict) -> int:
    """New studies in the (new, empty) storage ``url`` holding the recorded trials; the count restored."""
    from optuna.distributions import json_to_distribution

    storage = open_storage(url)
    count = 0
    with storage_errors(url):
        for name, records in studies.items():
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
            tag(study, identity)
            trials = []
            for record in sorted(records, key=lambda r: r.get("number", 0)):
                state = STATES.get(record.get("state"))
                if state is None or not state.is_finished() or "distributions" not in record:
                    continue
                trials.append(optuna.trial.create_trial(
                    state=state, value=record.get("score") if state == optuna.trial.TrialState.COMPLETE else None,
                    params=record.get("params", {}), user_attrs=record.get("user_attrs", {}),
                    distributions={k: json_to_distribution(d) for k, d in record["distributions"].items()}))
            study.add_trials(trials)
            count += len(trials)
    return count
