"""The driver's watch over a run's Ray actors: restart what dies, fail only when restarts run out.

Every actor is created with Ray's `max_restarts` (distributed.max_actor_restarts) and a name
(`keys.actor_name`: "{run_id}:{role}:{i}"). When one dies, Ray restarts it (its constructor runs
again: a sampler reloads the policy, a reward worker first takes what its dead incarnation left
pending, the learner resumes from its checkpoint) but the `run` call in flight fails with a
RayActorError (ActorDiedError / ActorUnavailableError). `poll` sees that, waits for the restarted
actor to answer `ready` and submits `run` again, counting the restart per actor and per role. Past
an actor's allowance (or if Ray gives up on it) the run fails with a DriverError naming the actor.
An actor's own exception (RayTaskError) is not a death: it propagates, as before.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Member:
    role: str
    name: str
    handle: Any
    max_restarts: int
    ref: Any = None
    restarts: int = 0
    result: Any = None
    done: bool = False
    restart_seconds: list = field(default_factory=list)  # death noticed -> ready again, per restart


class Supervisor:
    """The run's actors (see the module docstring). `error` is the exception class raised when
    the run cannot go on (the driver's DriverError)."""

    def __init__(self, ready_timeout_s: float, error: Callable[[str], Exception],
                 on_restart: Optional[Callable[[Member], None]] = None):
        self.ready_timeout_s = float(ready_timeout_s)
        self.error = error
        self.on_restart = on_restart
        self.members: list[Member] = []

    def add(self, role: str, name: str, handle: Any, max_restarts: int) -> Member:
        m = Member(role, name, handle, int(max_restarts))
        self.members.append(m)
        return m

    def of(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def start(self) -> None:
        for m in self.members:
            m.ref, m.done = m.handle.run.remote(), False

    def poll(self, stopping: bool = False, timeout_s: float = 0.0) -> None:
        """Collect finished `run` calls: restart dead actors; raise if a sampler or worker returned
        while the run is not stopping (they run until the stop key)."""
        import ray

        live = {m.ref: m for m in self.members if not m.done and m.ref is not None}
        if not live:
            return
        done, _ = ray.wait(list(live), num_returns=len(live), timeout=timeout_s)
        for ref in done:
            m = live[ref]
            try:
                m.result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # died (Ray restarts it) or unreachable
                self._restart(m, exc)
                continue
            m.done, m.ref = True, None
            if m.role != "learner" and not stopping:
                raise self.error(f"actor {m.name} stopped before the learner finished")

    def _restart(self, m: Member, exc: Exception) -> None:
        import ray

        m.restarts += 1
        if m.restarts > m.max_restarts:
            raise self.error(f"actor {m.name} died and its restarts are exhausted "
                             f"({m.max_restarts} allowed: distributed.max_actor_restarts): {_first_line(exc)}")
        t0 = time.monotonic()
        while True:  # a call to an actor that is restarting fails at once as unavailable: ask again
            left = self.ready_timeout_s - (time.monotonic() - t0)
            try:
                if left <= 0:
                    raise ray.exceptions.GetTimeoutError()
                ray.get(m.handle.ready.remote(), timeout=left)
                break
            except ray.exceptions.GetTimeoutError:
                raise self.error(f"actor {m.name} died and was not ready again within "
                                 f"{self.ready_timeout_s:.0f} s (distributed.startup_timeout_s)") from None
            except ray.exceptions.ActorUnavailableError:
                time.sleep(0.2)
            except ray.exceptions.RayActorError as again:  # dead for good: Ray gave up on it
                raise self.error(f"actor {m.name} died and Ray could not restart it: {_first_line(again)}") from None
        m.ref = m.handle.run.remote()
        m.restart_seconds.append(time.monotonic() - t0)
        if self.on_restart is not None:
            self.on_restart(m)

    def all_done(self) -> bool:
        return all(m.done for m in self.members)

    def learner_done(self) -> bool:
        return all(m.done for m in self.of("learner"))

    def restarts_by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.members:
            out[m.role] = out.get(m.role, 0) + m.restarts
        return out

    def results(self, role: str) -> list[Any]:
        return [m.result for m in self.of(role)]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
