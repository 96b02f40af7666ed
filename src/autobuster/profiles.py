"""The two profiles, the data layout under $AUTOBUSTER_HOME, and the record of which profile is active.

prepare.py chooses the profile once and writes `active.json`; every later command reads it with `active()`.
"""
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

FRAMES = 16  # frames per clip
SAMPLE_FPS = 4.0  # sampling rate: 16 frames cover 4 s
MIN_PIXELS = 56 * 56  # smallest frame the processors accept


def home() -> Path:
    return Path(os.environ.get("AUTOBUSTER_HOME", "~/.cache/autobuster")).expanduser()


@dataclass(frozen=True)
class Profile:
    name: str
    pixel_cap: int  # max pixels per frame after smart resize (448² -> 2,048 Qwen2.5-VL video tokens for 16 frames)
    time_budget: int  # training seconds per experiment (rollouts + updates)
    val_size: int  # pinned val set, drawn from Bench `id` (or a test split)
    holdout_size: int  # pinned holdout set, drawn from Bench `ood` (or benchmark): unseen generators
    wild_size: int  # pinned wild set, drawn from Bench `wild`: in-the-wild generators
    eval_batch: int  # clips per batched greedy evaluation
    eval_max_new_tokens: int  # evaluation decoding length
    cache_train: bool  # decode train clips to disk once (needs ~9.6 MB per clip at 448²)
    needs_cuda: bool


PROFILES = {
    "genbuster": Profile("genbuster", 448 * 448, 20 * 60, 400, 400, 400, 16, 1024,
                         cache_train=False, needs_cuda=True),
    # 64²: the synthetic 112² clips become 56² frames for patch 14 and 64² for patch 16, 4 tokens per frame pair
    "tiny": Profile("tiny", 64 * 64, 300, 160, 120, 120, 64, 64, cache_train=True, needs_cuda=False),
}


@dataclass(frozen=True)
class Setup:
    """Where one prepared dataset lives, and the profile it was prepared with."""
    profile: str
    root: str  # this dataset's directory under $AUTOBUSTER_HOME (manifest, eval sets, frame cache)
    source: str  # the folder holding the videos; manifest paths are relative to it
    model: str  # base model: a local directory or a hub id
    family: str = "Qwen2.5-VL"  # the base model's family (families.py), which sets the format and the frame sizes

    @property
    def model_family(self):
        from .families import family_named
        return family_named(self.family)

    @property
    def settings(self) -> Profile:
        return PROFILES[self.profile]

    def path(self, *parts) -> Path:
        return Path(self.root, *parts)

    @property
    def manifest(self) -> Path:
        return self.path("manifest.parquet")

    @property
    def videos(self) -> Path:
        return Path(self.source)

    def eval_set(self, name: str) -> Path:
        return self.path("eval", f"{name}.json")

    @property
    def time_budget(self) -> int:
        """Training seconds per experiment: the profile's, or the runner's override for long runs and the demo."""
        return int(os.environ.get("AUTOBUSTER_TIME_BUDGET", self.settings.time_budget))

    @property
    def seed(self) -> int:
        """The run's seed, from the runner: each run of one train_dapo.py commit gets its own (0, 1, 2, ...)."""
        return int(os.environ.get("AUTOBUSTER_SEED", 0))

    def check_device(self) -> None:
        import torch
        if self.settings.needs_cuda and not torch.cuda.is_available():
            raise UserError(f"the {self.profile} profile needs a CUDA GPU and none is visible; "
                            "on a CPU machine use `uv run prepare.py --profile tiny`")


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise UserError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")
    return PROFILES[name]


HOME_MARK = "$AUTOBUSTER_HOME"  # paths inside the home are stored relative to it: a copied or moved home still works


def save_active(setup: Setup) -> None:
    home().mkdir(parents=True, exist_ok=True)
    inside = str(home().resolve())
    record = {k: HOME_MARK + v[len(inside):] if v == inside or v.startswith(inside + os.sep) else v
              for k, v in asdict(setup).items()}
    tmp = home() / "active.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(home() / "active.json")


def active() -> Setup:
    f = home() / "active.json"
    if not f.exists():
        raise UserError(f"no prepared dataset under {home()}: run `uv run prepare.py --profile tiny` "
                        "(offline, CPU) or `uv run prepare.py` (GenBuster-200K-mini + GenBuster-Bench, GPU) first")
    here = str(home().resolve())
    return Setup(**{k: here + v[len(HOME_MARK):] if v.startswith(HOME_MARK) else v
                    for k, v in json.loads(f.read_text()).items()})
