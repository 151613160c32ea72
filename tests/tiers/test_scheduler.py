"""The pool's scheduling policy (coe.scheduler) alone: decisions over hand-made queue states, and a
deterministic fake-clock simulation of the H100 serving workload (6 experts, HBM for 2, Zipf(1.0),
Poisson arrivals) comparing the batching policy with the former FIFO rule.

The simulation models what the policy cannot see: a request admitted at t streams its first token at
t + PREFILL and finishes at t + GEN (continuous batching, up to ``capacity`` per expert); a switch
holds the incoming expert for SWITCH_OUT + SWITCH_IN; acquires wait FIFO for HBM space like the tier
manager's. Costs are the ones measured on the H100 (bench/results/serve_gpu_h100_2026-11-23.md:
3B experts, 0.2 s in, 0.025 s out, 128 tokens in ~2 s). Run this file as a script for the table.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from dataclasses import dataclass, field

import pytest

from coe.scheduler import (
    BatchingPolicy,
    ExpertView,
    FifoPolicy,
    SchedulerParams,
    auto_min_batch,
    auto_quantum,
)

GB = 10**9


def params(**kw) -> SchedulerParams:
    base = dict(capacity=8, budget_bytes=2 * GB, max_wait_s=3.0, quantum_s=2.0, min_batch=2, switch_s=0.2)
    base.update(kw)
    return SchedulerParams(**base)


def ev(name: str, **kw) -> ExpertView:
    kw.setdefault("size_bytes", GB)
    if kw.get("phase") in ("active", "closing"):
        kw.setdefault("resident", True)
    if kw.get("queued") and "wait_sum_s" not in kw:
        kw["wait_sum_s"] = kw["queued"] * kw.get("oldest_wait_s", 0.0) / 2
    return ExpertView(name=name, **kw)


decide = BatchingPolicy().decide


# ------------------------------------------------------------------------------------ decisions
def test_free_space_is_used_at_once_and_a_whole_queue_is_admitted():
    d = decide([ev("a", queued=1, oldest_wait_s=0.01), ev("b", queued=5, oldest_wait_s=0.5)], params())
    assert sorted(d.start) == ["a", "b"] and not d.close  # both fit: no waiting for a batch to form
    d = decide([ev("a", phase="active", queued=20, in_flight=3, session_age_s=0.1)], params(capacity=8))
    assert d.admit == {"a": 5}  # up to the engine's batch capacity, in one go


def test_no_candidate_means_no_switch_even_past_the_quantum():
    vs = [ev("a", phase="active", queued=4, in_flight=8, session_age_s=60.0, rate=9.0),
          ev("b", phase="active", queued=2, in_flight=1, session_age_s=60.0, rate=1.0)]
    d = decide(vs, params())
    assert not d.close and not d.start and d.admit == {"b": 2}


def test_quantum_expiry_preempts_only_the_least_demanded_session():
    vs = [ev("hot", phase="active", queued=3, in_flight=8, session_age_s=9.0, rate=8.0),
          ev("cool", phase="active", queued=1, in_flight=4, session_age_s=9.0, rate=1.0, drain_s=1.0),
          ev("next", queued=6, oldest_wait_s=1.0, rate=2.5)]
    d = decide(vs, params())
    assert d.close == ["cool"] and d.start == ["next"]
    assert d.admit == {"cool": 1, "hot": 0} or d.admit.get("hot", 0) == 0  # hot is full: nothing to add
    # the hot session is untouched: once it has room it keeps admitting
    vs[0] = ev("hot", phase="active", queued=3, in_flight=2, session_age_s=9.0, rate=8.0)
    d = decide(vs, params())
    assert d.admit["hot"] == 3 and "hot" not in d.close


def test_within_quantum_or_small_batch_nobody_is_preempted_until_starvation():
    active = [ev("a", phase="active", in_flight=2, session_age_s=0.5, rate=3.0),
              ev("b", phase="active", in_flight=2, session_age_s=1.5, rate=3.0)]
    d = decide([*active, ev("c", queued=9, oldest_wait_s=1.0, rate=1.0)], params())
    assert not d.close and not d.start
    assert d.wake_in_s == pytest.approx(0.5)  # b's quantum ends first: look again then
    past = [ev("a", phase="active", in_flight=2, session_age_s=5.0, rate=0.1),
            ev("b", phase="active", in_flight=2, session_age_s=5.0, rate=0.1)]
    d = decide([*past, ev("c", queued=1, oldest_wait_s=1.0)], params(min_batch=2))
    assert not d.close  # one request is not worth a switch yet...
    d = decide([*past, ev("c", queued=1, oldest_wait_s=3.0)], params(min_batch=2))
    assert len(d.close) == 1 and d.start == ["c"]  # ...until it starves


def test_starving_expert_preempts_one_session_regardless_of_quantum_oldest_first():
    vs = [ev("hot", phase="active", queued=2, in_flight=8, session_age_s=0.2, rate=8.0),
          ev("new", phase="active", in_flight=5, session_age_s=0.1, rate=1.0),
          ev("late", queued=1, oldest_wait_s=3.5),
          ev("early", queued=1, oldest_wait_s=4.0)]
    d = decide(vs, params())
    assert d.start[0] == "early" and d.reasons["early"] == "starving preempts new"
    # the second starving one takes the other slot: FIFO among starving experts keeps the bound
    assert d.start == ["early", "late"] and d.close == ["new", "hot"]
    d = decide(vs[:3], params())
    assert d.close == ["new"] and d.start == ["late"]  # only the victim stops admitting
    assert "hot" not in d.close


def test_closing_session_releases_when_drained_and_its_successor_holds_the_space():
    vs = [ev("a", phase="closing", queued=3, in_flight=0),
          ev("b", phase="loading", queued=4),
          ev("c", phase="active", in_flight=1, session_age_s=0.5),
          ev("d", queued=10, oldest_wait_s=2.9)]
    d = decide(vs, params())
    assert d.release == ["a"] and "a" not in d.admit  # a closing session admits nothing
    assert not d.start and not d.close  # b is taking a's space; c is inside its quantum
    # an active session with nothing queued and nothing in flight ends (stays resident, evictable)
    d = decide([ev("a", phase="active", session_age_s=0.3)], params())
    assert d.release == ["a"]


def test_failed_and_too_large_candidates():
    d = decide([ev("x", queued=3, oldest_wait_s=9.0, failed=True)], params())
    assert not d.start
    # a starving expert twice the size of a session needs two victims; until it can get them nobody
    # overtakes it
    vs = [ev("a", phase="active", in_flight=1, session_age_s=0.1),
          ev("b", phase="loading", queued=2),
          ev("big", size_bytes=2 * GB, queued=1, oldest_wait_s=5.0),
          ev("small", queued=8, oldest_wait_s=2.0)]
    d = decide(vs, params())
    assert not d.start and not d.close
    vs[1] = ev("b", phase="active", in_flight=1, session_age_s=0.1)
    d = decide(vs, params())
    assert d.start == ["big"] and sorted(d.close) == ["a", "b"]


def test_prefetch_names_the_next_candidate_and_quantum_follows_switch_cost():
    vs = [ev("a", phase="active", in_flight=2, session_age_s=0.1),
          ev("b", phase="active", in_flight=2, session_age_s=0.1),
          ev("c", queued=2, oldest_wait_s=0.5), ev("d", queued=9, oldest_wait_s=0.8)]
    assert decide(vs, params()).prefetch == "d"  # most request-seconds waited
    assert decide(vs[:2] + [ev("e", hint=3)], params()).prefetch == "e"  # router forecast
    assert auto_quantum(0.225, 3.0) == pytest.approx(2.025)  # ~10% of a residency spent switching
    assert auto_quantum(0.001, 3.0) == pytest.approx(0.3) and auto_quantum(5.0, 3.0) == 3.0
    assert auto_min_batch(96) == 8 and auto_min_batch(8) == 2 and auto_min_batch(1) == 1


def test_fifo_baseline_stops_every_session_once_anyone_starves():
    vs = [ev("a", phase="active", queued=5, in_flight=0, session_age_s=0.1), ev("b", queued=1, oldest_wait_s=4.0)]
    d = FifoPolicy().decide(vs, params())
    assert d.release == ["a"] and not d.admit  # a's newer requests wait behind b's old one


# ------------------------------------------------------------------------------------ simulation
PREFILL, GEN, SWITCH_IN, SWITCH_OUT, DT = 0.03, 2.05, 0.2, 0.025, 0.01


@dataclass
class _Exp:
    name: str
    queue: list = field(default_factory=list)  # arrival times
    running: list = field(default_factory=list)  # finish times
    phase: str = "idle"
    closing: bool = False
    ready_at: float | None = None  # loading: becomes active then
    active_since: float = 0.0
    last_admit: float = 0.0
    rate_acc: float = 0.0
    rate_t: float = 0.0
    resident: bool = False
    last_used: float = 0.0


def zipf_trace(n: int, rate: float, experts: int, s: float = 1.0, seed: int = 0) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    w = [1.0 / k**s for k in range(1, experts + 1)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, rng.choices(range(experts), weights=w)[0]))
    return out


def simulate(policy, trace, experts=6, slots=2, capacity=96, max_wait_s=3.0, horizon_s=400.0) -> dict:
    """Run ``trace`` through ``policy`` with the fake clock; returns the bench's numbers."""
    ex = [_Exp(f"e{i}") for i in range(experts)]
    p = SchedulerParams(capacity=capacity, budget_bytes=slots * GB, max_wait_s=max_wait_s,
                        quantum_s=auto_quantum(SWITCH_IN + SWITCH_OUT, max_wait_s),
                        min_batch=auto_min_batch(capacity), switch_s=SWITCH_IN + SWITCH_OUT)
    waiters: list[_Exp] = []  # acquires waiting for HBM space, FIFO like the tier manager's
    ttft, admit_wait, done, switches = [], [], 0, 0
    i, now = 0, 0.0
    while now < horizon_s and (i < len(trace) or any(e.queue or e.running or e.phase != "idle" for e in ex)):
        now += DT
        while i < len(trace) and trace[i][0] <= now:
            e = ex[trace[i][1]]
            e.rate_acc = e.rate_acc * (math.exp(-(trace[i][0] - e.rate_t) / 10.0) if e.rate_t else 0) + 1
            e.rate_t = trace[i][0]
            e.queue.append(trace[i][0])
            i += 1
        for e in ex:
            done += sum(1 for f in e.running if f <= now)
            e.running = [f for f in e.running if f > now]
            if e.phase == "loading" and e.ready_at is not None and e.ready_at <= now:
                e.phase, e.active_since, e.resident = "active", now, True
        for w in list(waiters):  # grant HBM space in FIFO order, evicting unleased residents (LRU)
            held = sum(1 for e in ex if e.resident or (e.phase == "loading" and e.ready_at is not None))
            if w.resident:
                w.ready_at = now
            else:
                idle = sorted((e for e in ex if e.resident and e.phase == "idle"), key=lambda e: e.last_used)
                if held >= slots and not idle:
                    continue
                out = 0.0
                if held >= slots:
                    idle[0].resident, out = False, SWITCH_OUT
                w.ready_at, w.resident = now + out + SWITCH_IN, False
                switches += 1
            waiters.remove(w)
        for _ in range(1 + sum(len(e.queue) for e in ex)):
            views = [ExpertView(
                name=e.name, size_bytes=GB, queued=len(e.queue),
                oldest_wait_s=now - e.queue[0] if e.queue else 0.0,
                wait_sum_s=sum(now - a for a in e.queue), in_flight=len(e.running),
                resident=e.resident, phase=e.phase if not (e.phase == "active" and e.closing) else "closing",
                session_age_s=now - e.active_since if e.phase == "active" else 0.0,
                drain_s=max(0.0, GEN - (now - e.last_admit)) if e.running else 0.0,
                rate=e.rate_acc * math.exp(-(now - e.rate_t) / 10.0) / 10.0 if e.rate_t else 0.0)
                for e in ex]
            d = policy.decide(views, p)
            by = {e.name: e for e in ex}
            for n in d.close:
                by[n].closing = True
            for n, k in d.admit.items():
                e = by[n]
                for a in e.queue[:k]:
                    ttft.append(now + PREFILL - a)
                    admit_wait.append(now - a)
                    e.running.append(now + GEN)
                e.queue = e.queue[k:]
                e.last_admit = now
            for n in d.release:
                e = by[n]
                e.phase, e.closing, e.last_used = "idle", False, now
            for n in d.start:
                e = by[n]
                e.phase, e.ready_at, e.closing = "loading", None, False
                waiters.append(e)
            if not (d.admit or d.start or d.close):
                break
    span = now - trace[0][0]
    return {"completed": done, "requests": len(trace), "switches": switches,
            "requests_per_switch": done / max(switches, 1), "completed_per_s": done / span,
            "output_tok_per_s": done * 128 / span, "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "ttft_p99_s": sorted(ttft)[int(0.99 * (len(ttft) - 1))] if ttft else None,
            "max_admit_wait_s": max(admit_wait) if admit_wait else None, "span_s": span}


def test_simulated_h100_workload_batches_by_expert_and_keeps_the_bound():
    trace = zipf_trace(400, 20.0, 6)
    new = simulate(BatchingPolicy(), trace, horizon_s=120.0)
    old = simulate(FifoPolicy(), trace, horizon_s=120.0)
    assert new["completed"] == len(trace)  # keeps up with the load...
    assert old["completed"] < len(trace)  # ...which the former rule did not (cut at the horizon)
    assert new["requests_per_switch"] >= 5 * old["requests_per_switch"]
    assert new["ttft_p50_s"] * 2 < old["ttft_p50_s"]
    # documented bound: max_wait + ceil(experts/slots) x (drain + switch), plus scheduler ticks
    bound = 3.0 + math.ceil(6 / 2) * (GEN + SWITCH_IN + SWITCH_OUT) + 0.1
    assert new["max_admit_wait_s"] <= bound


if __name__ == "__main__":  # python tests/tiers/test_scheduler.py [requests] [rate]
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    tr = zipf_trace(n, rate, 6)
    print(f"{n} requests, Poisson {rate}/s, Zipf(1.0) over 6 experts, HBM for 2, max_wait 3 s, capacity 96")
    for name, pol in (("fifo (former)", FifoPolicy()), ("batch (new)", BatchingPolicy())):
        r = simulate(pol, tr, horizon_s=70.0 + tr[-1][0])
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
