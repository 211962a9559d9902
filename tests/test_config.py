"""The one Config: every default lives there, the CLI's flags are derived from it, `--set` works everywhere."""

from __future__ import annotations

import argparse
import json

import pytest

from deeplight.base.config import Config
from deeplight.base.errors import DeeplightError
from deeplight.cli.main import build_parser, main
from deeplight.cli.options import config_from, overrides

COMMANDS_WITH_SETTINGS = ("ingest", "hash", "train", "prune", "sweep", "register", "promote")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", COMMANDS_WITH_SETTINGS)
def test_setting_flags_show_the_config_default_and_every_command_takes_set(command):
    sp = _subparsers()[command]
    settings = [a for a in sp._actions if "." in a.dest]
    assert settings, f"{command} has no flag derived from the Config"
    for a in settings:
        assert a.default is argparse.SUPPRESS  # an unset flag leaves the setting (and its one default) alone
        assert f"Config {a.dest}" in a.help
        shown = Config().get(a.dest)
        if not isinstance(shown, tuple):
            assert f"default {'none' if shown is None else shown}" in a.help
    assert any("--set" in a.option_strings for a in sp._actions)


def test_flags_then_set_reach_the_config():
    a = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--epochs", "3", "--lr", "0.01",
                                   "--set", "train.epochs=4", "--set", "model.dnn=[32,16]"])
    cfg = config_from(a)
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.dnn) == (4, 0.01, (32, 16))  # --set wins over a flag
    assert cfg.train.batch_size == Config().train.batch_size


def test_sweep_flags_fill_the_sweep_section():
    a = build_parser().parse_args(["sweep", "--data", "d", "--out", "o", "--dnn", "0.5:0.9", "--modes", "structured",
                                   "--n-trials", "3", "--set", "sweep.tolerance=0.002"])
    s = config_from(a).sweep
    assert (s.dnn, s.modes, s.n_trials, s.tolerance) == ((0.5, 0.9), ("structured",), 3, 0.002)
    assert set(overrides(a)) == {"sweep.dnn", "sweep.modes", "sweep.n_trials", "sweep.tolerance"}


def test_one_default_model_name_everywhere():
    from pipelines.deeplight_pipeline import deeplight_pipeline
    from pipelines.sweep_pipeline import sweep_pipeline

    name = Config().registry.model_name
    for fn in (deeplight_pipeline, sweep_pipeline):
        assert fn.component_spec.inputs["model_name"].default == name
    for command in ("register", "promote", "sweep"):
        assert config_from(_subparsers()[command].parse_args(
            ["--data", "d", "--out", "o"] if command == "sweep" else
            ["--model", "m", "--data", "d"] if command == "register" else [])).registry.model_name == name


def test_unknown_or_malformed_settings_are_clear_errors(capsys):
    assert main(["promote", "--set", "promote.nope=1"]) == 2
    assert "unknown setting 'promote.nope'" in capsys.readouterr().err
    assert main(["promote", "--set", "tolerance"]) == 2
    assert "want section.key=value" in capsys.readouterr().err
    with pytest.raises(DeeplightError, match="unknown setting"):
        Config().get("train.nope")


def test_pipeline_set_travels_as_config_overrides():
    from deeplight.cli.pipeline import pipeline_arguments

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="c")
    from deeplight.cli.pipeline import add_pipeline_settings

    add_pipeline_settings(sub.add_parser("x"))
    a = p.parse_args(["x", "--set", "model.dnn=[16]", "--set", "train.batch_size=512"])
    args = pipeline_arguments(a)
    assert json.loads(args["config_overrides"]) == {"model.dnn": [16], "train.batch_size": 512}
    bad = p.parse_args(["x", "--set", "train.nope=1"])
    with pytest.raises(DeeplightError, match="unknown setting 'train.nope'"):
        pipeline_arguments(bad)


def test_every_model_name_in_the_docs_and_code_is_the_one_default():
    """One registered-model name (issue 19, item 3): README and docstrings name models:/<Config default>."""
    import re
    from pathlib import Path

    from deeplight.base.config import Config

    repo = Path(__file__).resolve().parents[1]
    default = Config().registry.model_name
    files = [repo / "README.md", *sorted((repo / "deeplight").rglob("*.py")), *sorted((repo / "components").rglob("*.py"))]
    names = {}
    for f in files:
        text = f.read_text()
        for m in re.finditer(r"models:/([A-Za-z][\w.-]*)[@/]|--model-name ([a-z][\w-]*)|(?:register|promote) \[?--name ([a-z][\w-]*)|"
                             r"model_name=\"([\w-]+)\"", text):
            name = next(g for g in m.groups() if g)
            if name not in ("NAME", "ctr"):
                names.setdefault(name, []).append(f.relative_to(repo).as_posix())
    assert set(names) == {default}, names


def test_a_config_saved_before_the_search_was_the_default_prunes_with_its_budget():
    """Dense checkpoints from before prune.auto hold prune.max_auc_loss None ("no search") and no `auto` key;
    such a config must still load (config_of reads it, e.g. for a sweep's check of a trial's training settings)
    and give the search's default budget, not crash on None."""
    from deeplight.steps.pipeline import prune_label

    old = Config().to_dict()
    old["prune"]["max_auc_loss"] = None
    del old["prune"]["auto"]
    cfg = Config.from_dict(json.loads(json.dumps(old)))
    assert cfg.prune.auto and cfg.prune.max_auc_loss == 0.001
    assert prune_label(cfg) == "auto-max-auc-loss0p001"


def test_pruning_takes_the_model_and_training_from_the_checkpoint_and_todays_prune_settings(tmp_path):
    """`deeplight prune` and a sweep over a given dense checkpoint: data/features/model/train come from the
    checkpoint; prune settings (and everything else) from today's defaults, then the command line. A checkpoint
    trained when the prune lr default was 1e-4 and there was no search must not prune that way unasked."""
    from deeplight.model import checkpoint
    from deeplight.model.prune import config_for_pruning
    from deeplight.ops.sweep.run import base_config

    trained = Config().replace(**{"model.dnn": [16, 8], "train.batch_size": 256, "train.weight_decay": 1e-6,
                                  "data.dataset": "avazu", "prune.lr": 1e-4, "prune.auto": False,
                                  "prune.distill_weight": 0.0, "registry.model_name": "old-name"})
    path = tmp_path / "best.pt"
    checkpoint.save({"spec": {"field_sizes": [3, 4]}, "model": {}, "config": trained.to_json()}, path)

    cfg = config_for_pruning(path)
    assert (cfg.data, cfg.features, cfg.model, cfg.train) == (trained.data, trained.features, trained.model,
                                                              trained.train)
    assert cfg.prune == Config().prune and cfg.prune.lr != 1e-4 and cfg.prune.auto
    assert cfg.registry == Config().registry
    a = build_parser().parse_args(["prune", "--dense", str(path), "--data", "d", "--out", "o",
                                   "--set", "prune.distill_weight=0.5"])
    assert config_from(a, config_for_pruning(path)).prune.distill_weight == 0.5  # the command line still wins
    swept = base_config({"prune.ramp_epochs": 1.0}, dense=path)
    assert swept.model == trained.model and swept.prune.lr == Config().prune.lr and swept.prune.ramp_epochs == 1.0
