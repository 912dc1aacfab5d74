"""TrainConfig: sections validated on construction, flat reads, option lists from their owners."""

import argparse
import json

import pytest

from mpisgd.errors import ConfigError
from mpisgd.training.config import SETTINGS, TrainConfig, add_train_arguments, train_config_from
from mpisgd.training.registry import STRATEGIES, TrainResult


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return train_config_from(parser.parse_args(list(argv)))


def test_flat_names_read_the_sections():
    cfg = parse("--strategy", "downpour", "--servers", "2", "--server-rule", "sgd", "--batch-size", "8")
    assert (cfg.servers, cfg.server_rule, cfg.batch_size) == (2, "sgd", 8)
    assert cfg.downpour.server_rule == "sgd" and cfg.common.servers == 2
    with pytest.raises(AttributeError):
        cfg.no_such_setting  # noqa: B018


def test_every_setting_is_read_by_a_known_strategy():
    assert all(set(s.used_by) <= set(STRATEGIES) and s.used_by for s in SETTINGS.values())


def test_option_lists_come_from_their_owners():
    from mpisgd.comm.communicator import ALGORITHM_NAMES
    for name in ALGORITHM_NAMES:
        assert parse("--algorithm", name).algorithm == name
    with pytest.raises(ConfigError, match="--schedule must be one of constant, step, cosine"):
        parse("--schedule", "linear")


def test_an_ignored_setting_names_who_reads_it(tmp_path):
    with pytest.raises(ConfigError, match="--history is not used by --strategy sync; it is read by "
                                          "--strategy sandblaster only"):
        parse("--history", "5")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"dc-lambda": 0.1}))
    with pytest.raises(ConfigError, match=r"--dc-lambda \(set in .*run.json\) is not used by --strategy downpour"):
        parse("--strategy", "downpour", "--config", str(config))
    assert parse("--strategy", "dcasgd", "--config", str(config)).dc_lambda == 0.1


def test_flags_win_over_the_file_and_unknown_keys_are_named(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 7\nmax-steps = 3\n')
    assert (parse("--config", str(config), "--max-steps", "2").epochs, parse("--config", str(config)).max_steps) \
        == (7, 3)
    config.write_text("epochz = 2\n")
    with pytest.raises(ConfigError, match="unknown setting 'epochz'"):
        parse("--config", str(config))


def test_with_settings_revalidates():
    cfg = TrainConfig().with_settings(epochs=3)
    assert cfg.epochs == 3
    with pytest.raises(ConfigError, match="--epochs must be positive"):
        cfg.with_settings(epochs=0)


def test_train_result_reads_like_the_summary():
    result = TrainResult.from_summary("sync", {"steps": 4, "stopped": "epochs", "val_accuracy": 0.5,
                                               "global_batch": 16}, 1.5)
    assert (result.steps, result["global_batch"], result.get("val_accuracy")) == (4, 16, 0.5)
