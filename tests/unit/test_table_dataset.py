"""`TableDataset` on real DuckDB and Parquet/CSV/JSON files: rows, batches, collate, pickling, errors, snapshots."""

from __future__ import annotations

import os
import pathlib
import pickle
from typing import Any

import duckdb
import pytest
import torch
from torch.utils.data import DataLoader

import nbbatch
from nbbatch._errors import InvalidDataset
from nbbatch._store import inputs
from nbbatch._table import TableDataset, _Batch, bind_inputs

pytestmark = pytest.mark.timeout(60)

QUERY = (
    "SELECT range AS id, range * 0.5 AS x, 'r' || range AS name, [range, 1] AS pair, "
    "[1.0, 2.0]::FLOAT[2] AS vec, range % 2 = 0 AS even FROM range(10) ORDER BY id"
)


def write(path: pathlib.Path, sql: str) -> pathlib.Path:
    fmt = {".parquet": "parquet", ".csv": "csv, HEADER", ".json": "json"}[path.suffix]
    duckdb.sql(f"COPY ({sql}) TO '{path}' (FORMAT {fmt})")
    return path


def test_rows_and_len() -> None:
    ds = TableDataset(QUERY)
    assert len(ds) == 10
    assert ds.columns == ["id", "x", "name", "pair", "vec", "even"]
    row = ds[3]
    assert row["id"] == 3 and row["x"] == 1.5 and row["name"] == "r3" and row["pair"] == [3, 1] and row["even"] is False
    assert torch.equal(row["vec"], torch.tensor([1.0, 2.0]))
    assert ds[-1]["id"] == 9
    with pytest.raises(IndexError):
        ds[10]


def test_getitems_is_one_batch_of_columns() -> None:
    batch = TableDataset(QUERY).__getitems__([2, 3, 4])
    assert isinstance(batch, _Batch) and len(batch) == 3
    assert batch[1]["name"] == "r3"  # still a sequence of rows for custom collate functions
    cols = batch.columns
    assert torch.equal(cols["id"], torch.tensor([2, 3, 4]))
    assert cols["x"].dtype == torch.float64  # DECIMAL becomes float64
    assert cols["name"] == ["r2", "r3", "r4"] and cols["pair"] == [[2, 1], [3, 1], [4, 1]]
    assert cols["vec"].shape == (3, 2) and cols["even"].dtype == torch.bool


def test_getitems_in_any_order_with_repeats() -> None:
    cols = TableDataset(QUERY).__getitems__([7, 2, 7, 0]).columns
    assert cols["id"].tolist() == [7, 2, 7, 0] and cols["name"] == ["r7", "r2", "r7", "r0"]


def test_default_collate_gives_columns_through_getitems(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = TableDataset(QUERY)
    calls: list[list[int]] = []
    original = TableDataset.__getitems__

    def spy(self: TableDataset, indices: list[int]) -> Any:
        calls.append(list(indices))
        return original(self, indices)

    monkeypatch.setattr(TableDataset, "__getitems__", spy)
    monkeypatch.setattr(TableDataset, "__getitem__", lambda self, i: pytest.fail("read row by row"))
    batches = list(DataLoader(ds, batch_size=4))
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    first = batches[0]
    assert isinstance(first, dict) and set(first) == set(ds.columns)
    assert torch.equal(first["id"], torch.tensor([0, 1, 2, 3])) and first["name"] == ["r0", "r1", "r2", "r3"]
    assert first["vec"].shape == (4, 2)


def test_dataloader_workers_read_on_their_own(tmp_path: pathlib.Path) -> None:
    src = write(tmp_path / "in.parquet", "SELECT range AS id, range * 2.0::DOUBLE AS y FROM range(64)")
    loader = DataLoader(TableDataset(str(src)), batch_size=8, num_workers=2, multiprocessing_context="spawn")
    ids = torch.cat([b["id"] for b in loader])
    assert ids.tolist() == list(range(64))


def test_pickles_without_a_connection() -> None:
    ds = TableDataset(QUERY)
    ds[0]  # opens the connection
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    copy = pickle.loads(blob)
    assert copy._con is None and copy[9]["name"] == "r9"


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_file_sources(tmp_path: pathlib.Path, suffix: str) -> None:
    src = write(tmp_path / f"in{suffix}", "SELECT range AS id, 'n' || range AS name FROM range(5)")
    ds = TableDataset(src)  # a PathLike works too
    assert len(ds) == 5 and ds[4] == {"id": 4, "name": "n4"}


def test_public_name() -> None:
    assert nbbatch.TableDataset is TableDataset and TableDataset.__module__ == "nbbatch"


# -- errors name the fix -----------------------------------------------------------------------------
def test_failing_query_shows_duckdbs_message() -> None:
    with pytest.raises(InvalidDataset, match=r"(?s)failed in DuckDB: .*no_such_column.*fix the SQL"):
        TableDataset("SELECT no_such_column FROM range(3)")


def test_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidDataset, match="no such file .*check the path"):
        TableDataset(str(tmp_path / "missing.parquet"))
    with pytest.raises(InvalidDataset, match="check the file path"):
        TableDataset(f"SELECT * FROM read_parquet('{tmp_path / 'missing.parquet'}')")


def test_unknown_source() -> None:
    with pytest.raises(InvalidDataset, match="neither SQL .* read_csv"):
        TableDataset("data.xlsx")
    with pytest.raises(InvalidDataset, match="DuckDB SQL or a file path"):
        TableDataset(42)  # type: ignore[arg-type]


def test_empty_result(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidDataset, match="returned no rows"):
        bind_inputs(TableDataset("SELECT * FROM range(10) t(x) WHERE x > 100"), str(tmp_path / "s.duckdb"))


def test_column_without_a_torch_dtype() -> None:
    with pytest.raises(InvalidDataset, match=r"`big` .* is HUGEINT, which cannot become a tensor.*; cast it .*::DOUBLE"):
        TableDataset("SELECT range::HUGEINT AS big FROM range(3)")


def test_nulls_in_a_numeric_column(tmp_path: pathlib.Path) -> None:
    query = "SELECT range AS id, CASE WHEN range = 2 THEN NULL ELSE range END AS x FROM range(5) ORDER BY id"
    with pytest.raises(InvalidDataset, match="`x` .* 1 NULL values.*coalesce"):
        bind_inputs(TableDataset(query), str(tmp_path / "s.duckdb"))
    with pytest.raises(InvalidDataset, match="NULL values"):
        TableDataset(query).__getitems__([1, 2])


def test_unordered_glob_warns(tmp_path: pathlib.Path) -> None:
    for i in range(2):
        write(tmp_path / f"part{i}.parquet", f"SELECT range + {i * 10} AS id FROM range(3)")
    with pytest.warns(UserWarning, match="row order is not guaranteed"):
        TableDataset(f"SELECT * FROM read_parquet('{tmp_path}/*.parquet')")
    with pytest.warns(UserWarning, match="row order is not guaranteed"):
        TableDataset(str(tmp_path / "part*.parquet"))
    with pytest.warns(UserWarning, match="row order is not guaranteed"):
        TableDataset(f"SELECT * FROM '{tmp_path}/part0.parquet' UNION ALL SELECT * FROM read_parquet('{tmp_path}/part1.parquet')"
                     f" UNION ALL SELECT * FROM read_parquet('{tmp_path}/part0.parquet')")
    ordered = TableDataset(f"SELECT * FROM read_parquet('{tmp_path}/*.parquet') ORDER BY id")  # no warning
    assert [ordered[i]["id"] for i in range(6)] == [0, 1, 2, 10, 11, 12]


# -- snapshots -----------------------------------------------------------------------------------
def test_snapshot_keeps_rows_order_and_types(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "s.duckdb")
    bound, info = bind_inputs(TableDataset(QUERY), store)
    assert info is not None and info.rows == 10 and dict(info.columns)["vec"] == "FLOAT[2]"
    assert bound._snapshot == inputs.snapshot_path(store, info.content_hash) and os.path.exists(bound._snapshot)
    plain, snapped = TableDataset(QUERY)[3], bound[3]
    assert torch.equal(plain.pop("vec"), snapped.pop("vec")) and plain == snapped
    assert bound.__getitems__([0, 1]).columns["vec"].shape == (2, 2)  # ARRAY survives Parquet
    again, same = bind_inputs(TableDataset(QUERY), store)
    assert same == info  # same rows: same hash, same file
    _, reordered = bind_inputs(TableDataset(QUERY.replace("ORDER BY id", "ORDER BY id DESC")), store)
    assert reordered is not None and reordered.content_hash != info.content_hash
    _, changed = bind_inputs(TableDataset(QUERY.replace("'r' ||", "'s' ||")), store)
    assert changed is not None and changed.content_hash != info.content_hash
    assert sorted(os.listdir(inputs.snapshot_dir(store))) == sorted(
        f"{h}.parquet" for h in {info.content_hash, reordered.content_hash, changed.content_hash}
    )


def test_bound_dataset_reads_the_snapshot_not_the_source(tmp_path: pathlib.Path) -> None:
    src = write(tmp_path / "in.parquet", "SELECT range AS id FROM range(5)")
    bound, _ = bind_inputs(TableDataset(str(src)), str(tmp_path / "s.duckdb"))
    src.unlink()
    write(src, "SELECT range + 100 AS id FROM range(5)")
    copy = pickle.loads(pickle.dumps(bound))
    assert [copy[i]["id"] for i in range(5)] == [0, 1, 2, 3, 4]


def test_snapshot_numbers_rows_in_the_querys_order(tmp_path: pathlib.Path) -> None:
    parts = tmp_path / "parts"
    duckdb.sql(f"COPY (SELECT range AS k, hash(range) AS h FROM range(300000)) TO '{parts}' "
               "(FORMAT parquet, PER_THREAD_OUTPUT true)")
    query = f"SELECT k FROM read_parquet('{parts}/*.parquet') ORDER BY h"
    bound, _ = bind_inputs(TableDataset(query), str(tmp_path / "s.duckdb"))
    expected = duckdb.sql(query).fetchnumpy()["k"]
    got = duckdb.sql(f"SELECT k FROM read_parquet('{bound._snapshot}') ORDER BY {inputs.ROW_COLUMN}").fetchnumpy()["k"]
    assert (got == expected).all()
    assert bound.__getitems__([5, 6]).columns["k"].tolist() == expected[5:7].tolist()


def test_rows_out_of_range_in_a_batch() -> None:
    ds = TableDataset(QUERY)
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([3, 100])
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([9, 10])


def test_dashboard_resumes_a_table_run() -> None:
    from nbbatch._ui.dashboard import control

    detail = {"run_id": "ab12", "name": "r", "status": "failed", "launch": {"target": "m.py:P", "table": "in.parquet"}}
    assert control.resume_blocker(detail) is None
