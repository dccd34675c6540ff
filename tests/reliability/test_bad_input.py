"""Bad input: every config validation and the one-line message it gives (the README's table), and a
corrupt image in a tfds dataset, which stops the run with an error naming the record.

The table is :data:`ROWS` (tested here) plus the rows that ``tests/training/test_config_validation.py``
tests (read from its parametrization and :data:`ELSEWHERE`, not repeated). Print it, with the messages
diffax gives today, by ``python tests/reliability/test_bad_input.py``.
"""

import ast
import io
import os
import re
import typing

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # as tests/conftest.py

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO, make_config

from diffax import config as config_lib
from diffax import data

DATA_DIR = "<data_dir>"  # replaced by the directory of the locally built dataset below


class Row(typing.NamedTuple):
    field: str  # dotted path under config, or "--workdir"
    value: object
    expected: str  # the message starts with this; for ELSEWHERE rows, the test that checks it
    setup: tuple[tuple[str, object], ...] = ()  # other fields that make the check reachable


DIGITS = (("input.dataset", "digits"), ("input.image_size", 16))
SQUARES = (("input.dataset", "diffax_test_broken"), ("input.data_dir", DATA_DIR), ("input.channels", 3))

ROWS = [
    Row("total_steps", 0, "config.total_steps: 0 must be positive."),
    Row("optim", "adamw", "config.optim: must be a section (ConfigDict), got 'adamw'."),
    Row("input.batch_size", 0, "config.input.batch_size: 0 must be positive."),
    Row("input.split", "valid", "config.input.split: 'valid'; digits has ('train', 'test', 'all').", DIGITS),
    Row("input.upsample", 0, "config.input.upsample: 0 must be a positive integer.", DIGITS),
    Row("input.channels", 3, "config.input.channels: 3; digits images have 1 channel.", DIGITS),
    Row("input.mixture_components", 0, "config.input.mixture_components: must be at least 1."),
    Row("input.mixture_std", 0.0, "config.input.mixture_std: must be positive."),
    Row(
        "input.dataset",
        "mnist",
        "config.input.dataset: 'mnist' is not prepared under data_dir='/",
        SQUARES[1:],
    ),
    Row("input.split", "valid", "config.input.split: 'valid'; diffax_test_broken has ['train'].", SQUARES),
    Row(
        "input.num_classes",
        3,
        "config.input.num_classes: 3 must be positive and equal the model's",
        (("input.labels", True), ("model.num_classes", 4)),
    ),
    Row("optim.lr", 0.0, "config.optim.lr: 0.0 must be positive."),
    Row("optim.warmup_steps", -1, "config.optim.warmup_steps: -1 must be >= 0."),
    Row("optim.grad_clip", -1.0, "config.optim.grad_clip: -1.0 must be >= 0 (0 turns clipping off)."),
    Row("optim.accum_steps", 0, "config.optim.accum_steps: 0 must be >= 1."),
    Row("optim.min_lr_ratio", 2.0, "config.optim.min_lr_ratio: 2.0 must be in [0, 1]."),
    Row("log.eval_every_steps", 10, "config.evals.inception_weights: empty; a non-digits run is evaluated"),
    Row("evals.num_samples", 1, "config.evals.num_samples: 1 must be at least 2."),
    Row("trainer.name", "reflow_typo", "config.trainer.name: unknown trainer 'reflow_typo'; known:"),
    Row("evals.batch_size", 0, "config.evals.batch_size: 0 must be positive."),
    Row("evals.inception_size", 64, "config.evals.inception_size: 64 must be >= 75."),
    Row("evals.num_reference", 1, "config.evals.num_reference: 1 must be at least 2."),
    Row("ckpt.every_steps", 0, "config.ckpt.every_steps: 0 must be positive."),
    Row("ckpt.keep", 0, "config.ckpt.keep: 0 must be positive."),
    Row("log.every_steps", 0, "config.log.every_steps: 0 must be positive."),
    Row("log.num_samples", 0, "config.log.num_samples: 0 must be positive."),
    Row("sampler.steps", 0, "config.sampler.steps: 0 must be >= 1."),
    Row("sampler.no_such_option", 1, "config.sampler: "),
    Row("sampler.guidance_scale", 2.0, "config.sampler.guidance_scale: needs a labelled run (input.labels)."),
    Row(
        "cpu.eigen_convs",
        True,
        "config.cpu.eigen_convs: no such field; known fields of config.cpu: eigen_conv,",
    ),
    Row("cpu.retain_host_memory", "yes", "config.cpu.retain_host_memory: 'yes' must be True or False."),
]
ELSEWHERE = [  # checked by tests/training/test_config_validation.py outside its parametrization
    Row("optim.lrr", 0.1, "test_nonexistent_key_in_a_config_file_is_named"),
    Row("input.upsample", 3, "test_digits_size_must_match_the_upsampling", DIGITS),
    Row("--workdir", "<a path under a file>", "test_unwritable_workdir_is_named"),
]


def _training_rows() -> list[Row]:
    """The rows of ``test_bad_field_is_named_in_one_line``'s parametrization, read from its source."""
    source = (REPO / "tests" / "training" / "test_config_validation.py").read_text()
    [test] = [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef) and node.name == "test_bad_field_is_named_in_one_line"
    ]
    [decorator] = [d for d in test.decorator_list if isinstance(d, ast.Call) and d.func.attr == "parametrize"]
    return [Row(field, value, named) for field, value, named in ast.literal_eval(decorator.args[1])]


def _set(config: ml_collections.ConfigDict, field: str, value, data_dir: str) -> None:
    *sections, key = field.split(".")
    section = config
    for name in sections:
        section = section[name]
    with section.ignore_type(), section.unlocked():
        section[key] = data_dir if value == DATA_DIR else value


def message(row: Row, *, data_dir: str, workdir: str) -> str:
    """The ConfigError that ``diffax.config.validate`` raises for ``row``."""
    config = make_config()
    for field, value in (*row.setup, (row.field, row.value)):
        if field != "--workdir":
            _set(config, field, value, data_dir)
    if row.field == "--workdir":  # a directory that cannot be created: its parent is a file
        blocker = os.path.join(workdir, "a_file")
        open(blocker, "w").close()
        workdir = os.path.join(blocker, "run")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, workdir=workdir)
    return str(error.value)


class DiffaxTestBroken(tfds.core.GeneratorBasedBuilder):
    """16 labelled 12×10 RGB images built locally; record 5 holds bytes that are no PNG."""

    VERSION = tfds.core.Version("1.0.0")
    BROKEN = 5

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(12, 10, 3)),
            "label": tfds.features.ClassLabel(num_classes=4),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(16):
            image = (
                io.BytesIO(b"\x89PNG\r\n\x1a\n no image")
                if i == self.BROKEN
                else np.full((12, 10, 3), i, np.uint8)
            )
            yield i, {"image": image, "label": i % 4}


def build_broken_dataset(data_dir: str) -> str:
    """Prepares :class:`DiffaxTestBroken` under ``data_dir``; the tfds id of its undecodable record."""
    builder = DiffaxTestBroken(data_dir=data_dir)
    builder.download_and_prepare()
    read_config = tfds.ReadConfig(add_tfds_id=True)
    records = builder.as_dataset(
        split="train", read_config=read_config, decoders={"image": tfds.decode.SkipDecoding()}
    )
    [broken] = [r["tfds_id"].decode() for r in tfds.as_numpy(records) if b"no image" in r["image"]]
    return broken


@pytest.fixture(scope="module")
def broken_dataset(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return data_dir, build_broken_dataset(data_dir)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.field}={r.value!r}" for r in ROWS])
def test_each_validation_gives_its_one_line_message(row, broken_dataset, tmp_path):
    text = message(row, data_dir=broken_dataset[0], workdir=str(tmp_path))
    assert text.startswith(row.expected) and "\n" not in text, text


def test_the_table_covers_every_validation_in_the_config_module():
    source = (REPO / "diffax" / "config.py").read_text()
    fields = set(re.findall(r'"config\.([a-z_.]+)"', source)) - {"json"}  # field names, not "config.json"
    fields |= {f for f in re.findall(r'"((?:ckpt|log)\.[a-z_]+)"', source)}  # the positive-count loop
    named = {
        row.expected.split(":")[0].split("=")[0].removeprefix("config.") for row in ROWS + _training_rows()
    }
    named |= {row.field for row in ELSEWHERE}
    covered = {".".join(name.split(".")[:n]) for name in named for n in range(1, name.count(".") + 2)}
    assert fields <= covered, fields - covered
    training = (REPO / "tests" / "training" / "test_config_validation.py").read_text()
    assert all(f"def {row.expected}(" in training for row in ELSEWHERE)  # those tests still exist


def test_an_undecodable_image_stops_the_input_naming_the_record(broken_dataset):
    data_dir, broken = broken_dataset
    config = make_config()
    for field, value in (*SQUARES, ("input.shuffle_buffer", 16)):
        _set(config, field, value, data_dir)
    config_lib.validate(config)
    pipeline = data.make_pipeline(config.input, seed=config.seed)  # what train_and_evaluate reads
    with pytest.raises(ValueError, match=rf"^config.input.dataset: record {re.escape(broken)} of") as error:
        for step in range(4):  # two epochs of 8-image batches: the broken record is read
            pipeline.get(step)
    assert "\n" not in str(error.value)


def markdown_table(data_dir: str, workdir: str) -> str:
    """The README table: field, a bad value, the message (as diffax gives it now)."""
    lines = ["| field | bad value | message |", "|---|---|---|"]
    for row in sorted(ROWS + ELSEWHERE + _training_rows(), key=lambda r: r.field.lstrip("-")):
        text = message(row, data_dir=data_dir, workdir=workdir).replace("|", "\\|")
        lines.append(f"| `{row.field}` | `{row.value!r}` | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import contextlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()):  # tfds reports preparing the dataset
            build_broken_dataset(os.path.join(tmp, "tfds"))
        print(markdown_table(os.path.join(tmp, "tfds"), tmp))
