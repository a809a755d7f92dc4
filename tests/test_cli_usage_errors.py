"""Every vqtok command ends a usage error (unknown flag, bad value) with one line and exit 2."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.cli import parse_args as serve_args
from service.tokenize import main as tokenize_main
from training.ablation import main as ablation_main
from training.cli import main as train_main
from training.evaluate import main as eval_main
from training.export import main as export_main
from training.model_card import main as card_main
from training.select import main as select_main

COMMANDS: dict[str, Callable] = {
    "vqtok-serve": serve_args,
    "vqtok-tokenize": tokenize_main,
    "vqtok-train": train_main,
    "vqtok-eval": eval_main,
    "vqtok-select": select_main,
    "vqtok-export": export_main,
    "vqtok-ablation": ablation_main,
    "model_card": card_main,
}


REQUIRED = {
    "vqtok-train": ["--config", "x.yaml"],
    "vqtok-export": ["ckpt", "--out", "out"],
    "vqtok-tokenize": ["photos", "--out", "tokens"],
}


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unknown_flag_is_one_line_and_exit_2(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        COMMANDS[name]([*REQUIRED.get(name, []), "--no-such-flag", "7"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    assert "--no-such-flag" in err and "--help)" in err


def test_a_bad_value_names_the_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        serve_args(["--port", "eighty"])
    err = capsys.readouterr().err
    assert err == (
        "vqtok-serve: error: argument --port: invalid int value: 'eighty' "
        "(see vqtok-serve --help)\n"
    )
