"""Two fixed costs of inductor's CPU compile that fnmlp's compiled step does without.

Measured on a 2-core machine, for a graph never compiled before (torch 2.13), a first step of
~6-7 s had two parts that do not depend on the graph:

- **the vector-ISA probe**: before its first CPU kernel, every process checks which vector
  instruction sets (AVX2, AVX-512, ...) the C++ compiler can build and the machine can load, by
  ``dlopen``-ing a tiny library per ISA in a fresh Python subprocess, every time (~0.3 s
  each). The answer depends only on the machine, the compiler and torch, so it is recorded
  in inductor's cache folder once a probe accepted every ISA the CPU reports; in later
  processes fnmlp's compile takes each ISA's load as done (its library is still built, or
  found in the cache). Where the probe rejected an ISA nothing is recorded and inductor
  probes as before.
  With empty caches the probe also builds its test libraries, one after the other (~8 s);
  fnmlp runs inductor's probe of each ISA side by side instead.
- **one compiler at a time**: with a C++ wrapper built apart from its kernels, inductor builds
  the wrapper's object file, then the kernels', then links, one after the other.
  ``cpu_compile`` builds the two object files side by side (two compiler processes, then the
  link), only for the duration of fnmlp's own compile.

Both lean on torch internals; on a torch where these are not as expected they do nothing, and
any other failure inside them (setting up, or a replaced function raising during the compile)
falls back to inductor's own behaviour with a ``RuntimeWarning``: the compile goes on.

**Threads.** Every patch (inductor's config with fnmlp's options, the probe's load test, the
object build) is process-wide and made only inside ``compile_locked``: fnmlp's lock and
dynamo's own compile lock (``torch._dynamo.convert_frame.compile_lock``, which
``torch.compile`` holds while it compiles a frame or a lazy backward). So fnmlp's compiles run
one at a time, and a ``torch.compile`` in another thread never compiles while fnmlp's patches
are in place (it waits for fnmlp's compile to end, as it would for another thread's
``torch.compile``). Not covered: inductor's config patched by another thread around its own
compile (``with torch._inductor.config.patch(...)``, which is process-wide too) is seen by
fnmlp's compile in the options fnmlp does not set, and an inductor entry point that takes no
compile lock (``torch._inductor.compile``, AOTInductor) called by another thread during
fnmlp's compile would see its patches (which build and probe as inductor does, only faster).
Measured side by side with the commit before (``bench/compile_time.py``, three runs each): a
new graph 6.0-8.1 s -> 4.4-5.7 s, empty caches 14.3-17.8 s -> 9.1-10.5 s, warm caches
2.4-2.7 s -> 0.8-1.3 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_RECORD = "fnmlp-vec-isa-{key}.ok"
_PATCH_LOCK = threading.RLock()
_UNEXPECTED_TORCH = (ImportError, AttributeError)  # torch's internals are not as expected


@contextlib.contextmanager
def compile_locked():
    """fnmlp's patch lock and dynamo's compile lock (where this torch has one) for the block:
    no other fnmlp compile and no ``torch.compile`` compiles in another thread meanwhile."""
    try:
        from torch._dynamo.convert_frame import compile_lock
    except _UNEXPECTED_TORCH:
        compile_lock = contextlib.nullcontext()
    with compile_lock, _PATCH_LOCK:
        yield


@contextlib.contextmanager
def cpu_compile(options: dict):
    """For one compile: inductor's config patched with ``options``, the ISA probe answered from
    the record (or run side by side where there is none) and the object files built side by
    side; the probe's answer recorded after it. All inside ``compile_locked``; a failure of
    fnmlp's own set-up leaves inductor's behaviour (with a warning)."""
    import torch._inductor.config as config

    with compile_locked():
        with config.patch(options), contextlib.ExitStack() as patches:
            for patch in (_recorded_isa_loads, _parallel_objects):
                _enter_or_skip(patches, patch)
            _run_or_skip(_probe_isas_side_by_side)
            yield
        _run_or_skip(_record_isa)


def _enter_or_skip(stack: contextlib.ExitStack, patch: Callable) -> None:
    """Enter ``patch()`` on ``stack``; where setting it up fails, go on without it."""
    try:
        stack.enter_context(patch())
    except Exception as error:  # noqa: BLE001 - an optimization: inductor does without it
        _fell_back(patch.__name__, error)


def _run_or_skip(function: Callable[[], None]) -> None:
    """Run ``function``; where it fails, go on as if it had done nothing."""
    try:
        function()
    except Exception as error:  # noqa: BLE001 - an optimization: inductor does without it
        _fell_back(function.__name__, error)


def _fell_back(name: str, error: BaseException) -> None:
    """Warn that the set-up ``name`` failed and inductor's own behaviour is used (quiet on a
    torch whose internals are not as expected: those are skipped by design)."""
    if not isinstance(error, _UNEXPECTED_TORCH):
        warnings.warn(f"fnmlp: the inductor set-up {name} failed ({error!r}); compiling as "
                      "inductor does by itself", RuntimeWarning, stacklevel=3)


# --- the vector-ISA probe ---------------------------------------------------------------------


@contextlib.contextmanager
def _recorded_isa_loads():
    """During the block, each ISA library's load test passes without a subprocess where an
    earlier probe with this machine, compiler and torch accepted every ISA the CPU reports."""
    try:
        from torch._inductor import cpu_vec_isa

        probe = cpu_vec_isa.VecISA._probe_load
        path = _record_path()
    except (ImportError, AttributeError, OSError):
        path = None
    if path is None or not os.path.exists(path):
        yield
        return

    def recorded_load(self, library: str) -> bool:
        try:
            return _library_built(library)
        except Exception as error:  # noqa: BLE001 - inductor's own load test instead
            _fell_back("_recorded_isa_loads", error)
            return probe(self, library)

    cpu_vec_isa.VecISA._probe_load = recorded_load
    try:
        yield
    finally:
        cpu_vec_isa.VecISA._probe_load = probe


def _library_built(library: str) -> bool:
    """The recorded answer to an ISA library's load test: it loads where it was built."""
    return os.path.isfile(library)


def _probe_isas_side_by_side() -> None:
    """Where this process has not probed yet and nothing is recorded, run inductor's own
    probe of each ISA the CPU reports in a thread of its own (each builds a test library with
    g++, ~2 s with empty caches, and loads it in a subprocess; inductor runs them one after
    the other). Inductor caches each answer, so its probe then finds them all done."""
    try:
        from torch._inductor import cpu_vec_isa

        if cpu_vec_isa.valid_vec_isa_list.cache_info().currsize:
            return
        path = _record_path()
        if path is None or os.path.exists(path):
            return
        reported = set(cpu_vec_isa.x86_isa_checker())
        candidates = [isa for isa in cpu_vec_isa.supported_vec_isa_list
                      if all(flag in reported for flag in str(isa).split())]
        with ThreadPoolExecutor(max(1, len(candidates))) as pool:
            list(pool.map(bool, candidates))
    except (ImportError, AttributeError, OSError):
        pass


def _record_isa() -> None:
    """Record the probe's answer when it accepted every ISA the CPU reports (a no-op when
    recorded already, when nothing was probed, or on an unexpected torch)."""
    try:
        from torch._inductor import config, cpu_vec_isa

        path = _record_path()
        if path is None or os.path.exists(path) or config.cpp.vec_isa_ok is not None:
            return
        if cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 0:
            return  # inductor has not probed in this process
        probed = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
        with config.patch({"cpp.vec_isa_ok": True}):
            reported = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list.__wrapped__()]
        if probed and probed == reported and os.path.isdir(os.path.dirname(path)):
            with open(path, "w") as file:
                file.write(" ".join(probed) + "\n")
    except (ImportError, AttributeError, OSError):
        pass


def _record_path() -> str | None:
    """The record's path for this machine, compiler and torch; None off x86 Linux."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    import torch
    from torch._inductor import cpp_builder, cpu_vec_isa
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    compiler = cpp_builder.get_cpp_compiler()
    identity = "\n".join([torch.__version__, sys.executable, compiler,
                          cpp_builder.get_compiler_version_info(compiler),
                          " ".join(cpu_vec_isa.x86_isa_checker())])
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    folder = os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
    return os.path.join(folder, _RECORD.format(key=key))


# --- object files side by side ----------------------------------------------------------------


@contextlib.contextmanager
def _parallel_objects():
    """During the block, inductor's in-process build of (wrapper object, kernels object,
    linker) compiles the two objects concurrently; any other build runs as before."""
    try:
        from torch._inductor import codecache

        serial = codecache._worker_compile_cpp
        from torch.utils._filelock import FileLock
    except (ImportError, AttributeError):
        yield
        return

    def build(lock_path, builders):
        try:
            if len(builders) == 3 and _links(builders[-1], builders[:-1]):
                return _build_side_by_side(lock_path, builders, FileLock, codecache.LOCK_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - inductor's own build instead
            serial(lock_path, builders)  # raises where the code does not build at all
            return _fell_back("_parallel_objects", error)
        return serial(lock_path, builders)

    codecache._worker_compile_cpp = build
    try:
        yield
    finally:
        codecache._worker_compile_cpp = serial


def _build_side_by_side(lock_path: str, builders: list, lock_type, timeout: float) -> None:
    """Build the two objects of ``builders`` (wrapper, kernels, linker) at once, then link;
    what exists already is kept, as inductor's own build does."""
    *objects, linker = builders
    with lock_type(lock_path, timeout=timeout):
        missing = [b for b in objects if not os.path.exists(b.get_target_file_path())]
        with ThreadPoolExecutor(len(missing) or 1) as pool:
            for done in [pool.submit(b.build) for b in missing]:
                done.result()
        if not os.path.exists(linker.get_target_file_path()):
            linker.build()


def _links(linker, objects) -> bool:
    """Whether ``linker`` only links the outputs of ``objects`` (so these may build at once)."""
    try:
        command = linker.get_command_line()
        return all(b.get_target_file_path() in command for b in objects)
    except AttributeError:
        return False
