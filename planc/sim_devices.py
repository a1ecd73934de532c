"""When the simulated steps of engine replicas end, where replicas share devices.

A replica's step asks for a share of each device it runs on (its *demand*: 1 on each of its TP
devices for a replica that runs its whole chain at once; 1/pp on each stage's devices for each of
the pp lanes of a pipelined replica, whose lanes take turns on each stage). While the steps in
flight on a device ask for more than all of it, the device is time-sliced between them: the rates
are the max-min fair allocation (progressive filling) in which every contended step runs at the same
fraction of its own speed until a device it uses is full, as a device's time slices go round the
stages placed on it. A step whose devices have room runs at full speed, so replicas whose devices
are never oversubscribed step exactly as they would alone (their end times are never recomputed).

>>> clock = DeviceClock({"a": {0: 1.0}, "b": {0: 1.0}})
>>> clock.start("a", 0.0, 1.0)
>>> clock.start("b", 0.0, 1.0)
>>> clock.next_end(), clock.pop_ended(2.0)
(2.0, ['a', 'b'])
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional

_FULL = 1.0 + 1e-9
"""A device is oversubscribed past this much demand (lanes' 1/pp shares need not add up to 1 exactly)."""


@dataclass(slots=True)
class _Step:
    end: float
    rate: float = 1.0
    """Fraction of its own speed the step runs at now."""
    version: int = 0
    """Which heap entry for this step is current (older ones are skipped). Unique over the clock's
    life: a key's next step must not take a stale entry of its previous one for its own."""


class DeviceClock:
    """Steps in flight, keyed by replica, and when each ends under its devices' time-slicing.

    `demands` maps a replica's key to {device: share of that device its step asks for}; a key
    without demands runs on devices of its own. Ends come out in (time, key) order."""

    def __init__(self, demands: Optional[Mapping[Hashable, Mapping[int, float]]] = None):
        self.demands = {k: dict(v) for k, v in (demands or {}).items() if v}
        self.load: dict[int, float] = {}
        """Per device: the demands of the steps in flight on it."""
        self.steps: dict[Hashable, _Step] = {}
        self._heap: list[tuple[float, Hashable, int]] = []
        self._versions = 0

    def busy(self, key: Hashable) -> bool:
        return key in self.steps

    def next_end(self) -> float:
        while self._heap and self._stale(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else math.inf

    def start(self, key: Hashable, now: float, end: float) -> None:
        """A step of `key` starts at `now` and would end at `end` on devices of its own."""
        assert key not in self.steps, f"{key} is already stepping"
        self._versions += 1
        self.steps[key] = _Step(end, version=self._versions)
        heapq.heappush(self._heap, (end, key, self._versions))
        self._change(key, now, +1)

    def pop_ended(self, now: float) -> list[Hashable]:
        """Every step that has ended by `now`, in (end, key) order; the others' rates follow."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if self._stale(entry):
                continue
            key = entry[1]
            del self.steps[key]
            out.append(key)
            self._change(key, now, -1)
        return out

    def _stale(self, entry: tuple[float, Hashable, int]) -> bool:
        step = self.steps.get(entry[1])
        return step is None or step.version != entry[2]

    def _change(self, key: Hashable, now: float, sign: int) -> None:
        demand = self.demands.get(key)
        if not demand:
            return
        touched_full = False
        for d, share in demand.items():
            before = self.load.get(d, 0.0)
            self.load[d] = before + sign * share
            touched_full |= before > _FULL or self.load[d] > _FULL
        if touched_full:
            self._reshare(now)

    def _reshare(self, now: float) -> None:
        """Give every step in flight its fair rate from `now` on; move the ends of those whose rate changed."""
        rates = self._fair_rates()
        for key, step in self.steps.items():
            rate = rates.get(key, 1.0)
            if rate != step.rate:
                step.end = now + (step.end - now) * step.rate / rate
                step.rate = rate
                self._versions += 1
                step.version = self._versions
                heapq.heappush(self._heap, (step.end, key, step.version))

    def _fair_rates(self) -> dict[Hashable, float]:
        """Progressive filling over the oversubscribed devices: all contended steps speed up together
        until a device is full; the steps on it keep that rate, the rest go on; none goes past 1."""
        room = {d: 1.0 for d, u in self.load.items() if u > _FULL}
        ask = {d: self.load[d] for d in room}  # what the steps not yet given a rate ask of each device
        on: dict[int, list] = {d: [] for d in room}
        for k in self.steps:
            for d in self.demands.get(k, ()):
                if d in room:
                    on[d].append(k)
        rates: dict[Hashable, float] = {}
        while room:
            full = min(room, key=lambda d: room[d] / ask[d])
            level = room.pop(full) / ask[full]
            if level >= 1.0:
                break  # the rest fit at full speed
            for k in on[full]:
                if k in rates:
                    continue
                rates[k] = level
                for d, share in self.demands[k].items():
                    if d in room:
                        room[d] -= share * level
                        ask[d] -= share
            for d in [d for d in room if ask[d] <= 1e-12]:
                del room[d]  # every step on it has its rate
        return rates
