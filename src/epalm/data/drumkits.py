"""Reader for Debian's ``hydrogen-drumkits``: drum samples labelled with their instrument.

``apt-get install hydrogen-drumkits`` puts one folder per kit under
``/usr/share/hydrogen/data/drumkits``::

    drumkits/<kit>/drumkit.xml          Hydrogen kit: <instrument><name>Kick</name> ...
                                        <layer><filename>BD_01.aiff</filename></layer> (or a
                                        <filename> directly under <instrument>, older kits)
    drumkits/<kit>/<sample>.wav|.flac|.aiff

Label rule (:func:`drum_label`): the text that names a sample is its instrument's ``<name>`` in
``drumkit.xml`` when the kit lists the file there and that name contains a class keyword, else the
file's stem. The text is split into lower-case words (camelCase and digits split too:
``HiHatClosed`` -> ``hi hat closed``, ``BD_01`` -> ``bd``) and matched against :data:`KEYWORDS`:

==========  ===============================================================================
class       words (a word *starting* with a ``*`` entry matches too)
==========  ===============================================================================
kick        kick*, kik, bd, bassdrum, "bass drum"
snare       *snare* (rsnare, jsnare), sd, sn
hi-hat      hihat*, hat, hats, hh*, chh, ohh, hhat, "hi hat", closehihat, openhat, pedalhihat
tom         tom*, floortom
cymbal      crash*, ride*, china, splash, cymbal*, cc, rc, rd
clap        clap*
==========  ===============================================================================

A sample whose text matches no class (stick, cowbell, conga, djembe, effects, ...) or several
classes (ambiguous) is dropped. ``media_id`` is ``<kit>/<file stem>`` (stems repeat across kits).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from epalm.errors import AnnotationError
from epalm.data.records import QASample

__all__ = [
    "APT_COMMAND",
    "AUDIO_SUFFIXES",
    "DEFAULT_DRUMKITS_ROOT",
    "DRUM_CLASSES",
    "KEYWORDS",
    "QUESTION",
    "drum_label",
    "read_drumkit_xml",
    "read_drumkits",
    "words_of",
]

DEFAULT_DRUMKITS_ROOT = Path("/usr/share/hydrogen/data/drumkits")
APT_COMMAND = "apt-get update && apt-get install -y hydrogen-drumkits"
QUESTION = "what instrument is this?"
AUDIO_SUFFIXES = (".wav", ".flac", ".aiff", ".aif")

DRUM_CLASSES = ("kick", "snare", "hi-hat", "tom", "cymbal", "clap")
#: class -> (exact words, word prefixes, substrings, two-word phrases)
KEYWORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "kick": {"words": ("kik", "bd", "bassdrum"), "prefixes": ("kick",), "contains": (), "phrases": ("bass drum",)},
    "snare": {"words": ("sd", "sn"), "prefixes": (), "contains": ("snare",), "phrases": ()},
    "hi-hat": {"words": ("hat", "hats", "chh", "ohh", "hhat", "closehihat", "openhat", "pedalhihat"),
              "prefixes": ("hihat", "hh"), "contains": (), "phrases": ("hi hat",)},
    "tom": {"words": ("floortom",), "prefixes": ("tom",), "contains": (), "phrases": ()},
    "cymbal": {"words": ("china", "splash", "cc", "rc", "rd"), "prefixes": ("crash", "ride", "cymbal"),
               "contains": (), "phrases": ()},
    "clap": {"words": (), "prefixes": ("clap",), "contains": (), "phrases": ()},
}


def words_of(text: str) -> list[str]:
    """Lower-case words of a name: camelCase, digits and punctuation split (``HiHatClosed-0`` ->
    ``['hi', 'hat', 'closed']``; ``BD_01`` -> ``['bd']``)."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # camelCase boundary
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", text)  # "HHClosed" -> "HH Closed"
    return re.findall(r"[a-z]+", text.lower())


def _classes(text: str) -> set[str]:
    ws = words_of(text)
    joined = " " + " ".join(ws) + " "
    found = set()
    for label, rule in KEYWORDS.items():
        if (any(w in rule["words"] for w in ws) or any(w.startswith(p) for w in ws for p in rule["prefixes"])
                or any(c in w for w in ws for c in rule["contains"])
                or any(f" {p} " in joined for p in rule["phrases"])):
            found.add(label)
    return found


def drum_label(file_stem: str, instrument_name: str | None = None) -> str | None:
    """The class of a sample (see module doc), or ``None`` when no class or several classes match."""
    found = _classes(instrument_name) if instrument_name else set()
    if not found:
        found = _classes(file_stem)
    return next(iter(found)) if len(found) == 1 else None


def read_drumkit_xml(path: str | Path) -> dict[str, str]:
    """``{sample file name: instrument name}`` of one Hydrogen ``drumkit.xml`` (namespaced or not)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not a readable Hydrogen drumkit.xml ({err})") from err
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    out: dict[str, str] = {}
    for inst in root.iter(f"{ns}instrument"):
        name = (inst.findtext(f"{ns}name") or "").strip()
        for fn in inst.iter(f"{ns}filename"):
            if fn.text and fn.text.strip():
                out.setdefault(Path(fn.text.strip()).name, name)
    return out


def read_drumkits(root: str | Path = DEFAULT_DRUMKITS_ROOT, *, keep_unlabelled: bool = False) -> list[QASample]:
    """One :class:`QASample` per labelled drum sample (question :data:`QUESTION`, answer its class).

    ``keep_unlabelled``: also return dropped samples (``answers=[]``), to inspect the rule.
    Raises ``FileNotFoundError`` naming ``root`` and the apt command when the kits are absent.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no drum kits here (the hydrogen-drumkits Debian package installs "
                                f"them): {APT_COMMAND}")
    samples: list[QASample] = []
    for kit in sorted(p for p in root.iterdir() if p.is_dir()):
        xml = kit / "drumkit.xml"
        names = read_drumkit_xml(xml) if xml.is_file() else {}
        for f in sorted(kit.iterdir()):
            if f.suffix.lower() not in AUDIO_SUFFIXES or not f.is_file():
                continue
            instrument = names.get(f.name)
            label = drum_label(f.stem, instrument)
            if label is None and not keep_unlabelled:
                continue
            mid = f"{kit.name}/{f.stem}"
            samples.append(QASample(id=mid, media_id=mid, media_path=f, question=QUESTION,
                                    answers=[label] if label else [], answer_type=instrument or f.stem,
                                    modality="audio"))
    if not samples:
        raise FileNotFoundError(f"{root}: no labelled drum samples ({', '.join(AUDIO_SUFFIXES)} files in "
                                f"<kit>/ folders); reinstall the package: {APT_COMMAND}")
    return samples
