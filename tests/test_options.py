from pathlib import Path
from typing import Optional

import attrs
import pytest

import moedec
from moedec.errors import MoedecError
from moedec.options import build_strategy, describe_option, option_fields, parse_cli_options


@attrs.define
class Opts:
    name = "opts"
    n: int = attrs.field(default=4, validator=moedec.in_range(1, 8))
    ratio: float = attrs.field(default=0.5, validator=moedec.in_range(0.0, 1.0))
    flag: bool = False
    path: Optional[Path] = None
    label: str = "x"


def test_cli_strings_are_converted_to_field_types():
    s = build_strategy(Opts, parse_cli_options(["n=3", "ratio=0.25", "flag=yes", "path=/tmp/m", "label=hi"]))
    assert (s.n, s.ratio, s.flag, s.path, s.label) == (3, 0.25, True, Path("/tmp/m"), "hi")
    assert build_strategy(Opts, {"path": "none"}).path is None


@pytest.mark.parametrize(
    "pairs, match",
    [
        (["n=9"], r"strategy 'opts': bad option n='9': must be in \[1, 8\]"),
        (["n=x"], r"bad option n='x': expected an integer"),
        (["flag=maybe"], r"bad option flag='maybe': expected a boolean"),
        (["nope=1"], r"strategy 'opts' has no option 'nope' \(its options: flag, label, n, path, ratio\)"),
        (["n"], r"bad option 'n': expected key=value"),
    ],
)
def test_bad_options_are_one_line_errors(pairs, match):
    with pytest.raises(MoedecError, match=match):
        build_strategy(Opts, parse_cli_options(pairs))


def test_describe_shows_type_default_and_range():
    texts = [describe_option(Opts, f) for f in option_fields(Opts)]
    assert texts[0] == "n: int = 4 [1, 8]"
    assert texts[1] == "ratio: float = 0.5 [0.0, 1.0]"
