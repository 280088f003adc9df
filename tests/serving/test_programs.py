"""`Programs`: a step runs its own program, else the smallest compiled one that covers it while
its own compiles in the background, and waits only when nothing covers it."""

import threading
import time

from dspark_jax.serving.programs import Programs, covers

BIG = ("round", (64,), ("columns 8", False))
SMALL = ("round", (4,), ("columns 8", False))
OTHER = ("round", (4,), ("columns 16", False))  # another table width: a different program


def compiler(gate: threading.Event | None = None):
    """A compile function that records its keys (blocking on `gate` when given)."""
    compiled = []

    def compile(key):
        if gate is not None:
            gate.wait()
        compiled.append(key)
        return lambda: key
    return compile, compiled


def test_covers_takes_larger_sizes_and_equal_exact_fields():
    assert covers(BIG, SMALL) and covers(SMALL, SMALL) and not covers(SMALL, BIG) and not covers(BIG, OTHER)
    assert covers(("prefill", (4, 64), (8,)), ("prefill", (2, 64), (8,)))
    assert not covers(("prefill", (4, 32), (8,)), ("prefill", (2, 64), (8,)))


def test_a_covered_step_runs_padded_while_its_own_program_compiles():
    gate = threading.Event()
    compile, compiled = compiler(gate)
    programs = Programs(compile)
    programs.precompile([BIG])
    gate.set()
    programs.wait()
    gate.clear()  # SMALL's compilation now blocks until set: the step must not wait for it
    key, program = programs.get(SMALL)
    assert key == BIG and program() == BIG and programs.stalls == 0
    gate.set()
    programs.wait()
    assert programs.get(SMALL)[0] == SMALL and compiled == [BIG, SMALL] and len(programs) == 2
    assert programs.get(OTHER)[0] == OTHER and programs.stalls == 1  # nothing covered it: the step waited
    programs.close()


def test_without_background_compilation_each_step_runs_its_own_shape():
    compile, compiled = compiler()
    programs = Programs(compile, background=False)
    programs.precompile([BIG])
    assert programs.get(SMALL)[0] == SMALL and compiled == [BIG, SMALL] and programs.stalls == 1


def test_a_failed_compilation_is_dropped_and_retried_when_a_step_needs_it():
    attempts = []

    def compile(key):
        attempts.append(key)
        if len(attempts) == 1:
            raise RuntimeError("out of memory")
        return lambda: key

    programs = Programs(compile)
    programs.precompile([SMALL])
    programs.wait()
    assert len(programs) == 0 and programs.pending == 0  # logged and dropped, not raised at every step
    assert programs.get(SMALL)[0] == SMALL and attempts == [SMALL, SMALL] and programs.stalls == 1
    programs.close()


def test_shapes_steps_ask_for_compile_before_precompiled_ones():
    gate = threading.Event()
    compile, compiled = compiler(gate)
    programs = Programs(compile)
    programs.precompile([BIG])  # the thread takes it and blocks on the gate
    while not programs._pending[BIG].running():
        time.sleep(0.01)
    programs.precompile([("round", (k,), ("columns 8", False)) for k in (128, 256)])
    programs._ask(OTHER, 0)  # as `get` asks for a step's own shape
    gate.set()
    programs.wait()
    assert compiled[:2] == [BIG, OTHER]
    programs.close()


def test_several_threads_compile_at_once():
    """With two threads, two queued programs compile at the same time: each compilation waits
    until both have started (one thread would never start the second)."""
    both = threading.Barrier(2, timeout=30)

    def compile(key):
        both.wait()
        return lambda: key

    programs = Programs(compile, threads=2)
    programs.precompile([BIG, SMALL])
    programs.wait()
    assert len(programs) == 2 and programs.get(SMALL)[0] == SMALL and programs.stalls == 0
    programs.close()
