import csv

import pytest
from hearth.controller.coldstarts import (
    HUAWEI_COLUMNS,
    ColdStartError,
    ColdStartMetrics,
    append_jsonl,
    from_k8s_phases,
    from_local_phases,
    pod_id,
    read_huawei_csv,
    read_jsonl,
    to_huawei_csv,
)
from prometheus_client import CollectorRegistry

T0 = 1_800_000_000.0  # an epoch second
PHASES = {
    "requested": T0,
    "spawned": T0 + 0.010,
    "process_started": T0 + 0.150,
    "code_imported": T0 + 0.300,
    "deps_ready": T0 + 0.700,
    "ready": T0 + 0.750,
}


def test_local_phase_mapping_and_identity():
    r = from_local_phases(PHASES, function="fn", pod=pod_id(500, 256, 7), request_id="r1")
    assert r.schedulingCost == pytest.approx(0.010)
    assert r.podAllocationCost == pytest.approx(0.140)
    assert r.deployCodeCost == pytest.approx(0.150)
    assert r.deployDependencyCost == pytest.approx(0.450)
    assert r.totalCost_cold_start == pytest.approx(sum(r.costs().values()))
    assert r.totalCost_cold_start == pytest.approx(0.750)
    assert r.podID == "pool00-500-256-0000000007"
    assert r.day == 0 and 0 <= r.time < 86400


def test_k8s_phase_mapping():
    r = from_k8s_phases(
        created=T0,
        scheduled=T0 + 1,
        containers_started=T0 + 3,
        runtime={"code_imported": T0 + 3.5, "ready": T0 + 4},
        function="fn",
        pod="pool01-500-256-0000000001",
        origin=T0 - 86400 - 10,
    )
    assert (
        r.schedulingCost,
        r.podAllocationCost,
        r.deployCodeCost,
        r.deployDependencyCost,
    ) == pytest.approx((1, 2, 0.5, 0.5))
    assert r.day == 1 and r.time == pytest.approx(86410)


def test_bad_phases_name_the_phase():
    with pytest.raises(ColdStartError, match="missing 'code_imported'"):
        from_local_phases(
            {k: v for k, v in PHASES.items() if k != "code_imported"}, function="f", pod="p"
        )
    bad = dict(PHASES, spawned=T0 - 1)
    with pytest.raises(ColdStartError, match="'spawned' .* is before 'requested'"):
        from_local_phases(bad, function="f", pod="p")


def test_csv_has_exact_huawei_columns_and_round_trips(tmp_path):
    recs = [
        from_local_phases(
            PHASES, function="fn", pod=pod_id(500, 256, n), request_id=f"r{n}", from_pool=n % 2 == 0
        )
        for n in range(3)
    ]
    path = tmp_path / "cs.csv"
    assert to_huawei_csv(recs, path) == 3
    with open(path) as fh:
        header = next(csv.reader(fh))
    assert header == [*HUAWEI_COLUMNS, "fromPool"]
    back = read_huawei_csv(path)
    assert [r.fromPool for r in back] == [True, False, True]
    assert back[1].deployDependencyCost == pytest.approx(0.45)
    j = tmp_path / "cs.jsonl"
    for r in recs:
        append_jsonl(r, j)
    assert read_jsonl(j) == recs


def test_reads_public_trace_rows(tmp_path):
    p = tmp_path / "pub.csv"
    p.write_text(
        "day,time,clusterName,funcName,userID,requestID,totalCost_cold_start,podAllocationCost,deployCodeCost,deployDependencyCost,schedulingCost,podID,poolName,funcID\n"
        "0,0.323,1,979,1111,e8cc,0.289404,0.000243,0.213,0.000,0.076161,pool22-300-128-0001562370,pool22-300-128,979---1111---pool22-300-128\n"
    )
    (r,) = read_huawei_csv(p)
    assert (
        r.funcName == "979" and r.fromPool is False and r.schedulingCost == pytest.approx(0.076161)
    )


def test_prometheus_histograms_per_phase():
    reg = CollectorRegistry()
    m = ColdStartMetrics(reg)
    m.observe(from_local_phases(PHASES, function="fn", pod="p", from_pool=True))
    v = reg.get_sample_value(
        "hearth_cold_start_phase_seconds_count",
        {"function": "fn", "phase": "deployDependencyCost", "from_pool": "true"},
    )
    assert v == 1
    s = reg.get_sample_value(
        "hearth_cold_start_phase_seconds_sum",
        {"function": "fn", "phase": "totalCost_cold_start", "from_pool": "true"},
    )
    assert s == pytest.approx(0.75)
    assert (
        reg.get_sample_value("hearth_cold_starts_total", {"function": "fn", "from_pool": "true"})
        == 1
    )
