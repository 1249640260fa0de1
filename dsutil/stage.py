"""One marker per stage: what a stage's outputs are made from, and whether they are finished.

Every stage (squeeze, recover, relabel, a student) keeps ``stage.json`` in its folder (squeeze, whose folder is
the run: ``squeeze.stage.json``). It holds the stage's key, a hash of its settings as they bear on its outputs
and of its inputs' keys, and is written before the stage's first output with ``finished`` null and again, finished,
after its last. So a rerun reuses a finished stage of the same key, resumes an unfinished one of the same key,
and refuses (or with ``restart`` clears) a folder made for another key; a changed teacher changes every key
downstream of it. The experiment runner reads the same markers.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, fields, is_dataclass
from functools import cached_property
from pathlib import Path

from .files import file_sha256, read_json, remove_own, write_json
from .runtime import barrier, is_main

SCHEMA = 2  # 1: the runner's markers of before (no "schema", written only once the stage had finished)


def identity_settings(settings):
    """Settings as they bear on a stage's outputs: a config's fields (its ``identity()`` where it has one)
    without those its class added later (``ADDED``) while they hold the value that gives the behaviour of
    before, so adding a setting keeps every finished stage's key; dicts and lists element by element."""
    if is_dataclass(settings):
        added = getattr(type(settings), "ADDED", {})
        d = settings.identity() if hasattr(settings, "identity") else \
            {f.name: getattr(settings, f.name) for f in fields(settings)}
        return {k: identity_settings(v) for k, v in d.items() if not (k in added and v == added[k])}
    if isinstance(settings, dict):
        return {k: identity_settings(v) for k, v in settings.items()}
    if isinstance(settings, (list, tuple)):
        return [identity_settings(v) for v in settings]
    return settings


@dataclass(frozen=True)
class Identity:
    """A stage's name, its settings (dataclasses or plain values), its inputs' keys (``upstream``: the key) and
    the files it reads (``inputs``: their content hashes, recorded when it starts and checked whenever it is
    resumed or found finished, so a file changed in place is not taken for the one the stage read)."""

    stage: str
    settings: object
    upstream: tuple[str, ...] = ()
    inputs: tuple[Path, ...] = ()

    @cached_property
    def input_hashes(self) -> dict[str, str]:
        """Read once per identity: a claim, its start and a store's manifest share them (an image set can be GBs)."""
        return {Path(p).name: file_sha256(p) for p in self.inputs}

    @property
    def key(self) -> str:
        text = json.dumps((identity_settings(self.settings), list(self.upstream)), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_key(marker, made) -> str:
    """The key of a stage's input: that of the finished stage whose ``marker`` records it, or, for a file no
    stage made (an imported set, or a run of a dsutil older than its markers), the content hash of ``made``."""
    marker = Marker(marker)
    return marker.key() if marker.finished() else file_sha256(made)


class Marker:
    """``stage.json`` of one stage folder (or ``squeeze.stage.json``): read, claimed, started, finished."""

    def __init__(self, path):
        self.path = Path(path)

    def read(self) -> dict | None:
        return read_json(self.path) if self.path.exists() else None

    def finished(self, ident: Identity | None = None) -> bool:
        """Finished (with ``ident``'s key, when given)."""
        rec = self.read()
        return bool(rec and rec.get("finished") is not None and (ident is None or rec.get("hash") == ident.key))

    def key(self) -> str:
        """The key of the finished stage this marker records."""
        if not self.finished():
            raise FileNotFoundError(f"{self.path}: that stage has not finished; run it first")
        return self.read()["hash"]

    def seconds(self) -> float | None:
        return (self.read() or {}).get("seconds")

    def held_by_other(self, ident: Identity, own: tuple[str, ...]) -> bool:
        """The folder holds files of this stage (``own``: glob patterns) made for another key, or by an older
        dsutil that kept no marker."""
        rec = self.read()
        made = any(any(self.path.parent.glob(p)) for p in own)  # a run that failed before any output blocks nothing
        return made and (rec is None or rec.get("hash") != ident.key)

    def clear(self, own: tuple[str, ...]) -> None:
        """Remove the stage's files and marker (the user's own files stay)."""
        barrier()  # every rank has read the folder before it goes
        if is_main():
            remove_own(self.path.parent, (*own, self.path.name))
        barrier()

    def claim(self, ident: Identity, own: tuple[str, ...], restart: bool, what: str) -> bool:
        """True when the folder holds this very stage, finished. Else it may hold an unfinished run of the same
        key and input files (resumed) or nothing of the stage; with ``restart`` whatever it holds of the stage
        is removed first, and anything else is refused before work starts."""
        if restart:
            self.clear(own)
            return False
        rec, again = self.read(), "; choose another folder, or pass --restart to remove it and start again"
        if self.held_by_other(ident, own):
            raise ValueError(f"{self.path.parent} holds {what} made with other settings or inputs"
                             f"{'' if rec else ' (or by an older dsutil, without a stage.json)'}{again}")
        # the input files an unfinished or finished run of this key read (none in a marker of before, and none to
        # compare for another key's marker that made nothing: a fresh start)
        recorded = (rec.get("inputs") or {}) if rec and rec.get("hash") == ident.key else {}
        changed = [n for n, h in ident.input_hashes.items() if n in recorded and recorded[n] != h] if recorded else []
        if changed:
            raise ValueError(f"{self.path.parent} holds {what} made from other inputs: {', '.join(changed)} "
                             f"changed since{again}")
        return self.finished(ident)

    def start(self, ident: Identity) -> None:
        """Before the first output: what the files to come are made for."""
        if is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"schema": SCHEMA, "stage": ident.stage, "hash": ident.key,
                                   "settings": identity_settings(ident.settings), "upstream": list(ident.upstream),
                                   "inputs": ident.input_hashes,
                                   "started": time.time(), "finished": None, "seconds": None})
        barrier()

    def finish(self, seconds: float) -> None:
        """After the last output."""
        if is_main():
            write_json(self.path, self.read() | {"finished": time.time(), "seconds": seconds})
        barrier()
