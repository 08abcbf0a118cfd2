"""What every cares command shares at run time: atomic file writes, the output-folder checks (ownership
of what is there, distance from the inputs) and lock, device and mixed-precision choices, seed
derivation, and progress reporting.

Kept free of model and data code so that any module can import it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

# Environment variable that makes the process die right after a named file event (see fault_point).
FAULT_ENV = "CARES_FAULT_INJECT"


def fault_point(event: str) -> None:
    """Test hook: when the environment variable CARES_FAULT_INJECT equals `event`, end the process at
    once with os._exit(86), as a kill -9 at that instant would (no cleanup, no finally blocks). Events
    are named "wrote <file name> epoch <n>" by the checkpoint writer, so a test can kill a run between
    any two of its writes deterministically."""
    if os.environ.get(FAULT_ENV) == event:
        sys.stderr.flush()
        os._exit(86)


def temp_file_prefix(name: str) -> str:
    """The prefix of the temp files atomic_write makes for a file called `name` (for cleaning up
    after a kill: see remove_orphaned_temp_files)."""
    return f".{name}."


def atomic_write(path, write) -> Path:
    """Call write(file) so that readers of `path` see the old file or the new one, never a torn one:
    write a temp file in the same folder (same file system, so the rename is atomic), fsync it,
    os.replace it over the target, then fsync the folder so the rename itself is durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_file_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # folders cannot be opened for fsync on every platform; the rename has happened anyway
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write bytes atomically (config.yaml, log.csv, JSON summaries and manifests)."""
    return atomic_write(path, lambda f: f.write(data))


def remove_orphaned_temp_files(folder, names: Iterable[str]) -> list[Path]:
    """Delete the temp files a killed atomic_write of any of `names` left in `folder`; returns them.
    Call it only while holding the folder's RunLock, so no live writer's temp file is removed."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f"{temp_file_prefix(name)}*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


# --------------------------------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------------------------------

def check_output_dir(path, flag: str = "--out") -> Path:
    """Raise ValueError unless `path` is, or can be created as, a writable folder. Writes nothing, so
    commands call it before any work (an unusable --out is reported at once, not after inference)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is under {str(existing)!r}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r} is not writable ({str(existing)!r} is read-only for this user)")
    return path


# --------------------------------------------------------------------------------------------------
# What a command may write, overwrite or delete (docs/design.md#output-folders-and-ownership)
# --------------------------------------------------------------------------------------------------

# The ownership record of a folder: which of its entries (files or folders directly in it) which cares
# command created. A command writes it before its first output, so every entry listed was created by
# that command; it is the only proof a command accepts before it overwrites or deletes anything.
OWNER_FILE = ".cares-owner.json"
_OWNER_FORMAT = "cares-owner"
CLAIM_MODES = ("new", "update", "replace")


def read_owners(folder) -> dict[str, str]:
    """{entry name: command} from `folder`'s ownership record ({} when it has none)."""
    path = Path(folder) / OWNER_FILE
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"the ownership record {str(path)!r} cannot be read ({err}); without it no command "
                         "overwrites anything in that folder: choose another folder") from None
    if not (isinstance(record, dict) and record.get("format") == _OWNER_FORMAT
            and isinstance(record.get("entries"), dict)):
        raise ValueError(f"{str(path)!r} is not a cares ownership record (format {_OWNER_FORMAT!r}); "
                         "choose another folder")
    return {str(name): str(owner) for name, owner in record["entries"].items()}


def check_apart(out, inputs: Iterable[tuple[str, object]] = (), entries: Iterable[str] = (),
                input_files: Iterable[tuple[str, object]] = (), flag: str = "--out") -> None:
    """Raise ValueError when writing `entries` into `out` could overwrite or delete an input:
    - `out` is one of `inputs` (the paths named on the command line, (flag, path) pairs), or holds an
      input folder;
    - an input, named or read (`input_files`, e.g. a dataset's slices), lies in one of `entries`.
    An input file elsewhere in `out` is allowed (`cares evaluate --checkpoint run/last.pt --out run`).
    Paths that do not exist ('synthetic', a run not yet written) are skipped. An input's folder is
    resolved (links, ..) but not its last component: deleting a link removes the link, not its target."""
    out_path = Path(out).resolve()
    targets = [out_path / name for name in entries]
    resolved: dict[Path, Path] = {}

    def located(path: Path) -> Path:
        if path.parent not in resolved:
            resolved[path.parent] = path.parent.resolve()
        return resolved[path.parent] / path.name

    def refuse(input_flag, path, how):
        raise ValueError(f"{flag} {str(out)!r} {how} {input_flag} {str(path)!r}, an input of this command; a "
                         f"command never writes where its inputs are (it could overwrite or delete them): choose "
                         f"another {flag}")

    named = [(f, Path(p)) for f, p in inputs if p is not None]
    for input_flag, path in named:
        if not os.path.lexists(path):
            continue
        where = located(path)
        if where == out_path:
            refuse(input_flag, path, "is")
        if out_path in where.parents and path.is_dir():
            refuse(input_flag, path, "contains")
    for input_flag, path in named + [(f, Path(p)) for f, p in input_files]:
        if not targets or not os.path.lexists(path):
            continue
        where = located(path)
        for target in targets:
            if where == target or target in where.parents:
                refuse(input_flag, path, f"would get {target.name}{'/' if target.is_dir() else ''} written over")


def _entry_names(folder: Path, names: Iterable[str], owners: dict[str, str] | None = None) -> str:
    shown = []
    for name in names:
        text = name + ("/" if (folder / name).is_dir() else "")
        if owners is not None:
            text += f" (written by {owners[name]})" if name in owners else f" (not in {OWNER_FILE})"
        shown.append(text)
    return ", ".join(shown)


@dataclass(frozen=True)
class OutputClaim:
    """What claim_output allowed a command to do in a folder; take() it before the first write."""
    folder: Path
    owner: str
    entries: tuple[str, ...]
    remove: tuple[str, ...]      # entries of an earlier run of the same command, deleted by take()

    def take(self) -> Path:
        """Delete the entries to replace, then record this command as the owner of all its entries."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in self.remove:
            target = self.folder / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        owners = read_owners(self.folder)
        owners.update({name: self.owner for name in self.entries})
        record = {"format": _OWNER_FORMAT, "version": 1,
                  "note": "entries of this folder created by cares commands: the only files they overwrite or delete",
                  "entries": dict(sorted(owners.items()))}
        atomic_write_bytes(self.folder / OWNER_FILE, (json.dumps(record, indent=2) + "\n").encode())
        return self.folder


def claim_output(out, owner: str, entries: Iterable[str], *, mode: str = "new",
                 inputs: Iterable[tuple[str, object]] = (), input_files: Iterable[tuple[str, object]] = (),
                 flag: str = "--out", remedy: str | None = None) -> OutputClaim:
    """The one check every cares command makes before writing into `out`; writes nothing itself.

    owner: the command ("cares train"); entries: the names directly in `out` it writes (files or
    folders). Refused (ValueError) when `out` is unusable (check_output_dir), when its entries could
    land on one of the command's `inputs` (named on the command line) or `input_files` (read by it; see
    check_apart), and when an entry already there was not created by `owner` according to the folder's
    ownership record. Then, by mode, for entries of an earlier run of `owner`:
        new      refused, with `remedy` (say, "pass --resume to continue it") in the message
        update   kept and overwritten as the command goes (resume, a second predict into the folder)
        replace  deleted by take() (--overwrite)
    """
    if mode not in CLAIM_MODES:
        raise ValueError(f"mode must be one of {CLAIM_MODES}, got {mode!r}")
    entries = tuple(entries)
    if OWNER_FILE in entries:
        raise ValueError(f"{OWNER_FILE} is the ownership record, not an output")
    out = check_output_dir(out, flag)
    check_apart(out, inputs, entries, input_files, flag)
    owners = read_owners(out) if out.is_dir() else {}
    present = [name for name in entries if os.path.lexists(out / name)]
    foreign = [name for name in present if owners.get(name) != owner]
    if foreign:
        raise ValueError(f"{flag} {str(out)!r} already holds {_entry_names(out, foreign, owners)}, which {owner} "
                         f"did not write; it overwrites and deletes only what it wrote: choose another {flag} "
                         "(or move those files away)")
    if present and mode == "new":
        raise ValueError(f"{flag} {str(out)!r} already holds {_entry_names(out, present)} from an earlier {owner}"
                         + (f"; {remedy}" if remedy else f"; choose another {flag}"))
    return OutputClaim(out, owner, entries, tuple(present) if mode == "replace" else ())


class RunInUseError(ValueError):
    """Another live process holds the folder's lock."""


# The (device, inode) of every .lock file this process holds: POSIX record locks belong to a process,
# so a second lockf on the same file in this process would succeed, and closing a second descriptor of
# it would drop the lock; RunLock therefore checks this set before it opens the file.
_HELD_LOCKS: set[tuple[int, int]] = set()


class RunLock:
    """An exclusive lock on an output folder, held until release() or the end of the process.

    Implemented with a POSIX record lock (fcntl.lockf) on <folder>/.lock (POSIX only; on other
    platforms the lock is a no-op). A record lock belongs to the process that took it: the operating
    system drops it when that process dies, however it dies, and children forked while it is held
    (DataLoader workers, which may outlive a killed parent by seconds) do not inherit it, unlike a
    flock, which every inherited descriptor keeps alive. So a killed run never leaves a lock behind and
    `--resume` can take the folder over at once. The file holds the holder's pid for the error message
    a second writer gets.
    """

    FILE_NAME = ".lock"

    def __init__(self, folder, flag: str = "--out"):
        self.folder, self.flag = Path(folder), flag
        self._file = None
        self._key: tuple[int, int] | None = None

    def _in_use(self, holder: str) -> RunInUseError:
        return RunInUseError(f"{self.flag} {str(self.folder)!r} is in use by another run (pid {holder}); "
                             "wait for it to finish or choose another folder")

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking (documented in the README)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.FILE_NAME
        with contextlib.suppress(FileNotFoundError):
            status = os.stat(path)
            if (status.st_dev, status.st_ino) in _HELD_LOCKS:
                raise self._in_use(str(os.getpid()))
        handle = open(path, "a+")
        try:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()   # this process holds no lock on the file, so closing it drops none
            raise self._in_use(holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        status = os.fstat(handle.fileno())
        self._file, self._key = handle, (status.st_dev, status.st_ino)
        _HELD_LOCKS.add(self._key)
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the record lock
            _HELD_LOCKS.discard(self._key)
            self._file, self._key = None, None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# Device and mixed precision
# --------------------------------------------------------------------------------------------------

DEVICE_CHOICES = ("auto", "cpu", "cuda")
AMP_CHOICES = ("auto", "off", "fp16", "bf16")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda  ->  a torch.device (cuda:<local_rank> under torchrun)."""
    if preference not in DEVICE_CHOICES:
        raise ValueError(f"--device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def host_values_to(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of host values (a list of numbers, or a CPU tensor) on `device` without making the host
    wait for the device: built on the host, pinned and copied with non_blocking=True on CUDA (the
    pinned buffer is kept until the copy is done by torch's caching host allocator). A plain
    torch.tensor(values, device="cuda") is a blocking copy, a host sync in every training step that
    makes one (issue 19)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None:
        tensor = tensor.to(dtype)
    device = torch.device(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where oneDNN's bf16 convolutions
    beat fp32 ones. Measured on such a 2-core machine (CARes-UNet width 16, 256x256, batch 4, one
    training step): fp32 NCHW 14.7 s, bf16 autocast + channels_last 5.9 s."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):   # a torch without oneDNN, or one that renamed the probe
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto -> bf16 where the device computes it fast (CUDA with bf16, CPUs with native bf16), else
    off; other choices are returned as they are."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "off"


def resolve_channels_last(channels_last: bool | None, amp: str, device: torch.device) -> bool:
    """channels_last None (auto) -> on when bf16 autocast runs (oneDNN and cuDNN's fast bf16 convolutions
    want NHWC), off otherwise."""
    if channels_last is not None:
        return channels_last
    return resolve_amp(amp, device) == "bf16"


def autocast_context(device: torch.device, amp: str):
    """torch.autocast for --amp fp16 | bf16 (| auto, see resolve_amp), a no-op context for off."""
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be auto, off, fp16 or bf16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


# --------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------

def derive_seed(base: int, *keys: int) -> int:
    """Mix a base seed and non-negative integer keys into one 64-bit seed (numpy's SeedSequence, a
    hash), so that nearby keys such as (0, 1, 2) and (0, 2, 1), or seed 1 epoch 0 and seed 0 epoch 1,
    give unrelated random streams. The one seed derivation of cares: training, sampling, augmentation
    and the synthetic data all use it (with a constant tag key to keep their streams apart)."""
    for key in (base, *keys):
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {(base, *keys)!r}")
    return int(np.random.SeedSequence([int(base), *(int(k) for k in keys)]).generate_state(1, dtype=np.uint64)[0])


# --------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------

# Without a terminal, a progress line is printed at most this often (seconds).
PROGRESS_LOG_INTERVAL = 30.0


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def progress(items: Iterable[T], *, total: int | None, desc: str, unit: str = "item",
             stream=None, interval: float | None = None) -> Iterator[T]:
    """Yield `items`, showing progress with an ETA on `stream` (stderr): a tqdm bar on a terminal,
    otherwise a line such as "predict: 120/1600 slices (7.5%), 3.1 slices/s, ETA 7:57" every
    `interval` seconds (PROGRESS_LOG_INTERVAL) and one at the end, so logs of batch jobs show it too."""
    stream = sys.stderr if stream is None else stream
    interval = PROGRESS_LOG_INTERVAL if interval is None else interval
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream)
        return
    started = last = time.monotonic()
    done = 0

    def line(now: float) -> str:
        rate = done / max(now - started, 1e-9)
        text = f"{desc}: {done}" + (f"/{total} {unit}s ({100.0 * done / max(total, 1):.1f}%)" if total else f" {unit}s")
        text += f", {rate:.2f} {unit}s/s"
        if total and rate > 0:
            text += f", ETA {_format_seconds((total - done) / rate)}"
        return text

    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval:
            print(line(now), file=stream, flush=True)
            last = now
    print(line(time.monotonic()) + ", done", file=stream, flush=True)
