"""Pack an OASIS PNG folder into one HDF5 file (schema: `oasis_ldm.data.schema`).

Why this shape:
- All names are listed, parsed and paired before any pixel is read (`oasis.list_splits`),
  so a bad layout fails in a second with nothing written.
- Worker processes decode PNGs (and, for gzip, compress the chunks) in tasks of
  `ROWS_PER_TASK` rows; at most `WINDOW_PER_WORKER` tasks per worker are in flight, so memory
  stays bounded however large the input is. Each worker has a pipe of its own
  (`WorkerPool`), so a worker that dies is reported, never waited for. The parent only
  writes finished chunks (`write_direct_chunk`: one image per chunk, no per-row filter
  work in the parent).
- The file is written as `OUT.partial` and renamed only after it is complete (and verified
  when asked): on any error or interrupt the partial file is removed and an existing OUT
  is left untouched. `OUT.partial` is created before any pixel is decoded, so an OUT that
  cannot be written fails at once.
- Workers die with the parent (a SIGKILL or an OOM kill of the parent included) and a
  SIGTERM ends a worker; the parent then fails naming OUT, with nothing written.
- Masks hold only the classes of `schema.MASK_VALUES`; any other value is refused.
- OUT is never one of its inputs: an OUT inside --src (one of its PNGs, or a file the next pack
  would trip over) is refused, and --overwrite replaces only a file pack_h5 wrote (`_check_out`).
  A full disk is one line naming OUT and the free space.

What counts as an 8-bit greyscale PNG (`read_png`): mode L as is; 1-bit and 2/4-bit grey
as PIL expands them; greyscale stored as RGB, RGBA, LA or a palette when every colour
channel is equal and any alpha is fully opaque; 16-bit greyscale only when it holds 8-bit
data losslessly (all values <= 255, or all multiples of 257, the usual 8->16-bit expansion).
Anything else (real colour, transparency, 16-bit data, 16-bit colour) is refused: a silent
rescale would change what the model is trained on.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import multiprocessing
import os
import pickle
import signal
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import oasis_ldm
from oasis_ldm import outputs
from oasis_ldm.atomic import atomic_path
from oasis_ldm.data import schema
from oasis_ldm.data.oasis import SPLITS, LayoutError, SplitListing, list_splits

COMPRESSIONS: tuple[str, ...] = ("none", "lzf", "gzip")
DEFAULT_COMPRESSION = "gzip"  # measured: 5.5x smaller than none for ~20% more pack time; any HDF5 tool reads it
GZIP_LEVEL = 1  # recorded in the dataset's filter; chunks are written by `deflate`
ROWS_PER_TASK = 32
WINDOW_PER_WORKER = 4
MASK_VALUES_SHOWN = 5  # bad mask values a message lists before "..."
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PackError(ValueError):
    """A user-facing packing error; the one-line message starts with the offending path or flag."""


def default_workers() -> int:
    """CPUs this process may use (SLURM/cgroup aware where the OS says so), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


# ----------------------------------------------------------------------------- decoding


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _lossless_8bit(arr: np.ndarray, path: str) -> np.ndarray:
    """16-bit greyscale holding 8-bit data: values <= 255, or the standard x257 expansion."""
    if arr.min() >= 0 and arr.max() <= 255:
        return arr.astype(np.uint8)
    if arr.min() >= 0 and not np.any(arr % 257):
        return (arr // 257).astype(np.uint8)
    raise PackError(f"{path}: 16-bit PNG with values that do not fit 8 bits; convert it to 8-bit first")


def _equal_channels(arr: np.ndarray, colour: int, path: str) -> np.ndarray:
    """Greyscale stored as RGB(A)/LA: colour channels must agree and alpha must be opaque."""
    first = arr[..., 0]
    for c in range(1, colour):
        if not np.array_equal(first, arr[..., c]):
            raise PackError(f"{path}: colour image (channels differ); expected greyscale")
    if arr.shape[-1] > colour and not np.all(arr[..., colour] == 255):
        raise PackError(f"{path}: image has transparency; expected opaque greyscale")
    return np.ascontiguousarray(first)


def _grey(im: Image.Image, path: str) -> np.ndarray:
    """uint8 (H, W) of a loaded PIL image, converting only where no information is lost."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        return _lossless_8bit(np.asarray(im), path)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGB", "RGBA"):
        return _equal_channels(np.asarray(im), 3, path)
    if mode == "LA":
        return _equal_channels(np.asarray(im), 1, path)
    raise PackError(f"{path}: unsupported PNG mode {mode}; expected 8-bit greyscale")


def read_png(path: str | Path, shape: tuple[int, int] | None = None, what: str = "image") -> np.ndarray:
    """Decode one PNG to uint8 (H, W); PackError naming the file on any problem."""
    path = str(path)
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise PackError(f"{path}: not a PNG file ({im.format})")
            rawmode = im.tile[0][3] if im.tile else ""
            if ";16" in str(rawmode) and not im.mode.startswith("I"):
                raise PackError(f"{path}: 16-bit colour PNG; expected 8-bit greyscale")
            im.load()
            arr = _grey(im, path)
    except PackError:
        raise
    except UnidentifiedImageError:
        raise PackError(f"{path}: corrupt or not a PNG (unrecognised content)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise PackError(f"{path}: corrupt or truncated PNG ({_one_line(e)})") from None
    if shape is not None and arr.shape != shape:
        (h, w), expected = arr.shape, f"{shape[1]}x{shape[0]}"
        other = "its image" if what == "mask" else "the other images"
        raise PackError(f"{path}: {what} size {w}x{h} differs from {other} ({expected})")
    return arr


@dataclass(frozen=True)
class Task:
    """Rows [start, start + len(images)) of one split, as plain strings (cheap to pickle)."""

    split: str
    start: int
    images: tuple[str, ...]
    masks: tuple[str, ...] | None
    shape: tuple[int, int]
    compression: str
    stats: bool
    digests: bool


@dataclass
class Block:
    """A decoded task: per-row chunk payloads plus what the parent accumulates."""

    split: str
    start: int
    images: list  # gzip: the zlib-compressed chunk as stored; none/lzf: uint8 (H, W) arrays
    masks: list | None
    image_crc: list[int] = field(default_factory=list)
    mask_crc: list[int] = field(default_factory=list)
    pixel_sum: int = 0
    pixel_sq: int = 0


def deflate(arr: np.ndarray) -> bytes:
    """A gzip chunk exactly as HDF5's deflate filter stores it: one zlib stream.

    Z_RLE finds the long runs of black background and skips the LZ match search: on brain
    slices it is about twice as fast as level 1's default strategy and no larger. Any
    inflate reads it, so readers see an ordinary gzip dataset.
    """
    z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    return z.compress(arr.data) + z.flush()


def _payload(arr: np.ndarray, compression: str) -> bytes | np.ndarray:
    """gzip chunks are compressed here, in the worker; none/lzf rows go to the parent as arrays."""
    return deflate(arr) if compression == "gzip" else arr


# True at the 256 uint8 values that are mask classes: one gather per pixel, where np.isin
# would sort and search for every mask.
_MASK_OK = np.zeros(256, dtype=bool)
_MASK_OK[list(schema.MASK_VALUES)] = True


def check_mask(mask: np.ndarray, path: str | Path) -> None:
    """PackError naming the mask file and its values that are no class of `schema.MASK_VALUES`."""
    ok = _MASK_OK.take(mask)
    if ok.all():
        return
    bad = np.unique(mask[~ok]).tolist()
    shown = ", ".join(map(str, bad[:MASK_VALUES_SHOWN]))
    if len(bad) > MASK_VALUES_SHOWN:
        shown += f", ... ({len(bad)} values)"
    allowed = ", ".join(map(str, schema.MASK_VALUES))
    raise PackError(f"{path}: mask values {shown} outside the classes {allowed}")


def decode_task(task: Task) -> Block:
    """Worker body: decode, check, optionally checksum and compress one task's rows."""
    block = Block(task.split, task.start, [], [] if task.masks is not None else None)
    for k, image_path in enumerate(task.images):
        image = read_png(image_path, task.shape)
        block.images.append(_payload(image, task.compression))
        if task.stats:
            block.pixel_sum += int(image.sum(dtype=np.uint64))
            block.pixel_sq += int(np.square(image, dtype=np.uint32).sum(dtype=np.uint64))
        if task.digests:
            block.image_crc.append(zlib.crc32(image.data))
        if task.masks is not None:
            mask = read_png(task.masks[k], task.shape, what="mask")
            check_mask(mask, task.masks[k])
            block.masks.append(_payload(mask, task.compression))
            if task.digests:
                block.mask_crc.append(zlib.crc32(mask.data))
    return block


# ----------------------------------------------------------------------------- scheduling


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, however the parent dies.

    Without it, workers waiting for their next task outlive a SIGKILLed (or OOM-killed)
    parent forever. The parent may already have died before prctl ran: then this worker
    was re-parented and must exit by itself. (Elsewhere there is no prctl, and workers
    are not forked by this process, so there is nothing to do.)
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _init_worker(parent_pid: int) -> None:
    """Die with the parent; leave Ctrl-C to the parent; let SIGTERM end the worker.

    The parent cancels everything on Ctrl-C and removes the partial file. A fork inherits
    the parent's SIGTERM handler (which unwinds like Ctrl-C); a worker must instead die of
    SIGTERM, so that the parent sees it gone and fails in one line.
    """
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def make_tasks(listings: list[SplitListing], shape, compression: str, digests: bool) -> Iterator[Task]:
    for listing in listings:
        rows = listing.rows
        for start in range(0, len(rows), ROWS_PER_TASK):
            part = rows[start : start + ROWS_PER_TASK]
            masks = tuple(str(r.mask) for r in part) if listing.has_masks else None
            yield Task(
                listing.split,
                start,
                tuple(str(r.image) for r in part),
                masks,
                shape,
                compression,
                stats=listing.split == "train",
                digests=digests,
            )


def _worker_loop(conn: Connection, parent_pid: int, inherited: list[Connection]) -> None:
    """Worker body: answer each `(fn, arg)` from `conn` with `(True, result)` or `(False, error)`."""
    for other in inherited:  # the parent's ends, copied by fork: only the parent may hold them
        other.close()
    _init_worker(parent_pid)
    while True:
        try:
            fn, arg = conn.recv()
        except (EOFError, OSError):  # the parent closed the pool (a reset if answers were unread)
            return
        try:
            reply = (True, fn(arg))
        except Exception as e:  # PackError and the like: the parent raises it
            reply = (False, e)
        try:
            _send_reply(conn, reply)
        except OSError:  # the parent closed the pool while this task ran
            return


def _send_reply(conn: Connection, reply: tuple[bool, object]) -> None:
    """Send a worker's answer; an error that cannot be pickled travels as its message."""
    try:
        conn.send(reply)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        conn.send((False, RuntimeError(f"{_one_line(reply[1])} ({_one_line(e)})")))


class WorkerLost(RuntimeError):
    """A worker ended without answering: killed by a signal (SIGTERM, the OOM killer's SIGKILL)."""


def _exit_reason(process: multiprocessing.process.BaseProcess) -> str:
    """'was killed by SIGTERM', 'exited with status 1', ...: why a worker is gone."""
    process.join(timeout=5)  # it has closed its pipe, so it has ended or is about to
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        if -code == signal.SIGKILL:  # what the kernel's out-of-memory killer sends
            return "was killed by SIGKILL (out of memory? try fewer --workers)"
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal without a name
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class WorkerPool:
    """Forked worker processes, each with a pipe of its own.

    Why not `ProcessPoolExecutor`: its workers share one result pipe and one lock. A worker
    killed while sending a result (a block of 32 slices is far larger than the pipe, so it
    often is) leaves half a message in that pipe, and the executor's reader thread waits
    for the rest forever: the pack hangs. Here a dead worker's pipe simply ends (EOF), and
    the parent says which worker died and how. There are no threads, so forking stays safe.

    Task k goes to worker k mod n. Answers are read from whichever worker is ready and kept
    until asked for, so no worker waits on the parent to read it while the parent waits on
    another (measured: no slower than the executor it replaces).
    """

    def __init__(self, workers: int) -> None:
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        self._conns: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._submitted = 0
        self._sent: list[int] = [0] * workers  # tasks sent to each worker
        self._got: list[int] = [0] * workers  # answers read from each worker
        self._early: dict[int, tuple[bool, object]] = {}  # answers read before they were asked for
        try:
            for _ in range(workers):
                ours, theirs = ctx.Pipe()
                inherited = [*self._conns, ours]
                process = ctx.Process(target=_worker_loop, args=(theirs, os.getpid(), inherited), daemon=True)
                process.start()
                theirs.close()  # the worker holds the only copy: its death gives us EOF
                self._conns.append(ours)
                self._processes.append(process)
        except BaseException:
            self.close(kill=True)
            raise

    def __len__(self) -> int:
        return len(self._processes)

    def submit(self, fn: Callable, arg: object) -> int:
        """Queue `fn(arg)` on the next worker in turn; returns the task number for `answer`."""
        k, j = self._submitted, self._submitted % len(self)
        try:
            self._conns[j].send((fn, arg))  # a task is small: the pipe holds those in flight
        except OSError:  # EPIPE: the worker is gone
            raise self._lost(j) from None
        self._submitted += 1
        self._sent[j] += 1
        return k

    def answer(self, k: int) -> object:
        """The result of task `k`, re-raising the error its worker reported."""
        while k not in self._early:
            busy = [c for j, c in enumerate(self._conns) if self._sent[j] > self._got[j]]
            if not busy:  # nothing is coming: waiting would spin forever
                raise ValueError(f"task {k} was never submitted or was already answered")
            for conn in wait(busy):
                self._read(self._conns.index(conn))
        ok, value = self._early.pop(k)
        if not ok:
            raise value
        return value

    def _read(self, j: int) -> None:
        """Read worker j's oldest answer: that of its task got[j], number got[j] * n + j."""
        try:
            reply = self._conns[j].recv()
        except (EOFError, OSError):  # the worker died, perhaps halfway through an answer
            raise self._lost(j) from None
        self._early[self._got[j] * len(self) + j] = reply
        self._got[j] += 1

    def _lost(self, j: int) -> WorkerLost:
        process = self._processes[j]
        return WorkerLost(f"worker process {process.pid} {_exit_reason(process)}")

    def close(self, kill: bool) -> None:
        """End every worker: EOF lets idle ones return; `kill` stops busy ones at once first."""
        if kill:
            for process in self._processes:
                process.terminate()  # SIGTERM: the workers' default action ends them
        for conn in self._conns:
            conn.close()
        for process in self._processes:
            process.join()


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[WorkerPool | None]:
    """A `WorkerPool` whose workers all exist before the caller opens files.

    On Linux `fork` is used (no `__main__` guard needed, instant start); the workers are
    forked at once, by the calling thread, while the parent holds no HDF5 file. They die
    with that thread (`_die_with_parent`), which stays inside this context while they work.
    `workers=0` yields None: tasks then run in this process.
    """
    if workers == 0:
        yield None
        return
    pool = WorkerPool(workers)
    try:
        yield pool
    except BaseException:
        pool.close(kill=True)
        raise
    pool.close(kill=False)


def ordered_map(pool: WorkerPool | None, fn: Callable, tasks: Iterable, window: int) -> Iterator:
    """`map` in order with at most `window` tasks in flight.

    `Pool.imap` queues every result the parent has not consumed yet; the window keeps memory
    bounded. A worker that dies raises WorkerLost here instead of hanging the parent.
    """
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque[int] = deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= window:
            yield pool.answer(pending.popleft())
    while pending:
        yield pool.answer(pending.popleft())


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PackOptions:
    """How to pack; the CLI flags of tools/pack_h5.py map one to one onto these."""

    splits: tuple[str, ...] = SPLITS
    compression: str = DEFAULT_COMPRESSION
    workers: int = field(default_factory=default_workers)
    verify: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal


@dataclass(frozen=True)
class PackResult:
    path: Path
    counts: dict[str, int]
    mask_splits: tuple[str, ...]
    train_mean: float | None
    train_std: float | None
    size_bytes: int
    seconds: float
    verified: bool


def _check_options(options: PackOptions) -> None:
    if options.compression not in COMPRESSIONS:
        raise PackError(f"--compression {options.compression}: expected one of {', '.join(COMPRESSIONS)}")
    if options.workers < 0:
        raise PackError(f"--workers {options.workers}: must be >= 0 (0 decodes in this process)")
    if not options.splits or len(set(options.splits)) != len(options.splits):
        raise PackError(f"--splits {','.join(options.splits)}: expected distinct names of {', '.join(SPLITS)}")
    for split in options.splits:
        if split not in SPLITS:
            raise PackError(f"--splits: unknown split {split!r} (expected {', '.join(SPLITS)})")


def _packed_by_us(path: Path) -> bool:
    """Whether `path` is an HDF5 file pack_h5 wrote (its `created_by` attribute says so)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return str(f.attrs.get(schema.ATTR_CREATED_BY, "")).startswith("oasis-ldm pack_h5")
    except (OSError, ValueError):
        return False


def _check_out(out: Path, overwrite: bool, src: Path | None = None) -> None:
    if out.is_dir():
        raise PackError(f"{out}: is a directory; --out takes a file path")
    if src is not None and out.resolve().is_relative_to(src.resolve()):
        raise PackError(f"{out}: is inside --src {src}; write the packed file outside the PNG folders")
    if out.exists() and not overwrite:
        raise PackError(f"{out}: already exists (use --overwrite to replace it)")
    if out.exists() and not _packed_by_us(out):
        raise PackError(f"{out}: exists and is not a file pack_h5 wrote; --overwrite replaces only those")


def _check_numbers(listings: list[SplitListing]) -> None:
    """case_id and slice_idx are stored as int32."""
    limit = np.iinfo(np.int32).max
    for listing in listings:
        for row in listing.rows:
            if row.case_id > limit or row.slice_idx > limit:
                raise PackError(f"{row.image}: case or slice number does not fit int32")


@contextlib.contextmanager
def _out_errors(out: Path, what: str) -> Iterator[None]:
    """Turn an OSError while making OUT into one line naming OUT (not HDF5's raw text)."""
    try:
        yield
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else _one_line(e)  # h5py sets errno too
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += f"; {outputs.free_space(out)} free on its disk"
        raise PackError(f"{out}: {what} ({reason})") from None


def _make_parents(folder: Path, created: list[Path]) -> None:
    """mkdir -p, appending each folder it creates to `created` so a failure can remove them."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def _remove_folders(created: list[Path]) -> None:
    """Remove the folders `_make_parents` created, deepest first (only while still empty)."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _claim_out(out: Path, partial: Path) -> list[Path]:
    """Create OUT's folders and an empty `partial` before any decoding, so an OUT that cannot
    be written (read-only, a file as parent, no permission) fails at once, naming OUT."""
    created: list[Path] = []
    try:
        with _out_errors(out, "cannot write here"):
            _make_parents(out.parent, created)
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    except BaseException:
        _remove_folders(created)  # the partial file was the last step: it does not exist
        raise
    return created


def _create_split(f: h5py.File, listing: SplitListing, shape: tuple[int, int], compression: str) -> dict:
    """Preallocate one split's datasets and write its per-row metadata."""
    n, (h, w) = len(listing.rows), shape
    group = f.create_group(listing.split)
    pixels = dict(
        shape=(n, h, w),
        dtype=np.uint8,
        chunks=(1, h, w),
        compression=None if compression == "none" else compression,
        compression_opts=GZIP_LEVEL if compression == "gzip" else None,
    )
    rows = listing.rows
    group.create_dataset(schema.CASE_ID, data=np.array([r.case_id for r in rows], dtype=np.int32))
    group.create_dataset(schema.SLICE_IDX, data=np.array([r.slice_idx for r in rows], dtype=np.int32))
    names = np.array([r.image.name for r in rows], dtype=object)
    group.create_dataset(schema.FILENAME, data=names, dtype=schema.STRING_DTYPE)
    out = {schema.IMAGES: group.create_dataset(schema.IMAGES, **pixels)}
    if listing.has_masks:
        out[schema.MASKS] = group.create_dataset(schema.MASKS, **pixels)
    return out


def _write_rows(dset: h5py.Dataset, start: int, payloads: list, compression: str) -> None:
    """Write a task's rows; none/gzip chunks go straight to the file, lzf through h5py's filter."""
    if compression == "lzf":
        dset[start : start + len(payloads)] = np.stack(payloads)
        return
    for k, chunk in enumerate(payloads):
        dset.id.write_direct_chunk((start + k, 0, 0), chunk)


@dataclass
class _Totals:
    """What the parent accumulates while writing: train pixel moments, per-row checksums."""

    pixel_sum: int = 0
    pixel_sq: int = 0
    pixels: int = 0
    crc: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def _write_file(path: Path, listings: list[SplitListing], shape, options: PackOptions) -> _Totals:
    totals = _Totals()
    for listing in listings:
        for name in (schema.IMAGES, schema.MASKS) if listing.has_masks else (schema.IMAGES,):
            totals.crc[(listing.split, name)] = np.zeros(len(listing.rows), np.uint32)
    make_bar = functools.partial(
        tqdm,
        total=sum(len(x.rows) for x in listings),
        desc="pack_h5",
        unit="slice",
        disable=None if options.progress is None else not options.progress,
    )
    with worker_pool(options.workers) as pool, h5py.File(path, "w", locking=False) as f, make_bar() as bar:
        dsets = {x.split: _create_split(f, x, shape, options.compression) for x in listings}
        tasks = make_tasks(listings, shape, options.compression, options.verify)
        for block in ordered_map(pool, decode_task, tasks, options.workers * WINDOW_PER_WORKER):
            _store_block(dsets[block.split], block, totals, options.compression)
            if block.split == "train":
                totals.pixels += len(block.images) * shape[0] * shape[1]
            bar.update(len(block.images))
        _write_attrs(f, listings, totals, options.compression)
    return totals


def _store_block(dsets: dict, block: Block, totals: _Totals, compression: str) -> None:
    stop = block.start + len(block.images)
    _write_rows(dsets[schema.IMAGES], block.start, block.images, compression)
    if block.masks is not None:
        _write_rows(dsets[schema.MASKS], block.start, block.masks, compression)
    if block.image_crc:
        totals.crc[(block.split, schema.IMAGES)][block.start : stop] = block.image_crc
    if block.mask_crc:
        totals.crc[(block.split, schema.MASKS)][block.start : stop] = block.mask_crc
    totals.pixel_sum += block.pixel_sum
    totals.pixel_sq += block.pixel_sq


def _write_attrs(f: h5py.File, listings: list[SplitListing], totals: _Totals, compression: str) -> None:
    f.attrs[schema.ATTR_SCHEMA_VERSION] = schema.SCHEMA_VERSION
    f.attrs[schema.ATTR_CREATED_BY] = f"oasis-ldm pack_h5 {oasis_ldm.__version__}"
    f.attrs[schema.ATTR_COMPRESSION] = compression
    for listing in listings:
        f.attrs[schema.count_attr(listing.split)] = len(listing.rows)
    if totals.pixels:  # exact integer moments; float64 only for the final division
        n, s, sq = totals.pixels, totals.pixel_sum, totals.pixel_sq
        f.attrs[schema.ATTR_TRAIN_MEAN] = s / n
        f.attrs[schema.ATTR_TRAIN_STD] = float(np.sqrt(max(sq * n - s * s, 0) / (n * n)))


# ----------------------------------------------------------------------------- verifying

VERIFY_ROWS = 64


def _crc_rows(task: tuple[str, str, int, int]) -> np.ndarray:
    """Worker body of --verify: checksums of rows [start, stop) of one dataset, read back."""
    path, name, start, stop = task
    with h5py.File(path, "r", locking=False) as f:
        dset = f[name]
        rows = np.empty((stop - start, *dset.shape[1:]), np.uint8)
        dset.read_direct(rows, np.s_[start:stop])
    return np.array([zlib.crc32(row.data) for row in rows], np.uint32)


def verify_file(
    path: str | Path,
    listings: list[SplitListing],
    crc: dict[tuple[str, str], np.ndarray],
    workers: int = 0,
) -> None:
    """Re-read `path` and check every row against the checksum of its PNG's pixels.

    `crc[(split, "images" | "masks")]` holds zlib.crc32 of each decoded PNG, in row order.
    Raises PackError naming the PNG whose row differs (or the schema problem found).
    """
    with h5py.File(path, "r", locking=False) as f:
        info = schema.read_info(f)
        for listing in listings:
            names = f[listing.split][schema.FILENAME].asstr()[:]
            for row, name in zip(listing.rows, names, strict=True):
                if row.image.name != name:
                    raise PackError(f"{row.image}: --verify: stored file name {name!r} differs")
    tasks = [
        (str(path), f"{split}/{name}", start, min(start + VERIFY_ROWS, info.splits[split].count))
        for (split, name) in crc
        for start in range(0, info.splits[split].count, VERIFY_ROWS)
    ]
    by_split = {x.split: x for x in listings}
    with worker_pool(min(workers, len(tasks))) as pool:
        crcs = ordered_map(pool, _crc_rows, tasks, max(1, workers) * WINDOW_PER_WORKER)
        results = list(zip(tasks, crcs, strict=True))
    for (_, name, start, stop), got in results:
        split, kind = name.split("/")
        bad = np.flatnonzero(got != crc[(split, kind)][start:stop])
        if bad.size:
            row = by_split[split].rows[start + int(bad[0])]
            png = row.image if kind == schema.IMAGES else row.mask
            raise PackError(f"{png}: --verify: /{name} row {start + int(bad[0])} differs from this PNG")


# ----------------------------------------------------------------------------- entry point


def _write_and_rename(partial: Path, out: Path, listings: list[SplitListing], options: PackOptions) -> None:
    """Write `partial`, verify it when asked, and rename it to OUT; one-line errors naming OUT."""
    shape = read_png(listings[0].rows[0].image).shape
    try:
        with _out_errors(out, "write failed"), atomic_path(out, temp=partial):
            totals = _write_file(partial, listings, shape, options)
            if options.verify:
                verify_file(partial, listings, totals.crc, options.workers)
    except WorkerLost as e:  # SIGTERM, SIGKILL, the OOM killer
        raise PackError(f"{out}: not written: {e}") from None


def pack(src: str | Path, out: str | Path, options: PackOptions | None = None) -> PackResult:
    """Pack the OASIS folder `src` into the HDF5 file `out` (see the module docstring)."""
    started = time.perf_counter()
    options = options or PackOptions()
    src, out = Path(src), Path(out)
    _check_options(options)
    _check_out(out, options.overwrite, src)
    try:
        listings = list_splits(src, options.splits)
    except LayoutError as e:
        raise PackError(str(e)) from None
    _check_numbers(listings)
    partial = out.with_name(out.name + ".partial")
    created = _claim_out(out, partial)
    try:
        _write_and_rename(partial, out, listings, options)
    except BaseException:
        partial.unlink(missing_ok=True)
        _remove_folders(created)
        raise
    info = schema.inspect_file(out)
    return PackResult(
        path=out,
        counts={s: i.count for s, i in info.splits.items()},
        mask_splits=tuple(s for s, i in info.splits.items() if i.has_masks),
        train_mean=info.train_mean,
        train_std=info.train_std,
        size_bytes=out.stat().st_size,
        seconds=time.perf_counter() - started,
        verified=options.verify,
    )
