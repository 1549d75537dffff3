"""YAML as configs and search spaces read it: YAML 1.2's booleans, one-line errors naming the file and line."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot run; the message is one line meant for the user (raised by iai_dist.config too)."""


class _YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans (true / false only). YAML 1.1 also reads on / off / yes / no as booleans,
    which turned `--set train.autocast=off` into False; bool fields still take those words (pydantic reads them)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (task, regime, ...), got {type(data).__name__}")
    return data


def layered(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top`'s mappings on `base`'s, section by section: a user's file changes only the fields it names."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = layered(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
