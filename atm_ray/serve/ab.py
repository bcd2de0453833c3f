"""A/B comparison of model versions: arm assignment, and the ledger behind ``GET /v1/ab/report``.

Plain Python (no Serve): the Serve app in ``atm_ray.serve.app`` calls these. The paper's online measure was
user dissatisfaction; the report gives each arm's dissatisfaction rate with a 95% Wilson interval and a
two-proportion z-test between arms, next to request counts, latency percentiles and shadow agreement.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from atm_ray.config import AtmRayError


@dataclass(frozen=True)
class Arm:
    name: str
    model_dir: str
    weight: float


class ArmRouter:
    """Weighted split across named arms: sticky by a hash of (salt, user_id), random without a user id."""

    def __init__(self, arms: list[Arm], salt: str, seed: int | None = None):
        if not arms:
            raise AtmRayError("at least one arm is needed")
        if any(arm.weight < 0 for arm in arms) or sum(arm.weight for arm in arms) <= 0:
            raise AtmRayError("arm weights must be non-negative and not all zero")
        if len({arm.name for arm in arms}) != len(arms):
            raise AtmRayError("arm names must be unique")
        total = sum(arm.weight for arm in arms)
        self.names = [arm.name for arm in arms]
        self.bounds = []
        running = 0.0
        for arm in arms:
            running += arm.weight / total
            self.bounds.append(running)
        self.bounds[-1] = 1.0
        self.salt = salt
        self.random = random.Random(seed)

    def shares(self) -> dict[str, float]:
        """Each arm's share of the traffic."""
        previous, shares = 0.0, {}
        for name, bound in zip(self.names, self.bounds):
            shares[name] = round(bound - previous, 6)
            previous = bound
        return shares

    def _pick(self, point: float) -> str:
        for name, bound in zip(self.names, self.bounds):
            if point < bound:
                return name
        return self.names[-1]

    def assign(self, user_id: str | None) -> str:
        if user_id is None:
            return self._pick(self.random.random())
        digest = hashlib.sha256(f"{self.salt}\0{user_id}".encode()).digest()
        return self._pick(int.from_bytes(digest[:8], "big") / 2**64)


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible for small counts and rates near 0)."""
    if total == 0:
        return (0.0, 1.0)
    rate = successes / total
    denominator = 1 + z * z / total
    centre = (rate + z * z / (2 * total)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_test(successes_a: int, total_a: int, successes_b: int, total_b: int) -> dict:
    """Pooled two-proportion z-test: z and the two-sided p-value of rate_b - rate_a."""
    if total_a == 0 or total_b == 0:
        return {"z": None, "p_value": None}
    pooled = (successes_a + successes_b) / (total_a + total_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / total_a + 1 / total_b))
    if spread == 0:
        return {"z": 0.0, "p_value": 1.0}
    z = (successes_b / total_b - successes_a / total_a) / spread
    return {"z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


WINDOW = 10_000  # latencies and batch sizes the ledger keeps per arm (the most recent)


class Ledger:
    """Per-arm request counts, latencies (the most recent ``window``), intents, batch sizes, shadow
    agreement and feedback. ``request_arms`` remembers the arm of the last ``memory`` request ids."""

    def __init__(self, arm_names: list[str], window: int = WINDOW, memory: int = 200_000):
        self.arm_names = list(arm_names)
        self.window, self.memory = window, memory
        self.requests: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.intents: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.batch_sizes: dict[str, list[int]] = defaultdict(list)
        self.shadow = {"compared": 0, "intent_agreement": 0, "frame_agreement": 0}
        self.request_arms: OrderedDict[str, str] = OrderedDict()
        self.feedback: dict[str, dict[str, int]] = defaultdict(lambda: {"satisfied": 0, "dissatisfied": 0})
        # ids that got feedback, bounded like request_arms: an id forgotten there is unknown anyway
        self.feedback_given: OrderedDict[str, None] = OrderedDict()

    def record(self, entries: list[dict]) -> None:
        """Events ``request`` (arm, request_id, latency_ms, intent), ``error`` (arm), ``batch``
        (arm, size) or ``shadow`` (intent_agrees, frame_agrees)."""
        for entry in entries:
            event = entry["event"]
            if event == "request":
                arm = entry["arm"]
                self.requests[arm] += 1
                latencies = self.latencies[arm]
                latencies.append(entry["latency_ms"])
                if len(latencies) > self.window:
                    del latencies[: len(latencies) - self.window]
                self.intents[arm][entry["intent"]] += 1
                self.request_arms[entry["request_id"]] = arm
                while len(self.request_arms) > self.memory:
                    self.request_arms.popitem(last=False)
            elif event == "error":
                self.errors[entry["arm"]] += 1
            elif event == "batch":
                sizes = self.batch_sizes[entry["arm"]]
                sizes.append(entry["size"])
                if len(sizes) > self.window:
                    del sizes[: len(sizes) - self.window]
            elif event == "shadow":
                self.shadow["compared"] += 1
                self.shadow["intent_agreement"] += bool(entry["intent_agrees"])
                self.shadow["frame_agreement"] += bool(entry["frame_agrees"])

    def add_feedback(self, request_id: str, satisfied: bool) -> str:
        """Returns ``ok``, ``unknown`` (no such request id) or ``duplicate`` (feedback already given)."""
        arm = self.request_arms.get(request_id)
        if arm is None:
            return "unknown"
        if request_id in self.feedback_given:
            return "duplicate"
        self.feedback_given[request_id] = None
        while len(self.feedback_given) > self.memory:
            self.feedback_given.popitem(last=False)
        self.feedback[arm]["satisfied" if satisfied else "dissatisfied"] += 1
        return "ok"

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict:
        """Everything the ledger knows, as JSON-ready copies (safe to write from another thread)."""
        return {
            "version": 1,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "latencies": {arm: list(values) for arm, values in self.latencies.items()},
            "intents": {arm: dict(counts) for arm, counts in self.intents.items()},
            "batch_sizes": {arm: list(values) for arm, values in self.batch_sizes.items()},
            "shadow": dict(self.shadow),
            "request_arms": list(self.request_arms.items()),
            "feedback": {arm: dict(votes) for arm, votes in self.feedback.items()},
            "feedback_given": list(self.feedback_given),
        }

    @classmethod
    def from_state(cls, arm_names: list[str], state: dict, window: int = 10_000, memory: int = 200_000) -> "Ledger":
        """A ledger that goes on from ``state``; arms no longer deployed keep their counts in the state
        (and come back into the report if they are deployed again)."""
        if state.get("version") != 1:
            raise AtmRayError(f"A/B state version {state.get('version')!r} is not 1")
        ledger = cls(arm_names, window, memory)
        ledger.requests.update(state["requests"])
        ledger.errors.update(state["errors"])
        ledger.latencies.update({arm: list(values) for arm, values in state["latencies"].items()})
        for arm, counts in state["intents"].items():
            ledger.intents[arm].update(counts)
        ledger.batch_sizes.update({arm: list(values) for arm, values in state["batch_sizes"].items()})
        ledger.shadow.update(state["shadow"])
        ledger.request_arms.update((request_id, arm) for request_id, arm in state["request_arms"])
        for arm, votes in state["feedback"].items():
            ledger.feedback[arm].update(votes)
        ledger.feedback_given.update((request_id, None) for request_id in state["feedback_given"])
        return ledger

    def report(self) -> dict:
        arms = {}
        for name in self.arm_names:
            latencies = self.latencies.get(name, [])
            sizes = self.batch_sizes.get(name, [])
            votes = self.feedback[name]
            answered = votes["satisfied"] + votes["dissatisfied"]
            arms[name] = {
                "requests": self.requests.get(name, 0),
                "errors": self.errors.get(name, 0),
                "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95), "p99": percentile(latencies, 0.99)},
                "batches": {"count": len(sizes), "mean_size": sum(sizes) / len(sizes) if sizes else None, "max_size": max(sizes, default=None)},
                "top_intents": dict(sorted(self.intents.get(name, {}).items(), key=lambda item: -item[1])[:10]),
                "feedback": {
                    **votes,
                    "dissatisfaction_rate": votes["dissatisfied"] / answered if answered else None,
                    "dissatisfaction_95ci": wilson_interval(votes["dissatisfied"], answered),
                },
            }
        comparisons = {}
        first = self.arm_names[0]
        for other in self.arm_names[1:]:
            a, b = self.feedback[first], self.feedback[other]
            comparisons[f"{other}_vs_{first}"] = two_proportion_test(
                a["dissatisfied"], a["satisfied"] + a["dissatisfied"], b["dissatisfied"], b["satisfied"] + b["dissatisfied"]
            )
        compared = self.shadow["compared"]
        shadow = {
            **self.shadow,
            "intent_agreement_rate": self.shadow["intent_agreement"] / compared if compared else None,
            "frame_agreement_rate": self.shadow["frame_agreement"] / compared if compared else None,
        }
        return {"arms": arms, "dissatisfaction_tests": comparisons, "shadow": shadow}
