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


def build_parser() -> argparse.ArgumentParser:
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
