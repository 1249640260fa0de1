"""The ``dsutil`` command: one sub-command per pipeline stage, plus the demo."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

RUN_HELP = ("run directory with squeeze outputs (under torchrun write --run-dir: torchrun reads --run as its own "
            "--run-path)")


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows the default of every option, those without a help text too."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and not action.required:
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from .data import NORMALIZATIONS

    p.add_argument("--dataset", default="mnist5k", help="mnist5k, tiny-imagenet, imagefolder, cifar10, cifar100")
    p.add_argument("--data-root", default=None, help="folder of the dataset (not needed for mnist5k)")
    p.add_argument("--num-classes", type=int, default=None, help="keep only the first N classes")
    p.add_argument("--per-class", type=int, default=None, help="keep only the first N training images per class")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size")
    p.add_argument("--eval-resize", type=int, default=None,
                   help="imagefolder: resize held-out images' shorter side to this, then crop --image-size (256)")
    p.add_argument("--normalize", default=None, choices=list(NORMALIZATIONS),
                   help="a named pixel mean/std in place of the dataset's own (the teacher's, when imported)")


def _load_data(args):
    from .data import load_dataset

    return load_dataset(args.dataset, args.data_root, num_classes=args.num_classes, per_class=args.per_class,
                        image_size=args.image_size, seed=args.data_seed, eval_resize=args.eval_resize,
                        normalize=args.normalize)


def cmd_squeeze(args) -> None:
    from .squeeze import TeacherConfig, squeeze

    cfg = TeacherConfig(**{k: v for k, v in vars(args).items() if k in TeacherConfig.__dataclass_fields__})
    summary = squeeze(_load_data(args), args.out, cfg, device=args.device, restart=args.restart,
                      teacher_checkpoint=args.teacher_checkpoint)
    print(f"teacher {cfg.arch}: test top-1 {summary['test_top1']:.4f} in {summary['seconds']:.1f} s -> {args.out}")


def cmd_recover(args) -> None:
    from .recover import RecoverConfig, parse_classes, recover
    from .squeeze import load_squeezed

    cfg = RecoverConfig(**{k: v for k, v in vars(args).items() if k in RecoverConfig.__dataclass_fields__
                           and v is not None})
    _, spec, _, _ = load_squeezed(args.run)
    classes = parse_classes(args.classes, spec["num_classes"])
    summary = recover(args.run, cfg, classes, device=args.device)
    if summary:
        print(f"recover {cfg.method} ipc {cfg.ipc}: {summary['images']} images, teacher top-1 on them "
              f"{summary['teacher_top1_on_images']:.3f}")


def cmd_relabel(args) -> None:
    from .labels import LabelStore, human_bytes
    from .relabel import RelabelConfig, relabel

    cfg = RelabelConfig(**{k: v for k, v in vars(args).items() if k in RelabelConfig.__dataclass_fields__})
    store = relabel(args.run, args.images, cfg, out=args.out, device=args.device, restart=args.restart,
                    workers=args.workers)
    print(f"label store {store}: {human_bytes(LabelStore(store).disk_bytes())} on disk")


def cmd_train(args) -> None:
    from .train import StudentConfig, train_student

    cfg = StudentConfig(**{k: v for k, v in vars(args).items() if k in StudentConfig.__dataclass_fields__})
    name = f"{Path(args.labels).name}-{cfg.arch}-r{cfg.prune_ratio:g}-{cfg.metric}-{cfg.granularity}"
    out = args.out or Path(args.run) / "students" / (name + ("-online" if cfg.online else ""))
    result = train_student(args.run, args.labels, cfg, out, device=args.device, restart=args.restart,
                           keep_checkpoint=args.keep_checkpoint, checkpoint_seconds=args.checkpoint_seconds)
    print(f"student {cfg.arch}: test top-1 {result['test_top1']:.4f} with {result['label_bytes']} label bytes "
          f"-> {out}")


def cmd_import(args) -> None:
    from .import_set import import_images

    out = import_images(args.run, args.images, args.name, device=args.device)
    print(f"imported {args.images} -> {out} (relabel it with: dsutil relabel --run {args.run} --images {out})")


def cmd_import_teacher(args) -> None:
    from .import_set import import_teacher

    spec = import_teacher(args.state_dict, args.out, args.arch, args.num_classes, args.image_size, args.in_channels,
                          args.normalize)
    print(f"teacher {spec['arch']} ({spec['num_classes']} classes, {spec['image_size']} px) -> {args.out}; "
          f"use it with --teacher-checkpoint {args.out}" + (f" --normalize {args.normalize}" if args.normalize else ""))


def cmd_labels_size(args) -> None:
    import json

    from .labels import human_bytes, storage_bytes

    n = storage_bytes(args.classes, args.ipc, args.epochs, args.batch_size, args.prune_ratio, args.dtype, args.topk)
    full = storage_bytes(args.classes, args.ipc, args.epochs, args.batch_size, 0.0, args.dtype, None)
    if args.json:
        setting = {k: v for k, v in vars(args).items() if k not in ("func", "command", "labels_command", "json")}
        print(json.dumps({"bytes": n, "gib": n / 2**30, "full_bytes": full, "reduction": full / n} | setting))
    else:
        smaller = f"; {full / n:.1f}x less than {human_bytes(full)} unpruned" if n < full else ""
        print(f"{human_bytes(n)} ({n} bytes{smaller})")


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

        print(frontier_table(run_frontier(cfg, out)))
        print(f"frontier: {out / 'frontier.json'}")
        return
    summary = run_experiment(cfg, out)
    print(summary_table(summary))
    if args.quick:
        print("--quick: a smoke test of the pipeline with few iterations and epochs; its numbers are not evidence "
              "for or against the finding (run without --quick for that)")
    print(f"{len(summary['stages']['ran'])} stages ran, {len(summary['stages']['reused'])} reused; "
          f"{summary['seconds']:.0f} s. Summary: {out / 'summary.json'}; figures: {out / 'figures'}")


def build_parser() -> argparse.ArgumentParser:
    from .image_store import IMAGE_FORMATS
    from .recover import JITTER_RANGES, METHODS, REAL, RecoverConfig
    from .squeeze import BN_ESTIMATORS, BN_VIEWS, TeacherConfig

    parser = argparse.ArgumentParser(prog="dsutil", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("squeeze", formatter_class=DefaultsHelp, help="train the teacher and measure class-wise BN statistics")
    _add_data_args(p)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    d = TeacherConfig()
    p.add_argument("--arch", default=d.arch, help="convnet, resnet18, resnet50, mobilenet_v2")
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--shift", type=int, default=d.shift, help="largest random translation, pixels")
    p.add_argument("--augment", default=d.augment, choices=["shift", "rrc"],
                   help="teacher training views: shift + flip, or RandomResizedCrop + flip (the official teachers)")
    p.add_argument("--lr-warmup-epochs", type=int, default=d.lr_warmup_epochs,
                   help="linear warm-up epochs, then cosine (default: the one-cycle schedule)")
    p.add_argument("--pretrained", action="store_true", help="start from cached torchvision weights")
    p.add_argument("--bn-views", default=d.bn_views, choices=BN_VIEWS,
                   help="BN statistics of plain training images or of augmented views (official)")
    p.add_argument("--bn-estimator", default=d.bn_estimator, choices=BN_ESTIMATORS,
                   help="exact float64 sums, or per-class momentum running averages (official)")
    p.add_argument("--bn-momentum", type=float, default=d.bn_momentum, help="of the running estimator")
    p.add_argument("--bn-batch-size", type=int, default=d.bn_batch_size, help="images per BN-statistics batch")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the mnist5k train/test split")
    p.add_argument("--teacher-checkpoint", type=Path, default=None,
                   help="a teacher saved by dsutil (teacher.safetensors) used as it is, instead of training one")
    p.add_argument("--restart", action="store_true",
                   help="replace the teacher of a finished run in --out, removing everything made from it")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.set_defaults(func=cmd_squeeze)

    p = sub.add_parser("recover", formatter_class=DefaultsHelp, help="synthesise IPC images per class by BN matching (or pick real ones)")
    r = RecoverConfig()
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path, help=RUN_HELP)
    p.add_argument("--method", default=r.method, choices=[*METHODS, REAL])
    p.add_argument("--ipc", type=int, default=r.ipc, help="images per class")
    p.add_argument("--iterations", type=int, default=r.iterations)
    p.add_argument("--classes", default=None, help="class range a:b of this process (default: all)")
    p.add_argument("--lr", type=float, default=r.lr)
    p.add_argument("--r-bn", dest="r_bn", type=float, default=r.r_bn, help="weight of the BN loss")
    p.add_argument("--first-bn-multiplier", type=float, default=r.first_bn_multiplier)
    p.add_argument("--jitter", type=int, default=r.jitter, help="largest random roll, pixels")
    p.add_argument("--jitter-range", default=r.jitter_range, choices=JITTER_RANGES,
                   help="rolls drawn from -jitter..jitter, or 0..jitter (official ImageNet-1K)")
    p.add_argument("--image-format", default=r.image_format, choices=IMAGE_FORMATS,
                   help="keep rounded pixels, or the official uint8 truncation and JPEG-75 round trip")
    p.add_argument("--crop-scale", type=float, nargs=2, default=r.crop_scale, metavar=("MIN", "MAX"))
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips (flip: %(default)s)")
    p.add_argument("--chunk-classes", type=int, default=r.chunk_classes, help="classes per cross-class group")
    p.add_argument("--global-targets", default=r.global_targets, choices=["running", "measured"],
                   help="SRe2L's targets: the BN layers' running buffers, or squeeze's measured global statistics")
    p.add_argument("--batch-images", type=int, default=r.batch_images, help="images per teacher forward pass")
    p.add_argument("--seed", type=int, default=r.seed)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--pixels", default=r.pixels, choices=["uint8", "float32"],
                   help="how images.safetensors keeps the set (uint8, as PNGs do; float32: 4x the disk)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("import", formatter_class=DefaultsHelp,
                       help="bring an ImageFolder of distilled images made elsewhere into RUN/recover/NAME")
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path, help=RUN_HELP)
    p.add_argument("--images", required=True, type=Path, help="one folder per class, named as the run's classes")
    p.add_argument("--name", required=True, help="the folder under RUN/recover/")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_import)

    from .labels import PRUNE_POOLS, TOPK_FILLS
    from .relabel import MIXES, RelabelConfig

    p = sub.add_parser("relabel", formatter_class=DefaultsHelp, help="store FKD-style soft labels of augmented crops, with replay recipes")
    d = RelabelConfig()
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path, help=RUN_HELP)
    p.add_argument("--images", required=True, type=Path, help="a recover folder, e.g. RUN/recover/lpld-ipc10")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--mix", default=d.mix, choices=MIXES)
    p.add_argument("--mix-alpha", type=float, default=d.mix_alpha, help="Beta(alpha, alpha) of CutMix/MixUp")
    p.add_argument("--crop-scale", type=float, nargs=2, default=d.crop_scale, metavar=("MIN", "MAX"))
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips (flip: %(default)s)")
    p.add_argument("--dtype", default=d.dtype, choices=["fp16", "bf16", "fp32"])
    p.add_argument("--prune-ratio", type=float, default=d.prune_ratio,
                   help="generate only 1 - r of the batches (which: --prune-pool)")
    p.add_argument("--prune-pool", default=d.prune_pool, choices=PRUNE_POOLS,
                   help="a uniform random subset, the first 1 - r (official), or a coverage-balanced random pool")
    p.add_argument("--topk", type=int, default=d.topk, help="store only the K largest logits of every label")
    p.add_argument("--topk-fill", default=d.topk_fill, choices=TOPK_FILLS,
                   help="the other classes: probability zero (LPQLD's MR-k), the label's minimum logit (MRS-k), "
                        "their mass at T=1 spread evenly, or probs: top-k probabilities at --topk-temperature (MS-k)")
    p.add_argument("--topk-temperature", type=float, default=d.topk_temperature,
                   help="--topk-fill probs: the fixed temperature of the stored probabilities")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="store folder (default RUN/labels/<name>)")
    p.add_argument("--restart", action="store_true", help="relabel from scratch in an --out that holds another store")
    p.add_argument("--teacher-bf16", action="store_true", help="the teacher labels under bf16 autocast (GPUs)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes replaying batches (default: the cores but one, at most 8)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_relabel)

    from .labels import PRUNE_METRICS
    from .train import CHECKPOINT_SECONDS, DRAWS, SCHEDULES, StudentConfig

    p = sub.add_parser("train", formatter_class=DefaultsHelp, help="train a student on a label store and evaluate it on real test images")
    d = StudentConfig()
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path, help=RUN_HELP)
    p.add_argument("--labels", required=True, type=Path, help="label store folder")
    p.add_argument("--prune-ratio", type=float, default=d.prune_ratio)
    p.add_argument("--metric", default=d.metric, choices=PRUNE_METRICS)
    p.add_argument("--scores-from", default=d.scores_from, metavar="STUDENT_DIR",
                   help="a trained student whose dynamics.safetensors scores el2n/aum/forgetting pruning")
    p.add_argument("--granularity", default=d.granularity, choices=["batch", "epoch"])
    p.add_argument("--pool", default=d.pool, choices=PRUNE_POOLS,
                   help="random pruning keeps a uniform subset, the first 1 - r (official) or a balanced pool")
    p.add_argument("--draw", default=d.draw, choices=DRAWS,
                   help="each epoch's batches: shuffled passes over the pool, or drawn with replacement (official)")
    p.add_argument("--student", dest="arch", default=d.arch)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--norm", default=d.norm, choices=["batch", "instance"], help="convnet normalisation")
    p.add_argument("--epochs", type=int, default=None, help="default: the store's relabel epochs")
    p.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--no-decay-1d", dest="decay_1d", action="store_false",
                   help="no weight decay on 1-D parameters, BN weights and biases (official)")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="linear learning-rate warm-up")
    p.add_argument("--temperature", type=float, default=d.temperature, help="on the stored logits; a schedule's start")
    p.add_argument("--temperature-schedule", default=d.temperature_schedule, choices=SCHEDULES,
                   help="step: x gamma every step-epochs; cosine: down to --temperature-min at the last epoch")
    p.add_argument("--temperature-step-epochs", type=int, default=d.temperature_step_epochs)
    p.add_argument("--temperature-gamma", type=float, default=d.temperature_gamma)
    p.add_argument("--temperature-min", type=float, default=d.temperature_min)
    p.add_argument("--student-temperature", type=float, default=d.student_temperature,
                   help="a fixed student temperature (default: --temperature-ratio x the teacher-side one)")
    p.add_argument("--temperature-ratio", type=float, default=d.temperature_ratio)
    p.add_argument("--kl-times-t2", action="store_true", help="multiply the KL by the student temperature squared")
    p.add_argument("--hard-epochs", type=float, default=d.hard_epochs,
                   help="fraction of the epochs, the last ones, on hard labels with fresh crops")
    p.add_argument("--hard-weight", type=float, default=d.hard_weight,
                   help="in soft epochs: loss = (1 - w) KL + w cross-entropy on hard labels")
    p.add_argument("--online", action="store_true", help="label each batch with the teacher on the fly")
    p.add_argument("--restart", action="store_true", help="train from scratch in an --out that holds another run")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after training finishes")
    p.add_argument("--checkpoint-seconds", type=float, default=CHECKPOINT_SECONDS,
                   help="write checkpoint.pt at the end of an epoch at most this often (0: every epoch)")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_train)

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

    p = sub.add_parser("labels", formatter_class=DefaultsHelp, help="label storage tools")
    lsub = p.add_subparsers(dest="labels_command", required=True)
    q = lsub.add_parser("size", formatter_class=DefaultsHelp, help="storage of a label setting (the paper's formula plus replay metadata)")
    q.add_argument("--classes", type=int, required=True)
    q.add_argument("--ipc", type=int, required=True)
    q.add_argument("--epochs", type=int, required=True)
    q.add_argument("--batch-size", type=int, default=1024)
    q.add_argument("--prune-ratio", type=float, default=0.0)
    q.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    q.add_argument("--topk", type=int, default=None, help="keep only the top-k logits of every label")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_labels_size)
    return parser


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
    from .runtime import fix_mmap_threshold, is_main, start_ranks, stop_ranks

    matplotlib.use("Agg")  # a command draws into files only, on machines with or without a display
    args = build_parser().parse_args(argv)
    try:
        start_ranks()
        with contextlib.ExitStack() as quiet:  # only rank 0 prints; the others' stdout is closed on the way out
            if not is_main():
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
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
