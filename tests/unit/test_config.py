"""Settings from a TOML file named by FAREBOX_CONFIG and from FAREBOX_* variables (which win), with defaults that
run the demo; an unknown key in the file is an error that names the known ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from farebox.config import load_settings


def test_defaults_put_everything_under_var():
    s = load_settings({})
    assert s.var_dir == Path("var") and s.tokens_path == Path("var/api-tokens.toml")
    assert s.effective_database_url == f"sqlite:///{Path('var/backoffice.db').resolve()}"


def test_the_file_sets_the_token_file_and_a_variable_overrides_it(tmp_path):
    conf = tmp_path / "farebox.toml"
    conf.write_text('var_dir = "/srv/farebox"\napi_tokens_file = "/etc/farebox/tokens.toml"\n')
    s = load_settings({"FAREBOX_CONFIG": str(conf)})
    assert s.tokens_path == Path("/etc/farebox/tokens.toml") and s.var_dir == Path("/srv/farebox")
    s = load_settings({"FAREBOX_CONFIG": str(conf), "FAREBOX_API_TOKENS": "/run/tokens.toml"})
    assert s.tokens_path == Path("/run/tokens.toml")


def test_an_unknown_key_names_the_known_ones(tmp_path):
    conf = tmp_path / "farebox.toml"
    conf.write_text('api_token_file = "x"\n')
    with pytest.raises(ValueError, match=r"unknown settings \['api_token_file'\].*api_tokens_file"):
        load_settings({"FAREBOX_CONFIG": str(conf)})
