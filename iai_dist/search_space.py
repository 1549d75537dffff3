"""Search-space files for `python -m iai_dist.tune`: which config keys a sweep varies, over what domains.

    # tune_spaces/steps.yaml
    description: error vs refinement steps K
    preset: default                 # the base experiment (--preset on the command line wins)
    set: {eval.one_step: false}     # fixed overrides for every trial (--set on the command line wins)
    params:
      task.steps: {grid: [1, 5, 10, 20]}
      train.lr: {loguniform: [3.0e-4, 3.0e-3]}
      regime: {grid: [{kind: parametric, signal: obs}, {kind: implicit, signal: obs}]}   # joint settings
    num_samples: 1                  # each grid point is run this many times (random domains redrawn)
    early_stopping: {grace_steps: 100, reduction_factor: 3}    # ASHA on held-out query error; null: off

A key is a dotted config field, or a section whose values are mappings of its fields (to vary several
fields together, e.g. a regime with the signals it allows). Everything is checked against the experiment
config before any trial starts: every combination of the finite domains, and both ends of the ranges.
This module needs pydantic only; Ray Tune domains are built from it in `iai_dist.service.sweep`.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from iai_dist.config import ConfigError, ExperimentConfig, load_config, parse_override, read_yaml

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform")
NOT_SWEPT = ("tracking",)  # where runs are logged is the sweep's, not a trial's, business
MAX_CHECKED_COMBINATIONS = 4096  # beyond this many, each value is checked against the base alone


class Domain(BaseModel):
    """One key's values: `{grid: [...]}` (every value, crossed with the other grids), `{choice: [...]}`
    (drawn at random), `{uniform: [lo, hi]}` or `{loguniform: [lo, hi]}` (numbers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["grid", "choice", "uniform", "loguniform"]
    values: tuple[Any, ...]

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if not (isinstance(data, dict) and len(data) == 1 and next(iter(data)) in DOMAIN_KINDS):
            raise ValueError(f"expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                             f"{{loguniform: [lo, hi]}} (got {data!r})")
        kind, values = next(iter(data.items()))
        if not isinstance(values, list) or not values:
            raise ValueError(f"{kind}: expected a non-empty list (got {values!r})")
        return {"kind": kind, "values": tuple(values)}

    @model_validator(mode="after")
    def _range(self) -> "Domain":
        if self.kind in ("uniform", "loguniform"):
            lo_hi = self.values
            if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi):
                raise ValueError(f"{self.kind}: expected [lo, hi], two numbers (got {list(lo_hi)!r})")
            if not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{self.kind}: lo must be below hi (got {list(lo_hi)!r})")
            if self.kind == "loguniform" and lo_hi[0] <= 0:
                raise ValueError(f"loguniform: lo must be positive (got {lo_hi[0]!r})")
        return self

    @property
    def finite(self) -> bool:
        return self.kind in ("grid", "choice")

    def probes(self) -> tuple[Any, ...]:
        """The values a check must try: all of a finite domain, both ends of a range (as the type drawn)."""
        if self.finite:
            return self.values
        lo, hi = self.values
        return (float(lo), float(hi))


class EarlyStopping(BaseModel):
    """ASHA (asynchronous successive halving) on the held-out query error after step K, in learner steps:
    a trial is compared with the others at grace_steps x reduction_factor^n and stopped unless it is in
    the best 1/reduction_factor. Off (null) for ablations, whose point is every trial's full curve."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    grace_steps: PositiveInt = 100
    reduction_factor: float = Field(3.0, gt=1)


class SearchSpace(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    description: str = ""
    preset: str | None = None
    set: dict[str, Any] = {}
    params: dict[str, Domain] = Field(min_length=1)
    num_samples: PositiveInt = 1
    early_stopping: EarlyStopping | None = EarlyStopping()

    def num_trials(self) -> int:
        """Trials the sweep will run: grid points x num_samples (choices and ranges are drawn per trial)."""
        size = 1
        for domain in self.params.values():
            size *= len(domain.values) if domain.kind == "grid" else 1
        return size * self.num_samples


def trial_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's drawn values as dotted overrides: a section-valued key becomes one override per field,
    so the fields it leaves out keep the base config's values (not the section's defaults)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update({f"{key}.{field}": v for field, v in value.items()})
        else:
            out[key] = value
    return out


def _config_node(key: str) -> type[BaseModel] | None:
    """The config section a dotted key names (None for a plain field); KeyError if there is no such key."""
    node: Any = ExperimentConfig
    for part in key.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            raise KeyError(key)
        node = node.model_fields[part].annotation
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _check_keys(space: SearchSpace, source: str) -> None:
    for key, domain in space.params.items():
        try:
            section = _config_node(key)
        except KeyError:
            raise ConfigError(f"{source}: params.{key}: unknown config key") from None
        if key.split(".")[0] in NOT_SWEPT:
            raise ConfigError(f"{source}: params.{key}: tracking settings belong to the sweep, not to a trial")
        if section is not None:
            if not domain.finite or not all(isinstance(v, dict) for v in domain.values):
                raise ConfigError(f"{source}: params.{key}: {key} is a section: give grid or choice values "
                                  f"that are mappings of its fields, e.g. {{grid: [{{field: value}}, ...]}}")


def _check_values(space: SearchSpace, base: ExperimentConfig, source: str) -> None:
    """Build the config of every combination a trial could get (ranges at both ends); the first that is
    invalid is reported with the values that made it so."""
    keys = list(space.params)
    probes = [space.params[k].probes() for k in keys]
    total = 1
    for p in probes:
        total *= len(p)
    if total <= MAX_CHECKED_COMBINATIONS:
        combinations = (dict(zip(keys, combo)) for combo in itertools.product(*probes))
    else:  # too many to build: each value on its own against the base
        combinations = ({k: v} for k, p in zip(keys, probes) for v in p)
    for combo in combinations:
        try:
            base.with_overrides(trial_overrides(combo))
        except ConfigError as exc:
            detail = str(exc).removeprefix("overrides: ")
            where = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            raise ConfigError(f"{source}: params: a trial with {where} is invalid: {detail}") from None


def load_space(path: str | Path, preset: str | None = None, overrides: tuple[str, ...] | list[str] = ()
               ) -> tuple[SearchSpace, ExperimentConfig]:
    """Read and check a space file; returns it with the base config (its preset, its `set`, then the
    command line's --preset and --set on top). Every problem is a ConfigError naming the file and key."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"search space file {source!r} does not exist (shipped ones: tune_spaces/*.yaml)")
    data = read_yaml(path.read_text(), source)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"] if p not in DOMAIN_KINDS) or "space"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {field}: {msg}") from None
    try:
        base = load_config(preset or space.preset).with_overrides(space.set)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {str(exc).replace('overrides: ', 'set: ', 1)}") from None
    try:
        base = base.with_overrides(dict(parse_override(item) for item in overrides)) if overrides else base
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("overrides: ", "--set: ", 1)) from None
    if not base.distributed.num_workers:
        raise ConfigError(
            f"{source}: every trial runs on the Ray service, but the base config has distributed.num_workers=0; "
            "use a Ray preset (default) or add --set distributed.num_workers=1 --set distributed.episode_workers=1")
    _check_keys(space, source)
    _check_values(space, base, source)
    return space, base
