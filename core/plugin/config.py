"""Per-plugin configuration: option defaults for a plugin's methods, from the environment
(``MODELPRESS_PLUGIN_<PLUGIN>_<OPTION>=value``) and from a recipe's ``plugins:`` section.

``<PLUGIN>`` is the plugin's registered name (its entry-point name; ``modelpress plugins`` lists
them), ``<OPTION>`` the option's name, both upper-cased with every character that is not a
letter or a digit as ``_``: ``MODELPRESS_PLUGIN_QUANTIZE_MAX_SAMPLES=64``. A value is read as
YAML (``8``, ``0.5``, ``true``, ``[a, b]``), else as the string given. They are defaults: an
option given explicitly (a keyword argument, a command-line flag, a recipe pass's ``options``)
wins, and a recipe's ``plugins:`` section wins over the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from modelpress.plugin.methods import Method

__all__ = ["ENV_PREFIX", "env_defaults", "env_name"]

ENV_PREFIX = "MODELPRESS_PLUGIN_"


def _upper(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def env_name(plugin: str, option: str) -> str:
    """The environment variable that sets ``option``'s default for ``plugin``'s methods."""
    return f"{ENV_PREFIX}{_upper(plugin)}_{_upper(option)}"


def _value(text: str) -> Any:
    # NOTE: imported here: only a variable that is set is read (18 modules, ~1 MB, on every apply otherwise)
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def env_defaults(
    method: Method, environ: Mapping[str, str] | None = None
) -> dict[str, tuple[str, Any]]:
    """``{option: (variable, value)}`` for each option of ``method`` set in the environment."""
    environ = os.environ if environ is None else environ
    if not method.plugin:
        return {}
    found = {}
    for option in method.options.model_fields:
        variable = env_name(method.plugin, option)
        if variable in environ:
            found[option] = (variable, _value(environ[variable]))
    return found
