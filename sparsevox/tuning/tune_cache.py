"""The persistent autotune cache: one JSON file of measured candidates, shared by processes.

Where: ``$SPARSEVOX_CACHE_DIR`` or ``~/.cache/sparsevox/``, file ``autotune.json``::

    {"format": 1, "library": "sparsevox",
     "entries": {"<Problem.key()>|sparsevox <version>|check <n>": {
         "times_ms": {"implicit_gemm {\\"fwd_block_size\\": 16}": 0.123, ...},   # median per candidate
         "dropped": {"<candidate>": "<why>", ...},                              # raised: never usable
         "failed": {"<candidate>": "<measured error>", ...}}}}                  # failed the accuracy
                                                                                # check: only if named

Rules (as CuPy's kernel cache does it): the file is read lazily once per process; writes happen in a
background thread, under an exclusive ``fcntl.flock`` on ``autotune.lock``, by re-reading the file,
merging this process's new entries into it (candidate by candidate) and replacing it atomically
(temp file + ``os.replace``), so concurrent processes merge instead of overwriting each other. A corrupt
or foreign file (not JSON, another format version) is moved aside with a warning and tuning starts
fresh. A cache directory that cannot be written is warned about once; results then live in memory only.

``cli(argv)`` implements ``python -m sparsevox cache show | clear | path``.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock, writes stay atomic
    fcntl = None

log = logging.getLogger("sparsevox.tune_cache")

FORMAT = 1
FILE_NAME = "autotune.json"
LOCK_NAME = "autotune.lock"

_lock = threading.RLock()  # guards everything below
_entries: dict[str, dict] = {}
_dirty: set[str] = set()
_loaded = False
_saver: threading.Thread | None = None
_unwritable_warned = False
# Final choices of this process, {(Problem or its key(), algorithm names): (Algorithm, params)}: the
# autotuner's fast path. It lives here so that clear() and reset() forget it together with the entries.
choices: dict = {}
# The plans of sparsevox.conv.plan by call signature (shapes, dtypes, devices, the map's sizes and kind,
# algorithm input): what a fresh kernel map of a known layer reuses. Forgotten with ``choices``.
plans: dict = {}


def cache_dir() -> Path:
    """``$SPARSEVOX_CACHE_DIR`` if set, else ``~/.cache/sparsevox``."""
    env = os.environ.get("SPARSEVOX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsevox"


def cache_path() -> Path:
    return cache_dir() / FILE_NAME


# ---- reading -------------------------------------------------------------------------------------

def _parse(text: str) -> dict[str, dict]:
    """Entries of a cache file's text; ``ValueError`` saying why when it is not ours."""
    data = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(data, dict) or data.get("library") != "sparsevox":
        raise ValueError("not a sparsevox autotune cache")
    if data.get("format") != FORMAT:
        raise ValueError(f"format {data.get('format')!r}, this sparsevox reads format {FORMAT}")
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ValueError("'entries' is not a mapping of entries")
    return entries


def _read(path: Path) -> dict[str, dict]:
    """Entries on disk; a missing file is empty, a bad one is moved aside (warned) and treated as empty."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("sparsevox autotune cache %s cannot be read (%s); tuning starts fresh", path, e)
        return {}
    try:
        return _parse(text)
    except (ValueError, UnicodeDecodeError) as e:
        aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.replace(path, aside)
            where = f"moved aside to {aside}"
        except OSError as e2:
            where = f"left in place (cannot move it: {e2})"
        log.warning("sparsevox autotune cache %s is unusable (%s); %s; tuning starts fresh", path, e, where)
        return {}


@contextlib.contextmanager
def _file_lock(directory: Path):
    """Hold the cross-process lock (``flock`` on ``directory/autotune.lock``); OSError if it cannot be made."""
    with open(directory / LOCK_NAME, "a") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        yield


def _load() -> dict[str, dict]:
    path = cache_path()
    if not path.exists():
        return {}
    try:
        with _file_lock(path.parent):  # so a bad file is moved aside only while no writer is busy
            return _read(path)
    except OSError:  # read-only directory: no lock file can be made, reading alone is still safe
        return _read(path)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            disk = _load()
            for k, v in disk.items():
                _entries.setdefault(k, v)
            _loaded = True


def get(key: str) -> dict | None:
    """The entry for ``key`` (``{"times_ms": {...}, "dropped": {...}, "failed": {...}}``) or None; loads the
    file once."""
    _ensure_loaded()
    return _entries.get(key)


def entries() -> dict[str, dict]:
    """A snapshot of every entry known to this process (disk and new)."""
    _ensure_loaded()
    with _lock:
        return dict(_entries)


# ---- writing -------------------------------------------------------------------------------------

def put(key: str, entry: dict) -> None:
    """Record ``entry`` for ``key`` in memory and schedule a background save."""
    global _saver
    _ensure_loaded()
    with _lock:
        _entries[key] = entry
        _dirty.add(key)
        if _saver is None:
            _saver = threading.Thread(target=_save_loop, name="sparsevox-tune-cache", daemon=True)
            _saver.start()


def merge_entry(old: dict | None, new: dict) -> dict:
    """Candidate-by-candidate union of two entries; ``new`` wins where both measured a candidate."""
    times = dict((old or {}).get("times_ms", {}))
    dropped = dict((old or {}).get("dropped", {}))
    failed = dict((old or {}).get("failed", {}))
    for cand, ms in new.get("times_ms", {}).items():
        times[cand] = ms
        dropped.pop(cand, None)
        if cand not in new.get("failed", {}):
            failed.pop(cand, None)
    for cand, why in new.get("failed", {}).items():
        failed[cand] = why
        dropped.pop(cand, None)
    for cand, why in new.get("dropped", {}).items():
        dropped[cand] = why
        times.pop(cand, None)
        failed.pop(cand, None)
    return {"times_ms": times, "dropped": dropped, "failed": failed}


def _save_loop() -> None:
    """Write dirty entries until none are left; the thread ends (and clears ``_saver``) under the lock."""
    global _saver
    while True:
        with _lock:
            if not _dirty:
                _saver = None
                return
            batch = {k: _entries[k] for k in _dirty}
            _dirty.clear()
        merged = _write(batch)
        if merged is not None:
            with _lock:  # learn what other processes wrote, except keys changed again meanwhile
                for k, v in merged.items():
                    if k not in _dirty:
                        _entries[k] = v


def _warn_unwritable(path: Path, e: Exception) -> None:
    global _unwritable_warned
    if not _unwritable_warned:
        _unwritable_warned = True
        log.warning("sparsevox autotune cache directory %s is not writable (%s); tuning results are kept "
                    "in memory for this process only (set SPARSEVOX_CACHE_DIR to a writable directory)",
                    path, e)


def _write(batch: dict[str, dict]) -> dict[str, dict] | None:
    """Merge ``batch`` into the file under the lock; return the merged entries, None if it could not."""
    directory = cache_dir()
    path = directory / FILE_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _file_lock(directory):
            merged = _read(path)
            for k, entry in batch.items():
                merged[k] = merge_entry(merged.get(k), entry)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=FILE_NAME + ".", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": FORMAT, "library": "sparsevox", "entries": merged}, f,
                              indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        return merged
    except OSError as e:
        _warn_unwritable(directory, e)
        return None
    except Exception as e:  # never let a cache problem escape a background thread silently
        log.warning("sparsevox autotune cache could not be saved to %s: %s", path, e)
        return None


def flush(timeout: float | None = None) -> None:
    """Wait until pending background saves are on disk (called at exit; handy in tests)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _lock:
            saver = _saver
        if saver is None:
            return
        saver.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        if deadline is not None and time.monotonic() >= deadline:
            return


atexit.register(flush, 30.0)


def reset() -> None:
    """Forget this process's entries and choices; the next lookup re-reads the (possibly new) cache dir."""
    global _loaded, _unwritable_warned
    flush()
    with _lock:
        _entries.clear()
        _dirty.clear()
        choices.clear()
        plans.clear()
        _loaded = False
        _unwritable_warned = False


def clear() -> list[Path]:
    """Delete the cache file (and files moved aside) and forget everything in memory; return what was deleted."""
    flush()
    directory = cache_dir()
    removed = []
    with _lock:
        _entries.clear()
        _dirty.clear()
        choices.clear()
        plans.clear()
        if directory.is_dir():
            for p in sorted(directory.glob(FILE_NAME + "*")):  # the file, temp files and *.bad-* copies
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
    return removed


# ---- python -m sparsevox cache ... ---------------------------------------------------------------

_USAGE = "usage: python -m sparsevox cache {show | clear | path}"


def _best(entry: dict) -> str:
    failed = entry.get("failed", {})
    times = {c: ms for c, ms in entry.get("times_ms", {}).items() if c not in failed}
    if not times:
        return "(every candidate dropped)"
    cand = min(times, key=times.get)
    return (f"{cand}  {times[cand]:.4f} ms  ({len(times)} timed, {len(entry.get('dropped', {}))} dropped, "
            f"{len(failed)} failed the check)")


def cli(argv) -> int:
    """``show`` lists each configuration and its fastest candidate (the one that runs, unless another within
    ``autotune.MEMORY_TIE`` of it declares less scratch memory); ``clear`` deletes the cache;
    ``path`` prints the cache file's path. Returns the process exit status."""
    args = list(argv)
    if args and args[0] == "cache":  # accept the full command line as well as what follows "cache"
        args = args[1:]
    if len(args) != 1 or args[0] not in ("show", "clear", "path"):
        print(_USAGE)
        return 0 if args and args[0] in ("-h", "--help") else 2
    cmd = args[0]
    if cmd == "path":
        print(cache_path())
    elif cmd == "clear":
        removed = clear()
        print(f"removed {len(removed)} file(s) from {cache_dir()}" if removed
              else f"nothing to remove in {cache_dir()}")
    else:
        path = cache_path()
        found = entries()
        print(f"{path}: {len(found)} configuration(s), format {FORMAT}")
        for key in sorted(found):
            print(f"{key}\n    {_best(found[key])}")
    return 0
