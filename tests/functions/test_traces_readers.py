"""Trace readers on the real sample rows and on malformed files (errors name file/line/column)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import polars as pl
import pytest
from hearth.functions.replay import readers as R
from hearth.functions.replay.readers import TraceFormatError
from trace_data import DATA

H25 = DATA / "huawei_2025_notebook_excerpts"
H23 = DATA / "huawei_2023_notebook_excerpts"


def test_real_coldstart_rows_parse_and_identity_holds():
    df = R.read_coldstarts(H25 / "cold_starts_all_regions_head_R1day0_tail_R5day30.csv")
    assert df.height == 10
    assert df["region"].to_list() == ["R1"] * 5 + ["R5"] * 5
    assert df["time"][0] == pytest.approx(0.104)
    assert df["totalCost_cold_start"][4] == pytest.approx(5.309122)
    # derived exactly as the notebook does: poolName = first 3 dash parts of podID
    assert df["poolName"][4] == "pool26-1000-1024"
    assert df["funcID"][0] == "332---439---pool22-300-128"
    rep = R.check_identity(df)
    assert rep.rows == 10 and rep.violations == 0 and rep.max_abs_error < 1e-9


def test_real_r2_rows_keep_notebook_columns_and_identity():
    df = R.read_coldstarts(H25 / "cold_starts_R2_head_day0_tail_day30.csv")
    assert df.height == 10
    # The notebook's own funcID column equals our derivation
    derived = R.with_pool_and_funcid(df.drop(["poolName", "funcID"]), ["x"])
    assert derived["funcID"].to_list() == df["funcID"].to_list()
    assert R.check_identity(df).violations == 0


def test_identity_violation_is_reported(tmp_path):
    p = tmp_path / "cs.csv"
    p.write_text(
        "day,time,clusterName,funcName,userID,requestID,totalCost_cold_start,podAllocationCost,"
        "deployCodeCost,deployDependencyCost,schedulingCost,podID\n"
        "0,1.0,1,7,8,r1,1.0,0.1,0.2,0.3,0.4,pool22-300-128-01\n"
        "0,2.0,1,7,8,r2,2.0,0.1,0.2,0.3,0.4,pool22-300-128-02\n"
    )
    rep = R.check_identity(R.read_coldstarts(p))
    assert rep.violations == 1
    assert rep.examples[0]["row"] == 1
    assert rep.max_abs_error == pytest.approx(1.0)


def test_real_runtime_trigger_table():
    df = R.read_runtime(H25 / "R2_funcID_runtime_triggerType_head_tail.csv")
    assert df.height == 10
    row = df.row(5, named=True)
    assert (
        row["funcName"] == "565"
        and row["userID"] == "486"
        and row["poolName"] == "pool30-1800-2048"
    )
    assert row["pool_cpu"] == 1800 and row["pool_memory_mb"] == 2048
    assert row["runtime"] == "http" and row["trigger"] == "APIG" and row["invocation"] == "sync"
    assert df["trigger"][0] == "workflow"
    assert df["invocation"][-1] == "unknown"


def test_multi_trigger_strings():
    got = R.parse_triggers(["APIG-S TIMER-A", "unknown-unknown", "OBS-A", "  DMS-A  SMN-S "])
    assert got[0] == [("APIG", "sync"), ("TIMER", "async")]
    assert got[1] == [("unknown", "unknown")]
    assert got[2] == [("OBS", "async")]
    assert got[3] == [("DMS", "async"), ("SMN", "sync")]


def test_real_per_request_rows():
    df = R.read_requests(H25 / "per_request_R5_day30_head_tail.csv")
    assert df.height == 10
    assert df["time_frontend"].null_count() == 5  # tail rows lack frontend fields
    assert df["runtimeCost"][0] == pytest.approx(0.000829)
    assert df["funcID"][0] == "411---301---pool22-300-128"


def test_real_wide_tables():
    wide = R.read_wide(H23 / "private_requests_minute_wide_head_tail.csv")
    assert wide.columns[:2] == ["day", "time"] and wide.height == 10
    long = R.read_wide(H23 / "private_requests_minute_wide_head_tail.csv", long=True)
    f194 = long.filter(pl.col("function") == "194").sort("time")
    assert f194["value"][0] == 2891
    q = R.read_wide(H25 / "quantiles_R2_requests_per_minute_wide_head_tail.csv", long=True)
    assert q.filter(pl.col("function") == "1263---582---pool23-400-256")["value"].sum() == 13
    sec = R.inspect(H23 / "private_requests_second_selected_funcs_head_tail.csv")
    assert sec.kind == "huawei-wide"


def test_real_azure_2021_rows():
    df = R.read_azure2021(DATA / "azure_2021_doc_sample")
    assert df.height == 6
    assert df["duration"][2] == pytest.approx(42.356)
    assert df["start_timestamp"][2] == pytest.approx(5241.567729949951 - 42.356)


def test_directory_classification_skips_derived_tables():
    skipped: list[str] = []
    kinds = R.classify([DATA], skipped=skipped)
    assert {
        "huawei-coldstart",
        "huawei-request",
        "huawei-runtime",
        "huawei-wide",
        "azure2021",
    } <= set(kinds)
    assert any("R2_function_summary" in s for s in skipped)


HEADER = (
    "day,time,clusterName,funcName,userID,requestID,totalCost_cold_start,podAllocationCost,"
    "deployCodeCost,deployDependencyCost,schedulingCost,podID"
)
ROW = "0,{t},1,7,8,r{t},1.0,0.1,0.2,0.3,0.4,pool22-300-128-01"


def _write(p: Path, rows: list[str], header: str = HEADER) -> Path:
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def test_wrong_header_names_file_line_and_column(tmp_path):
    p = _write(
        tmp_path / "bad.csv", [ROW.format(t=1)], HEADER.replace("totalCost_cold_start", "totalCost")
    )
    with pytest.raises(TraceFormatError) as ei:
        R.read_coldstarts(p)
    e = ei.value
    assert e.path == str(p) and e.line == 1 and e.column == "7"
    assert "'totalCost_cold_start'" in str(e) and "'totalCost'" in str(e)


def test_unrecognised_header(tmp_path):
    p = _write(tmp_path / "x.csv", ["1,2"], "foo,bar")
    with pytest.raises(TraceFormatError, match=r"x\.csv: line 1.*unrecognised header"):
        R.inspect(p)


def test_bad_number_names_line_and_column(tmp_path):
    rows = [ROW.format(t=i) for i in range(1, 200)]
    rows[149] = rows[149].replace(",0.3,", ",0.3x,")  # data row 150 -> file line 151
    p = _write(tmp_path / "day01.csv", rows)
    with pytest.raises(TraceFormatError) as ei:
        R.read_coldstarts(p)
    e = ei.value
    assert e.line == 151 and e.column == "10 'deployDependencyCost'"
    assert "'0.3x'" in str(e) and str(p) in str(e)


def test_leaving_out_requestid_keeps_every_check(tmp_path):
    good = _write(tmp_path / "ok.csv", [ROW.format(t=i) for i in range(1, 20)])
    full = R.read_coldstarts(good)
    lean = R.read_coldstarts(good, exclude=("requestID",))
    assert "requestID" in full.columns and "requestID" not in lean.columns
    assert lean.equals(full.drop("requestID"))
    rows = [ROW.format(t=i) for i in range(1, 200)]
    rows[149] = rows[149].replace(",0.3,", ",0.3x,")
    bad = _write(tmp_path / "day01.csv", rows)
    with pytest.raises(TraceFormatError) as ei:
        R.read_coldstarts(bad, exclude=("requestID",))
    assert ei.value.line == 151 and ei.value.column == "10 'deployDependencyCost'"
    ragged = _write(tmp_path / "r.csv", [ROW.format(t=1), "0,2,1,7"])
    with pytest.raises(TraceFormatError, match="fields"):
        R.read_coldstarts(ragged, exclude=("requestID",))
    with pytest.raises(ValueError, match="only text columns"):
        R.read_coldstarts(good, exclude=("day",))


def test_bad_number_found_in_the_right_daily_file(tmp_path):
    d = tmp_path / "R3"
    d.mkdir()
    _write(d / "day00.csv", [ROW.format(t=i) for i in range(5)])
    _write(
        d / "day01.csv",
        [ROW.format(t=i) for i in range(5)] + ["x,9,1,7,8,r,1,0,0,0,1,pool22-300-128-01"],
    )
    with pytest.raises(TraceFormatError) as ei:
        R.read_coldstarts(d)
    assert ei.value.path.endswith("day01.csv") and ei.value.line == 7 and "'day'" in ei.value.column


def test_ragged_row(tmp_path):
    p = _write(tmp_path / "r.csv", [ROW.format(t=1), "0,2,1,7"])
    with pytest.raises(TraceFormatError) as ei:
        R.read_coldstarts(p)
    assert ei.value.line == 3 and "fields" in str(ei.value)


def test_truncated_gzip_names_line_and_column(tmp_path):
    src = _write(tmp_path / "full.csv", [ROW.format(t=i) for i in range(20000)])
    gz = tmp_path / "day.csv.gz"
    with open(src, "rb") as fi, gzip.open(gz, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    ok = R.read_coldstarts(gz)
    assert ok.height == 20000
    data = gz.read_bytes()
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError) as ei:
        R.read_coldstarts(cut)
    e = ei.value
    assert e.path == str(cut) and "truncated gzip" in str(e)
    assert e.line is not None and 2 < e.line < 20002
    assert e.column is not None


def test_daily_directory_parquet_and_region_from_dir(tmp_path):
    for region in ("R1", "R2"):
        d = tmp_path / "cold_start" / region
        d.mkdir(parents=True)
        for day in range(3):
            _write(d / f"day{day:02d}.csv", [ROW.format(t=day * 86400 + i) for i in range(4)])
    df = R.read_coldstarts(tmp_path / "cold_start")
    assert df.height == 24
    assert sorted(df["region"].unique().to_list()) == ["R1", "R2"]
    pq = tmp_path / "one.parquet"
    df.write_parquet(pq)
    back = R.read_coldstarts(pq)
    assert back.height == 24 and back["region"].to_list() == df["region"].to_list()


def test_parquet_with_wrong_types_is_located(tmp_path):
    pq = tmp_path / "t.parquet"
    pl.DataFrame(
        {
            "app": ["a", "b"],
            "func": ["f", "g"],
            "end_timestamp": ["1.5", "oops"],
            "duration": [0.1, 0.2],
        }
    ).write_parquet(pq)
    with pytest.raises(TraceFormatError) as ei:
        R.read_azure2021(pq)
    assert ei.value.line == 2 and "'end_timestamp'" in ei.value.column


def test_explicit_kind_mismatch(tmp_path):
    p = _write(tmp_path / "a.csv", ["a,f,1.0,0.1"], "app,func,end_timestamp,duration")
    with pytest.raises(TraceFormatError, match="does not match huawei-coldstart"):
        R.read_coldstarts(p)
