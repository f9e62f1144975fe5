"""The Config dataclass and the SETTINGS list (which documents them) must agree."""

from __future__ import annotations

from dataclasses import fields

from taskomatic.config import SETTINGS, Config


def test_every_setting_is_a_config_field_with_the_same_default():
    config_defaults = {f.name: f.default for f in fields(Config) if f.compare}
    documented = {s.name: s.default for s in SETTINGS}
    assert config_defaults == documented


def test_readme_table_is_current():
    from pathlib import Path

    from taskomatic.config import settings_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in readme, "regenerate the README's settings table from settings_table()"
