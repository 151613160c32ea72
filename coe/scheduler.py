"""Scheduling policy of the expert pool: a pure decision function over queue state.

The pool (:mod:`coe.pool`) owns the asyncio side: queues, sessions (an expert acquired from the tier
manager and admitting requests), engine calls. Every time something changes it builds one
:class:`ExpertView` per expert and asks a policy what to do; the policy returns a :class:`Decision`
(admit *n* queued requests of these experts, start sessions for those, stop admitting to that one,
end these drained sessions, prefetch this one, look again in *t* seconds). No clocks, no I/O: the
unit tests drive it with hand-made views and a fake clock.

Why not FIFO: on one H100 with six 3B experts, HBM for two and a Zipf(1.0) load, the former rule
(:class:`FifoPolicy`) stopped admission in *every* session as soon as any non-resident expert's
oldest request passed ``max_wait`` and admitted only requests older than it, so each residency
served fewer than two requests (84 requests over 44 switches) and TTFT p50 grew to 11 s.

:class:`BatchingPolicy` (the default) batches by expert and amortises switches:

* **Gated batches.** A session admits its expert's whole queue at once (up to the engine's batch
  capacity) and keeps admitting new arrivals while nobody else needs its space or while it is
  inside its time slice (*quantum*). Admission never stops globally.
* **Quantum scaled to the switch cost.** ``quantum ≈ 9 × (switch in + switch out)`` measured by the
  tier manager, so switching is ~10% of a residency; clamped to ``[max_wait/10, max_wait]``.
* **Switch only into free space or for a worthy candidate.** Waiting experts are ranked: starving
  ones (head waited ≥ ``max_wait``) first, oldest head first; then by request-seconds waited
  (queued demand × wait). A candidate starts at once if its weights fit in space no session holds
  (idle residents are evictable). Otherwise it may preempt **one** session — the one with the least
  *claim* (recent arrival rate × quantum + queued + router hint; then the shortest estimated drain;
  then the oldest session) — only if that session is past its quantum, the candidate has at least
  ``min_batch`` requests queued and expects at least as much work per quantum as the victim has.
  A starving candidate preempts the least-claim session regardless of quantum.
* **Preempt only the victim.** The victim stops admitting (it keeps what it admitted), drains, and
  releases its lease; the candidate's session is started at once and its acquire waits for exactly
  that space (loading from disk meanwhile). Every other session keeps admitting.

Starvation bound (documented, not a hard real-time guarantee): a request whose expert is the oldest
starving one is admitted within ``max_wait + drain + switch``, where *drain* is the longest
remaining generation among the victim's in-flight requests; behind *k* other starving experts it
waits at most ``max_wait + ⌈(k+1)/slots⌉ × (drain + switch)``, because starving experts are taken in
order of their oldest request and each is served a whole batch at once. ``slots`` is how many
sessions fit the HBM budget together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol

Phase = Literal["idle", "loading", "active", "closing"]


@dataclass(frozen=True)
class ExpertView:
    """What the policy knows of one expert at one instant (times are ages, in seconds)."""

    name: str
    size_bytes: int
    queued: int = 0
    oldest_wait_s: float = 0.0  # age of the queue's head; 0 when empty
    wait_sum_s: float = 0.0  # Σ ages of every queued request (queued demand × wait)
    in_flight: int = 0
    resident: bool = False  # weights in HBM now (with or without a session)
    phase: Phase = "idle"  # session: none / acquiring / admitting / draining (no admission)
    session_age_s: float = 0.0  # since the session became active
    drain_s: float = 0.0  # estimated time until its in-flight requests finish
    rate: float = 0.0  # recent arrivals per second (EWMA)
    hint: int = 0  # router's forecast (routed, not yet queued)
    failed: bool = False
    #: HBM this expert holds outside any session: a sleeping engine's context (the tier manager
    #: can shut it down to make room, at the price of a cold start later) ...
    asleep_bytes: int = 0
    #: ... or what a start or prefetch in flight has reserved (nobody can take it until it ends)
    moving_bytes: int = 0


@dataclass(frozen=True)
class SchedulerParams:
    """Knobs the policy reads; built by the pool from :class:`coe.pool.PoolConfig` and tier metrics."""

    capacity: int  # requests of one expert in flight at once (engine batch)
    budget_bytes: int  # HBM budget: every engine's whole footprint, awake or asleep
    max_wait_s: float  # starvation threshold
    quantum_s: float  # time slice of a session when others wait
    min_batch: int = 1  # queued requests a candidate needs to preempt a session past its quantum
    switch_s: float = 0.0  # measured mean switch in + out (informational; the quantum derives from it)


@dataclass
class Decision:
    """What the pool does now. ``admit`` is applied before ``release``; ``start`` after both."""

    admit: dict[str, int] = field(default_factory=dict)
    start: list[str] = field(default_factory=list)  # begin a session (acquire) for these
    close: list[str] = field(default_factory=list)  # stop admitting; release once drained
    release: list[str] = field(default_factory=list)  # end these sessions now (nothing in flight)
    prefetch: str | None = None  # next expert worth moving up early (demand policy)
    wake_in_s: float | None = None  # look again by then even if nothing happens
    reasons: dict[str, str] = field(default_factory=dict)  # name -> why it was started/closed


class Policy(Protocol):
    def decide(self, views: Iterable[ExpertView], p: SchedulerParams) -> Decision: ...


def auto_quantum(switch_s: float, max_wait_s: float, overhead: float = 0.1) -> float:
    """Time slice such that one switch is ``overhead`` of a residency: ``switch × (1-o)/o``,
    clamped to ``[max_wait/10, max_wait]`` (a quantum past max_wait would be cut by starvation)."""
    q = switch_s * (1.0 - overhead) / overhead
    return min(max_wait_s, max(max_wait_s / 10.0, q))


def auto_min_batch(capacity: int) -> int:
    return max(1, min(8, capacity // 4))


def _release_after_admit(v: ExpertView, admitted: int, closing: bool) -> bool:
    if v.phase not in ("active", "closing"):
        return False
    if v.in_flight + admitted > 0:
        return False
    return closing or v.phase == "closing" or v.queued - admitted == 0


class BatchingPolicy:
    """Batch by expert, amortise switches, bounded starvation; see the module docstring."""

    def claim(self, v: ExpertView, p: SchedulerParams) -> float:
        """Work (requests) an expert expects to have over one quantum: what keeps it in HBM."""
        return v.rate * p.quantum_s + v.queued + v.hint

    def _place(self, cand: ExpertView, room: "_Room", victims: dict[str, ExpertView], p: SchedulerParams,
               d: Decision) -> list[ExpertView] | None:
        """Start ``cand`` in free space, or by closing the sessions it may preempt; the sessions
        closed for it (none when it fit), or None when it cannot start now."""
        is_starving = cand.oldest_wait_s >= p.max_wait_s
        free = room.free_for(cand, p)
        if cand.size_bytes <= free:
            d.start.append(cand.name)
            d.reasons[cand.name] = "free space" + (" (starving)" if is_starving else "")
            room.take(cand, [])
            return []

        def victim_key(v: ExpertView) -> tuple:
            return (self.claim(v, p), v.drain_s, -v.session_age_s, v.name)

        if is_starving:
            pool = sorted(victims.values(), key=victim_key)
        else:
            worth = cand.queued >= p.min_batch
            mine = self.claim(cand, p)
            pool = sorted((v for v in victims.values() if v.session_age_s >= p.quantum_s
                           and self.claim(v, p) <= mine), key=victim_key) if worth else []
        chosen, got = [], free
        for v in pool:
            if got >= cand.size_bytes:
                break
            chosen.append(v)
            got += v.size_bytes
        if got < cand.size_bytes:
            return None
        for v in chosen:
            del victims[v.name]
            d.reasons[v.name] = f"closed for {cand.name}"
        d.close.extend(v.name for v in chosen)
        d.start.append(cand.name)
        d.reasons[cand.name] = ("starving" if is_starving else "quantum") + " preempts " + ",".join(
            v.name for v in chosen)
        room.take(cand, chosen)
        return chosen

    def decide(self, views: Iterable[ExpertView], p: SchedulerParams) -> Decision:
        vs = {v.name: v for v in views}
        d = Decision()
        closing: set[str] = set()
        # Space no session holds: idle residents are evictable, closing sessions each already
        # have their successor counted (a session is closed only for one). Moves in flight hold
        # their reservation; sleeping engines hold their context (see _Room.free_for).
        moving = sum(v.moving_bytes for v in vs.values() if v.phase == "idle")
        room = _Room(p.budget_bytes, moving + sum(v.size_bytes for v in vs.values() if v.phase in ("loading", "active")),
                     moving, sum(v.asleep_bytes for v in vs.values() if v.phase == "idle"))
        starving = sorted(
            (v for v in vs.values() if v.phase == "idle" and v.queued and not v.failed
             and v.oldest_wait_s >= p.max_wait_s),
            key=lambda v: (-v.oldest_wait_s, v.name),
        )
        waiting = sorted(
            (v for v in vs.values() if v.phase == "idle" and v.queued and not v.failed
             and v.oldest_wait_s < p.max_wait_s),
            key=lambda v: (-v.wait_sum_s, not v.resident, v.name),
        )
        victims = {n: v for n, v in vs.items() if v.phase == "active"}
        for cand in [*starving, *waiting]:
            chosen = self._place(cand, room, victims, p, d)
            if chosen is None:
                if cand.oldest_wait_s >= p.max_wait_s:
                    break  # head-of-line: nobody overtakes a starving expert that cannot fit yet
                continue
            closing.update(v.name for v in chosen)
        # Admission: every active session, including one closed just now (gated: what is queued
        # at the close is admitted, nothing after).
        for v in vs.values():
            if v.phase == "active" and v.queued:
                n = min(v.queued, max(0, p.capacity - v.in_flight))
                if n:
                    d.admit[v.name] = n
        for v in vs.values():
            if _release_after_admit(v, d.admit.get(v.name, 0), v.name in closing):
                d.release.append(v.name)
        started = set(d.start)
        d.prefetch = _prefetch(vs.values(), [v for v in [*starving, *waiting] if v.name not in started])
        # Next look: when a waiting head crosses max_wait or an active session its quantum.
        times = [p.max_wait_s - v.oldest_wait_s for v in waiting if v.name not in started]
        if waiting or starving:
            times += [p.quantum_s - v.session_age_s for v in victims.values() if v.session_age_s < p.quantum_s]
        times = [t for t in times if t > 0]
        d.wake_in_s = min([*times, p.max_wait_s / 4])
        return d


@dataclass
class _Room:
    """HBM as one decision packs sessions into it: ``committed`` is held by sessions (loading or
    active) and by moves in flight (``moving`` of it); ``asleep`` by sleeping engines' contexts."""

    budget: int
    committed: int
    moving: int
    asleep: int

    def free_for(self, cand: ExpertView, p: SchedulerParams) -> int:
        """Space ``cand`` may take without closing a session. The sleeping engines' contexts are
        kept from it while it fits beside them and the moves in flight (waking it then costs one
        copy and nobody pays a cold start), and given to it when it never could, whatever the
        sessions do: the tier manager then shuts sleeping engines down to make room. Without that
        an expert that needed their room never got a session (code 830a084). Its own
        context or reservation is part of its awake size."""
        others = self.asleep - cand.asleep_bytes
        moving = self.moving - cand.moving_bytes
        kept = 0 if cand.size_bytes > self.budget - others - moving else others
        return self.budget - (self.committed - cand.moving_bytes) - kept

    def take(self, cand: ExpertView, closed: list[ExpertView]) -> None:
        """``cand`` starts a session; the sessions ``closed`` for it pass their space to it."""
        self.committed += cand.size_bytes - cand.moving_bytes - sum(v.size_bytes for v in closed)
        self.moving -= cand.moving_bytes
        self.asleep -= cand.asleep_bytes


def _prefetch(views: Iterable[ExpertView], not_started: list[ExpertView]) -> str | None:
    """What to bring towards HBM ahead of need: the best waiting expert that was not started (it is
    likely next), else the idle expert the router's demand hint favours most."""
    nxt = [v for v in not_started if not v.resident]
    if not nxt:
        nxt = sorted((v for v in views if v.phase == "idle" and v.hint and not v.resident and not v.failed),
                     key=lambda v: (-v.hint, v.name))
    return nxt[0].name if nxt else None


class FifoPolicy:
    """The former rule, kept as the FIFO-across-experts baseline (benches, comparisons).

    Every expert with queued requests gets a session at once (acquires queue up in the tier manager).
    When any expert without a session has a request older than ``max_wait``, every session admits only
    requests older than that one and ends when it has none; so under load this is global FIFO."""

    def decide(self, views: Iterable[ExpertView], p: SchedulerParams) -> Decision:
        vs = list(views)
        d = Decision()
        starving = [v for v in vs if v.queued and v.phase in ("idle", "loading") and v.oldest_wait_s > p.max_wait_s]
        worst = max((v.oldest_wait_s for v in starving), default=None)

        def may(v: ExpertView) -> bool:
            return worst is None or (v.queued > 0 and v.oldest_wait_s >= worst)

        for v in vs:
            if v.phase in ("active", "closing"):
                # admitting only while its head is older than the starving one: here the whole
                # view has one age, so admit one at a time and let the pool re-ask.
                n = min(v.queued, max(0, p.capacity - v.in_flight)) if may(v) else 0
                if n and worst is not None:
                    n = 1
                if n:
                    d.admit[v.name] = n
                left = v.queued - n
                if v.in_flight + n == 0 and (left == 0 or not may(v)):
                    d.release.append(v.name)
            elif v.phase == "idle" and v.queued and not v.failed and may(v):
                d.start.append(v.name)
        d.wake_in_s = p.max_wait_s / 4
        return d


POLICIES: dict[str, type] = {"batch": BatchingPolicy, "fifo": FifoPolicy}
