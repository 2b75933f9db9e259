"""Reading the config file: the path, the YAML, validation into :class:`router.settings.Settings`
with one line per problem, each starting with its key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from router.settings import ConfigError, Settings


def error_message(item: Mapping[str, Any]) -> str:
    """The message of one pydantic error, without the ``Value error,`` put before a validator's own."""
    return str(item["msg"]).removeprefix("Value error, ")


def problems(error: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem, each starting with its key (under ``prefix``): what ConfigError says."""
    lines = []
    for item in error.errors():
        key = ".".join([part for part in (prefix, *map(str, item["loc"])) if part])
        message = error_message(item)
        if key:
            lines.append(f"{key}: {message}")
        else:  # whole-file checks: each line already names its key
            lines.extend(message.splitlines())
    return lines


def config_path(path: str | os.PathLike[str] | None) -> Path:
    """The config file to read: the argument, else ``OPENWEIGHT_CONFIG``."""
    chosen = path or os.environ.get("OPENWEIGHT_CONFIG")
    if not chosen:
        raise ConfigError("no config file: pass --config FILE or set OPENWEIGHT_CONFIG")
    return Path(chosen)


def read_config_file(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The raw mapping in the YAML file (before validation)."""
    file = config_path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping")
    return raw


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read, validate and return the config; raise :class:`ConfigError` naming each bad key."""
    raw = read_config_file(path)
    raw.update(overrides)
    try:
        return Settings(**raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(problems(exc))) from None
