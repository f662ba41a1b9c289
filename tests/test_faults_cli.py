"""User errors through the ``unitok`` command line: one line ``unitok COMMAND: error: ...`` (or argparse's
usage line) and exit status 2, never a traceback; unexpected exceptions keep theirs."""

from __future__ import annotations

import types

import pytest
import torch

from unitok.data.synth import SynthConfig, generate_world
from unitok.scripts import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, SynthConfig(num_images=20, size=32, classify_per_class=0), workers=1)
    return root


def train_args(out, world, *extra: str) -> list[str]:
    return [
        "train-tokenizer",
        "--config",
        "unitok-tiny-synth",
        "--out",
        str(out),
        "--set",
        f"data.path={world}",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.device=cpu",
        "--set",
        "train.local_batch_size=4",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "logging.tensorboard=false",
        *extra,
    ]


def one_line_error(capsys, argv: list[str], expected: str) -> str:
    """Run the command line; it must exit 2 with one error line holding ``expected`` and no traceback."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and expected in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    return err


def test_run_errors_are_one_line(world, tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, train_args(out, world, "--set", "model.overrides.image_size=63"), "63")
    one_line_error(capsys, train_args(out, tmp_path / "no-such-data"), "no-such-data does not exist")
    one_line_error(
        capsys, train_args(out, world, "--set", "train.local_batch_size=64"), "smaller than one global batch"
    )
    one_line_error(capsys, train_args(out, world, "--resume", str(tmp_path / "nowhere")), "--resume")
    afile = tmp_path / "a-file"
    afile.write_text("x")
    one_line_error(capsys, train_args(afile, world), "a-file")
    if not torch.cuda.is_available():
        one_line_error(capsys, train_args(out, world, "--set", "train.device=cuda"), "no CUDA device")


def test_config_errors_are_one_line(tmp_path, capsys):
    one_line_error(capsys, ["train-tokenizer", "--config", "unitok-tiny-synt"], "no preset of that name")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {total_steps: 3\n")
    one_line_error(capsys, ["train-tokenizer", "--config", str(bad)], f"{bad}:")
    one_line_error(
        capsys, ["train-tokenizer", "--config", "unitok-tiny-synth", "--set", "optim.lr=.inf"], "finite"
    )


def test_argument_errors_are_one_line(tmp_path, capsys):
    base = ["eval-tokenizer", "--preset", "unitok-tiny", "--data", str(tmp_path)]
    one_line_error(capsys, [*base, "--workers", "-1"], "--workers")
    one_line_error(capsys, [*base, "--image-size", "0"], "--image-size")
    one_line_error(capsys, ["data", "synth", "--out", str(tmp_path / "w"), "--workers", "-1"], "workers")
    afile = tmp_path / "f"
    afile.write_text("")
    one_line_error(capsys, ["data", "synth", "--out", str(afile), "--num-images", "2"], "is a file")


def test_unexpected_exceptions_keep_their_traceback(monkeypatch):
    def broken(argv, prog):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "broken", ("unitok_broken_module", "test"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: types.SimpleNamespace(main=broken))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["broken"])
