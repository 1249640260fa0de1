"""The ``dsutil`` command: one sub-command per pipeline stage, plus the demo."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("dsutil")  # dsutil.runtime.log: shown from rank 0 only (show_log)
RUN_HELP = ("run directory with squeeze outputs (under torchrun write --run-dir: torchrun reads --run as its own "
            "--run-path)")


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows the default of every option, those without a help text too."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and not action.required:
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _run_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path, help=RUN_HELP)


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def _restart_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--restart", action="store_true", help=f"make {what} again from nothing: what the folder holds of "
                   "it is removed first, whatever its settings (the user's own files stay)")


def cmd_squeeze(args) -> None:
    from .config import DataConfig
    from .settings import from_flags
    from .squeeze import TeacherConfig, squeeze

    cfg = from_flags(args, TeacherConfig)
    summary = squeeze(from_flags(args, DataConfig, "data_").load(), args.out, cfg, device=args.device,
                      restart=args.restart, teacher_checkpoint=args.teacher_checkpoint)
    log.info(f"teacher {cfg.arch}: test top-1 {summary['test_top1']:.4f} in {summary['seconds']:.1f} s -> {args.out}")


def cmd_recover(args) -> None:
    from .recover import RecoverConfig, parse_classes, recover
    from .settings import from_flags
    from .squeeze import load_squeezed

    cfg = from_flags(args, RecoverConfig)
    _, spec, _, _ = load_squeezed(args.run)
    classes = parse_classes(args.classes, spec["num_classes"])
    summary = recover(args.run, cfg, classes, device=args.device, restart=args.restart)
    if summary:
        log.info(f"recover {cfg.method} ipc {cfg.ipc}: {summary['images']} images, teacher top-1 on them "
              f"{summary['teacher_top1_on_images']:.3f}")


def cmd_relabel(args) -> None:
    from .labels import LabelStore, human_bytes
    from .relabel import RelabelConfig, relabel
    from .settings import from_flags

    cfg = from_flags(args, RelabelConfig)
    store = relabel(args.run, args.images, cfg, out=args.out, device=args.device, restart=args.restart,
                    workers=args.workers)
    log.info(f"label store {store}: {human_bytes(LabelStore(store).disk_bytes())} on disk")


def cmd_train(args) -> None:
    from .layout import trained_student_dir
    from .settings import from_flags
    from .train import StudentConfig, train_student

    cfg = from_flags(args, StudentConfig)
    out = args.out or trained_student_dir(args.run, args.labels, cfg)
    result = train_student(args.run, args.labels, cfg, out, device=args.device, restart=args.restart,
                           keep_checkpoint=args.keep_checkpoint, checkpoint_seconds=args.checkpoint_seconds)
    log.info(f"student {cfg.arch}: test top-1 {result['test_top1']:.4f} with {result['label_bytes']} label bytes "
          f"-> {out}")


def cmd_import(args) -> None:
    from .import_set import import_images

    out = import_images(args.run, args.images, args.name, device=args.device, restart=args.restart)
    log.info(f"imported {args.images} -> {out} (relabel it with: dsutil relabel --run {args.run} --images {out})")


def cmd_import_teacher(args) -> None:
    from .import_set import import_teacher

    spec = import_teacher(args.state_dict, args.out, args.arch, args.num_classes, args.image_size, args.in_channels,
                          args.normalize)
    log.info(f"teacher {spec['arch']} ({spec['num_classes']} classes, {spec['image_size']} px) -> {args.out}; "
          f"use it with --teacher-checkpoint {args.out}" + (f" --normalize {args.normalize}" if args.normalize else ""))


def cmd_labels_size(args) -> None:
    import json

    from .labels import human_bytes, storage_bytes
    from .protocol import pixel_bytes

    n = storage_bytes(args.classes, args.ipc, args.epochs, args.batch_size, args.prune_ratio, args.dtype, args.topk)
    full = storage_bytes(args.classes, args.ipc, args.epochs, args.batch_size, 0.0, args.dtype, None)
    images = pixel_bytes(args.classes, args.ipc, args.image_size, args.channels, args.pixels) if args.image_size else None
    if args.json:
        setting = {k: v for k, v in vars(args).items() if k not in ("func", "command", "labels_command", "json")}
        total = {} if images is None else {"image_bytes": images, "total_bytes": n + images}
        log.info(json.dumps({"bytes": n, "gib": n / 2**30, "full_bytes": full, "reduction": full / n} | total | setting))
    else:
        smaller = f"; {full / n:.1f}x less than {human_bytes(full)} unpruned" if n < full else ""
        line = f"{human_bytes(n)} ({n} bytes{smaller})"
        if images is not None:
            line = (f"labels {line}; images {human_bytes(images)} ({args.pixels}); total {human_bytes(n + images)} "
                    f"({n + images} bytes; the labels are {n / (n + images):.1%} of it)")
        log.info(line)


def cmd_ledger(args) -> None:
    from . import ledger

    if args.ledger_command == "record":
        doc = ledger.record(args.runs, names=args.name)
        log.info(f"{len(doc['entries'])} entries -> {ledger.LEDGER}")
    elif args.ledger_command == "tables":
        changed = ledger.write_tables()
        log.info(f"tables rewritten in {', '.join(changed)}" if changed else "every table is current")
    else:
        rows = ledger.check(budget=args.budget, runs_dir=args.runs, quick=args.quick)
        for r in rows:
            log.info(f"{r['status']:<8} {r['id']}: {r['recorded']} -> {r['now']}")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("holding", "moved", "broken", "skipped")}
        log.info(", ".join(f"{n} {s}" for s, n in counts.items()))
        if counts["broken"]:
            raise ValueError(f"{counts['broken']} of the ledger's numbers broke (beyond their tolerance): "
                             + ", ".join(r["id"] for r in rows if r["status"] == "broken"))


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. student.epochs=50")
        key, value = item.split("=", 1)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return out


def cmd_run(args) -> None:
    from .config import load_config
    from .runner import run_experiment, summary_table

    cfg = load_config(args.config, _parse_sets(args.set), quick=args.quick)
    out = args.out or Path("runs") / (cfg.name + ("-quick" if args.quick else ""))
    if args.command == "frontier":
        from .frontier import frontier_table, run_frontier

        log.info(frontier_table(run_frontier(cfg, out)))
        log.info(f"frontier: {out / 'frontier.json'}")
        return
    summary = run_experiment(cfg, out)
    log.info(summary_table(summary))
    if args.quick:
        log.info("--quick: a smoke test of the pipeline with few iterations and epochs; its numbers are not evidence "
              "for or against the finding (run without --quick for that)")
    log.info(f"{len(summary['stages']['ran'])} stages ran, {len(summary['stages']['reused'])} reused; "
          f"{summary['seconds']:.0f} s. Summary: {out / 'summary.json'}; figures: {out / 'figures'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsutil", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stage_commands(sub)
    _add_preset_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_stage_commands(sub) -> None:
    """squeeze, recover, import, relabel, train. Their settings flags are made from the settings dataclasses
    (settings.add_flags): a field added to a config has its flag, choices, help and default with no edit here."""
    from .config import DataConfig
    from .recover import RecoverConfig
    from .relabel import RelabelConfig
    from .settings import add_flags
    from .squeeze import TeacherConfig
    from .train import CHECKPOINT_SECONDS, StudentConfig

    p = sub.add_parser("squeeze", formatter_class=DefaultsHelp, help="train the teacher and measure class-wise BN statistics")
    add_flags(p, DataConfig, {"root": "--data-root", "seed": "--data-seed"}, dest_prefix="data_")
    add_flags(p, TeacherConfig)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--teacher-checkpoint", type=Path, default=None,
                   help="a teacher saved by dsutil (teacher.safetensors) used as it is, instead of training one")
    _restart_flag(p, "the teacher (and everything made from it)")
    _device_flag(p)
    p.set_defaults(func=cmd_squeeze)

    p = sub.add_parser("recover", formatter_class=DefaultsHelp, help="synthesise IPC images per class by BN matching (or pick real ones)")
    _run_flag(p)
    add_flags(p, RecoverConfig)
    p.add_argument("--classes", default=None, help="class range a:b of this process (default: all)")
    _restart_flag(p, "the set")
    _device_flag(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("import", formatter_class=DefaultsHelp,
                       help="bring an ImageFolder of distilled images made elsewhere into RUN/recover/NAME")
    _run_flag(p)
    p.add_argument("--images", required=True, type=Path, help="one folder per class, named as the run's classes")
    p.add_argument("--name", required=True, help="the folder under RUN/recover/")
    _restart_flag(p, "the import")
    _device_flag(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("relabel", formatter_class=DefaultsHelp, help="store FKD-style soft labels of augmented crops, with replay recipes")
    _run_flag(p)
    p.add_argument("--images", required=True, type=Path, help="a recover folder, e.g. RUN/recover/lpld-ipc10")
    add_flags(p, RelabelConfig)
    p.add_argument("--out", type=Path, default=None, help="store folder (default RUN/labels/<name>)")
    _restart_flag(p, "the store")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes replaying batches (default: the cores but one, at most 8)")
    _device_flag(p)
    p.set_defaults(func=cmd_relabel)

    p = sub.add_parser("train", formatter_class=DefaultsHelp, help="train a student on a label store and evaluate it on real test images")
    _run_flag(p)
    p.add_argument("--labels", required=True, type=Path, help="label store folder")
    add_flags(p, StudentConfig, {"arch": ("--arch", "--student")})
    p.add_argument("--out", type=Path, default=None, help="student folder (default RUN/students/<name>)")
    _restart_flag(p, "the student")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after training finishes")
    p.add_argument("--checkpoint-seconds", type=float, default=CHECKPOINT_SECONDS,
                   help="write checkpoint.pt at the end of an epoch at most this often (0: every epoch)")
    _device_flag(p)
    p.set_defaults(func=cmd_train)


def _add_preset_commands(sub) -> None:
    """run, demo, frontier: a whole preset."""
    helps = {"demo": "the MNIST-5k demo: every stage, a table and figures",
             "run": "every stage of an experiment preset, reusing finished stages",
             "frontier": "the preset's frontier: section, label bytes against accuracy beyond pruning"}
    for name in ("run", "demo", "frontier"):
        p = sub.add_parser(name, formatter_class=DefaultsHelp, help=helps[name])
        if name != "demo":
            from .config import PRESETS

            names = ", ".join(sorted(q.stem for q in PRESETS.glob("*.yaml")))
            p.add_argument("config", help=f"a YAML file or a preset name: {names}")
        else:
            p.set_defaults(config="mnist5k")
        p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>)")
        p.add_argument("--quick", action="store_true", help="the preset's smaller smoke-test settings")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. "
                       "student.epochs=50 (repeatable)")
        p.set_defaults(func=cmd_run)


def _add_tool_commands(sub) -> None:
    """import-teacher, labels size and ledger."""
    from .data import NORMALIZATIONS
    from .models import ARCHS

    p = sub.add_parser("import-teacher", formatter_class=DefaultsHelp,
                       help="a torch state dict of a torchvision model (e.g. the official teachers) as a dsutil teacher")
    p.add_argument("--state-dict", required=True, type=Path, help="a .pth file (a state dict, or a checkpoint "
                   "holding one under 'model' or 'state_dict'); read with weights_only=True")
    p.add_argument("--arch", required=True, choices=[a for a in ARCHS if a != "convnet"])
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True, help="64 or less: the small-image stem (3x3, no max-pool)")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--normalize", default=None, choices=list(NORMALIZATIONS),
                   help="the pixel mean/std the teacher was trained with; runs using it must name the same")
    p.add_argument("--out", required=True, type=Path, help="the teacher file to write (.safetensors)")
    p.set_defaults(func=cmd_import_teacher)

    from .labels import DTYPES

    p = sub.add_parser("labels", formatter_class=DefaultsHelp, help="label storage tools")
    lsub = p.add_subparsers(dest="labels_command", required=True)
    q = lsub.add_parser("size", formatter_class=DefaultsHelp, help="storage of a label setting (the paper's formula plus replay metadata)")
    q.add_argument("--classes", type=int, required=True)
    q.add_argument("--ipc", type=int, required=True)
    q.add_argument("--epochs", type=int, required=True)
    q.add_argument("--batch-size", type=int, default=1024)
    q.add_argument("--prune-ratio", type=float, default=0.0)
    q.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    q.add_argument("--topk", type=int, default=None, help="keep only the top-k logits of every label")
    q.add_argument("--image-size", type=int, default=None, help="the images' side in pixels: adds their bytes, the total")
    q.add_argument("--channels", type=int, default=3)
    q.add_argument("--pixels", default="uint8", choices=["uint8", "float32"], help="how the image store keeps them")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_labels_size)

    p = sub.add_parser("ledger", formatter_class=DefaultsHelp, help="the published numbers: record, tables, check")
    lsub = p.add_subparsers(dest="ledger_command", required=True)
    q = lsub.add_parser("record", formatter_class=DefaultsHelp, help="docs/ledger.json from the runs' summaries")
    q.add_argument("--runs", type=Path, default=Path("runs"), help="the folder of the runs (runs/<preset>)")
    q.add_argument("--name", action="append", help="only these runs (repeatable; default: all)")
    lsub.add_parser("tables", formatter_class=DefaultsHelp, help="the README's and docs' tables from the ledger")
    q = lsub.add_parser("check", formatter_class=DefaultsHelp, help="rerun what fits a time budget and compare")
    q.add_argument("--budget", type=float, default=0.0, help="seconds: runs whose stages took longer are skipped")
    q.add_argument("--runs", type=Path, default=None, help="rerun into this folder's runs, reusing finished stages "
                   "(default: each from an empty folder)")
    q.add_argument("--quick", action="store_true", help="only the instant entries (what CI checks)")
    for q in lsub.choices.values():
        q.set_defaults(func=cmd_ledger)



def user_message(e: BaseException) -> str:
    """An error's own message; raised in a DataLoader worker, torch wraps it in the worker's traceback, and the
    message is the last ``Type: ...`` of that traceback."""
    import re

    text = str(e)
    if "Original Traceback (most recent call last):" not in text:
        return text
    tb = text.split("Original Traceback (most recent call last):", 1)[1]
    last = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(e).__name__)}: ", tb, re.M))
    return tb[last[-1].end():].strip() if last else text


def main(argv: list[str] | None = None) -> int:
    """Run one command; under torchrun every rank runs it, and only rank 0 prints."""
    import matplotlib

    from .files import check_tensorboard
    from .runtime import fix_mmap_threshold, show_log, start_ranks, stop_ranks

    matplotlib.use("Agg")  # a command draws into files only, on machines with or without a display
    args = build_parser().parse_args(argv)
    try:
        start_ranks()
        show_log()  # from rank 0 only
        fix_mmap_threshold()
        check_tensorboard()
        args.func(args)
    except (ValueError, OSError) as e:  # bad input, settings or files; anything else keeps its traceback
        print(f"dsutil {args.command}: error: {user_message(e)}", file=sys.stderr)
        return 2
    finally:
        stop_ranks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
