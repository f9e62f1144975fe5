"""Configuration: defaults < file < environment < overrides, and errors that say where."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import pytest

from taskomatic import config
from taskomatic.config import SETTINGS, Config, ConfigError, load, parse_overrides, read_file, settings_table


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read the machine's /etc/taskomatic/taskomatic.conf."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent" / "taskomatic.conf"))


def write(tmp_path: Path, text: str, name: str = "taskomatic.conf") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def file_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_file(path)
    assert info.value.path == path
    assert path in str(info.value)
    return info.value


# -- the settings list -------------------------------------------------------------


def test_settings_and_config_fields_agree() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)), "a setting name is declared twice"
    config_fields = {f.name: f.default for f in fields(Config) if f.compare}
    assert set(names) == set(config_fields)
    for setting in SETTINGS:
        assert config_fields[setting.name] == setting.default, setting.name


def test_defaults_without_any_source() -> None:
    cfg = load(None, environ={}, overrides={})
    assert cfg == Config()
    assert cfg.shards == 4
    assert cfg.mode == "standalone"
    assert cfg.dsn == ""
    assert cfg.source_path is None


def test_settings_table_lists_every_setting() -> None:
    table = settings_table()
    lines = table.splitlines()
    assert lines[0].startswith("| setting |")
    assert len(lines) == 2 + len(SETTINGS)
    for setting in SETTINGS:
        row = [line for line in lines if f"`[{setting.section}] {setting.name}`" in line]
        assert len(row) == 1, setting.name
        assert f"`{setting.env_var}`" in row[0]
        assert setting.help in row[0]
    assert "`TASKOMATIC_SHARDS`" in table and "`TASKOMATIC_DSN`" in table


def test_env_var_names() -> None:
    by_name = {s.name: s for s in SETTINGS}
    assert by_name["shards"].env_var == "TASKOMATIC_SHARDS"
    assert by_name["dsn"].env_var == "TASKOMATIC_DSN"


# -- precedence --------------------------------------------------------------------


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = 6\nmode = multihost\n\n[database]\ndsn = dbname=x\n")
    cfg = load(path, environ={})
    assert (cfg.shards, cfg.mode, cfg.dsn) == (6, "multihost", "dbname=x")
    assert cfg.claim_batch == 200  # untouched settings keep their default
    assert cfg.source_path == path


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = 6\n[database]\ndsn = dbname=file\n")
    cfg = load(path, environ={"TASKOMATIC_SHARDS": "9", "TASKOMATIC_DSN": "dbname=env"})
    assert cfg.shards == 9
    assert cfg.dsn == "dbname=env"


def test_overrides_beat_environment_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = 6\n")
    cfg = load(path, environ={"TASKOMATIC_SHARDS": "9"}, overrides={"shards": 12})
    assert cfg.shards == 12


def test_none_override_means_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = 6\n")
    cfg = load(path, environ={"TASKOMATIC_SHARDS": "9"}, overrides={"shards": None})
    assert cfg.shards == 9


def test_full_chain_each_layer_wins_only_its_settings(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = 6\nclaim_batch = 50\npoll_interval = 0.5\n")
    cfg = load(path, environ={"TASKOMATIC_CLAIM_BATCH": "70", "TASKOMATIC_POLL_INTERVAL": "0.25"},
               overrides=parse_overrides(["daemon.poll_interval=0.125"]))
    assert cfg.shards == 6  # file
    assert cfg.claim_batch == 70  # environment
    assert cfg.poll_interval == 0.125  # override
    assert cfg.drain_timeout == 300.0  # default


def test_unrelated_environment_is_ignored() -> None:
    cfg = load(None, environ={"SHARDS": "3", "TASKOMATIC_NOPE": "1", "PGHOST": "/tmp"})
    assert cfg == Config()


def test_environment_value_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ={"TASKOMATIC_SHARDS": "lots"})
    assert "TASKOMATIC_SHARDS" in str(info.value)
    with pytest.raises(ConfigError, match="TASKOMATIC_SHARDS"):
        load(None, environ={"TASKOMATIC_SHARDS": "0"})


def test_environment_bool() -> None:
    assert load(None, environ={"TASKOMATIC_SHUTDOWN_POWEROFF_FALLBACK": "yes"}).shutdown_poweroff_fallback is True
    assert load(None, environ={"TASKOMATIC_SHUTDOWN_POWEROFF_FALLBACK": "off"}).shutdown_poweroff_fallback is False


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = 3\n")
    cfg = load(None, environ={"TASKOMATIC_CONFIG": path})
    assert cfg.shards == 3
    assert cfg.source_path == path


def test_explicit_path_beats_config_environment(tmp_path: Path) -> None:
    mine = write(tmp_path, "[daemon]\nshards = 3\n", "mine.conf")
    other = write(tmp_path, "[daemon]\nshards = 5\n", "other.conf")
    assert load(mine, environ={"TASKOMATIC_CONFIG": other}).shards == 3


def test_default_file_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[daemon]\nshards = 7\n", "default.conf")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    cfg = load(None, environ={})
    assert cfg.shards == 7
    assert cfg.source_path == path


def test_absent_default_file_is_fine() -> None:
    assert not os.path.exists(config.DEFAULT_CONFIG_PATH)
    assert load(None, environ={}).shards == 4


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        load(missing, environ={})
    assert info.value.path == missing
    assert "not found" in info.value.reason
    assert missing in str(info.value)


def test_missing_file_from_config_environment_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        load(None, environ={"TASKOMATIC_CONFIG": missing})
    assert info.value.path == missing


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = 3\n")
    os.chmod(path, 0)
    try:
        with pytest.raises(ConfigError) as info:
            read_file(path)
    finally:
        os.chmod(path, 0o644)
    assert info.value.path == path
    assert "permission" in info.value.reason


def test_directory_instead_of_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_file(str(tmp_path))
    assert info.value.path == str(tmp_path)


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"[daemon]\nstate_dir = /var/lib/t\xe9\n")
    with pytest.raises(ConfigError) as info:
        read_file(str(path))
    assert info.value.path == str(path)


# -- file contents -----------------------------------------------------------------


def test_every_setting_can_be_set_in_the_file(tmp_path: Path) -> None:
    samples = {
        "dsn": ("dbname=t host=/run", "dbname=t host=/run"), "connect_timeout": ("2.5", 2.5),
        "mode": ("multihost", "multihost"), "shards": ("3", 3), "state_dir": ("/srv/t", "/srv/t"),
        "routing": ("hash", "hash"), "child_start": ("spawn", "spawn"),
        "claim_batch": ("10", 10), "max_claimed_per_shard": ("20", 20), "poll_interval": ("0.5", 0.5),
        "drain_timeout": ("5", 5.0), "fast_stop_timeout": ("1", 1.0), "heartbeat_timeout": ("9", 9.0),
        "embedded_user": ("pg", "pg"), "log_level": ("DEBUG", "debug"), "emulator": ("/bin/q", "/bin/q"),
        "machine_type": ("q35", "q35"), "shutdown_timeout": ("30", 30.0),
        "shutdown_poweroff_fallback": ("true", True), "vnc_listen": ("0.0.0.0", "0.0.0.0"),
        "save_dir": ("/srv/save", "/srv/save"), "save_dir_shared": ("yes", True), "migration_timeout": ("60", 60.0),
        "migration_uri": ("tcp://10.0.0.5", "tcp://10.0.0.5"),
        "retry_limit": ("3", 3), "retry_backoff_max": ("10", 10.0),
        "keepalive_interval": ("2", 2), "keepalive_count": ("4", 4), "task_timeout": ("100", 100.0),
        "reconcile_interval": ("5", 5.0), "nic_network": ("default", "default"),
        "metrics_port": ("9188", 9188), "metrics_address": ("::1", "::1"),
        "lease_seconds": ("30", 30.0), "lease_renew_interval": ("5", 5.0), "keys_per_shard": ("3", 3),
        "tasks_per_key": ("8", 8), "startup_retry_max": ("30", 30.0), "auto_migrate": ("yes", True),
        "keep_finished": ("30D", "30d"), "archive": ("no", False), "archive_keep": ("Forever", "forever"),
        "retention_interval": ("15", 15.0), "retention_batch": ("200", 200),
    }
    assert set(samples) == {s.name for s in SETTINGS}
    sections: dict[str, list[str]] = {}
    for s in SETTINGS:
        sections.setdefault(s.section, []).append(f"{s.name} = {samples[s.name][0]}")
    text = "".join(f"[{sec}]\n" + "\n".join(lines) + "\n\n" for sec, lines in sections.items())
    values = read_file(write(tmp_path, text))
    assert values == {name: typed for name, (_, typed) in samples.items()}


def test_comments_blank_lines_and_colon_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "# taskomatic\n; another comment\n\n[daemon]\n# shards = 99\nshards: 5\n\n")
    assert read_file(path) == {"shards": 5}


def test_option_names_are_case_insensitive(tmp_path: Path) -> None:
    assert read_file(write(tmp_path, "[daemon]\nShards = 5\n")) == {"shards": 5}


@pytest.mark.parametrize("text, value", [("yes", True), ("On", True), ("1", True), ("TRUE", True),
                                         ("no", False), ("off", False), ("0", False), ("False", False)])
def test_bool_spellings(tmp_path: Path, text: str, value: bool) -> None:
    path = write(tmp_path, f"[libvirt]\nshutdown_poweroff_fallback = {text}\n")
    assert read_file(path) == {"shutdown_poweroff_fallback": value}


def test_unknown_key_names_file_and_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "# header\n[daemon]\nshards = 2\n\n[database]\n# x\n\nbogus_key = 1\n")
    assert error.line == 8
    assert "bogus_key" in error.reason
    assert "dsn" in error.reason  # lists the known ones
    assert f"{error.path}:8:" in str(error)


def test_setting_in_the_wrong_section_is_unknown(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\nmode = standalone\n[logging]\nmode = multihost\n")
    assert error.line == 4
    assert "mode" in error.reason and "[logging]" in error.reason


def test_unknown_section_names_file_and_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\nshards = 2\n\n[deamon]\nshards = 3\n")
    assert error.line == 4
    assert "deamon" in error.reason


@pytest.mark.parametrize("value", ["four", "2.5", "", "3 # comment"])
def test_bad_int_names_line(tmp_path: Path, value: str) -> None:
    error = file_error(tmp_path, f"[daemon]\nmode = standalone\nclaim_batch = {value}\n")
    assert error.line == 3
    assert "daemon.claim_batch" in error.reason


def test_bad_bool_names_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[libvirt]\n\nshutdown_poweroff_fallback = maybe\n")
    assert error.line == 3
    assert "shutdown_poweroff_fallback" in error.reason
    assert "maybe" in error.reason


@pytest.mark.parametrize("value", ["-2", "0"])
def test_shards_below_one_names_line(tmp_path: Path, value: str) -> None:
    error = file_error(tmp_path, f"[daemon]\n\n\nshards = {value}\n")
    assert error.line == 4
    assert "shards" in error.reason
    assert "at least 1" in error.reason


def test_bad_choice_names_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\nmode = cluster\n")
    assert error.line == 2
    assert "standalone" in error.reason


def test_bad_float_names_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\nshards = 2\npoll_interval = -1\n")
    assert error.line == 3


def test_line_without_equals_names_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\n\nshards = 3\nnoequals\n")
    assert error.line == 4
    assert "name = value" in error.reason


def test_setting_before_any_section(tmp_path: Path) -> None:
    error = file_error(tmp_path, "# comment\nshards = 3\n")
    assert error.line == 2
    assert "section" in error.reason


def test_duplicate_key_names_second_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\nshards = 3\nmode = standalone\nshards = 4\n")
    assert error.line == 4
    assert "shards" in error.reason and "twice" in error.reason


def test_duplicate_key_differing_in_case(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\nShards = 3\nshards = 4\n")
    assert error.line == 3


def test_duplicate_section_names_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\nshards = 3\n[daemon]\nmode = multihost\n")
    assert error.line == 3
    assert "daemon" in error.reason


def test_load_reports_file_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = zero\n")
    with pytest.raises(ConfigError) as info:
        load(path, environ={"TASKOMATIC_SHARDS": "3"})
    assert (info.value.path, info.value.line) == (path, 2)


def test_config_error_text() -> None:
    assert str(ConfigError("bad", "/etc/t.conf", 7)) == "/etc/t.conf:7: bad"
    assert str(ConfigError("bad", "/etc/t.conf")) == "/etc/t.conf: bad"
    assert str(ConfigError("bad")) == "bad"
    error = ConfigError("bad", "/etc/t.conf", 7)
    assert (error.reason, error.path, error.line) == ("bad", "/etc/t.conf", 7)


def test_unknown_key_in_default_section_is_reported(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[DEFAULT]\nshardz = 3\n")
    assert error.line == 2


def test_unknown_section_with_trailing_comment_names_line(tmp_path: Path) -> None:
    error = file_error(tmp_path, "[daemon]\nshards = 2\n[deamon] ; typo\nshards = 3\n")
    assert error.line == 3


# -- --set overrides ---------------------------------------------------------------


def test_parse_overrides_types_values() -> None:
    values = parse_overrides(["daemon.shards=3", "database.dsn=host=/run port=5433",
                              "libvirt.shutdown_poweroff_fallback=on", "daemon.poll_interval=0.5"])
    assert values == {"shards": 3, "dsn": "host=/run port=5433", "shutdown_poweroff_fallback": True,
                      "poll_interval": 0.5}


def test_parse_overrides_bare_name() -> None:
    assert parse_overrides(["shards=3"]) == {"shards": 3}


def test_parse_overrides_last_wins() -> None:
    assert parse_overrides(["daemon.shards=3", "daemon.shards=5"]) == {"shards": 5}


def test_parse_overrides_empty() -> None:
    assert parse_overrides([]) == {}


@pytest.mark.parametrize("pair", ["daemon.shards", "daemon.nope=1", "nosuch.shards=3", "=3",
                                  "logging.shards=3", ""])
def test_parse_overrides_rejects_bad_keys(pair: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_overrides([pair])
    assert repr(pair) in info.value.reason


@pytest.mark.parametrize("pair", ["daemon.shards=x", "daemon.shards=0", "daemon.shards=-1",
                                  "daemon.mode=cluster", "libvirt.shutdown_poweroff_fallback=perhaps"])
def test_parse_overrides_rejects_bad_values(pair: str) -> None:
    key = pair.partition("=")[0]
    with pytest.raises(ConfigError, match="--set") as info:
        parse_overrides([pair])
    assert key in info.value.reason


def test_unknown_override_name_in_load() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        load(None, environ={}, overrides={"bogus": 1})


def test_lease_renewal_must_fit_three_times_in_the_lease() -> None:
    with pytest.raises(ConfigError, match=r"lease_renew_interval .* at most a third of lease_seconds"):
        load(None, {"TASKOMATIC_LEASE_SECONDS": "5", "TASKOMATIC_LEASE_RENEW_INTERVAL": "2"})
    config = load(None, {"TASKOMATIC_LEASE_SECONDS": "6", "TASKOMATIC_LEASE_RENEW_INTERVAL": "2"})
    assert (config.lease_seconds, config.lease_renew_interval) == (6.0, 2.0)


def test_a_password_any_local_user_can_read_is_warned_about(tmp_path: Path) -> None:
    path = Path(write(tmp_path, "[database]\ndsn = host=db user=t password=s3cret\n"))
    path.chmod(0o644)
    warning = config.exposed_password_warning(load(str(path), {}))
    assert warning is not None and "0644" in warning and str(path) in warning and "s3cret" not in warning
    path.chmod(0o640)  # group-readable is how the package installs it
    assert config.exposed_password_warning(load(str(path), {})) is None
    no_password = Path(write(tmp_path, "[database]\ndsn = host=db user=t\n", name="other.conf"))
    no_password.chmod(0o644)
    assert config.exposed_password_warning(load(str(no_password), {})) is None


# -- the dsn is checked by libpq's parser when the configuration is read ---------------


def test_a_dsn_libpq_cannot_parse_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[database]\n# the database\ndsn = host=/run dbname=ovirt oops\n")
    with pytest.raises(ConfigError) as info:
        read_file(path)
    assert (info.value.path, info.value.line) == (path, 3)
    assert "not a valid libpq connection string" in info.value.reason
    assert 'missing "=" after "oops"' in info.value.reason


def test_a_bad_dsn_with_a_password_does_not_show_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[database]\ndsn = host=/run password=hunter2 secret-part\n")
    with pytest.raises(ConfigError) as info:
        read_file(path)
    assert "not a valid libpq connection string" in str(info.value)
    assert "hunter2" not in str(info.value) and "secret-part" not in str(info.value)


@pytest.mark.parametrize("dsn", ["", "dbname=t", "host=/run/postgresql dbname=t user=u",
                                 "postgresql://u@db.example.org:5432/t?sslmode=require"])
def test_good_dsns_are_kept_as_given(tmp_path: Path, dsn: str) -> None:
    assert load(write(tmp_path, f"[database]\ndsn = {dsn}\n"), environ={}).dsn == dsn


def test_a_bad_dsn_in_the_environment_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ={"TASKOMATIC_DSN": "dbname='unterminated"})
    assert "TASKOMATIC_DSN" in str(info.value) and "unterminated quoted string" in str(info.value)


def test_startup_retry_max_must_be_positive(tmp_path: Path) -> None:
    assert load(None, environ={}).startup_retry_max == 60.0
    with pytest.raises(ConfigError) as info:
        read_file(write(tmp_path, "[database]\nstartup_retry_max = 0\n"))
    assert info.value.line == 2 and "startup_retry_max" in info.value.reason


@pytest.mark.parametrize(("reason", "permanent"), [
    ('cannot connect to the database: connection to server on socket "/x/.s.PGSQL.5432" failed: '
     "No such file or directory", False),
    ('cannot connect to the database: connection to server at "db" (10.0.0.5), port 5432 failed: '
     "Connection refused", False),
    ("cannot connect to the database: FATAL:  the database system is starting up", False),
    ('cannot connect to the database: could not translate host name "db" to address', False),
    ('cannot connect to the database: FATAL:  password authentication failed for user "t"', True),
    ('cannot connect to the database: FATAL:  database "nope" does not exist', True),
    ('cannot connect to the database: FATAL:  no pg_hba.conf entry for host "10.0.0.9"', True),
])
def test_which_connection_failures_the_daemon_waits_out(reason: str, permanent: bool) -> None:
    from taskomatic.runtime.instance import permanent_refusal as _permanent_refusal

    assert _permanent_refusal(reason) is permanent


# -- one state directory rule, runtime directory, drop-ins, suggestions ------------------------------


def test_state_directory_from_systemd_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/taskomatic:/var/lib/other")
    assert Config(state_dir="/srv/t").resolved_state_dir() == Path("/var/lib/taskomatic")
    monkeypatch.delenv("STATE_DIRECTORY")
    assert Config(state_dir="/srv/t").resolved_state_dir() == Path("/srv/t")


def test_runtime_directory_from_systemd_else_under_the_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert Config(state_dir="/srv/t").resolved_runtime_dir() == Path("/srv/t/run")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/taskomatic")
    assert Config(state_dir="/srv/t").resolved_runtime_dir() == Path("/run/taskomatic")


def test_drop_ins_are_read_after_the_main_file_in_name_order(tmp_path: Path) -> None:
    main = write(tmp_path, "[daemon]\nshards = 2\nclaim_batch = 10\n")
    (tmp_path / "taskomatic.conf.d").mkdir()
    (tmp_path / "taskomatic.conf.d" / "20-b.conf").write_text("[daemon]\nshards = 6\n")
    (tmp_path / "taskomatic.conf.d" / "10-a.conf").write_text("[daemon]\nshards = 5\npoll_interval = 1\n")
    (tmp_path / "taskomatic.conf.d" / "30-c.conf.rpmsave").write_text("[daemon]\nshards = 9\n")
    cfg = load(main, environ={})
    assert (cfg.shards, cfg.claim_batch, cfg.poll_interval) == (6, 10, 1.0)


def test_a_bad_drop_in_line_names_that_file(tmp_path: Path) -> None:
    main = write(tmp_path, "[daemon]\nshards = 2\n")
    (tmp_path / "taskomatic.conf.d").mkdir()
    bad = tmp_path / "taskomatic.conf.d" / "50-x.conf"
    bad.write_text("[daemon]\n\nshards = many\n")
    with pytest.raises(ConfigError) as info:
        load(main, environ={})
    assert f"{bad}:3" in str(info.value)


@pytest.mark.parametrize(("text", "words"), [
    ("[daemon]\nshard = 2\n", "did you mean 'shards'"),
    ("[daemon]\ndsn = x\n", "belongs in [database]"),
])
def test_a_mistyped_setting_gets_a_suggestion(tmp_path: Path, text: str, words: str) -> None:
    assert words in str(file_error(tmp_path, text))


def test_a_mistyped_set_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        parse_overrides(["daemon.poll_intervall=3"])
    assert "did you mean daemon.poll_interval" in str(info.value)


def test_embedded_is_an_explicit_dsn_and_empty_is_none() -> None:
    assert load(None, environ={"TASKOMATIC_DSN": "embedded"}).embedded
    assert not load(None, environ={}).embedded
    assert "TASKOMATIC_DSN" in config.missing_dsn_message(Config())


def test_reload_keeps_overrides_applies_changes_and_holds_restart_only(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nshards = 2\nretry_limit = 8\n[logging]\nlog_level = info\n")
    running = load(path, environ={}, overrides={"log_level": "debug", "poll_interval": 0.5})
    write(tmp_path, "[daemon]\nshards = 6\nretry_limit = 3\npoll_interval = 9\n[logging]\nlog_level = error\n")
    result = config.reload_config(running, environ={})
    assert result.config.log_level == "debug" and result.config.poll_interval == 0.5  # the command line wins
    assert result.changed == {"retry_limit": (8, 3)}
    assert result.restart_only == {"shards": (2, 6)} and result.config.shards == 2


def test_a_readable_password_in_a_drop_in_is_warned_about(tmp_path: Path) -> None:
    main = Path(write(tmp_path, "[daemon]\nshards = 2\n"))
    main.chmod(0o644)
    (tmp_path / "taskomatic.conf.d").mkdir()
    dropin = tmp_path / "taskomatic.conf.d" / "50-db.conf"
    dropin.write_text("[database]\ndsn = host=db user=t password=s3cret\n")
    dropin.chmod(0o644)
    warning = config.exposed_password_warning(load(str(main), {}))
    assert warning is not None and str(dropin) in warning and "s3cret" not in warning
    dropin.chmod(0o640)
    assert config.exposed_password_warning(load(str(main), {})) is None


def test_reload_of_an_embedded_database_keeps_its_resolved_dsn(tmp_path: Path) -> None:
    from taskomatic.cli_common import with_dsn

    path = write(tmp_path, "[database]\ndsn = embedded\n")
    running = with_dsn(load(path, environ={}), "host=/srv/t/postgres/run dbname=taskomatic")
    result = config.reload_config(running, environ={})
    assert result.restart_only == {} and result.config.dsn == running.dsn


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0),
                                                ("7d", 604800.0), ("2W", 1209600.0), ("1.5h", 5400.0),
                                                (" forever ", None)])
def test_retention_durations(text: str, seconds: float | None) -> None:
    from taskomatic.settings import duration_seconds

    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["7 days", "-1d", "d", "7y", "never", ""])
def test_bad_retention_durations_are_refused_with_the_forms_allowed(text: str) -> None:
    with pytest.raises(ConfigError, match="90s, 30m, 12h, 7d or 2w"):
        parse_overrides([f"retention.keep_finished={text}"])


def test_a_deprecated_setting_is_accepted_with_a_warning_naming_it_and_the_file(tmp_path: Path) -> None:
    from taskomatic.config import deprecated_settings_warnings

    path = tmp_path / "taskomatic.conf"
    path.write_text("[multihost]\nkeys_per_shard = 4\nlease_seconds = 12\n")
    config = load(str(path), environ={})
    warnings = deprecated_settings_warnings(config)
    assert len(warnings) == 1
    assert "multihost.keys_per_shard is deprecated and does nothing" in warnings[0] and str(path) in warnings[0]
    from_env = load(str(path), environ={"TASKOMATIC_TASKS_PER_KEY": "3"})
    assert [w.split(" is ")[0] for w in deprecated_settings_warnings(from_env)] == [
        "setting multihost.keys_per_shard", "setting multihost.tasks_per_key"]
    path.write_text("[multihost]\nlease_seconds = 12\n")
    assert deprecated_settings_warnings(load(str(path), environ={})) == []


def test_the_packaged_file_does_not_offer_deprecated_settings() -> None:
    packaged = (Path(__file__).resolve().parents[2] / "packaging" / "rpm" / "taskomatic.conf").read_text()
    deprecated = [s.name for s in SETTINGS if s.deprecated]
    assert deprecated and not [name for name in deprecated if name in packaged]
