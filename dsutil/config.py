"""Experiment configs: one dataclass per stage, all in one YAML preset.

A preset names every setting of an experiment; the runner writes the
resolved config next to the results, so a run directory says how it was made.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from .data import DATASETS, NORMALIZATIONS
from .labels import PRUNE_METRICS
from .recover import METHODS, REAL, RecoverConfig
from .relabel import RelabelConfig
from .settings import build, check_choices, one_of, require
from .squeeze import TeacherConfig
from .train import StudentConfig

PRESETS = Path(__file__).with_name("configs")


@dataclass
class FrontierConfig:
    """`dsutil frontier` (dsutil.frontier): the label budgets trained beyond pruning alone."""
    methods: list[str] = field(default_factory=lambda: ["lpld", "sre2l"])
    prune_ratios: list[float] = field(default_factory=lambda: [0.975, 0.9875, 0.995])  # the full grid's ratios
    curve_ratios: list[float] = field(default_factory=lambda: [0.0, 0.9])  # pruning alone only, for the curve
    topk: list[int | None] = field(default_factory=lambda: [None, 2])  # None: every logit
    topk_fill: str = "mass"
    policies: dict[str, dict] = field(default_factory=lambda: {"constant": {}})  # name: student settings changed
    seeds: list[int] = field(default_factory=lambda: [0, 1])

    def __post_init__(self):
        require("constant" in self.policies and not self.policies["constant"], "policies", self.policies,
                "a 'constant' policy with no changes (the pruning-alone baseline)")
        for name, changes in self.policies.items():
            build(StudentConfig, changes, f"frontier policy {name!r}")
        for r in self.prune_ratios + self.curve_ratios:
            require(0 <= r < 1, "frontier ratios", r, "ratios in [0, 1)")
        for k in self.topk:
            require(k is None or k >= 1, "frontier topk", k, "null (every logit) or 1 or more")
        require(None in self.topk, "frontier topk", self.topk, "a list that holds null (the full labels)")
        require(len(set(self.seeds)) == len(self.seeds) > 0, "frontier seeds", self.seeds, "distinct integers")

    def settings(self) -> list[tuple[float, int | None, str]]:
        """Every (prune ratio, top-k, policy) trained: the full grid, plus pruning alone on the curve."""
        grid = [(r, k, p) for r in self.prune_ratios for k in self.topk for p in self.policies]
        return [(r, None, "constant") for r in self.curve_ratios if r not in self.prune_ratios] + grid


@dataclass
class DataConfig:
    dataset: str = "mnist5k"  # mnist5k (embedded), tiny-imagenet, imagefolder, cifar10 or cifar100
    root: str | None = None  # folder of the dataset (not needed for mnist5k)
    num_classes: int | None = None  # keep only the first N classes
    per_class: int | None = None  # keep only the first N training images per class
    image_size: int | None = None  # resize images to this size
    seed: int = 0  # of the mnist5k train/test split
    eval_resize: int | None = None  # imagefolder: held-out images' shorter side before the image_size crop (256)
    normalize: str | None = None  # a named mean/std (data.NORMALIZATIONS) in place of the dataset's own
    CHOICES: ClassVar[dict] = {"dataset": DATASETS, "normalize": tuple(NORMALIZATIONS)}
    # added after runs were made, with the value that gives the behaviour of before; left out of a stage's key while
    # they hold it
    ADDED: ClassVar[dict] = {"eval_resize": None, "normalize": None}

    def __post_init__(self):
        check_choices(self)
        require(self.eval_resize is None or (self.dataset == "imagefolder" and self.image_size is not None
                                             and self.eval_resize >= self.image_size), "eval_resize",
                self.eval_resize, "at least image_size, for an imagefolder with an image_size (or null)")
        for name in ("num_classes", "per_class", "image_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "a positive integer or null")

    def load(self):
        """The dataset these settings name (an :class:`dsutil.data.ImageData`)."""
        from .data import load_dataset

        data = load_dataset(self.dataset, self.root, num_classes=self.num_classes, per_class=self.per_class,
                            image_size=self.image_size, seed=self.seed, eval_resize=self.eval_resize,
                            normalize=self.normalize)
        data.settings = self
        return data


@dataclass
class ExperimentConfig:
    name: str = "mnist5k"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_checkpoint: str | None = None  # a pretrained teacher (safetensors from dsutil or `dsutil teacher`)
    methods: list[str] = field(default_factory=lambda: ["sre2l", "lpld", "real"])
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    method_overrides: dict[str, dict] = field(default_factory=dict)  # per-method recover settings
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    prune_ratios: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.9, 0.95, 0.975, 0.99])
    prune_metrics: list[str] = field(default_factory=lambda: ["random"])
    seeds: list[int] | None = None  # student seeds: each student is trained once per seed (None: student.seed)
    device: str = "auto"
    frontier: FrontierConfig | None = None  # `dsutil frontier`: label budgets beyond pruning (dsutil.frontier)
    cosine_per_class: int | None = None  # real images' within-class cosine on a seeded sample per class (None: all)
    baselines: bool = True  # a hard-label student per image set and seed, the full-real number, HLR/IOR/LRS
    teacher_floor: float = 1.5  # stop before recover when the teacher's test top-1 is under this many times chance (0: go on)

    def recover_config(self, method: str) -> RecoverConfig:
        base = asdict(self.recover) | self.method_overrides.get(method, {}) | {"method": method}
        return build(RecoverConfig, base, f"recover settings of {method}")

    def __post_init__(self):  # everything checked before any stage runs
        self.student_seeds()
        require(len(self.methods) > 0, "methods", self.methods, "at least one method")
        for method in self.methods:
            one_of("methods", method, [*METHODS, REAL])
            self.recover_config(method)
        require(len(self.prune_ratios) > 0, "prune_ratios", self.prune_ratios, "at least one ratio")
        for r in self.prune_ratios:
            require(0 <= r < 1, "prune_ratios", r, "ratios in [0, 1)")
        for metric in self.prune_metrics:
            one_of("prune_metrics", metric, PRUNE_METRICS)
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device", self.device,
                "auto, cpu, cuda or cuda:N")
        for method in self.frontier.methods if self.frontier else []:
            require(method in self.methods and method != REAL, "frontier.methods", method,
                    f"distilled methods of the preset ({', '.join(m for m in self.methods if m != REAL)})")
        require(self.cosine_per_class is None or self.cosine_per_class >= 2, "cosine_per_class",
                self.cosine_per_class, "2 or more images per class (or null: all of them)")
        require(self.teacher_floor >= 0, "teacher_floor", self.teacher_floor, "0 (never stop) or more, a multiple of chance")
        require(self.teacher.epochs > 0 or self.teacher.pretrained or self.teacher_checkpoint is not None,
                "teacher.epochs", self.teacher.epochs, "1 or more, unless teacher.pretrained or teacher_checkpoint")
        # the runner sets these per student: a value given here would be recorded and never used
        require(self.student.prune_ratio == 0.0, "student.prune_ratio", self.student.prune_ratio,
                f"0: the run trains a student at each of prune_ratios ({self.prune_ratios}); set prune_ratios instead")
        require(self.student.metric == "random", "student.metric", self.student.metric,
                f"random: the run trains a student by each of prune_metrics ({self.prune_metrics}); set prune_metrics "
                "instead")
        require(self.seeds is None or self.student.seed == 0, "student.seed", self.student.seed,
                f"0 where seeds is set: the run trains a student per seed of seeds ({self.seeds}); set seeds instead")

    def student_seeds(self) -> list[int]:
        seeds = [self.student.seed] if self.seeds is None else list(self.seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        return seeds

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"data": DataConfig, "teacher": TeacherConfig, "recover": RecoverConfig, "relabel": RelabelConfig,
            "student": StudentConfig, "frontier": FrontierConfig}


def settings_reference() -> str:
    """docs/settings-reference.md, made from the dataclasses themselves (their fields, types, defaults and
    trailing comments), so a new setting is documented by writing it."""
    from .settings import reference_rows

    head = ["# Settings reference", "", "Made by `python -m dsutil.config` from the settings dataclasses (a test keeps "
            "it current); what each section does: `docs/settings.md`.", ""]
    table = ["| key | type | default | note |", "| --- | --- | --- | --- |"]
    out = head + ["## top level", "", *table, *reference_rows(ExperimentConfig)]
    for name, cls in SECTIONS.items():
        out += ["", f"## {name}", "", *table, *reference_rows(cls, f"{name}.")]
    return "\n".join(out) + "\n"


def from_dict(d: dict, where: str = "config") -> ExperimentConfig:
    """An experiment from nested settings, every value typed and checked (:func:`dsutil.settings.build`)."""
    d = dict(d)
    for key, cls in SECTIONS.items():
        if key in d and (d[key] is not None or key != "frontier"):  # an empty section: its defaults
            d[key] = build(cls, d[key], f"{where}: {key}")
    return build(ExperimentConfig, d, where)


def load_config(path_or_name: str | Path, overrides: dict | None = None, quick: bool = False) -> ExperimentConfig:
    """A YAML file, or the name of a packaged preset (mnist5k, tiny-imagenet-10, tiny-imagenet, imagenet1k).

    ``overrides`` maps dotted keys (``student.epochs``) to values; ``quick`` applies
    the preset's own ``quick:`` section, a smaller smoke-test version of it.
    """
    names = ", ".join(p.stem for p in sorted(PRESETS.glob("*.yaml")))
    if not str(path_or_name).strip():
        raise FileNotFoundError(f"config name is empty; give a YAML path or a preset: {names}")
    path = Path(path_or_name)
    if not path.is_file():  # a folder of the same name is not a config: the packaged preset is
        path = PRESETS / f"{path_or_name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config {path_or_name!r} not found; give a YAML path or a preset: {names}")
    d = read_yaml(path)
    quick_overrides = d.pop("quick", None) or {}
    require(isinstance(quick_overrides, dict), f"{path}: quick", quick_overrides,
            "a mapping of dotted keys to values (student.epochs: 2)")
    for dotted, value in ((quick_overrides if quick else {}) | (overrides or {})).items():
        node = d
        *parents, leaf = str(dotted).split(".")
        for i, k in enumerate(parents):
            if node.get(k) is None:  # absent, or an empty section
                node[k] = {}
            node = node[k]
            require(isinstance(node, dict), f"{path}: {dotted}", value,
                    f"a key under a section; {'.'.join(parents[:i + 1])} is a value, not a section")
        node[leaf] = merged(node.get(leaf), value)
    return from_dict(d, str(path))


def merged(base, value):
    """``value`` over ``base``: a mapping given for a mapping (``--set 'relabel={epochs: 2}'``) changes only the
    keys it names, at every depth; anything else replaces what was there."""
    if isinstance(base, dict) and isinstance(value, dict):
        return base | {k: merged(base.get(k), v) for k, v in value.items()}
    return value


MAX_ALIASES = 100  # a preset needs few YAML aliases; thousands are a "billion laughs" that fills the memory


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (two ``student:`` sections, say)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base loader names it below
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice in one mapping; "
                                                        "keep one (YAML would silently keep the last)",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """A preset file as a mapping; bad YAML, repeated keys and alias bombs stop here, naming the file."""
    try:
        text = path.read_text()
        aliases = sum(isinstance(t, yaml.AliasToken) for t in yaml.scan(text))
        if aliases > MAX_ALIASES:
            raise ValueError(f"{path}: {aliases} YAML aliases (*name); expected at most {MAX_ALIASES}")
        d = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of settings (data:, teacher:, ...), got {type(d).__name__}")
    return d


if __name__ == "__main__":
    print(settings_reference(), end="")
