"""The sandbox a student's code runs in while it is graded: Debian's bubblewrap, an unprivileged uid, hard limits.

Every process that runs a student's code (the notebook's kernel, the trusted re-run's worker) is started by
:func:`run` inside ``bwrap`` (https://github.com/containers/bubblewrap), as root drops it:

- **filesystem**: an empty root; the system (``/usr``), Python and the course's virtual environment mounted
  read-only; ``/home/student`` = the run's private scratch folder, the only writable place besides an empty
  ``/tmp``; whatever else the run needs (peftlab for the kernel, the grader's worker code) bound read-only by
  name. The gradebook, ``source/``, ``submitted/``, other students' files and the repository are not there;
- **processes**: new pid, network, IPC and UTS namespaces (``--unshare-pid --unshare-net ...``): no view of the
  grader's processes or their command lines, no network, and every process the run started dies with it (the pid
  namespace ends when its first process exits; ``--die-with-parent`` ends it with the grader). ``--as-pid-1``:
  the command itself is that first process, so not even bubblewrap's own command line (the host paths it
  mounts) is in view;
- **identity**: ``setpriv`` drops to an unprivileged uid (one per parallel slot) with no capabilities and
  ``no_new_privs``: files the grader did not make world-readable stay unreadable, nothing can be written outside
  the scratch folder;
- **limits** (:class:`Limits`, ``prlimit``): address space (a 6 GiB allocation fails with ``MemoryError``),
  processes (a fork bomb stops at the limit), CPU seconds, size of a written file; ``/tmp`` is a 512 MiB tmpfs;
  where the machine has cgroup v1 controllers, the whole sandbox is in a memory and a pids cgroup of its slot
  (8 GiB and 256 tasks, ``/tmp`` included); the grader adds the wall clock and the bytes it reads back.
  :func:`run` returns what was hit as a sentence for the feedback.

bubblewrap must be installed (``apt-get install bubblewrap``); :func:`available` says whether it is, and why not.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TMP_BYTES = 512 * 2**20  # the sandbox's /tmp (RAM-backed): capped, and charged to its memory cgroup
CGROUPS = Path("/sys/fs/cgroup")  # cgroup v1 memory and pids controllers, where the machine lets root use them
UID_BASE = 61000  # uid of slot i is UID_BASE + i: one per parallel run, so process limits are per run
HOME = "/home/student"


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 6 * 2**30  # address space per process (RLIMIT_AS); torch + a tiny model need ~2 GiB
    sandbox_memory_bytes: int = 8 * 2**30  # resident memory of the whole sandbox, /tmp included (memory cgroup)
    processes: int = 256  # processes and threads of the run's uid (RLIMIT_NPROC); torch starts a few dozen
    cpu_seconds: int = 1800  # per process (RLIMIT_CPU)
    file_bytes: int = 256 * 2**20  # largest file the run may write (RLIMIT_FSIZE)
    wall_seconds: float = 900.0  # the whole run, killed after
    output_bytes: int = 2**20  # what the grader keeps of the run's stdout and stderr


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float
    hit: list[str] = field(default_factory=list)  # the limits the run hit, as sentences for the feedback

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.hit


def available() -> str | None:
    """None when sandboxed runs work here, else the reason (for a skip or an error message)."""
    if sys.platform != "linux":
        return "the grading sandbox needs Linux (bubblewrap)"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        return "setpriv/prlimit (util-linux) are missing"
    if os.geteuid() != 0:
        return "the grader must run as root to start sandboxes under other uids"
    probe = subprocess.run(_bwrap_args([], [], None) + ["/bin/true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"bwrap does not start here: {probe.stderr.decode(errors='replace').strip()[:300]}"
    return None


def _python_roots() -> list[Path]:
    """The folders Python needs: the interpreter's installation and the virtual environment (read-only)."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.executable).resolve().parents[1]}
    return sorted(r for r in roots if r != Path("/usr") and not str(r).startswith("/usr/"))


def _dirs_to(path: Path) -> list[str]:
    """``--dir`` arguments (world-traversable) for the parents of ``path`` that are not already mounted."""
    args = []
    for parent in reversed(path.parents):
        if str(parent) in ("/", "/usr", "/tmp", "/proc", "/dev") or str(parent).startswith("/usr/"):
            continue
        args += ["--perms", "0755", "--dir", str(parent)]
    return args


def _bwrap_args(ro_binds: list[tuple[Path, str]], hide: list[Path], scratch: Path | None) -> list[str]:
    args = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "grading", "--as-pid-1",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--ro-bind-try", "/etc/alternatives",
            "/etc/alternatives", "--ro-bind-try", "/etc/localtime", "/etc/localtime",
            "--ro-bind-try", "/etc/fonts", "/etc/fonts", "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp"]
    for root in _python_roots():
        args += _dirs_to(root) + ["--ro-bind", str(root), str(root)]
    for src, dst in ro_binds:
        args += _dirs_to(Path(dst)) + ["--ro-bind", str(src), dst]
    for path in hide:  # an empty folder over a package: nothing of it can be imported
        args += ["--tmpfs", str(path)]
    if scratch is not None:
        args += ["--perms", "0755", "--dir", "/home", "--bind", str(scratch), HOME, "--chdir", HOME]
    return args


def run(argv: list[str], scratch: Path, *, slot: int = 0, ro_binds: list[tuple[Path, str]] = (),
        hide: list[Path] = (), env: dict[str, str] | None = None, limits: Limits = Limits(),
        stdin: bytes | None = None, pass_fds: tuple[int, ...] = ()) -> Result:
    """Run ``argv`` in a fresh sandbox whose writable home is ``scratch`` (created, owned by the slot's uid).

    ``ro_binds``: ``(host path, sandbox path)`` pairs mounted read-only; ``hide``: folders replaced by empty ones
    (a package the run must not import). The environment is ``env`` plus a minimal base, nothing of the grader's.
    """
    uid = UID_BASE + slot
    scratch.mkdir(parents=True, exist_ok=True)
    os.chown(scratch, uid, uid)
    os.chmod(scratch, 0o700)
    base_env = {"HOME": HOME, "USER": "student", "LOGNAME": "student",
                "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                "LANG": "C.UTF-8", "TMPDIR": "/tmp", "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/matplotlib",
                "HF_HOME": f"{HOME}/.cache/huggingface", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONHASHSEED": "0"}
    cmd = _bwrap_args(list(ro_binds), list(hide), scratch) + [
        "--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
        "--bounding-set=-all", "--no-new-privs",
        "prlimit", f"--as={limits.memory_bytes}", f"--nproc={limits.processes}", f"--cpu={limits.cpu_seconds}",
        f"--fsize={limits.file_bytes}", "--core=0", "--", *argv]
    cmd = _in_cgroups(cmd, slot, limits)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**base_env, **(env or {})},
                            start_new_session=True, pass_fds=pass_fds)
    out, err = _Capped(proc.stdout, limits.output_bytes), _Capped(proc.stderr, limits.output_bytes)
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
    hit = []
    try:
        proc.wait(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        hit.append(f"it ran longer than the time limit of {limits.wall_seconds:.0f} s and was stopped")
    out.join(), err.join()
    for capped, name in ((out, "output"), (err, "error output")):
        if capped.dropped:
            hit.append(f"its {name} was cut at {limits.output_bytes:,} bytes ({capped.dropped:,} more were dropped)")
    code = proc.returncode
    if code < 0 and -code == signal.SIGXCPU:
        hit.append(f"it used more than {limits.cpu_seconds} s of CPU time")
    if code < 0 and -code == signal.SIGXFSZ:
        hit.append(f"it wrote a file larger than the limit of {limits.file_bytes:,} bytes")
    return Result(code, out.data, err.data, time.perf_counter() - start, hit)


def _in_cgroups(cmd: list[str], slot: int, limits: Limits) -> list[str]:
    """``cmd`` started inside the slot's memory and pids cgroups (v1), when the machine has them writable: the
    whole sandbox, every process and its ``/tmp`` together, stays under ``limits``. Else ``cmd`` as it is (the
    per-process limits of ``prlimit`` still hold)."""
    procs = []
    for controller, settings in (("memory", {"memory.limit_in_bytes": limits.sandbox_memory_bytes}),
                                 ("pids", {"pids.max": limits.processes})):
        group = CGROUPS / controller / f"peftlab-grading-slot{slot}"
        try:
            group.mkdir(exist_ok=True)
            for name, value in settings.items():
                (group / name).write_text(str(value))
        except OSError:
            continue
        procs.append(str(group / "cgroup.procs"))
    if not procs:
        return cmd
    join = " && ".join(f'echo $$ > "{p}"' for p in procs)
    return ["/bin/sh", "-c", f'{join} && exec "$@"', "sh", *cmd]


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError):
        pass


class _Capped(threading.Thread):
    """Read a pipe to its end in the background; keep the first ``limit`` bytes, count the rest."""

    def __init__(self, pipe, limit: int):
        super().__init__(daemon=True)
        self.pipe, self.limit, self.chunks, self.kept, self.dropped = pipe, limit, [], 0, 0
        self.start()

    def run(self) -> None:
        while chunk := self.pipe.read1(65536) if hasattr(self.pipe, "read1") else self.pipe.read(65536):
            room = max(self.limit - self.kept, 0)
            self.chunks.append(chunk[:room])
            self.kept += min(room, len(chunk))
            self.dropped += max(len(chunk) - room, 0)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def clean(scratch: Path) -> None:
    """Remove a run's scratch folder (whatever the student's code left there)."""
    shutil.rmtree(scratch, ignore_errors=True)
