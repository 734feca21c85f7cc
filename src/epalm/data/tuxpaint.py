"""Reader for Debian's ``tuxpaint-stamps-default``: clip-art stamps with a one-line description.

``apt-get install --no-install-recommends tuxpaint-stamps-default`` puts the stamps under
``/usr/share/tuxpaint/stamps/<category>/.../``::

    frog.png  (or frog.svg)   the stamp (RGBA; transparent background)
    frog.txt                  line 1: the English description ("A frog."); next lines:
                              translations, ``<locale>.utf8=<text>``
    frog.dat, frog*.ogg, frog_mirror.png   options, sounds, mirrored copies (ignored)

A stamp is a ``<name>.txt`` with a ``<name>.png`` or ``<name>.svg`` beside it (PNG preferred; a
description without an image is skipped). ``media_id`` is the path relative to the root without
suffix (``animals/amphibians/frog``). SVGs are rasterised by :func:`render_svg` with
``rsvg-convert`` (``apt-get install librsvg2-bin``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from epalm.errors import AnnotationError, MediaError
from epalm.data.image import load_image_on_white
from epalm.data.records import CaptionSample

__all__ = [
    "APT_COMMAND",
    "DEFAULT_STAMPS_ROOT",
    "RSVG_APT_COMMAND",
    "composite_on_white",
    "read_description",
    "read_tuxpaint_stamps",
    "render_svg",
]

DEFAULT_STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")
APT_COMMAND = "apt-get update && apt-get install -y --no-install-recommends tuxpaint-stamps-default"
RSVG_APT_COMMAND = "apt-get update && apt-get install -y --no-install-recommends librsvg2-bin"


def read_description(path: str | Path) -> str:
    """The English description: the first non-empty line of a stamp's ``.txt`` (UTF-8)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise AnnotationError(f"{path}: unreadable stamp description ({err})") from err
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            return line
    raise AnnotationError(f"{path}: the stamp description is empty (line 1 should be the English text)")


def read_tuxpaint_stamps(root: str | Path = DEFAULT_STAMPS_ROOT, *, include_svg: bool = True) -> list[CaptionSample]:
    """One :class:`CaptionSample` per stamp (its description as the only reference), sorted by id.

    ``include_svg=False`` keeps PNG stamps only (no ``rsvg-convert`` needed). Raises
    ``FileNotFoundError`` naming ``root`` and the apt command when the stamps are absent.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no Tux Paint stamps here (the tuxpaint-stamps-default Debian package "
                                f"installs them): {APT_COMMAND}")
    samples: list[CaptionSample] = []
    for txt in sorted(root.rglob("*.txt")):
        image = next((p for p in (txt.with_suffix(".png"), txt.with_suffix(".svg"))
                      if p.is_file() and (include_svg or p.suffix == ".png")), None)
        if image is None:
            continue
        media_id = txt.relative_to(root).with_suffix("").as_posix()
        samples.append(CaptionSample(id=media_id, media_id=media_id, media_path=image,
                                     captions=[read_description(txt)]))
    if not samples:
        raise FileNotFoundError(f"{root}: no stamps (<name>.txt beside <name>.png/.svg); reinstall the package: "
                                f"{APT_COMMAND}")
    return samples


def render_svg(svg: str | Path, png: str | Path, size: int = 256) -> Path:
    """Rasterise ``svg`` to ``png`` (``size`` px on its longer side, aspect kept) with ``rsvg-convert``."""
    exe = shutil.which("rsvg-convert")
    if exe is None:
        raise FileNotFoundError(f"rendering {svg} needs rsvg-convert: {RSVG_APT_COMMAND} "
                                "(or skip SVG stamps)")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp")
    proc = subprocess.run([exe, "--keep-aspect-ratio", "-w", str(size), "-h", str(size), "-f", "png",
                           "-o", str(tmp), str(svg)], capture_output=True, check=False)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise MediaError(svg, f"rsvg-convert failed ({proc.stderr.decode(errors='replace').strip()[-300:]})")
    tmp.replace(png)
    return png


def composite_on_white(path: str | Path):
    """Open a stamp as RGB with its transparent background made white (what Tux Paint's canvas shows)."""
    return load_image_on_white(path)
