"""Command-line options derived from the one Config: a flag's default and help come from `Config()`, and every
command that takes settings accepts `--set section.key=value` (repeatable, JSON values), applied last.

    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> setting(p, "--epochs", "train.epochs", int, "dense training epochs")
    >>> add_set(p)
    >>> a = p.parse_args(["--epochs", "3", "--set", "model.dnn=[16]"])
    >>> overrides(a)
    {'train.epochs': 3, 'model.dnn': [16]}
    >>> config_from(a).train.epochs, config_from(a).model.dnn
    (3, (16,))
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from deeplight.base.config import Config, parse_sets

DEFAULTS = Config()


def _shown(value: Any, sep: str = ",") -> str:
    if isinstance(value, tuple):
        return sep.join(str(v) for v in value) if value else "none"
    return "none" if value is None else str(value)


def setting(parser: Any, flag: str, key: str, type: Callable[[str], Any] | None = None, help: str = "",
            sep: str = ",", **kw: Any) -> None:
    """A flag for the Config setting `key`; unset flags leave the setting alone (argparse.SUPPRESS). `sep` joins
    a tuple default as the flag writes it (0.8,0.1,0.1 or LOW:HIGH)."""
    default = _shown(DEFAULTS.get(key), sep)
    text = f"{help} (default {default}; Config {key})" if help else f"default {default}; Config {key}"
    if "choices" not in kw:
        kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument(flag, dest=key, type=type, default=argparse.SUPPRESS, help=text, **kw)


def add_set(parser: Any) -> None:
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", dest="set_items",
                        help="any Config setting, e.g. train.weight_decay=1e-5 or model.dnn=[400,400] "
                             "(repeatable; JSON values; applied after the other flags)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    """Dotted settings given on the command line: the setting flags, then --set (which wins)."""
    out = {k: v for k, v in vars(a).items() if "." in k}
    out.update(parse_sets(getattr(a, "set_items", None)))
    return out


def config_from(a: argparse.Namespace, base: Config | None = None) -> Config:
    """`base` (default: Config()) with the command line's settings applied."""
    return (base or Config()).replace(**overrides(a))
