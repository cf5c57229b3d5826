"""The CLI's fixed choices are read from the modules that own them, without importing torch to
build the parser."""

import subprocess
import sys

import pytest

from anybind.cli import build_parser, main


def _choices(verb: str, option: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "verb").choices[verb]
    return list(next(a for a in sub._actions if option in a.option_strings).choices)


def test_choices_come_from_their_owners():
    from anybind.encoders import POOLINGS
    from anybind.features.precision import PRECISIONS
    from anybind.features.safetensors_io import STORED_DTYPES
    from anybind.serve.index import KINDS

    assert _choices("extract", "--pooling") == list(POOLINGS)
    assert _choices("extract", "--precision") == list(PRECISIONS)
    assert _choices("extract", "--dtype") == list(STORED_DTYPES)
    assert _choices("index", "--kind") == list(KINDS)


def test_a_value_outside_the_choices_is_refused_with_them(capsys):
    with pytest.raises(SystemExit) as e:
        main(["extract", "--encoder", "random:text", "--data", "x", "--dtype", "fp8"])
    assert e.value.code == 2
    assert "invalid choice: 'fp8' (choose from 'fp16', 'bf16', 'fp32')" in capsys.readouterr().err


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from anybind.cli import build_parser; "
            "build_parser().parse_args(['extract', '--encoder', 'random:text', '--data', 'x']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
