"""Server metrics in the Prometheus text exposition format (no client library needed).

Counters: requests by endpoint and status, prompt / generation / reasoning tokens, aborted requests.
Histograms: time to first token, inter-token latency, end-to-end latency. Gauges (read from the engine at
scrape time): running and waiting sequences, K/V block and state-slot use.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

PREFIX = "nemotron3"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=_LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum}", f"{name}_count {self.total}"]
        return out


class Metrics:
    """Thread-safe counters and histograms; `render()` gives the /metrics body."""

    def __init__(self, engine_stats: Callable[[], dict] | None = None) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.reasoning_tokens = 0
        self.aborted = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.engine_stats = engine_stats

    def request_done(self, endpoint: str, status: int | str) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def tokens(self, prompt: int = 0, generation: int = 0, reasoning: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generation
            self.reasoning_tokens += reasoning

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        with self._lock:
            self.e2e.observe(seconds)

    def render(self) -> str:
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total Finished HTTP API requests by endpoint and status code.",
                     f"# TYPE {p}_requests_total counter"]  # fmt: skip
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            for name, value, help_ in (
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                ("generation_tokens_total", self.generation_tokens, "Tokens generated (reasoning included)."),
                ("reasoning_tokens_total", self.reasoning_tokens, "Tokens generated inside reasoning spans."),
                ("requests_aborted_total", self.aborted, "Requests cancelled (client disconnect)."),
            ):
                lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
            for name, hist, help_ in (
                ("time_to_first_token_seconds", self.ttft, "Time from arrival to the first generated token."),
                ("inter_token_latency_seconds", self.itl, "Time between consecutive streamed tokens."),
                ("e2e_request_latency_seconds", self.e2e, "Time from arrival to the end of the request."),
            ):
                lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} histogram"]
                lines += hist.lines(f"{p}_{name}")
            gauges: dict = {}
        if self.engine_stats is not None:
            try:
                gauges.update(self.engine_stats())
            except Exception:  # noqa: BLE001, S110 - a scrape never fails because the engine is busy changing
                pass
        for name, value in gauges.items():
            lines += [f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
        return "\n".join(lines) + "\n"
