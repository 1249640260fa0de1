"""The ``dsutil`` command: one sub-command per pipeline stage, plus the demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist5k", help="mnist5k, tiny-imagenet, imagefolder, cifar10, cifar100")
    p.add_argument("--data-root", default=None, help="folder of the dataset (not needed for mnist5k)")
    p.add_argument("--num-classes", type=int, default=None, help="keep only the first N classes")
    p.add_argument("--per-class", type=int, default=None, help="keep only the first N training images per class")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size")


def _load_data(args):
    from .data import load_dataset

    return load_dataset(args.dataset, args.data_root, num_classes=args.num_classes, per_class=args.per_class,
                        image_size=args.image_size, seed=args.data_seed)


def cmd_squeeze(args) -> None:
    from .squeeze import TeacherConfig, squeeze

    cfg = TeacherConfig(arch=args.arch, width=args.width, depth=args.depth, epochs=args.epochs,
                        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                        weight_decay=args.weight_decay, seed=args.seed, pretrained=args.pretrained)
    summary = squeeze(_load_data(args), args.out, cfg, device=args.device)
    print(f"teacher {cfg.arch}: test top-1 {summary['test_top1']:.4f} in {summary['seconds']:.1f} s -> {args.out}")


def cmd_recover(args) -> None:
    from .recover import RecoverConfig, load_squeezed, parse_classes, recover

    cfg = RecoverConfig(**{k: v for k, v in vars(args).items() if k in RecoverConfig.__dataclass_fields__
                           and v is not None})
    _, spec, _, _ = load_squeezed(args.run)
    classes = parse_classes(args.classes, spec["num_classes"])
    summary = recover(args.run, cfg, classes, device=args.device)
    if summary:
        print(f"recover {cfg.method} ipc {cfg.ipc}: {summary['images']} images, teacher top-1 on them "
              f"{summary['teacher_top1_on_images']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    from .recover import METHODS, REAL, RecoverConfig
    from .squeeze import TeacherConfig

    parser = argparse.ArgumentParser(prog="dsutil", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("squeeze", help="train the teacher and measure class-wise BN statistics")
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
    p.add_argument("--pretrained", action="store_true", help="start from cached torchvision weights")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the mnist5k train/test split")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.set_defaults(func=cmd_squeeze)

    p = sub.add_parser("recover", help="synthesise IPC images per class by BN matching (or pick real ones)")
    r = RecoverConfig()
    p.add_argument("--run", required=True, type=Path, help="run directory with squeeze outputs")
    p.add_argument("--method", default=r.method, choices=[*METHODS, REAL])
    p.add_argument("--ipc", type=int, default=r.ipc, help="images per class")
    p.add_argument("--iterations", type=int, default=r.iterations)
    p.add_argument("--classes", default=None, help="class range a:b of this process (default: all)")
    p.add_argument("--lr", type=float, default=r.lr)
    p.add_argument("--r-bn", dest="r_bn", type=float, default=r.r_bn, help="weight of the BN loss")
    p.add_argument("--first-bn-multiplier", type=float, default=r.first_bn_multiplier)
    p.add_argument("--jitter", type=int, default=r.jitter, help="largest random roll, pixels")
    p.add_argument("--crop-scale", type=float, nargs=2, default=r.crop_scale, metavar=("MIN", "MAX"))
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--chunk-classes", type=int, default=r.chunk_classes, help="classes per cross-class group")
    p.add_argument("--global-targets", default=r.global_targets, choices=["running", "exact"])
    p.add_argument("--batch-images", type=int, default=r.batch_images, help="images per teacher forward pass")
    p.add_argument("--seed", type=int, default=r.seed)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_recover)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dsutil {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
