"""User code named in a config: `module:function` or `path/to/file.py:function` (custom losses, rewards)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ayar.errors import ConfigError


def load_callable(spec: str, field: str):
    """The function `spec` names; a ConfigError naming `field` and the fix when it cannot be found."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{field}: {spec!r} should be `module:function` or `path/to/file.py:function`")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"{field}: file {module_name} not found")
            mod_spec = importlib.util.spec_from_file_location(f"ayar_user_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # `mypkg.losses` next to the config, as `python -m` would find it
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(
            f"{field}: cannot import {module_name!r} ({e}); run from the folder that holds it, "
            "or give a file path: path/to/file.py:function"
        ) from None
    except Exception as e:  # the user's module failed while importing
        raise ConfigError(f"{field}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ConfigError(
            f"{field}: {module_name!r} has no function {attr!r}"
            + (f"; it has: {', '.join(names[:10])}" if names else "")
        )
    return fn
