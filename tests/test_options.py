"""The one table of settings: every setting in it once, each with its flag, help and check."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from krita_sdxl.backend.cli.main import build_parser
from krita_sdxl.backend.cli.options import OPTIONS, merge, resolve
from krita_sdxl.backend.common.config import ConfigError, Settings


def test_every_setting_has_exactly_one_option():
    assert sorted(o.name for o in OPTIONS) == sorted(f.name for f in fields(Settings))


def test_every_option_reaches_settings_from_flags_and_from_toml(tmp_path):
    """Each flag fills its own field (the parser, TOML reader and Settings agree on every name)."""
    for option in OPTIONS:
        default = getattr(Settings(), option.name)
        if isinstance(default, bool):
            flag_args, value = [option.flag], not default
        elif option.choices:
            value = next(c for c in option.choices if c != default)
            flag_args = [option.flag, value]
        elif isinstance(default, str):
            value = "cpu" if option.name == "device" else "ipc:///tmp/x.sock" if option.name == "endpoint" else "v"
            flag_args = [option.flag, value]
        else:
            value = type(default)(default + 8) if option.name != "heartbeat_timeout" else 30.0
            if option.name == "max_prompt_chars":  # its default is the protocol's own limit: only lower is valid
                value = default - 8
            flag_args = [option.flag, str(value)]
        args = build_parser().parse_args(["serve", "--config", "/dev/null", *flag_args])
        assert getattr(resolve(args), option.name) == value, option.name
        toml = tmp_path / f"{option.name}.toml"
        rendered = str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')
        toml.write_text(f"[serve]\n{option.name} = {rendered}\n")
        assert getattr(resolve(build_parser().parse_args(["serve", "--config", str(toml)])), option.name) == value


def test_the_checks_name_the_source():
    with pytest.raises(ConfigError, match=r"c.toml: heartbeat_timeout = nan: must be a number of seconds"):
        merge(Settings(), {"heartbeat_timeout": float("nan")}, "c.toml", toml=True)
    with pytest.raises(ConfigError, match=r"--max-pixels 4: must be a whole number"):
        merge(Settings(), {"max_pixels": 4}, "command line")
    with pytest.raises(ConfigError, match="unknown setting 'devise'"):
        merge(Settings(), {"devise": "cpu"}, "c.toml", toml=True)
    assert merge(Settings(), {"tile-threshold": "1024x1024"}, "c.toml", toml=True).tile_threshold == 1024 * 1024


def test_refine_offers_only_the_local_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    refine_flags = {s for a in sub.choices["refine"]._actions for s in a.option_strings}
    for option in OPTIONS:
        if option.name != "endpoint":  # refine has its own --endpoint: where to connect
            assert (option.flag in refine_flags) == (option.where in ("local", "common")), option.name
    args = parser.parse_args(["refine", "in.png", "-o", "o.png", "--local", "--endpoint", "tcp://10.0.0.1:1"])
    assert resolve(args).endpoint == Settings().endpoint
