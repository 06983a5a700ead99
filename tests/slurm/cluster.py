"""A throwaway single-node SLURM cluster on localhost, for integration tests.

Slurm 22.05 (apt's slurm-wlm and munge) without systemd: munged runs as the munge
user, ``slurmctld -D -i`` and ``slurmd -D`` run in the background, no systemd, no accounting.
Everything the cluster writes (slurm.conf, state, spool, logs) lives in one folder of the test;
munge's socket lives in its own ``/tmp/vitreg-munge-*`` folder (the munge user cannot enter
pytest's private tmp folders). The daemons use free ports, so a cluster never collides with
another one on the machine, and they are stopped by PID: ``stop()`` first cancels every job and
ends what is left of the jobs' processes (found by this cluster's ``SLURM_CONF`` in their
environment), then the daemons.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
DAEMON_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# ------------------------------------------------------------------------------------ install
def which(binary: str) -> str | None:
    """``shutil.which`` that also looks in the sbin folders (not always on a test's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *DAEMON_DIRS])
    return shutil.which(binary, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def _apt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def ensure_slurm_installed() -> str | None:
    """Install slurm-wlm and munge with apt-get when slurmctld & co. are missing.

    Returns None when SLURM is usable, else the reason it is not (for ``pytest.skip``).
    """
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"SLURM is not installed ({', '.join(missing_binaries())} missing) and installing it needs root"
    if which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    install = ("install", "-y", "--no-install-recommends", *PACKAGES)
    try:
        result = _apt(*install)
        if result.returncode != 0:  # a stale or empty package list: update once and retry
            _apt("update")
            result = _apt(*install)
    except (OSError, subprocess.SubprocessError) as err:
        return f"apt-get install {' '.join(PACKAGES)} failed: {err}"
    if result.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-500:]}"
    missing = missing_binaries()
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def real_memory_mb() -> int:
    """MemTotal minus 1 GiB, in MiB (slurmd refuses a node that claims more than it has)."""
    text = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"MemTotal:\s+(\d+) kB", text).group(1))
    return max(1024, total_kb // 1024 - 1024)


def parse_scontrol_records(text: str) -> list[dict[str, str]]:
    """``scontrol -o show ...`` output: one record per line of ``Key=Value`` pairs."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                record[key] = value
        records.append(record)
    return records


def slurm_conf(root: Path, host: str, ctld_port: int, slurmd_port: int, munge_socket: Path) -> str:
    """A minimal single-node slurm.conf (root daemons, munge auth, no accounting); all paths under ``root``."""
    return "\n".join(
        [
            "ClusterName=vitregtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log",
            f"SlurmdLogFile={root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1024",
            "JobRequeue=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` for 10 min
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={real_memory_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


# ------------------------------------------------------------------------------------ cluster
class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """``with SlurmCluster(tmp_path / "slurm") as cluster: cluster.sbatch(...)``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.host = short_hostname()
        self.conf = self.root / "slurm.conf"
        self.munge_dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *DAEMON_DIRS])

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir = Path(tempfile.mkdtemp(prefix="vitreg-munge-", dir="/tmp"))
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o755)  # munged insists that everyone may reach its socket
        socket_path = self.munge_dir / "munge.socket"
        self.conf.write_text(slurm_conf(self.root, self.host, free_port(), free_port(), socket_path))

        m = self.munge_dir
        self._spawn(
            "munged",
            [
                *("setpriv", "--reuid=munge", "--regid=munge", "--init-groups", which("munged"), "-F"),
                *(f"--socket={socket_path}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log"),
                f"--seed-file={m}/munged.seed",
            ],
        )
        self._wait_for(lambda: socket_path.exists(), timeout, "munged's socket")
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout, "slurmctld")
        self._spawn("slurmd", [which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait_for(lambda: self.node_state() in ("idle",), timeout, "the node to become idle")

    def _spawn(self, name: str, cmd: Sequence[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (closed by the child's exit)
        self.procs[name] = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs_tail()}")

    def stop(self) -> None:
        """Cancel all jobs, end the jobs' leftover processes, then the daemons; never raises."""
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.run(["scancel", "--user", str(os.getuid())], check=False, timeout=20)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                    time.sleep(0.5)
        except Exception:
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        # Whatever outlived the daemons (a slurmstepd and its tasks if scancel did not end them in time).
        # Not before: slurmctld's own helper (slurmscriptd) carries the marker too, and slurmctld
        # stalls on shutdown when it is gone.
        self._kill_job_processes()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    def job_process_ids(self) -> list[int]:
        """Processes started by this cluster (slurmstepd, batch scripts, srun, tasks): they carry
        this cluster's SLURM_CONF in their environment. Daemons we started are excluded."""
        marker = f"SLURM_CONF={self.conf}".encode()
        daemons = {p.pid for p in self.procs.values()}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in daemons or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def _kill_job_processes(self) -> None:
        for sig, pause in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.5)):
            pids = self.job_process_ids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            time.sleep(pause)

    # ------------------------------------------------------------------ commands
    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(cmd), capture_output=True, text=True, env=kwargs.pop("env", self.env), timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise SlurmError(f"`{' '.join(cmd)}` exited with {result.returncode}: {result.stderr.strip()}")
        return result

    def node_state(self) -> str:
        result = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return result.stdout.strip().rstrip("*~#")

    def sbatch(
        self,
        script: Path | str,
        args: Sequence[str] = (),
        options: Sequence[str] = (),
        env: Mapping[str, str] = (),
        **kw,
    ) -> str:
        """Submit ``script`` (``sbatch --parsable``); returns the job id."""
        result = self.run(["sbatch", "--parsable", *options, str(script), *args], env={**self.env, **dict(env)}, **kw)
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` records of a job (one per array task once they are split)."""
        result = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        return parse_scontrol_records(result.stdout) if result.returncode == 0 else []

    def logs_tail(self, lines: int = 20) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


def wait_until(condition, timeout: float, what: str, cluster: SlurmCluster, detail=None, poll: float = 0.5):
    """Poll ``condition`` until it returns something truthy (returned); on timeout fail with ``what``, the
    optional ``detail()`` and the tail of the cluster's logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    extra = f"; {detail()}" if detail is not None else ""
    raise AssertionError(f"timed out waiting for {what}{extra}\n{cluster.logs_tail()}")
