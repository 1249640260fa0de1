"""One marker per stage: what a stage's outputs are made from, and whether they are finished.

Every stage (squeeze, recover, relabel, a student) keeps ``stage.json`` in its folder (squeeze, whose folder is
the run: ``squeeze.stage.json``). It holds the stage's key, a hash of its settings as they bear on its outputs
and of its inputs' keys, and is written before the stage's first output with ``finished`` null and again, finished,
after its last, with the names, sizes and (for files up to ``HASH_LIMIT``) content hashes of what it wrote. So
a rerun reuses a finished stage of the same key whose outputs are as it wrote them, resumes an unfinished one of the
same key, and refuses (or with ``restart`` clears) a folder made for another key or from other inputs, or whose
outputs went missing or changed; a changed teacher changes every key downstream of it. The experiment runner
decides through the same claim, under the same lock.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, fields, is_dataclass
from functools import cached_property
from pathlib import Path

from .files import file_sha256, read_json, remove_own, write_json
from .provenance import provenance
from .runtime import barrier, is_main

SCHEMA = 3  # 3: with the outputs it wrote; 2: without; 1: the runner's markers of before (no "schema", written
# only once the stage had finished). A marker of a later schema is refused: this dsutil cannot tell what it means.
HASH_LIMIT = 64 << 20  # outputs of at most this many bytes are hashed when the stage finishes and when it is reused;
HASHED_PER_STAGE = 1 << 30  # and at most this many bytes in all per stage: larger ones are checked by size


class StageMismatch(ValueError):
    """A stage folder that does not hold this very stage as it was finished: ``problem`` says what it holds.
    ``redo``: the folder's files of the stage are stale (made for other settings or inputs, or some are missing),
    so a runner may clear and make them again; else they were changed after they were written (by hand?),
    and only the user may let them go."""

    def __init__(self, problem: str, advice: str, redo: bool):
        super().__init__(f"{problem}; {advice}")
        self.problem, self.redo = problem, redo


def written(folder: Path, patterns: tuple[str, ...]) -> dict[str, dict]:
    """``{name: {"bytes": n, "sha256": h}}`` of the files matching ``patterns`` under ``folder`` (the hash for
    files up to ``HASH_LIMIT``, while the stage's hashed bytes stay under ``HASHED_PER_STAGE``)."""
    out, hashed = {}, 0
    for path in sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}):
        size = path.stat().st_size
        out[path.relative_to(folder).as_posix()] = entry = {"bytes": size}
        if size <= HASH_LIMIT and hashed + size <= HASHED_PER_STAGE:
            entry["sha256"], hashed = file_sha256(path), hashed + size
    return out


def _valid_record(rec: dict) -> bool:
    """The fields a claim reads hold what this dsutil writes there."""
    schema = rec.get("schema", 1)
    return (isinstance(rec.get("hash"), str) and (rec.get("finished") is None or type(rec["finished"]) in (int, float))
            and type(schema) is int and isinstance(rec.get("inputs") or {}, dict)
            and all(isinstance(v, str) for v in (rec.get("inputs") or {}).values())
            and isinstance(rec.get("outputs") or {}, dict)
            and all(isinstance(v, dict) and type(v.get("bytes")) is int for v in (rec.get("outputs") or {}).values()))


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
        """The record, or None where there is none; one of a later schema, or not of this shape, is refused."""
        if not self.path.exists():
            return None
        rec = read_json(self.path)
        if not _valid_record(rec):
            raise ValueError(f"{self.path} is not a dsutil stage marker (its hash, finished, schema, inputs or outputs "
                             "has the wrong type); was it edited by hand? Remove the folder's files to start again")
        if not 1 <= rec.get("schema", 1) <= SCHEMA:
            raise ValueError(f"{self.path}: stage marker schema {rec['schema']}, this dsutil reads 1 to {SCHEMA}; "
                             "it was written by another dsutil version: use that version, or another folder")
        return rec

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

    def damaged(self) -> tuple[list[str], list[str]]:
        """The outputs a finished stage recorded that are gone, and those whose size or content changed since
        (none for a marker of before, which recorded none)."""
        folder, missing, changed = self.path.parent, [], []
        for name, was in ((self.read() or {}).get("outputs") or {}).items():
            path = folder / name
            if not path.is_file():
                missing.append(name)
            elif path.stat().st_size != was["bytes"] or ("sha256" in was and file_sha256(path) != was["sha256"]):
                changed.append(name)
        return missing, changed

    def claim(self, ident: Identity, own: tuple[str, ...], restart: bool, what: str) -> bool:
        """True when the folder holds this very stage, finished, its outputs as it wrote them. Else it may hold
        an unfinished run of the same key and input files (resumed) or nothing of the stage; with ``restart``
        whatever it holds of the stage is removed first, and anything else is refused (:class:`StageMismatch`)
        before work starts."""
        if restart:
            self.clear(own)
            return False
        rec, again = self.read(), "choose another folder, or pass --restart to remove it and start again"
        where = self.path.parent
        if self.held_by_other(ident, own):
            raise StageMismatch(f"{where} holds {what} made with other settings or inputs"
                                f"{'' if rec else ' (or by an older dsutil, without a stage.json)'}", again, redo=True)
        # the input files an unfinished or finished run of this key read (none in a marker of before, and none to
        # compare for another key's marker that made nothing: a fresh start)
        recorded = (rec.get("inputs") or {}) if rec and rec.get("hash") == ident.key else {}
        changed = [n for n, h in ident.input_hashes.items() if n in recorded and recorded[n] != h] if recorded else []
        if changed:
            raise StageMismatch(f"{where} holds {what} made from other inputs: {', '.join(changed)} changed since",
                                again, redo=True)
        if not self.finished(ident):
            return False
        missing, changed = self.damaged()
        if changed:
            raise StageMismatch(f"{where} holds {what} whose files changed after it finished: {', '.join(changed)}",
                                "restore them, or pass --restart to make it again", redo=False)
        if missing:
            raise StageMismatch(f"{where} holds {what} whose files are gone: {', '.join(missing)}",
                                "pass --restart to make it again", redo=True)
        return True

    def start(self, ident: Identity) -> None:
        """Before the first output: what the files to come are made for."""
        if is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"schema": SCHEMA, "stage": ident.stage, "hash": ident.key,
                                   "settings": identity_settings(ident.settings), "upstream": list(ident.upstream),
                                   "inputs": ident.input_hashes,
                                   "started": time.time(), "finished": None, "seconds": None})
        barrier()

    def finish(self, seconds: float, outputs: tuple[str, ...]) -> None:
        """After the last output: the files matching ``outputs`` (glob patterns in the folder) are recorded."""
        if is_main():
            rec = self.read()
            if rec is None:
                raise ValueError(f"{self.path} was removed while its stage ran (by another process, or by hand); "
                                 "its outputs are not recorded as finished: run the stage again")
            write_json(self.path, rec | {"schema": SCHEMA, "finished": time.time(), "seconds": seconds,
                                         "outputs": written(self.path.parent, outputs), "provenance": provenance()})
        barrier()
