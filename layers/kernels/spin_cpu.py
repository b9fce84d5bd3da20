"""A bounded busy-wait on one memory word (CPU), for the worker threads of
:mod:`pydagnn.layers.kernels.threads_cpu`: generated as LLVM IR and compiled with
llvmlite (numba's LLVM binding, as :mod:`gemm_cpu`) at first use, called through ctypes,
which releases the GIL for the call.

Why: a parallel region hands work to a sleeping thread and waits for it to finish; on a
small virtual machine a sleeping virtual CPU is halted, and waking it goes through the
host. Measured on the 2-core development VM (Firecracker, ``haltpoll`` with no polling):
a worker started 110-200 us (median) after the calling thread entered the region, and an
empty region cost 140-170 us; with the threads spinning here between regions (for at
most :data:`threads_cpu.SPIN_SECONDS`) the worker starts 25-40 us after, and an empty
region costs 38-50 us. OpenMP runtimes do the same (``OMP_WAIT_POLICY``, spin first).

``wait_while(word, value, equal, seconds, after)``: spin while ``word == value`` (``equal``
true) or ``word != value`` (false), at most ``seconds``; then spin ``after`` seconds more
(the other thread, which has just written the word, is about to release the GIL: taking
it at once would put this thread to sleep again); returns the word. The loop reads the
word with acquire ordering and runs ``pause`` (x86) between reads, which also lets a
hypervisor see the spin. :func:`available` is False where the module does not build
(no llvmlite, no cycle counter): the callers then sleep at once, as before.
"""
import ctypes
import threading
import time

_LOCK = threading.Lock()
_STATE = {'fn': None, 'hz': None}   # fn None: not built; False: unavailable

_IR = r'''
declare i64 @llvm.readcyclecounter()
{pause_decl}
define i64 @spin_wait(ptr %p, i64 %value, i64 %equal, i64 %cycles, i64 %after) {{
entry:
  %t0 = call i64 @llvm.readcyclecounter()
  %want = icmp ne i64 %equal, 0
  br label %loop
loop:
  %v = load atomic i64, ptr %p acquire, align 8
  %same = icmp eq i64 %v, %value
  %go = icmp eq i1 %same, %want
  br i1 %go, label %check, label %tail0
check:
  {pause}
  %t = call i64 @llvm.readcyclecounter()
  %dt = sub i64 %t, %t0
  %more = icmp ult i64 %dt, %cycles
  br i1 %more, label %loop, label %tail0
tail0:
  %t1 = call i64 @llvm.readcyclecounter()
  br label %tail
tail:
  %t2 = call i64 @llvm.readcyclecounter()
  %dt2 = sub i64 %t2, %t1
  %more2 = icmp ult i64 %dt2, %after
  br i1 %more2, label %tailpause, label %out
tailpause:
  {pause}
  br label %tail
out:
  %r = load atomic i64, ptr %p acquire, align 8
  ret i64 %r
}}

define i64 @cycle_counter() {{
  %t = call i64 @llvm.readcyclecounter()
  ret i64 %t
}}
'''


def available():
    """Whether the busy-wait is built (builds it on first call)."""
    return bool(_build_once())


def wait_while(word_address, value, equal, seconds, after=0.0):
    """Spin while the int64 at ``word_address`` equals ``value`` (``equal`` True) or
    differs from it (False), for at most ``seconds``, then ``after`` seconds more; returns
    the word's value. Needs :func:`available`."""
    fn = _build_once()
    hz = _STATE['hz']
    return fn(word_address, int(value), 1 if equal else 0, int(seconds * hz), int(after * hz))


def _build_once():
    if _STATE['fn'] is None:
        with _LOCK:
            if _STATE['fn'] is None:
                try:
                    _STATE['fn'], _STATE['hz'] = _build()
                except Exception:   # any failure: no spinning, the threads sleep at once
                    _STATE['fn'] = False
    return _STATE['fn']


def _build():
    import llvmlite.binding as llvm
    try:   # needed by older llvmlite, refused (deprecated) by newer
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
    except Exception:  # pragma: no cover
        pass
    triple = llvm.get_default_triple()
    x86 = triple.startswith(('x86_64', 'i686', 'i386'))
    src = _IR.format(pause_decl='declare void @llvm.x86.sse2.pause()' if x86 else '',
                     pause='call void @llvm.x86.sse2.pause()' if x86 else '')
    mod = llvm.parse_assembly(src)
    mod.verify()
    tm = llvm.Target.from_triple(triple).create_target_machine(opt=2)
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = ctypes.CFUNCTYPE(i64, ptr, i64, i64, i64, i64)(engine.get_function_address('spin_wait'))
    counter = ctypes.CFUNCTYPE(i64)(engine.get_function_address('cycle_counter'))
    hz = _counter_rate(counter)
    fn._keep = (mod, engine, tm, counter)   # the compiled code lives as long as fn
    return fn, hz


def _counter_rate(counter):
    """Cycle-counter ticks per second (the TSC on x86), measured against perf_counter
    over 5 ms; a counter that does not advance fails the build."""
    c0, t0 = counter(), time.perf_counter()
    time.sleep(0.005)
    c1, t1 = counter(), time.perf_counter()
    hz = (c1 - c0) / (t1 - t0)
    if not hz > 1e6:
        raise RuntimeError(f'cycle counter rate {hz}')
    return hz
