"""A table's rows kept as compact Arrow text (halp.data.TableRows): the same samples, in the same order, as a
whole-table pandas conversion gives, whichever chunk a value falls in; views (slices, take) keep table positions."""

from __future__ import annotations

import pickle
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import halp.data as data
from halp.data import TableError, TableRows, open_table

datasets = pytest.importorskip("datasets")

ROWS = 23  # with TEXT_CHUNK_ROWS = 5: five chunks, the last one short


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(data, "TEXT_CHUNK_ROWS", 5)


def _mixed_table() -> pa.Table:
    """Columns whose pandas dtype depends on the whole column: integers with one null (in the last chunk only),
    integers without nulls, floats with NaN, booleans with a null, lists, unicode text, and nulls in the answer."""
    return pa.table({
        "question_id": [f"q{i}" for i in range(ROWS)],
        "image_id": [f"img{i}.png" for i in range(ROWS)],
        "question": [f"Is there a dög №{i}?" for i in range(ROWS)],
        "answer": [None if i == 3 else ("yes" if i % 2 else "no") for i in range(ROWS)],
        "count_with_null": pa.array([None if i == ROWS - 1 else i for i in range(ROWS)], type=pa.int64()),
        "count": pa.array(list(range(ROWS)), type=pa.int32()),
        "score": [float("nan") if i == 7 else i / 4 for i in range(ROWS)],
        "flag": [None if i == 12 else bool(i % 3) for i in range(ROWS)],
        "choices": [["a", "b"] if i % 2 else [] for i in range(ROWS)],
    })


def _expected(frame: pd.DataFrame) -> list[tuple]:
    """The rows as the whole-table frame gives them (an independent conversion of the same table)."""
    meta_columns = ["count_with_null", "count", "score", "flag", "choices"]
    text = data._as_text
    return [
        (text(row["question_id"]), text(row["image_id"]), text(row["question"]), text(row["answer"]),
         {column: text(row[column]) for column in meta_columns})
        for row in frame.to_dict("records")
    ]


def _as_tuples(samples) -> list[tuple]:
    return [(s.question_id, s.image_id, s.question, s.ground_truth, s.meta) for s in samples]


@pytest.mark.parametrize("statistics", [True, False])
def test_parquet_rows_match_the_whole_table_frame(tmp_path, statistics):
    path = tmp_path / "mixed.parquet"
    # Without statistics no row group records its null count: the integer columns are read alone to find nulls.
    pq.write_table(_mixed_table(), path, row_group_size=4, write_statistics=statistics)
    rows = open_table(path).samples
    assert isinstance(rows, TableRows) and len(rows) == ROWS
    assert _as_tuples(rows) == _expected(pd.read_parquet(path))
    assert rows[0].meta["count_with_null"] == "0.0"  # float64 in the whole frame: the null is in a later chunk
    assert rows[0].meta["count"] == "0" and rows[ROWS - 1].meta["count_with_null"] == ""


def test_csv_and_saved_dataset_rows_match_the_whole_table_frame(tmp_path):
    frame = _mixed_table().to_pandas()
    csv = tmp_path / "mixed.csv"
    frame.to_csv(csv, index=False)
    whole = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert _as_tuples(open_table(csv).samples) == _expected(whole)

    folder = tmp_path / "saved"
    dataset = datasets.Dataset(_mixed_table())
    dataset.save_to_disk(str(folder))
    assert _as_tuples(open_table(folder).samples) == _expected(dataset.to_pandas())
    # A selection (an indices mapping over the Arrow file) reads the selected rows, in the selection's order.
    picked = datasets.load_from_disk(str(folder)).select([20, 2, 11])
    picked_rows = data._open_dataset(picked, "picked", {}).samples
    assert [s.question_id for s in picked_rows] == ["q20", "q2", "q11"]
    assert _as_tuples(picked_rows) == _expected(picked.to_pandas())


def test_pandas_index_columns_are_not_metadata(tmp_path):
    frame = _mixed_table().to_pandas().set_index("score")
    path = tmp_path / "indexed.parquet"
    frame.to_parquet(path)  # the index is stored as a column that pandas reads back as the index
    rows = open_table(path).samples
    assert "score" not in rows[0].meta and _as_tuples(rows) == [
        (qid, image, question, truth, {k: v for k, v in meta.items() if k != "score"})
        for qid, image, question, truth, meta in _expected(pd.read_parquet(path).reset_index())
    ]


def test_views_keep_table_positions(tmp_path):
    path = tmp_path / "vqa.parquet"
    dataset = datasets.Dataset.from_dict(
        {"question_id": [f"q{i}" for i in range(ROWS)], "question": ["Q?"] * ROWS, "image": [b"x"] * ROWS}
    )
    dataset.to_parquet(str(path))
    rows = open_table(path).samples
    assert [s.image_row for s in rows] == list(range(ROWS))
    tail = rows[10:]
    assert len(tail) == ROWS - 10 and tail[0].question_id == "q10" and tail[0].image_row == 10
    picked = tail.take([12, 0, 5])
    assert [(s.question_id, s.image_row) for s in picked] == [("q22", 22), ("q10", 10), ("q15", 15)]
    assert rows[-1].question_id == f"q{ROWS - 1}" and [s.question_id for s in rows[3:9:2]] == ["q3", "q5", "q7"]
    assert [s.image_id for s in rows[:3]] == ["row-0", "row-1", "row-2"]  # binary cells have no stored path
    with pytest.raises(IndexError):
        rows[ROWS]
    again = pickle.loads(pickle.dumps(picked))
    assert _as_tuples(again) == _as_tuples(picked) and [s.image_row for s in again] == [22, 10, 15]
    assert rows.question_ids() == [f"q{i}" for i in range(ROWS)]


def test_errors_name_rows_across_chunks(tmp_path):
    ids = [f"q{i}" for i in range(ROWS)]
    ids[2], ids[17] = " ", ""
    path = tmp_path / "empty.csv"
    pd.DataFrame({"question_id": ids, "image_id": "a.png", "question": "Q?"}).to_csv(path, index=False)
    with pytest.raises(TableError, match=r"empty question_id in row\(s\) 4, 19$"):
        open_table(path)
    ids = [f"q{i % 9}" for i in range(ROWS)]
    pd.DataFrame({"question_id": ids, "image_id": "a.png", "question": "Q?"}).to_csv(path, index=False)
    with pytest.raises(TableError, match=r"duplicate question_id values \(9\), e.g. q0, q1, q2, q3, q4, q5, q6"):
        open_table(path)


def test_rows_hold_compact_text():
    """100,000 rows: the Arrow text plus 8 bytes of position a row, not one Python object per row."""
    count = 100_000
    frame = pd.DataFrame({
        "question_id": [f"q{i}" for i in range(count)],
        "image_id": [f"{i}.jpg" for i in range(count)],
        "question": [f"Is there a dog in image {i}?" for i in range(count)],
        "category": [f"c{i % 7}" for i in range(count)],
    })
    rows = data.samples_from_frame(frame, "big")
    text_bytes = sum(len(value.encode()) for column in frame.columns for value in frame[column])
    # Each string costs its bytes plus a 4-byte offset; the answer column is empty; positions 8 bytes a row.
    assert rows.nbytes <= text_bytes + count * (5 * 4 + 8) + 4096
    assert rows[count - 1].question == f"Is there a dog in image {count - 1}?"


def test_text_that_is_not_unicode_is_carried():
    """A lone surrogate (a JSON escape can make one) in an object column: the row opens, and extraction refuses it
    with a reason later (halp.extract.unstorable_text)."""
    ids = [f"q{i}" for i in range(12)]
    ids[7] = "q\ud800"
    frame = pd.DataFrame({"question_id": ids, "image_id": "a.png", "question": [f"Q{i}?" for i in range(12)],
                          "note": ["ok"] * 11 + ["x\x00y"]}, dtype=object)
    rows = data.samples_from_frame(frame.copy(), "odd")
    assert rows[7].question_id == "q\ud800" and rows[11].meta == {"note": "x\x00y"}
    assert [s.question_id for s in rows] == ids and rows.question_ids() == ids
    frame.loc[3, "question_id"] = "q\ud800"
    with pytest.raises(TableError, match=re.escape("duplicate question_id values (1), e.g. q\ud800")):
        data.samples_from_frame(frame, "odd")
