"""The store under the runs: one reading of the tracking URI, the lock, WAL, the disk reserve."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

import heatmapbench
from heatmapbench.app import store
from heatmapbench.app.store import (RESERVE_BYTES, prepare_sqlite_store, space_reserve, sqlite_path, store_exists,
                                    store_lock)


def test_the_tracking_uri_is_read_in_one_place(tmp_path):
    assert sqlite_path(f"sqlite:///{tmp_path}/mlruns/mlflow.db") == tmp_path / "mlruns" / "mlflow.db"
    assert sqlite_path("http://127.0.0.1:5000") is None and sqlite_path("postgresql://db/mlflow") is None
    assert not store_exists(f"sqlite:///{tmp_path}/mlflow.db")  # not created yet
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert store_exists(f"sqlite:///{tmp_path}/mlflow.db") and store_exists("http://127.0.0.1:5000")
    package = Path(heatmapbench.__file__).resolve().parent
    slicing = [str(p.relative_to(package)) for p in package.rglob("*.py")
               if 'len("sqlite:///")' in p.read_text() and p.name != "store.py"]
    assert not slicing, f"modules that parse the tracking URI themselves (use app.store.sqlite_path): {slicing}"


def test_a_new_store_is_made_in_wal_mode_under_the_lock(tmp_path):
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    with store_lock(uri):
        prepare_sqlite_store(uri)
    assert (tmp_path / "new" / "mlflow.db.lock").is_file()
    with contextlib.closing(sqlite3.connect(tmp_path / "new" / "mlflow.db")) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with store_lock("http://127.0.0.1:5000"):  # a server needs no lock: nothing is written
        prepare_sqlite_store("http://127.0.0.1:5000")


def test_the_disk_reserve_is_kept_beside_the_store_and_given_back(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with space_reserve(uri) as free:
        (reserve,) = tmp_path.glob(".mlflow.db.reserve-*")
        assert reserve.stat().st_size == RESERVE_BYTES
        free()
        assert not reserve.exists()
    with space_reserve(uri):
        pass
    assert not list(tmp_path.glob(".mlflow.db.reserve-*"))  # gone when the run closes
    with space_reserve("http://127.0.0.1:5000") as free:
        free()


def test_names_that_moved_out_of_tracking_still_import_with_a_warning():
    with pytest.warns(DeprecationWarning, match="heatmapbench.app.tracking.make_logger is deprecated .* "
                                                "use heatmapbench.app.store.make_logger instead"):
        from heatmapbench.app.tracking import make_logger
    assert make_logger is store.make_logger
    from heatmapbench.app import tracking

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        tracking.no_such_name  # noqa: B018
    from heatmapbench.app import provenance

    with pytest.warns(DeprecationWarning, match="use heatmapbench.app.provenance.run_tags instead"):
        assert tracking.run_tags is provenance.run_tags
