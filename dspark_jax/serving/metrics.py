"""Prometheus metrics of a serving process (prometheus_client, one registry per server).

The engine's own counters (`EngineStats`) are read when /metrics is scraped, by a collector;
what only the HTTP layer sees (tokens per request, time to first token, time per output
token, end-to-end latency, finished requests by reason) is recorded as requests end.
Names follow vLLM's where one exists, under the `dspark_` prefix.

When several HTTP processes serve one engine (`serve.py --api-server-count N`), the server
sets PROMETHEUS_MULTIPROC_DIR for them: prometheus_client then keeps each process's metrics
in files there, and /metrics, from whichever process answers, adds them up (and shows each
process's CPU seconds, one series per pid, in place of this process's own process metrics).
"""

from __future__ import annotations

import contextlib
import glob
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class EngineCollector:
    """Turns `stats()` (an `EngineStats`) into Prometheus samples at scrape time."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("dspark_num_requests_running", "Requests holding a slot (prefilling or decoding).",
                                value=s.running)
        yield GaugeMetricFamily("dspark_num_requests_waiting", "Requests waiting for a slot.", value=s.waiting)
        yield GaugeMetricFamily("dspark_kv_pages_used", "KV-cache pages held by requests.", value=s.pages_used)
        yield GaugeMetricFamily("dspark_kv_pages_free", "KV-cache pages free.", value=s.pages_free)
        yield CounterMetricFamily("dspark_num_preemptions", "Requests preempted for KV pages (recomputed later).",
                                  value=s.preemptions)
        yield CounterMetricFamily("dspark_engine_steps", "Device steps run.", value=s.steps)
        yield CounterMetricFamily("dspark_engine_step_seconds",
                                  "Wall time the engine spent stepping (planning, launching, waiting for the device, "
                                  "committing); the rest of its time it waited for requests or messages.",
                                  value=s.step_seconds)
        yield CounterMetricFamily("dspark_engine_wait_seconds",
                                  "The part of the stepping time spent blocked reading steps back from the device.",
                                  value=s.wait_seconds)
        yield GaugeMetricFamily("dspark_engine_program_shapes",
                                "Device programs compiled so far (one per bucketed step shape).",
                                value=s.program_shapes)
        yield GaugeMetricFamily("dspark_engine_compiles_pending", "Device programs compiling or queued to compile.",
                                value=s.compiles_pending)
        yield CounterMetricFamily("dspark_engine_compile_stalls",
                                  "Engine steps that waited for a program to compile (no compiled one covered them).",
                                  value=s.compile_stalls)
        yield CounterMetricFamily("dspark_decode_rounds", "Decoding rounds, summed over requests.", value=s.rounds)
        yield CounterMetricFamily("dspark_undrafted_rounds",
                                  "Decoding rounds run without a draft because drafting did not pay.",
                                  value=s.undrafted_rounds)
        yield CounterMetricFamily("dspark_round_tokens", "Tokens committed by decoding rounds.", value=s.tokens)
        yield GaugeMetricFamily("dspark_tokens_per_round", "Mean tokens a decoding round commits (accepted + 1).",
                                value=s.tokens_per_round)
        yield GaugeMetricFamily(
            "dspark_draft_forecast_scale",
            "Draft tokens accepted per token the confidences forecast (it scales the drafting decision).",
            value=s.forecast_scale)
        histogram = CounterMetricFamily("dspark_verify_length", "Decoding rounds by draft tokens verified.",
                                        labels=["length"])
        for length, count in enumerate(s.verify_length_histogram):
            histogram.add_metric([str(length)], count)
        yield histogram
        verified = CounterMetricFamily("dspark_draft_verified", "Rounds that verified draft position j (1-based).",
                                       labels=["position"])
        accepted = CounterMetricFamily("dspark_draft_accepted", "Rounds that accepted draft position j (1-based).",
                                       labels=["position"])
        rate = GaugeMetricFamily("dspark_acceptance_rate", "Accepted over verified, per draft position (1-based).",
                                 labels=["position"])
        for j, (a, v, r) in enumerate(zip(s.accepted_at_position, s.verified_at_position, s.acceptance_at_position)):
            verified.add_metric([str(j + 1)], v)
            accepted.add_metric([str(j + 1)], a)
            rate.add_metric([str(j + 1)], r)
        yield from (verified, accepted, rate)


def forget_exited_processes(directory: str) -> None:
    """Drops the per-process gauges of HTTP processes that have exited (one that died, or that
    uvicorn replaced on SIGHUP or stopped on SIGTTOU), so that /metrics shows a series for each
    live one; their counters and histograms stay in the sums."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = int(os.path.basename(path).rsplit("_", 1)[1].removesuffix(".db"))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):  # another process's scrape removed it first
                mark_process_dead(pid, directory)
        except PermissionError:  # alive, another user's
            pass


class ServerMetrics:
    def __init__(self, stats):
        self.engine = EngineCollector(stats)
        self.registry = r = CollectorRegistry()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        if self.multiprocess:
            self.cpu = Gauge("dspark_api_server_cpu_seconds", "CPU seconds used by each HTTP server process so far "
                             "(as of its last finished request).", multiprocess_mode="liveall", registry=r)
        else:
            r.register(self.engine)
            ProcessCollector(registry=r)  # process_cpu_seconds_total etc. of the HTTP process (on Linux)
        self.prompt_tokens = Counter("dspark_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("dspark_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("dspark_request_success", "Requests finished, by finish reason.", ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("dspark_time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("dspark_e2e_request_latency_seconds", "Time from arrival to the last token.",
                                 buckets=LATENCY_BUCKETS, registry=r)

    def request_done(self, prompt_tokens: int, tokens: int, reason: str, arrival: float, first: float | None,
                     end: float) -> None:
        """Records one finished choice (times from time.perf_counter)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(tokens)
        self.finished.labels(reason).inc()
        self.latency.observe(end - arrival)
        if first is not None:
            self.ttft.observe(first - arrival)
            if tokens > 1:
                self.tpot.observe((end - first) / (tokens - 1))
        if self.multiprocess:
            self.cpu.set(time.process_time())

    def render(self) -> bytes:
        """The text /metrics answers: this process's registry, or every HTTP process's metrics
        added up, with the engine's."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        forget_exited_processes(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # (a few files: cheap per scrape)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(self.engine)
        return generate_latest(registry)
