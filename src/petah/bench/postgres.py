"""A throwaway PostgreSQL cluster (Debian's ``postgresql``: ``initdb`` + ``pg_ctl`` on a free port,
as ``nobody`` when run as root — the server refuses root), for the hub's tests and ``petah bench
fleet --sim``. Durability is off (``fsync``, full-page writes, synchronous commit): it is thrown
away at the end."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from petah.errors import PetahError
from petah.http import free_port


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Callable[[], str]]:
    """Start a cluster of its own; yields a function that creates an empty database and returns
    its ``postgresql://`` URL; the cluster is stopped and removed afterwards."""
    import pwd

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise PetahError("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(found[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="petah-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chmod(folder, 0o755)
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    port, data = free_port(), folder / "data"
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "petah", "-A", "trust", "-E",
                        "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t",
                        "60", "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off "
                                    "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200",
                        "start"], check=True, capture_output=True, timeout=120)
        import psycopg

        count = itertools.count()

        def new_database() -> str:
            name = f"hub{next(count)}"
            with psycopg.connect(f"postgresql://petah@127.0.0.1:{port}/postgres", autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {name}")
            return f"postgresql://petah@127.0.0.1:{port}/{name}"

        new_database.data_dir = data  # the server's processes are found by it (CPU per poll)
        yield new_database
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


__all__ = ["throwaway_cluster"]
