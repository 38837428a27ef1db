import pytest
from hearth.controller.autoscaler import Autoscaler, AutoscalerConfig

CFG = AutoscalerConfig(target_concurrency=1.0, max_instances=100, scale_to_zero_grace_s=30)


def run(a, fn, series, ready_fn, cfg=CFG, t0=0.0, dt=2.0):
    out = []
    t = t0
    for c in series:
        a.observe(fn, t, c)
        r = ready_fn(out)
        out.append(a.decide(fn, t, r, r, cfg))
        t += dt
    return out


@pytest.mark.parametrize("ready", [2, 4])
def test_stable_mode_tracks_average(ready):
    """Load alternating 2 and 4 (mean 3) with a fixed number of ready instances, fewer or more
    than needed but never in panic: the decision is the mean over the stable window, 3."""
    a = Autoscaler()
    ds = run(a, "f", [2.0, 4.0] * 20, lambda out: ready)
    assert not any(d.panic for d in ds)
    assert ds[-1].desired == 3 and ds[-1].stable_avg == pytest.approx(3.0)
    assert ds[-1].start == max(0, 3 - ready)


def test_panic_scales_up_within_panic_window():
    a = Autoscaler()
    # 60 s of steady load 2 on 2 instances, then a burst to 10
    pre = run(a, "f", [2.0] * 30, lambda out: 2)
    assert pre[-1].desired == 2 and not pre[-1].panic
    t = 60.0
    decisions = []
    for k in range(3):  # 3 ticks × 2 s = 6 s: the panic window
        a.observe("f", t + 2 * k, 10.0)
        decisions.append(a.decide("f", t + 2 * k, 2, 2, CFG))
    assert any(d.panic for d in decisions)
    assert max(d.desired for d in decisions) >= 10 - 1  # the panic estimate, not the stable mean
    stable_only = (2.0 * 27 + 10.0 * 3) / 30
    assert decisions[-1].desired > stable_only


def test_no_scale_down_during_panic():
    a = Autoscaler()
    run(a, "f", [2.0] * 30, lambda out: 2)
    a.observe("f", 60, 10.0)
    d1 = a.decide("f", 60, 2, 2, CFG)
    assert d1.panic
    a.observe("f", 62, 0.0)
    a.observe("f", 64, 0.0)
    a.observe("f", 66, 0.0)
    a.observe("f", 68, 0.0)
    d2 = a.decide("f", 68, d1.desired, d1.desired, CFG)
    assert d2.panic and d2.desired >= d1.desired


def test_scale_to_zero_only_after_grace():
    a = Autoscaler()
    a.observe("f", 0, 1.0)
    a.decide("f", 0, 1, 1, CFG)
    # traffic stops; stable window drains after 60 s; grace is 30 s after the last non-zero sample
    for t in range(2, 200, 2):
        a.observe("f", t, 0.0)
    assert a.decide("f", 20, 1, 1, CFG).desired == 1
    assert a.decide("f", 200, 1, 1, CFG).desired == 0


def test_activator_buffers_from_zero_and_starts():
    a = Autoscaler()
    a.observe("f", 0, 5.0)
    d = a.decide("f", 0, 0, 0, CFG, queued=5)
    assert d.buffer == 5 and d.start >= 1 and d.desired >= 1


def test_bounds_min_max():
    a = Autoscaler()
    cfg = AutoscalerConfig(target_concurrency=1.0, min_instances=2, max_instances=4)
    a.observe("f", 0, 50.0)
    assert a.decide("f", 0, 1, 1, cfg).desired == 4
    b = Autoscaler()
    b.observe("f", 0, 0.0)
    assert b.decide("f", 0, 0, 0, cfg).desired == 2


def test_released_to_zero_is_not_restarted_by_the_average_alone():
    """The keep-alive policy released the last instance (no work in flight): the stable
    average still remembers the load, but only new work starts an instance again."""
    a = Autoscaler()
    for t in range(0, 20, 2):
        a.observe("f", t, 1.0)
    a.observe("f", 20, 0.0)
    d = a.decide("f", 20, 0, 0, CFG)
    assert d.stable_avg > 0 and d.floor == 0 and d.start == 0
    a.observe("f", 22, 1.0)  # an invocation waits
    assert a.decide("f", 22, 0, 0, CFG, queued=1).start >= 1
