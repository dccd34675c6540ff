"""Bad configs stop before anything compiles, with one line that names the field."""

import importlib
import pathlib

import pytest
from conftest import run_main

from diffax import config as config_lib
from diffax import data, train
from experiments import mixture


def _bad(mixture_config, field, value):
    section, key = field.split(".")
    mixture_config[section][key] = value
    return mixture_config


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("input.dataset", "no_such_dataset", "config.input.dataset: unknown dataset 'no_such_dataset'"),
        ("model.name", "no_such_model", "config.model: models.get: unknown model 'no_such_model'"),
        ("sampler.name", "no_such_sampler", "config.sampler.name: unknown sampler 'no_such_sampler'"),
        ("optim.name", "no_such_optimizer", "config.optim.name: unknown optimizer 'no_such_optimizer'"),
        ("input.batch_size", 12, "config.input.batch_size=12 does not divide over 8 devices"),
        ("process.name", "no_such_schedule", "config.process: Unknown schedule 'no_such_schedule'"),
        ("loss.name", "no_such_loss", "config.loss: "),
        ("optim.decay", "step", "config.optim.decay: unknown decay 'step'"),
        ("mesh.fsdp", 3, "config.mesh.data=-1"),
        ("input.image_size", 0, "config.input.image_size: 0 must be positive"),
        ("ema.decays", (1.5,), "config.ema.decays: 1.5"),
        ("ema.std_rels", (0.5,), "config.ema.std_rels: std_rel 0.5 must be in (0, 0.2887)"),
    ],
)
def test_bad_field_is_named_in_one_line(mixture_config, tmp_path, field, value, named):
    config = _bad(mixture_config, field, value)
    with pytest.raises(config_lib.ConfigError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert message.startswith(named) and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()  # stopped before building anything


def test_nonexistent_key_in_a_config_file_is_named(mixture_config, tmp_path):
    mixture_config.optim.lrr = 1e-3  # a typo of lr, added by an experiment file
    with pytest.raises(config_lib.ConfigError, match=r"^config.optim.lrr: no such field; known fields"):
        config_lib.validate(mixture_config, workdir=str(tmp_path))


def test_unwritable_workdir_is_named(mixture_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(config_lib.ConfigError, match=rf"^--workdir={blocker}/run: not writable"):
        config_lib.validate(mixture_config, workdir=str(blocker / "run"))


def test_digits_size_must_match_the_upsampling(mixture_config):
    mixture_config.input.dataset = "digits"
    mixture_config.input.image_size = 16
    mixture_config.input.upsample = 3
    with pytest.raises(
        config_lib.ConfigError, match="config.input.image_size: 16 must equal 8 \\* upsample = 24"
    ):
        config_lib.validate(mixture_config)


@pytest.mark.parametrize("name", ["digits", "mixture", "cifar10", "imagenet64", "dit"])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_experiment_configs_are_valid(name, arg):
    config = importlib.import_module(f"experiments.{name}").get_config(arg)
    if config.input.dataset not in data.BUILTIN_DATASETS:
        config.input.dataset = "mixture"  # tfds sets are not prepared here; every other field is checked
    config_lib.validate(config)


EXPERIMENT_FILES = sorted(
    path.stem
    for path in (pathlib.Path(__file__).resolve().parents[2] / "experiments").glob("*.py")
    if "def get_config" in path.read_text()
)


@pytest.mark.parametrize("name", EXPERIMENT_FILES)
def test_every_experiment_file_builds_its_config(name):
    """Each experiment's get_config() runs (a file that edits a field its base no longer has fails here)."""
    config = importlib.import_module(f"experiments.{name}").get_config()
    assert config.input.dataset and config.total_steps > 0


def test_unknown_command_line_key_is_one_line(tmp_path):
    from diffax import main as main_lib  # defines the CLI flags

    argv = ["diffax.main", f"--config={mixture.__file__}", f"--workdir={tmp_path}", "--config.optim.lrr=0.1"]
    with pytest.raises(
        SystemExit, match=r"^diffax: invalid config override --config.optim.lrr=0.1: no such field"
    ) as e:
        main_lib._parse_flags(argv)
    assert "\n" not in str(e.value)


def test_command_line_config_error_is_one_line(tmp_path):
    bad = run_main(tmp_path, "--config.input.batch_size=12")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("diffax: invalid config: config.input.batch_size=12 does not divide"), last


def test_cpu_settings_are_checked_before_they_are_applied(tmp_path):
    experiment = tmp_path / "typo.py"
    experiment.write_text(
        "from experiments import mixture\n\n\n"
        "def get_config(arg=None):\n"
        "    config = mixture.get_config(arg)\n"
        "    config.cpu.eigen_convs = True\n"
        "    return config\n"
    )
    bad = run_main(tmp_path / "run", config=experiment, num_devices=1, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("diffax: invalid config: config.cpu.eigen_convs: no such field; known fields"), (
        last
    )
    assert not (tmp_path / "run").exists()
