"""Typed, frozen experiment configuration.

One `ExperimentConfig` describes a whole run. It is built from a YAML preset shipped in `iai_dist/presets/`, or
a user's YAML file, plus dotted command-line overrides (`--set train.lr=3e-4`). Every check happens here, before
any work starts, and a failure is a `ConfigError` with one readable line that names the field and what is allowed.
"""

from __future__ import annotations

import types
import typing
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PositiveInt, ValidationError, field_validator, model_validator

from iai_dist.family_config import EmbeddingsConfig, GenerativeConfig, ImageConfig, Section as _Section
from iai_dist.yaml_text import ConfigError, layered, load_yaml, read_yaml  # ConfigError: every config check's error

PRESET_PACKAGE = "iai_dist.presets"


class TaskConfig(_Section):
    """The task family and the shape of an episode: K mini-batches of B context points + a query set."""

    family: str = "linear_regression"
    dim: PositiveInt = 20  # input dimension d; x ~ N(0, I)
    num_classes: int = Field(2, ge=2)  # classification families only
    noise_var: float = Field(0.01, ge=0)  # regression: observation noise variance
    label_noise: float = Field(0.0, ge=0)  # classification: Gumbel temperature on teacher logits (0 = argmax)
    teacher_hidden: PositiveInt = 32  # hidden width of the MLP teacher (mlp_* families)
    steps: PositiveInt = 10  # K: refinement steps = mini-batches per episode
    batch_size: PositiveInt = 10  # B: points per mini-batch
    query_size: PositiveInt = 100  # points in the query set D_valid
    image: ImageConfig = ImageConfig()  # image families only
    generative: GenerativeConfig = GenerativeConfig()  # generative families only
    embeddings: EmbeddingsConfig = EmbeddingsConfig()  # the embeddings family only

    @field_validator("family")
    @classmethod
    def _family_exists(cls, family: str) -> str:
        from iai_dist.tasks import FAMILIES  # the registry imports this module

        if family not in FAMILIES:
            raise ValueError(f"unknown task family {family!r}; known: {', '.join(sorted(FAMILIES))}")
        return family

    @model_validator(mode="after")
    def _family_accepts(self) -> "TaskConfig":
        """The family's own checks (an image family: task.dim against the image features, N against its classes)."""
        from iai_dist.tasks import FAMILIES

        FAMILIES[self.family].check_config(self)
        return self


class RegimeConfig(_Section):
    """What the state is (DESIGN.md 'regime') and what the refiner reads besides it ('signal')."""

    kind: Literal["parametric", "explicit", "implicit"] = "parametric"
    signal: Literal["obs", "grad", "obs+grad"] = "obs+grad"
    # parametric f: linear / softmax-linear, a one-hidden-layer MLP, or (generative families) a Gaussian mixture's
    # exact flow-matching velocity field, theta = its weights, means and scales (it has a density: exact NLL)
    model: Literal["linear", "mlp", "mixture"] = "linear"
    hidden: PositiveInt = 32  # hidden width of the parametric MLP f, and of the explicit f_gamma
    latent_dim: PositiveInt = 32  # explicit: size of the task latent z
    # explicit: "film" also scales f_gamma's hidden layers by (1 + A z); "concat": the paper's MLP([x, z])
    conditioning: Literal["film", "concat"] = "film"
    # explicit: Adam steps fitting f_gamma with a free latent per task (256 episodes) before meta-training
    pretrain_steps: int = Field(0, ge=0)
    f_gamma_lr_scale: float = Field(1.0, ge=0)  # explicit: f_gamma learns at train.lr x this (0: frozen)
    chunk_size: PositiveInt = 32  # a state vector is cut into tokens of this many entries
    # parametric/explicit: observation tokens also carry f's current prediction at each mini-batch point,
    # so the refiner reads residuals directly instead of multiplying x by theta across tokens
    obs_predictions: bool = True
    # Memory in the state beside theta/z, updated by formula each step (beyond the paper; VectorStateRegime):
    # "moments": gradient moments at each of memory_decays (what learned optimizers such as VeLO read);
    # "observations": running means of [x,1][x,1]^T and [x,1] e(y)^T, as d + 1 extra tokens (d <= 128);
    # "learned": memory_slots tokens of chunk_size entries that the refiner writes like theta and f never reads
    # (what to keep is learned, so it needs train.unroll >= 2: a greedy loss never reaches a slot's writer).
    memory: Literal["none", "moments", "observations", "learned"] = "none"
    memory_decays: tuple[float, ...] = (0.5, 0.9, 0.99)
    memory_slots: PositiveInt = 4  # "learned": slot tokens carried in the state

    @model_validator(mode="after")
    def _implicit_has_no_gradient(self) -> "RegimeConfig":
        if self.kind == "implicit" and self.signal != "obs":
            raise ValueError(f"signal {self.signal!r} needs parameters to differentiate; the implicit regime has none, use 'obs'")
        if self.memory == "moments" and "grad" not in self.signal:
            raise ValueError(f"memory 'moments' accumulates gradients: it needs signal grad or obs+grad, not {self.signal!r}")
        if (self.pretrain_steps or self.f_gamma_lr_scale != 1) and self.kind != "explicit":
            raise ValueError(f"pretrain_steps and f_gamma_lr_scale are about the explicit regime's f_gamma; "
                             f"regime.kind is {self.kind!r}")
        if self.memory in ("observations", "learned") and self.kind == "implicit":
            raise ValueError(f"memory {self.memory!r} is for the parametric and explicit regimes, not implicit")
        if not self.memory_decays or not all(0 < b < 1 for b in self.memory_decays):
            raise ValueError(f"memory_decays: expected decays strictly between 0 and 1, got {list(self.memory_decays)}")
        return self


class RefinerConfig(_Section):
    """The Transformer h_phi."""

    width: PositiveInt = 128
    depth: PositiveInt = 4
    heads: PositiveInt = 4
    mlp_ratio: PositiveInt = 4

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "RefinerConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        return self


class TrainConfig(_Section):
    """Greedy meta-training: AdamW, linear warmup then cosine decay, gradient clipping."""

    tasks_per_batch: PositiveInt = 128  # episodes per learner step
    max_steps: PositiveInt = 2000  # learner steps
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # 'relative' weighs each refinement step's query loss by its own size (sum of log losses), so late
    # steps, whose losses are orders of magnitude smaller, are learned as well as the first; 'uniform' sums them.
    step_weighting: Literal["relative", "uniform"] = "relative"
    # Backpropagate each query loss through up to `unroll` consecutive refinement steps: the state is detached
    # every `unroll` steps (1: the greedy objective; >= task.steps: through the whole episode). Costs a
    # learner step's activations x unroll in memory and runs the K steps one after another.
    unroll: PositiveInt = 1
    # Roll out and learn from horizon x K refinement steps on fresh mini-batches (past K on the last step
    # embedding, as evaluation past K): > 1 teaches the refiner to go on improving past K, at horizon x the rows.
    horizon: PositiveInt = 1
    horizon_from: float = Field(0.0, ge=0, lt=1)  # a curriculum: steps before horizon_from x max_steps roll out K
    horizon_weight: float = Field(1.0, gt=0, le=1)  # what each step past K weighs in the objective (steps 1..K: 1)
    seed: int = Field(0, ge=0)  # model init and the training episodes' seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch.compile (iai_dist/compiling.py): off | refiner (its Transformer only) | step (the whole greedy forward and
    # backward, and the rollout, one graph each) | graphs (step under CUDA graphs). Worth it on a GPU; on a small CPU
    # compiling takes minutes. Configs and checkpoints from before the modes said true (refiner) or false (off).
    compile: Literal["off", "refiner", "step", "graphs"] = "off"
    # The refiner's Transformer under bfloat16 autocast (states, f, gradients, losses stay fp32). auto: bf16 where
    # native (a CUDA GPU with bf16; a CPU with AMX or AVX512-BF16: 1.7x faster there, 17x slower without), else fp32.
    autocast: Literal["auto", "off", "bf16"] = "auto"
    # Stop with an error after this many skipped non-finite steps in a row (the count lives on the device and is
    # read every this many steps and at log steps, so a GPU step never waits to learn whether it was finite).
    max_nonfinite_in_row: PositiveInt = 10
    checkpoint_every: PositiveInt = 500
    log_every: PositiveInt = 50

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_was_a_switch(cls, value):
        return {True: "refiner", False: "off"}.get(value, value) if isinstance(value, bool) else value


# Training on K steps only: no horizon past K, no curriculum into one, no weight for its steps.
K_STEPS_ONLY = {"train.horizon": 1, "train.horizon_from": 0.0, "train.horizon_weight": 1.0}


class EvalConfig(_Section):
    """Held-out evaluation against baselines on the very same episodes and mini-batches."""

    episodes: PositiveInt = 512
    seed: int = Field(1_000_003, ge=0)  # held-out episodes; lr selection uses seed + 1
    horizon: PositiveInt = 2  # refine for horizon * K steps (fresh mini-batches beyond K)
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    lr_select_episodes: PositiveInt = 128
    # Train the one-step (K=1) model, reading all K*B points at once, for as many learner steps as the main
    # model; false skips it (evaluate still uses one found beside the checkpoint).
    one_step: bool = True
    batch_tasks: PositiveInt = 256  # episodes evaluated at once (bounds memory)
    # Fixed held-out episodes (seed + 2) whose query error after each step is logged at every log step.
    monitor_episodes: int = Field(256, ge=0)
    # Generative families: sample quality after each reported step on this many held-out tasks, from this many
    # generated and as many true samples per task (sliced Wasserstein-2, MMD, NLL where there is a density)
    sample_tasks: int = Field(32, ge=0)
    samples: int = Field(1000, ge=16)


# `register` (the name users set) is also ABCMeta.register, a class attribute no config code uses
warnings.filterwarnings("ignore", message='Field name "register" in "TrackingConfig" shadows', category=UserWarning)


class TrackingConfig(_Section):
    enabled: bool = True
    experiment: str = "iai_dist"
    run_name: str | None = None
    runs_dir: str = "runs"  # relative paths are taken from the current directory
    # Where Ray Train keeps the service's checkpoints: None = runs_dir (on a cluster: storage every node
    # mounts), or a URI of a filesystem Ray Train reaches through pyarrow (s3://bucket/prefix, gs://...).
    storage: str | None = None
    # Register the run's refiner (its MLflow pyfunc model, logged with every tracked run) in the MLflow model
    # registry under this name: a new version per run. None: logged, not registered.
    register: str | None = None


class DistributedConfig(_Section):
    """The Ray service (iai_dist.service). num_workers=0 is the in-process path: no Ray at all."""

    num_workers: int = Field(0, ge=0)  # Ray Train learner workers (DDP ranks); 0 = train in this process
    episode_workers: int = Field(0, ge=0)  # episode-worker actors, dealt round-robin to the learner ranks
    use_gpu: bool = False  # learners get `learner_gpus` of a GPU each, episode workers `episode_worker_gpus` of one
    # With use_gpu: below 1, a single learner shares its GPU with episode workers (0.25 + 3 x 0.25: one card).
    # DDP ranks need a GPU each (NCCL refuses two ranks on one), so several learners take 1.
    learner_gpus: float = Field(1.0, gt=0, le=1)
    learner_cpus: float = Field(1.0, gt=0)  # CPUs reserved per learner (fractions let several share a core)
    episode_worker_cpus: float = Field(1.0, gt=0)
    episode_worker_gpus: float = Field(0.25, gt=0, le=1)  # with use_gpu: 0.25 puts four workers on one GPU
    # The batch learned at step n is rolled out with the weights of step n - staleness (the newest published
    # by then), exactly: training is reproducible and resumes exactly. 0 = synchronous (no overlap of rollout
    # and learning); 1 = each batch is rolled out while the learner learns the previous one. A rank keeps
    # staleness + 1 requests in flight, so more than staleness + 1 episode workers per rank add nothing.
    staleness: int = Field(1, ge=0)
    sync_every: PositiveInt = 1  # rank 0 publishes the refiner's weights every this many learner steps
    max_failures: int = Field(3, ge=-1)  # learner failures recovered from the last checkpoint (-1: always)
    # Restarts of a crashed episode-worker actor over the run (-1: always); finite, so a worker that crashes
    # every time ends the run with its last error.
    worker_restarts: int = Field(10, ge=-1)
    # A learner rank that gets no batch from its episode worker in this long stops the run (a hung worker).
    rollout_timeout_s: float = Field(600.0, gt=0)
    # Learners not placed within this long (time for an autoscaler to boot GPU nodes) stop the run.
    placement_timeout_s: float = Field(900.0, gt=0)


class ExperimentConfig(_Section):
    task: TaskConfig = Field(default_factory=TaskConfig)  # built lazily: its check imports the task registry
    regime: RegimeConfig = RegimeConfig()
    refiner: RefinerConfig = RefinerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _sections_fit_together(self) -> "ExperimentConfig":
        from iai_dist.tasks import FAMILIES

        kind = FAMILIES[self.task.family].kind
        if self.regime.kind == "parametric" and self.regime.model == "mixture" and kind != "generative":
            raise ValueError(f"regime.model 'mixture' is a density model for generative families; task.family "
                             f"{self.task.family!r} is {kind}")
        if self.tracking.register and kind == "generative":
            raise ValueError("tracking.register: the MLflow model predicts targets of query rows (regression and "
                             f"classification); {self.task.family} is generative and logs no model")
        if self.regime.memory == "observations" and self.task.dim > 128:
            raise ValueError(f"regime.memory 'observations' keeps (d + 1)^2 statistics per task: task.dim {self.task.dim} "
                             "is over 128; use memory 'moments' or a smaller d")
        for field, what in (("horizon_from", "a curriculum into a horizon past K"),
                            ("horizon_weight", "the weight of the steps past K")):
            if self.train.horizon == 1 and getattr(self.train, field) != K_STEPS_ONLY[f"train.{field}"]:
                raise ValueError(f"train.{field}: {what}; set train.horizon >= 2 (it is 1)")
        if self.regime.memory == "learned" and self.train.unroll < 2:
            raise ValueError("regime.memory 'learned': the refiner writes the memory slots, and only a loss that reaches "
                             "back through a step teaches it what to write; set train.unroll >= 2 (it is 1)")
        d = self.distributed
        if d.num_workers == 0:
            if d.episode_workers:
                raise ValueError("distributed.episode_workers needs distributed.num_workers > 0 (the Ray service)")
            return self
        if d.use_gpu and d.learner_gpus < 1 and d.num_workers > 1:
            raise ValueError(f"distributed.learner_gpus {d.learner_gpus:g} with distributed.num_workers {d.num_workers}: "
                             "Ray would pack DDP ranks onto one GPU, which NCCL refuses; set it to 1")
        if self.train.compile == "graphs" and d.num_workers > 1:
            raise ValueError("train.compile 'graphs': CUDA graphs cannot hold DDP's gradient all-reduce; with "
                             f"distributed.num_workers {d.num_workers} use 'step'")
        if d.episode_workers < d.num_workers:
            raise ValueError(
                f"distributed.episode_workers ({d.episode_workers}) must be at least distributed.num_workers "
                f"({d.num_workers}): every learner rank is fed by its own episode workers"
            )
        if self.train.tasks_per_batch % d.num_workers:
            raise ValueError(
                f"train.tasks_per_batch ({self.train.tasks_per_batch}) must be a multiple of "
                f"distributed.num_workers ({d.num_workers}): each rank learns on an equal share"
            )
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        data = self.model_dump()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return validate(data, source="overrides")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a config section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 3e-4); values are read as YAML scalars, except that a field whose
    values are strings takes the text as written (`tracking.run_name=2024`, `train.autocast=off`)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE such as train.lr=3e-4")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is not None and not isinstance(value, str) and _takes_text(key):
        value = raw.strip()
    return key, value


def _takes_text(key: str) -> bool:
    """Whether the config field at a dotted key holds strings only (str, a Literal of strings, or those or None)."""
    model: Any = ExperimentConfig
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    options = typing.get_args(model) if typing.get_origin(model) in (typing.Union, types.UnionType) else (model,)
    options = [o for o in options if o is not type(None)]

    def text(o: Any) -> bool:
        return o is str or (typing.get_origin(o) is Literal and all(isinstance(v, str) for v in typing.get_args(o)))

    return bool(options) and all(text(o) for o in options)


def validate(data: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"{source}: {field}: {msg}{more}") from None


def load_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """preset (default 'default'), then a user's YAML file on top, then --set overrides on top."""
    if preset is not None or config_file is None:
        name = preset or "default"
        if name not in preset_names():
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
        text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
        data = read_yaml(text, f"preset {name}")
        source = f"preset {name}"
    else:
        data, source = {}, ""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        user = read_yaml(path.read_text(), str(path))
        data = layered(data, user)
        source = str(path)
    validate(data, source)
    parsed = [parse_override(item) for item in overrides]
    for key, value in parsed:
        _set_dotted(data, key, value)
    return validate(data, "--set" if parsed else source)


def flatten(cfg: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """{'train.lr': 0.001, ...}: for MLflow params and readable diffs (of a config or its dumped data)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)  # nested sections: task.image.size
            else:
                out[f"{prefix}{key}"] = value

    walk("", cfg.model_dump() if isinstance(cfg, BaseModel) else cfg)
    return out


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
