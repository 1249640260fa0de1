"""The ledger of published numbers: made from the runs, rendered into the docs' tables, and rechecked."""
import json
import shlex

import pytest
from test_one_door import SMALL as ONE_SEED  # the suite's one small preset

from dsutil import ledger
from dsutil.cli import main

SMALL = ONE_SEED | {"seeds": [0, 1]}
COMMAND = "dsutil run mnist5k --out {out} " + " ".join(f"--set {shlex.quote(f'{k}={json.dumps(v)}')}"
                                                        for k, v in SMALL.items())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A ledger of one small run, made by its own command as `dsutil ledger check` runs it."""
    root = tmp_path_factory.mktemp("ledger")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ledger.RUNS, "small", COMMAND)
        ledger._run("small", root / "runs" / "small")
        doc = ledger.record(root / "runs", root / "ledger.json", names=["small"])
    return root, doc


def test_the_ledger_names_each_number_with_its_command_spread_seeds_machine_and_commit(recorded):
    root, doc = recorded
    summary = json.loads((root / "runs/small/summary.json").read_text())
    by_id = {e["id"]: e for e in doc["entries"]}
    e = by_id["small/lpld/random/r=0.5/top1"]
    point = summary["methods"]["lpld"]["students"][1]
    assert (e["value"], e["std"], e["per_seed"], e["seeds"]) == (point["test_top1"], point["test_top1_std"],
                                                                 point["test_top1_per_seed"], [0, 1])
    assert e["command"] == COMMAND and e["machine"]["torch"] == summary["provenance"]["torch"]
    assert e["commit"] == summary["provenance"]["commit"] and e["date"] == summary["provenance"]["date"]
    assert by_id["small/lpld/hard/top1"]["value"] == summary["methods"]["lpld"]["hard_label"]["test_top1"]
    assert by_id["small/lpld/random/r=0/lrs"]["value"] == summary["methods"]["lpld"]["students"][0]["scores"]["lrs"]
    assert by_id["small/stage-seconds"]["value"] == round(sum(summary["stage_seconds"].values()), 1) > 0
    assert all(ledger.read(summary, x["read"]) == x["value"] for x in doc["entries"]
               if x.get("run") == "small" and x["kind"] != "seconds_ratio")
    assert by_id["labels-size/imagenet1k-ipc10/bytes"]["quick"] and by_id["labels-size/imagenet1k-ipc10/bytes"]["value"] > 0


def test_the_check_says_holding_moved_broken_or_skipped(recorded, tmp_path, monkeypatch):
    root, doc = recorded
    monkeypatch.setitem(ledger.RUNS, "small", COMMAND)
    entries = list(doc["entries"])  # a copy: the fixture stays as recorded
    top1 = next(i for i, e in enumerate(entries) if e["id"] == "small/lpld/random/r=0/top1")
    lrs = next(i for i, e in enumerate(entries) if e["id"] == "small/lpld/random/r=0/lrs")
    entries[top1] = entries[top1] | {"value": entries[top1]["value"] + 0.02}  # within 0.03: moved
    entries[lrs] = entries[lrs] | {"value": entries[lrs]["value"] + 0.2}  # beyond 0.05: broken
    (tmp_path / "ledger.json").write_text(json.dumps(doc | {"entries": entries}))
    skipped = ledger.check(tmp_path / "ledger.json", budget=0.0)
    assert {r["status"] for r in skipped if r["id"].startswith("small/")} == {"skipped"}
    assert {r["status"] for r in skipped if r["id"].startswith("labels-size/")} == {"holding"}
    rows = {r["id"]: r["status"] for r in ledger.check(tmp_path / "ledger.json", budget=1e6, runs_dir=root / "runs")}
    assert rows.pop("small/lpld/random/r=0/top1") == "moved" and rows.pop("small/lpld/random/r=0/lrs") == "broken"
    assert rows.pop("small/stage-seconds") == "holding"  # the reused stages report their first time
    assert set(rows.values()) == {"holding"}  # every other number comes back, bit for bit


def test_the_tables_are_made_from_the_ledger(recorded, tmp_path):
    root, doc = recorded
    text = ledger.table(doc["entries"], "small")
    e = {x["id"]: x for x in doc["entries"]}
    hard, r05 = e["small/lpld/hard/top1"], e["small/lpld/random/r=0.5/top1"]
    assert f"| LPLD | {e['small/lpld/cosine']['value']:.3f} | {hard['value'] * 100:.1f} ± {hard['std'] * 100:.1f} |" in text
    assert f"{r05['value'] * 100:.1f} ± {r05['std'] * 100:.1f} |" in text.splitlines()[2]
    assert f"| LPLD | {e['small/lpld/random/r=0/lrs']['value'] * 100:.1f} |" in text
    assert "seeds [0, 1]" in text and e["small/teacher/top1"]["machine"]["cpu"] in text
    (tmp_path / "docs").mkdir()
    for doc_name in ledger.DOCS:
        (tmp_path / doc_name).write_text("before\n<!-- ledger: small -->\nold table\n<!-- /ledger -->\nafter\n")
    assert ledger.write_tables(tmp_path, root / "ledger.json", check_only=True) == list(ledger.DOCS)
    assert ledger.write_tables(tmp_path, root / "ledger.json") == list(ledger.DOCS)
    assert (tmp_path / "README.md").read_text() == f"before\n<!-- ledger: small -->\n{text}<!-- /ledger -->\nafter\n"
    assert ledger.write_tables(tmp_path, root / "ledger.json") == []  # current: nothing to write


def test_the_published_tables_are_current_and_the_quick_entries_hold(capsys):
    """What CI checks: the README's and docs' tables are the ledger's, and its instant entries come back."""
    assert ledger.write_tables(check_only=True) == []
    assert main(["ledger", "check", "--quick"]) == 0
    out = capsys.readouterr().out
    assert " 0 broken" in out and "holding  labels-size/" in out
