"""`Engine`: continuous batching of requests over paged KV caches, one jitted step at a time.

A request goes waiting -> prefilling -> decoding -> finished:

- waiting: in a bounded FCFS queue (`max_waiting` new requests; a full queue refuses with
  `EngineFull`; preempted requests come back to its front beyond that bound);
- admitted in arrival order while a slot (one of `max_num_seqs` rows) and pages are free;
- prefilling: its context runs in chunks of at most `max_num_batched_tokens` tokens per step
  (all prefilling requests together), mixed into the same step as the decoding rounds (the
  chunks of a step are padded to a power-of-two width, in a power-of-two number of rows that
  the budget holds);
- decoding: each step runs `num_scheduler_steps` rounds in a row for every decoding request
  (`spec_round`: the draft proposes, the scheduler picks verify lengths, the target verifies,
  rejection sampling commits), after the host has given it pages for those rounds' writes.
  When the scheduler knows the draft's cost, each round program also says whether drafting
  pays for its rows (`speculation_pays`, from their latest confidences; for the rows that ran
  when all have finished); while it does not, the host launches autoregressive rounds
  instead (a second round program, without the draft's proposal: the draft only takes in the
  new positions), which decide again as rows come and go. While drafting does not pay, the host probes it with one drafted step now
  and then: 2 undrafted steps after drafting stopped paying, then after a gap that doubles
  each time a probe finds that it still does not pay (4, 8, ... steps, up to PROBE_LIMIT
  rounds and at least 2 steps). A draft that does not pay then costs one drafted step in about
  PROBE_LIMIT rounds (under 1% for a draft costing as much as the target), and one that starts
  to pay is found within about PROBE_LIMIT rounds (half a second at 1 ms a round).
  The decision is made on the host, a step or two late, rather than by a branch inside the
  program: on an H200 with SmolLM2, rounds behind such a branch took as long as drafted ones
  (docs/benchmarks.md).
  The confidences forecast a round's accepted tokens, and a forecast can be off for the
  traffic at hand (a confidence head calibrated on other prompts, or at another temperature).
  So the decision scales each forecast by what the engine's drafted rounds have accepted per
  token their own confidences forecast (`forecast_scale`: sums over the rows' drafted rounds,
  decayed so that about the last FORECAST_MEMORY count, with FORECAST_PRIOR tokens of evidence
  for 1). A request that has not drafted yet counts as the other rows that have, and when none
  has (say, one request at a time) as the rows of the last drafted round, not as sure to be
  accepted: a new request does not draft while drafting does not pay. Only finished rounds
  set these, so the output stays exactly the target's.
  A request whose prefill ends in a step joins that step's rounds when pages for them are
  free. Several rounds per step divide the host's work per step (planning, the launch,
  reading back) among them: for a small model that work, not the device, sets the pace. The
  cost is latency: a request admitted during a step starts after it, its first token is read
  back with the step's rounds (time to first token grows by about that many rounds), and a
  request that finishes in its first round sits idle for the rest.

When pages run out for a decoding request, the newest request is preempted: its pages and
slot are freed and it goes back to the front of the queue; later its prompt plus the tokens
it has generated are prefilled again and it continues where it stopped, with the same random
stream (a request's draws depend only on its seed and token positions), so nothing is
dropped and nothing changes. A request that could never fit the pool is refused when added.

The device programs (`dspark_jax.serving.step`: a prefill, then the rounds) are specialised
on bucketed shapes only: the round's capacity (a power of two covering the highest decoding
slot), each program's block-table width (a power of two of pages; always a whole context's
with `kernels="pallas"`, since the kernel reads only the pages a row's length reaches), the
prefill's chunk width and rows (powers of two holding the longest chunk and the chunks) and
whether any request uses top-k/top-p; the rounds per step are fixed per engine. Programs are
compiled ahead of time (`dspark_jax.serving.programs`): a step whose shape is not compiled
yet runs a compiled program of more rows or wider chunks, padded, while its own compiles on
a background thread (COMPILE_THREADS of them), and waits only when none covers it; `precompile` compiles the largest
shapes at start-up so that none has to wait.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import itertools
import logging
import math
import time
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dspark_jax.decoding.batching import bucket
from dspark_jax.decoding.scheduler import AsyncPrefixScheduler
from dspark_jax.decoding.speculative import DecodeState, check_setup, resolve_kernels, use_kernels
from dspark_jax.models.draft import Draft
from dspark_jax.models.target import Target, param_shardings
from dspark_jax.sampling import SamplingParams as RowSampling
from dspark_jax.serving.pages import SCRATCH_PAGE, PageAllocator, page_bytes, pages_for_budget
from dspark_jax.serving.params import RequestOutput, SamplingParams
from dspark_jax.serving.programs import Programs
from dspark_jax.serving.step import PrefillBatch, engine_prefill, engine_round

log = logging.getLogger(__name__)

PROBE_LIMIT = 512  # rounds: the longest gap between two probes of a draft that does not pay
FORECAST_MEMORY = 256  # row-rounds (one row's drafted round each): the forecast scale's evidence weighs e times
#                       less for every FORECAST_MEMORY row-rounds drafted since
FORECAST_PRIOR = 2.0  # draft tokens of evidence for a forecast scale of 1 (the confidences trusted)
# Programs compiled at once off the steps' thread. One: with four, a CPU test run once crashed inside XLA (a
# segfault serializing an executable for the persistent cache), and what more threads gain was never measured.
COMPILE_THREADS = 1


# A step is logged as slow when it takes at least SLOW_STEP_SECONDS and more than SLOW_STEP_FACTOR
# times the typical step: a moving average (weight SLOW_STEP_WEIGHT) set by SLOW_STEP_AFTER steps first.
SLOW_STEP_FACTOR, SLOW_STEP_SECONDS, SLOW_STEP_AFTER, SLOW_STEP_WEIGHT = 10.0, 0.05, 20, 0.05


class EngineFull(RuntimeError):
    """The waiting queue is full: the request was not accepted (retry later)."""


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine started, and the current occupancy."""

    running: int  # requests holding a slot (prefilling or decoding)
    waiting: int
    pages_used: int
    pages_free: int
    preemptions: int
    steps: int
    rounds: int  # decoding rounds summed over requests
    tokens: int  # tokens committed by rounds
    verify_length_histogram: list[int]  # drafted rounds that verified 0..gamma draft tokens
    accepted_at_position: list[int]  # rounds whose draft token j+1 was accepted
    verified_at_position: list[int]  # rounds that verified draft token j+1
    program_shapes: int = 0  # device programs compiled (one per bucketed shape; `Engine.precompile`)
    compile_stalls: int = 0  # steps that waited for a program to compile
    compiles_pending: int = 0  # programs asked for and still compiling or queued
    undrafted_rounds: int = 0  # rounds decoded autoregressively because drafting did not pay
    forecast_scale: float = 1.0  # accepted draft tokens per token the confidences forecast (`Engine.forecast_scale`)
    step_seconds: float = 0.0  # wall time inside `step` (planning, launching, waiting for the device, committing)
    wait_seconds: float = 0.0  # the part of step_seconds spent blocked reading launched steps back from the device

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_at_position(self) -> list[float]:
        return [a / v if v else 0.0 for a, v in zip(self.accepted_at_position, self.verified_at_position)]


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """An engine's bounds on requests: its model's vocabulary and context, its stop ids, its
    queue and its KV pool."""

    vocab_size: int
    max_model_len: int
    eos_ids: tuple[int, ...]
    max_stop_ids: int
    max_waiting: int
    usable_pages: int
    page_size: int
    gamma: int

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[list[int], tuple[int, ...], int]:
        """Raises a ValueError naming the field a request gets wrong; returns (prompt, stop
        ids, tokens to generate at most)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a dspark_jax.serving.SamplingParams, got {type(params).__name__}")
        prompt = list(prompt_ids)
        vocab = self.vocab_size
        if not prompt:
            raise ValueError("prompt_ids is empty")
        bad = [t for t in prompt if not (isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt_ids has {bad[0]!r}, not a token id in [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt_ids has {len(prompt)} tokens; the context is {self.max_model_len} "
                             "(max_model_len), which leaves no room to generate")
        stop_ids = tuple(dict.fromkeys((() if params.ignore_eos else self.eos_ids) + params.stop_token_ids))
        if len(stop_ids) > self.max_stop_ids:
            raise ValueError(f"stop_token_ids: {len(stop_ids)} stop ids with EOS exceed the engine's "
                             f"max_stop_ids={self.max_stop_ids}")
        if any(t >= vocab for t in stop_ids):
            raise ValueError(f"stop_token_ids has an id outside the vocabulary [0, {vocab})")
        max_new = min(params.max_tokens, self.max_model_len - len(prompt))
        need = self.pages_for(len(prompt) + max_new + self.gamma + 1)
        if need > self.usable_pages:
            raise ValueError(f"a request of {len(prompt)} prompt tokens and max_tokens={params.max_tokens} needs "
                             f"{need} KV pages; the pool has {self.usable_pages}")
        return prompt, stop_ids, max_new

    def max_tokens_for(self, prompt_len: int) -> int:
        """The most tokens a request with this prompt length may ask for: the rest of the
        context, as far as the whole KV pool holds it (< 1: the prompt alone is too long)."""
        pool = self.usable_pages * self.page_size - self.gamma - 1
        return min(self.max_model_len, pool) - prompt_len

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    key_seed: int
    stop_ids: tuple[int, ...]
    max_new: int
    arrival: int
    output: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # context positions already in the caches
    decoding: bool = False
    preempted: bool = False  # has held a slot (waits outside the queue's bound)
    unread: int = 0  # the most tokens that launched, unread steps may commit
    launched: int = 0  # launched, unread units of work (a round or a first token), >= 1 token each

    @property
    def context(self) -> list[int]:
        """What prefill runs: the prompt, plus all but the last generated token after a
        preemption (the last one is the next anchor)."""
        return self.prompt + self.output[:-1]


@dataclasses.dataclass
class _Launch:
    """A step dispatched to the device and not read back yet."""

    decoding: list[_Request]  # rows of the round
    prefilling: list[_Request]  # rows of the prefill batch
    firsts: list[bool]  # per prefill row: its chunk ends the context and samples a first token
    drafting: bool = True  # the rounds draft
    probe: bool = False  # they draft to probe whether drafting pays (it did not when last read back)
    rnd: list | None = None  # engine_round's (RoundOutput, done, drafting pays) on the device, once dispatched
    prefilled: list | None = None  # engine_prefill's (first token, done) on the device
    programs: list = dataclasses.field(default_factory=list)  # the keys of the programs it runs
    first_runs: list = dataclasses.field(default_factory=list)  # those this engine had never run before


class Engine:
    """Continuous-batching engine over a target and an optional draft (module docstring).

    target, draft: a `Target` and a `Draft` (None decodes autoregressively); scheduler: a
    `dspark_jax.decoding.scheduler` object or None (verify every draft token);
    max_num_seqs: request slots; page_size: positions per KV page; kv_memory: the pool's
    budget, a fraction of free device memory or a byte count (`pages_for_budget`), unless
    num_pages is given; max_model_len: prompt plus generated tokens per request (default: the
    model's positions, less a verify block); max_num_batched_tokens: prefill tokens per step
    (the chunk size); max_waiting: queue bound; max_stop_ids: stop ids per request (EOS ids
    included); seed: where requests without a seed get theirs; mesh: a (data, fsdp, tensor)
    mesh to run under (weights and KV pages are split over its tensor axis);
    async_scheduling: plan each step while the previous one runs (`step`);
    num_scheduler_steps: decoding rounds per step (vLLM's name for the same idea);
    background_compile: compile a step's new shape on background threads while a larger
    compiled program runs it (one device; under a mesh programs compile at their first step);
    kernels: how the target and the draft attend over their pages: "xla" (every page of the
    block table gathered, then attention over them) or "pallas" (the ragged paged attention
    kernel of `pallas_kernels`, which reads only the pages below each row's length: 1.1x to
    3.5x faster than "xla" per layer on an H200, docs/benchmarks.md), with the fused sampling
    kernels of DSpark/DFlash draft slots and rejection sampling (one device, the shapes
    `use_kernels` accepts on a GPU, and interpreted on a CPU, which is for tests); "auto" (the
    default): "pallas" on one GPU, where the kernels are measured faster, else "xla"
    (`resolve_kernels`).
    """

    def __init__(self, target: Target, draft: Draft | None = None, *, scheduler=None, max_num_seqs: int = 64,
                 page_size: int = 16, kv_memory: float | int | None = None, num_pages: int | None = None,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 512, max_waiting: int = 4096,
                 max_stop_ids: int = 8, seed: int = 0, mesh: Mesh | None = None, async_scheduling: bool = True,
                 num_scheduler_steps: int = 1, kernels: str = "auto", background_compile: bool = True):
        kernels = resolve_kernels(kernels, target, draft, mesh=mesh, page_size=page_size)
        target, draft = use_kernels(target, draft, kernels, mesh=mesh, page_size=page_size)
        log.info("paged attention: %s", kernels)
        cfg = target.config
        self.gamma = 0 if draft is None else draft.config.block_size
        check_setup(cfg, None if draft is None else draft.config, scheduler)
        for name, value in (("max_num_seqs", max_num_seqs), ("page_size", page_size),
                            ("max_num_batched_tokens", max_num_batched_tokens), ("max_waiting", max_waiting),
                            ("max_stop_ids", max_stop_ids), ("num_scheduler_steps", num_scheduler_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        limit = cfg.max_position_embeddings - (self.gamma + 1)
        self.max_model_len = limit if max_model_len is None else max_model_len
        if not 1 < self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] for this model (its positions less a verify "
                             f"block), got {max_model_len!r}")
        if mesh is not None:
            target, draft = _place(target, draft, mesh)
        self.target, self.draft, self.scheduler, self.mesh = target, draft, scheduler, mesh
        self.async_scheduling, self.num_scheduler_steps = async_scheduling, num_scheduler_steps
        self.max_num_seqs, self.page_size = max_num_seqs, page_size
        self.max_num_batched_tokens, self.max_waiting, self.max_stop_ids = max_num_batched_tokens, max_waiting, max_stop_ids
        self.eos_ids = tuple(cfg.eos_token_ids)
        self.max_pages = math.ceil((self.max_model_len + self.gamma + 1) / page_size)  # per request
        # The kernel reads only the pages below each row's length (the target's and the draft's),
        # so every program takes whole-context block tables: one shape per capacity.
        self._full_tables = kernels == "pallas"

        layer_configs = [cfg] + ([] if draft is None else [draft.config.layers])
        shards = 1 if mesh is None else _kv_shards(mesh, cfg)
        per_page = page_bytes(layer_configs, page_size, target.dtype, shards)
        if num_pages is None:
            num_pages = pages_for_budget(kv_memory, per_page, jax.devices()[0] if mesh is None else mesh.devices.flat[0])
        self.pages = PageAllocator(num_pages)
        # what a request is checked against (picklable: a client in another process checks
        # requests with it before sending them)
        self.limits = RequestLimits(cfg.vocab_size, self.max_model_len, self.eos_ids, max_stop_ids, max_waiting,
                                    self.pages.usable, page_size, self.gamma)
        log.info("KV pool: %d pages of %d positions (%.1f MiB per device)", num_pages, page_size,
                 num_pages * per_page / 2**20)

        self._state = self._initial_state(num_pages)
        self._inflight: _Launch | None = None
        # whether the next rounds draft: as the last rounds read back found (`speculation_pays`),
        # or to probe after _probe_gap undrafted steps (_undrafted_steps planned in a row)
        self._drafting, self._probing = True, False
        self._probe_gap, self._undrafted_steps = 1, 0
        self._forecast = (0.0, 0.0)  # decayed sums over drafted rounds: (accepted, forecast) draft tokens
        # [G] mean confidences of the last drafted round's rows, for rows that have not drafted (NaN: none yet)
        self._fallback = np.full((self.gamma,), np.nan, np.float32)
        # state shapes and shardings, for compiling programs off the main thread
        self._state_avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                         self._state)
        self._programs = Programs(self._compile, background_compile and mesh is None,
                                  functools.partial(_cover_allowed, self._full_tables, self.pages.usable),
                                  threads=COMPILE_THREADS)
        weakref.finalize(self, self._programs.close)
        self._programs_run: set = set()  # keys of the programs launched so far
        self._typical_step = (0.0, 0)  # moving average of step seconds (steps without a compile stall), count
        self._slots: list[_Request | None] = [None] * max_num_seqs
        self._waiting: collections.deque[_Request] = collections.deque()
        self._preempted_waiting = 0  # preempted requests in _waiting
        self._requests: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)
        g = self.gamma
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, [0] * (g + 1), [0] * g, [0] * g)

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> str:
        """Queues a request and returns its id. Raises ValueError naming the bad field, or
        EngineFull when the queue is full; either way nothing else changes."""
        params = SamplingParams() if params is None else params
        prompt, stop_ids, max_new = self.check_request(prompt_ids, params)
        if request_id is not None and str(request_id) in self._requests:
            raise ValueError(f"request_id {str(request_id)!r} is already in use")
        if self.num_queued >= self.max_waiting:
            raise EngineFull(f"the engine's queue is full ({self.max_waiting} waiting requests); retry later")
        rid = str(request_id) if request_id is not None else next(i for i in map(str, self._ids) if i not in self._requests)
        seed = int(self._seeds.integers(2**32)) if params.seed is None else params.seed
        request = _Request(rid, prompt, params, seed, stop_ids, max_new, next(self._arrivals))
        self._requests[rid] = request
        self._waiting.append(request)
        return rid

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_queued(self) -> int:
        """Waiting requests that count against `max_waiting`: those never admitted (a
        preempted request was accepted once and is never refused for the bound)."""
        return len(self._waiting) - self._preempted_waiting

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[list[int], tuple[int, ...], int]:
        """Raises the ValueError `add_request` would for this prompt and params, changing
        nothing; returns (prompt, stop ids, tokens to generate at most)."""
        return self.limits.check(prompt_ids, params)

    def max_tokens_for(self, prompt_len: int) -> int:
        return self.limits.max_tokens_for(prompt_len)

    def abort(self, request_id: str) -> bool:
        """Drops a request and frees its slot and pages at once; False if it is not known."""
        request = self._requests.pop(str(request_id), None)
        if request is None:
            return False
        if request.slot is None:
            self._waiting.remove(request)
            self._preempted_waiting -= request.preempted
        else:
            self._release(request)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def state(self) -> DecodeState:
        """The device state over every slot (benchmarks and tests read it; `step` replaces it)."""
        return self._state

    def stats(self) -> EngineStats:
        s = self._stats
        return dataclasses.replace(
            s, running=sum(r is not None for r in self._slots), waiting=len(self._waiting),
            pages_used=self.pages.num_used, pages_free=self.pages.num_free,
            verify_length_histogram=list(s.verify_length_histogram), accepted_at_position=list(s.accepted_at_position),
            verified_at_position=list(s.verified_at_position), program_shapes=len(self._programs),
            compile_stalls=self._programs.stalls, compiles_pending=self.compiles_pending,
            forecast_scale=self.forecast_scale)

    @property
    def forecast_scale(self) -> float:
        """Draft tokens the drafted rounds accepted per token their confidences forecast (the
        prefix survivals of the verified slots), over about the last FORECAST_MEMORY rows'
        drafted rounds, with FORECAST_PRIOR tokens for 1: the drafting decision scales its
        forecast by it (`speculation_pays`)."""
        accepted, forecast = self._forecast
        return (accepted + FORECAST_PRIOR) / (forecast + FORECAST_PRIOR)

    @property
    def compiles_pending(self) -> int:
        """Programs asked for and still compiling or queued (cheaper than `stats()`)."""
        return self._programs.pending

    def wait_for_programs(self) -> None:
        """Blocks until every program asked for (`precompile`, or steps' own shapes that ran
        padded meanwhile) has compiled."""
        self._programs.wait()

    def close(self) -> None:
        """Stops compiling in the background (queued compilations are dropped). The engine can
        still step; shapes it then meets compile when first needed."""
        self._programs.close()

    def precompile(self, wait: bool = False) -> None:
        """Compiles the largest program shapes this engine can run (on the background threads
        unless `background_compile` is off, and then now): its widest round at every block-table
        width, drafted and undrafted where the scheduler may skip drafting, and for each chunk
        width the prefill of the most rows the token budget holds, all for rows without
        top-k/top-p. Once they are compiled, a step without top-k/top-p rows runs one of them,
        padded, while its own shape compiles, rather than waiting (with `kernels="xla"`, only
        one that gathers at most 4 times its pages or the pool's: `_cover_allowed`). Under a
        mesh programs compile at their first step, and this does nothing.
        wait: block until they are compiled."""
        if self.mesh is not None:
            log.info("precompile: under a mesh, programs compile at their first step")
            return
        budget = bucket(self.max_num_batched_tokens)
        cap = min(self.max_num_seqs, bucket(self.max_num_seqs, 4))
        gated = self.draft is not None and getattr(self.scheduler, "draft_seconds", None) is not None
        keys, draftings = [], (True, False) if gated else (True,)
        for columns in sorted({self._table_width_for(pages) for pages in range(1, self.max_pages + 1)}):
            keys += [("round", (cap,), (columns, False, drafting)) for drafting in draftings]
            widest = bucket(columns * self.page_size)  # a chunk's width, at most its table's positions
            keys += [("prefill", (min(bucket(self.max_num_seqs, 1), max(1, budget // w)), w), (columns, False))
                     for w in (16 << i for i in range(budget.bit_length())) if w <= min(budget, widest)]
        log.info("precompile: %d program shapes to compile", len(keys))
        self._programs.precompile(keys)
        if wait:
            self._programs.wait()

    # ---------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Runs one device step: `num_scheduler_steps` rounds for every decoding request and a
        prefill chunk for those still prefilling (admitting waiting requests first). Returns
        the tokens each request committed (a finished request's last output ends its stream).

        With asynchronous scheduling, what a step returns is the previous step's tokens: step
        n + 1 is planned (on upper bounds of the tokens step n commits) and launched before step
        n is read back, so the device always has the next step queued and the host's planning
        and bookkeeping overlap the device's work. When the free pages might not cover the next
        step's writes, the previous step is committed before planning, so that preemption
        decides on known lengths."""
        start, outputs, stalls = time.perf_counter(), [], self._programs.stalls
        committed = []  # the launches this step waited for
        if self._inflight is not None and self._round_pages_needed() > self.pages.num_free:
            outputs += self._commit(self._inflight)
            committed.append(self._inflight)
            self._inflight = None
        plan = self._plan()
        launched = None if plan is None else self._dispatch(*plan)
        if self._inflight is not None:
            outputs += self._commit(self._inflight)
            committed.append(self._inflight)
        self._inflight = launched
        if launched is not None and not self.async_scheduling:
            outputs += self._commit(launched)
            committed.append(launched)
            self._inflight = None
        seconds = time.perf_counter() - start
        self._stats.step_seconds += seconds
        if self._programs.stalls == stalls:  # a step that waited for a compilation is logged already
            self._watch_step(seconds, [launched] if launched else [], committed)
        return outputs

    def _watch_step(self, seconds: float, launched: list[_Launch], committed: list[_Launch]) -> None:
        """Logs a step far slower than the typical one (a moving average over the steps that
        waited for no compilation) with the programs it ran, then updates the average."""
        typical, count = self._typical_step
        if count >= SLOW_STEP_AFTER and seconds > max(SLOW_STEP_SECONDS, SLOW_STEP_FACTOR * typical):
            log.info("a step took %.0f ms, %.0fx the typical step, without waiting for a compilation; it launched %s "
                     "and read back %s", 1e3 * seconds, seconds / typical, _describe(launched), _describe(committed))
        weight = max(1 / (count + 1), SLOW_STEP_WEIGHT)
        self._typical_step = (typical + weight * (seconds - typical), count + 1)

    def _plan(self) -> tuple | None:
        """The next step's rows and host-side inputs, with the requests' books updated as if
        it had run (None: nothing to run). A request whose prefill ends in this step joins the
        step's rounds too (the prefill runs first) when pages for them are free."""
        decoding = self._plan_decoding()
        chunks = self._plan_prefill()
        if not decoding and not chunks:
            return None
        filtered = any(r.params.filtered for r in self._slots if r is not None)
        batch = prefill = None
        keys = []
        if chunks:
            rows, width = self._prefill_shape(chunks)
            columns = self._table_width([r for r, _ in chunks])
            key, prefill = self._programs.get(("prefill", (rows, width), (columns, filtered)))
            keys.append(key)
            rows, width = key[1]  # a compiled program's shape, at least this step's
            batch = self._prefill_batch(chunks, rows, width, columns, filtered)
        firsts = []
        for r, n in chunks:
            r.computed += n
            r.decoding = r.computed == len(r.context)
            firsts.append(r.decoding and not r.output)  # resumed requests know their next token
            r.unread += firsts[-1]
            r.launched += firsts[-1]
        decoding += [r for r, _ in chunks if r.decoding and not self._surely_done(r)
                     and self._grow(r, self._round_positions(r))]
        table = running = rnd = None
        if decoding:
            cap = min(self.max_num_seqs, bucket(1 + max(r.slot for r in decoding), 4))
            columns = self._table_width(decoding)
            key, rnd = self._programs.get(("round", (cap,), (columns, filtered, self._drafting)))
            keys.append(key)
            (cap,) = key[1]  # a compiled program's capacity, at least this step's
            table = np.full((cap, columns), SCRATCH_PAGE, np.int32)
            running = np.zeros((cap,), bool)
            for r in decoding:
                table[r.slot, : len(r.pages)] = r.pages
                running[r.slot] = True
                r.unread += self.num_scheduler_steps * self._round_width(self._drafting)
                r.launched += self.num_scheduler_steps
            self._undrafted_steps = 0 if self._drafting else self._undrafted_steps + 1
        launch = _Launch(decoding, [r for r, _ in chunks], firsts, self._drafting, self._probing, programs=keys)
        if decoding and self._probing:  # one probing step: the next ones are undrafted until it is read back
            self._drafting = self._probing = False
        decision = (np.float32(self.forecast_scale), self._fallback.copy())
        return launch, filtered, (prefill, batch), (rnd, table, running, *decision)

    def _dispatch(self, launch: _Launch, filtered: bool, prefill, rnd) -> _Launch:
        """Runs the planned programs (each (program, its inputs), or (None, ...)) without waiting
        for them; starts copying their outputs to the host."""
        launch.first_runs = [key for key in launch.programs if key not in self._programs_run]
        self._programs_run.update(launch.programs)
        state = self._state._replace(sampling=self._state.sampling.replace(filtered=filtered))
        params = (self.target.params, None if self.draft is None else self.draft.params)
        if prefill[0] is not None:
            state, *launch.prefilled = prefill[0](*params, state, *prefill[1:])
        if rnd[0] is not None:
            state, *launch.rnd = rnd[0](*params, state, *rnd[1:])
        self._state = state
        jax.tree.map(lambda x: x.copy_to_host_async(), (launch.rnd, launch.prefilled))
        self._stats.steps += 1
        return launch

    def _commit(self, launch: _Launch) -> list[RequestOutput]:
        """Waits for a launched step and commits its tokens to the requests still alive (one
        finished or aborted since the launch is skipped)."""
        start = time.perf_counter()
        rnd, prefilled = jax.device_get((launch.rnd, launch.prefilled))
        self._stats.wait_seconds += time.perf_counter() - start
        outputs = []
        for i, (r, first) in enumerate(zip(launch.prefilling, launch.firsts)):
            r.unread -= first
            r.launched -= first
            if first and self._requests.get(r.id) is r:
                token = int(prefilled[0][i])
                r.output.append(token)
                outputs.append(self._emit(r, [token], bool(prefilled[1][i])))
        if launch.rnd is not None and launch.drafting:
            self._learn_forecast(rnd[0])
        if launch.rnd is not None:
            self._decide_drafting(launch, bool(rnd[2]))
        for r in launch.decoding:
            r.unread -= self.num_scheduler_steps * self._round_width(launch.drafting)
            r.launched -= self.num_scheduler_steps
            if self._requests.get(r.id) is r:
                outputs.append(self._finish_round(r, *rnd[:2]))
        return outputs

    def _learn_forecast(self, out) -> None:
        """Adds a drafted step's rounds (RoundOutput fields [rounds, cap, ...], on the host) to
        the forecast scale's sums, the earlier sums decayed by e^(-row rounds / FORECAST_MEMORY),
        and keeps the mean confidences of its last round's drafted rows as the fallback."""
        drafted = out.drafted
        if not drafted.any():
            return
        last = np.flatnonzero(drafted.any(axis=1))[-1]
        self._fallback = out.confidence[last][drafted[last]].mean(axis=0).astype(np.float32)
        decay = math.exp(-int(drafted.sum()) / FORECAST_MEMORY)
        accepted, forecast = self._forecast
        self._forecast = (decay * accepted + float(out.accepted[drafted].sum()),
                          decay * forecast + float(out.forecast[drafted].sum()))

    def _decide_drafting(self, launch: _Launch, pays: bool) -> None:
        """Whether the steps planned from now on draft (with asynchronous scheduling, the step
        after the next one, which is already launched), from a step read back: they do when
        drafting pays for the step's rows, or to probe once the undrafted steps planned in a row
        reach the gap. A drafted step that found that drafting pays sets the gap to 1 step; a
        probe that found that it does not doubles it, to max(2, PROBE_LIMIT / rounds per step)
        steps at most; any other drafted step that found that it does not makes it at least 2
        steps. Counting steps when they are planned (`_plan`) keeps a decided probe standing
        across read-backs until a step is planned, and the gaps exact with asynchronous
        scheduling."""
        if launch.drafting:
            longest = max(2, PROBE_LIMIT // self.num_scheduler_steps)
            if pays:
                self._probe_gap = 1
            else:
                self._probe_gap = min(2 * self._probe_gap, longest) if launch.probe else max(self._probe_gap, 2)
        self._probing = not pays and self._undrafted_steps >= self._probe_gap
        self._drafting = pays or self._probing

    def _compile(self, key):
        """The program of a `Programs` key, a callable of (target params, draft params, state,
        inputs...): compiled ahead of time on one device (on a background thread: it reads no
        live state); under a mesh, jit's own dispatch, which compiles at the first call (the
        steps' outputs may be laid out unlike the initial state, over a data axis, and jit
        follows them where a compiled program would refuse them). A round: sizes (capacity,),
        exact (table columns, filtered, drafting); a prefill: sizes (rows, chunk width), exact
        (table columns, filtered)."""
        kind, sizes, exact = key
        filtered = exact[1]
        models = (self.target.model, None if self.draft is None else self.draft.model, self.scheduler)
        params = (self.target.params, None if self.draft is None else self.draft.params)
        if kind == "round":
            (cap,), (columns, _, drafting) = sizes, exact
            inputs = (np.zeros((cap, columns), np.int32), np.zeros((cap,), bool), np.float32(1),
                      np.full((self.gamma,), np.nan, np.float32))
            program = functools.partial(engine_round, *models)
            statics = (self.num_scheduler_steps, drafting)
        else:
            (rows, width), columns = sizes, exact[0]
            inputs = (self._prefill_batch([], rows, width, columns, filtered),)
            program, statics = functools.partial(engine_prefill, *models), ()
        if self.mesh is not None:
            return lambda *args: program(*args, *statics)
        state = self._state_avals._replace(sampling=self._state_avals.sampling.replace(filtered=filtered))
        return program.func.lower(*models, *params, state, *inputs, *statics).compile()

    def _round_width(self, drafting: bool) -> int:
        """Tokens a round may commit, and positions past its anchor it writes, plus one: a
        verify block when it drafts, the anchor alone when it does not."""
        return self.gamma + 1 if drafting else 1

    def _round_positions(self, r: _Request) -> int:
        """Positions r's next step may write up to (a step drafts when `_drafting`): its
        context, the tokens steps in flight and the step's rounds before its last may commit (a
        request with max_new tokens is done and writes nothing), and the last round's writes
        past its anchor. Undrafted steps need fewer pages, and narrower block tables."""
        width = self._round_width(self._drafting)
        ahead = r.unread + (self.num_scheduler_steps - 1) * width
        return len(r.prompt) + min(len(r.output) + ahead, r.max_new - 1) + width - 1

    def _surely_done(self, r: _Request) -> bool:
        """Steps in flight will finish r: each round commits at least one token unless r stops."""
        return len(r.output) + r.launched >= r.max_new

    def _round_pages_needed(self) -> int:
        return sum(max(0, self._pages_for(self._round_positions(r)) - len(r.pages))
                   for r in self._slots if r is not None and r.decoding and not self._surely_done(r))

    def _plan_decoding(self) -> list[_Request]:
        """Decoding requests, each with pages for this step's rounds' writes; preempts the
        newest requests when pages run out."""
        decoding = sorted((r for r in self._slots if r is not None and r.decoding and not self._surely_done(r)),
                          key=lambda r: r.arrival)
        planned = []
        for r in decoding:
            if r.slot is None:  # preempted for an older request earlier in this loop
                continue
            while not self._grow(r, self._round_positions(r)):
                self._preempt(max((q for q in self._slots if q is not None), key=lambda q: q.arrival))
                if r.slot is None:
                    break
            if r.slot is not None:
                planned.append(r)
        return [r for r in planned if r.slot is not None]

    def _plan_prefill(self) -> list[tuple[_Request, int]]:
        """(request, chunk length) for the prefilling requests, then admitted waiting ones, in
        arrival order, within the token budget and the free pages. The batch holds at most
        bucket(budget) // width rows of `width` tokens, width the power of two that holds the longest
        chunk; chunks beyond those rows wait for the next step (their requests keep their slot)."""
        budget = self.max_num_batched_tokens
        chunks = []
        for r in sorted((r for r in self._slots if r is not None and not r.decoding), key=lambda r: r.arrival):
            n = min(len(r.context) - r.computed, budget)
            if n <= 0 or not self._grow(r, r.computed + n):
                break
            chunks.append((r, n))
            budget -= n
        while self._waiting and budget > 0 and None in self._slots:
            r = self._waiting[0]
            n = min(len(r.context), budget)
            if not self._grow(r, n):
                break
            self._waiting.popleft()
            self._preempted_waiting -= r.preempted
            r.slot = self._slots.index(None)
            self._slots[r.slot] = r
            chunks.append((r, n))
            budget -= n
        if not chunks:
            return chunks
        rows = self._prefill_shape(chunks)[0]
        for r, _ in reversed(chunks[rows:]):
            if r.computed == 0:  # admitted just now: back to the queue rather than idle in a slot
                self._release(r)
                self._waiting.appendleft(r)
                self._preempted_waiting += r.preempted
        return chunks[:rows]

    def _prefill_shape(self, chunks) -> tuple[int, int]:
        """(rows, width) of the prefill batch: the powers of two that hold the chunks and the
        longest chunk, rows * width at most the token budget's power of two (a lone short
        prompt computes its own bucket, not the whole budget)."""
        width = bucket(max(n for _, n in chunks))
        return min(bucket(len(chunks), 1), max(1, bucket(self.max_num_batched_tokens) // width)), width

    def _pages_for(self, positions: int) -> int:
        return self.limits.pages_for(positions)

    def _grow(self, r: _Request, positions: int) -> bool:
        """Gives r pages for `positions` positions; False (nothing taken) if too few are free."""
        more = self._pages_for(positions) - len(r.pages)
        if more <= 0:
            return True
        pages = self.pages.allocate(more)
        if pages is None:
            return False
        r.pages += pages
        return True

    def _release(self, r: _Request) -> None:
        self.pages.free(r.pages)
        r.pages = []
        if r.slot is not None:
            self._slots[r.slot] = None
            r.slot = None

    def _preempt(self, r: _Request) -> None:
        """Frees r's slot and pages and puts it back at the front of the queue; its context is
        recomputed when it is admitted again. Only with no step in flight (`step`)."""
        assert self._inflight is None, "preempting while a step is in flight"
        log.info("preempting request %s (%d tokens generated): the KV pool is full", r.id, len(r.output))
        self._release(r)
        r.computed, r.decoding, r.preempted = 0, False, True
        self._waiting.appendleft(r)
        self._preempted_waiting += 1
        self._stats.preemptions += 1

    def _table_width(self, requests) -> int:
        return self._table_width_for(max(len(r.pages) for r in requests))

    def _table_width_for(self, pages: int) -> int:
        """Block-table columns of a program over requests holding up to `pages` pages: a power
        of two that holds them (attention in XLA gathers every column), or a whole context's
        pages (`_full_tables`)."""
        if self._full_tables:
            return self.max_pages
        return min(bucket(pages, 4), self.max_pages)

    def _prefill_batch(self, chunks, rows: int, c: int, width: int, filtered: bool) -> PrefillBatch:
        """The prefill inputs of `chunks` in `rows` rows of `c` tokens with `width`-column
        block tables (padding rows go to no slot)."""
        slots = np.full((rows,), self.max_num_seqs, np.int32)
        table = np.full((rows, width), SCRATCH_PAGE, np.int32)
        start, num_new, given, generated, max_new = (np.zeros((rows,), np.int32) for _ in range(5))
        final = np.zeros((rows,), bool)
        tokens, next_ids = np.zeros((rows, c), np.int32), np.zeros((rows, c), np.int32)
        stop_ids = np.full((rows, self.max_stop_ids), -1, np.int32)
        temperature, top_p, top_k = np.zeros((rows,), np.float32), np.ones((rows,), np.float32), np.zeros((rows,), np.int32)
        seeds = np.zeros((rows,), np.uint32)
        for i, (r, n) in enumerate(chunks):
            context = r.context
            slots[i], start[i], num_new[i] = r.slot, r.computed, n
            table[i, : len(r.pages)] = r.pages
            tokens[i, :n] = context[r.computed : r.computed + n]
            following = context[r.computed + 1 : r.computed + n + 1]
            next_ids[i, : len(following)] = following
            final[i] = r.computed + n == len(context)
            given[i] = r.output[-1] if r.output else -1
            generated[i], max_new[i] = len(r.output), r.max_new
            stop_ids[i, : len(r.stop_ids)] = r.stop_ids
            temperature[i], top_p[i], top_k[i] = r.params.temperature, r.params.top_p, r.params.top_k
            seeds[i] = r.key_seed
        sampling = RowSampling(temperature, top_k, top_p, filtered=filtered)
        return PrefillBatch(slots, table, start, tokens, next_ids, num_new, final, given, generated, max_new, sampling,
                            seeds, stop_ids)

    def _finish_round(self, r: _Request, rnd, done) -> RequestOutput:
        """Commits r's tokens from a step's rounds (fields [rounds, cap, ...])."""
        s, st = r.slot, self._stats
        new = []
        for k in np.flatnonzero(rnd.active[:, s]):
            count = int(rnd.count[k, s])
            new += rnd.tokens[k, s, :count].tolist()
            st.rounds += 1
            st.tokens += count
            if self.gamma and not rnd.drafted[k, s]:
                st.undrafted_rounds += 1
            elif self.gamma:
                length, accepted = int(rnd.verify_length[k, s]), int(rnd.accepted[k, s])
                st.verify_length_histogram[length] += 1
                for j in range(length):
                    st.verified_at_position[j] += 1
                    st.accepted_at_position[j] += j < accepted
        r.output += new
        return self._emit(r, new, bool(done[s]))

    def _emit(self, r: _Request, new: list[int], done: bool) -> RequestOutput:
        if not done:
            return RequestOutput(r.id, new, False)
        reason = "stop" if r.output and r.output[-1] in r.stop_ids else "length"
        self._release(r)
        del self._requests[r.id]
        return RequestOutput(r.id, new, True, reason)

    # --------------------------------------------------------------- device state

    def _initial_state(self, num_pages: int) -> DecodeState:
        n, g = self.max_num_seqs, self.gamma
        target, draft = self.target, self.draft
        features = 0 if draft is None else len(draft.config.target_layer_ids) * target.config.hidden_size
        tcache = target.model.init_paged_cache(num_pages, self.page_size)
        dcache = None if draft is None else draft.model.init_paged_cache(num_pages, self.page_size)
        zeros = lambda: jnp.zeros((n,), jnp.int32)  # distinct buffers: the state is donated
        state = DecodeState(
            target_cache=tcache.rows(tcache.block_table, zeros()),
            draft_cache=None if dcache is None else dcache.rows(dcache.block_table, zeros()),
            pending_features=jnp.zeros((n, g + 1, features), target.dtype),
            pending_next=jnp.zeros((n, g + 1), jnp.int32), pending_count=zeros(), anchor=zeros(), generated=zeros(),
            max_new=zeros(), done=jnp.ones((n,), bool), sampling=RowSampling.rows(n),
            keys=jax.vmap(jax.random.key)(jnp.zeros((n,), jnp.uint32)),
            stop_ids=jnp.full((n, self.max_stop_ids), -1, jnp.int32),
            # copied: the scheduler may return one array twice, and the state is donated
            scheduler_state=jax.tree.map(jnp.copy, self.scheduler.init_state(n, g))
            if isinstance(self.scheduler, AsyncPrefixScheduler) else (),
            last_confidence=jnp.full((n, g), jnp.nan, jnp.float32),
        )
        if self.mesh is None:  # committed to the device, like every later state (one compile, not two)
            return jax.device_put(state, jax.devices()[0])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        place = lambda cache: None if cache is None else cache.rows(*jax.device_put(
            (cache.block_table, cache.lengths), replicated))  # the pools keep their KV-head split
        rest = jax.device_put(state._replace(target_cache=None, draft_cache=None), replicated)
        return rest._replace(target_cache=place(state.target_cache), draft_cache=place(state.draft_cache))


def _describe(launches: list[_Launch]) -> str:
    """The programs of some launches, for a log line: kind, sizes and options, and whether it
    was the first time this engine ran that program."""
    names = [f"{key[0]} {key[1]} {key[2]}" + (" (its first run)" if key in launch.first_runs else "")
             for launch in launches for key in launch.programs]
    return ", ".join(names) or "nothing"


def freeze_heap() -> tuple[float, int]:
    """Collects garbage once, then exempts every object alive from later collections (a
    serving process calls it once its model and engine are built). A full collection walks
    every tracked object: with a model, its tokenizer and JAX loaded that is a few hundred
    thousand (`bench_engine.py` reports how many and how long), and it comes at unforeseen
    steps. Frozen, they are never walked again; objects made later are collected as usual.
    Returns the collection's seconds and the number of objects frozen."""
    start = time.perf_counter()
    gc.collect()
    seconds = time.perf_counter() - start
    gc.freeze()
    return seconds, gc.get_freeze_count()


def _cover_allowed(full_tables: bool, pool_pages: int, cover, step) -> bool:
    """Whether program `cover` may run `step` padded (`Programs` keys; sizes[0] is rows,
    exact[0] table columns): always with whole-context tables (the kernel reads only the
    pages below each row's length); else only if its rows x columns, the pages XLA's attention
    gathers per layer, are at most the pool's pages or 4 times the step's own (a larger gather
    could run out of memory where the step's own program would not)."""
    gathered = lambda key: key[1][0] * key[2][0]
    return full_tables or gathered(cover) <= max(pool_pages, 4 * gathered(step))


def _kv_shards(mesh: Mesh, config) -> int:
    """How many ways every layer's page pools split over the tensor axis (1 if some layer's
    key/value heads do not divide)."""
    tensor = mesh.shape["tensor"]
    heads = {config.layer_spec(i).num_kv_heads for i in range(config.num_layers)}
    return tensor if all(k % tensor == 0 for k in heads) else 1


def _place(target: Target, draft: Draft | None, mesh: Mesh):
    """The target's weights split over the mesh by its sharding rules, and the draft's
    replicated (it is small) with the target's embedding and LM head shared."""
    _, shardings = param_shardings(target.config, target.dtype, mesh, target.rules)
    placed = Target(target.config, jax.device_put(target.params, shardings), target.tokenizer, target.dtype, mesh,
                    target.rules)
    if draft is None:
        return placed, None
    own, _, _ = Draft.split(draft.params)
    own = jax.device_put(own, NamedSharding(mesh, PartitionSpec()))
    return placed, Draft(draft.config, {**own, **Draft.frozen(placed.params)}, draft.dtype, mesh)
