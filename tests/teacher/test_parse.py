from pathlib import Path

import pytest

from distillscale.domain import load_taxonomy
from distillscale.teacher.parse import LabelParser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parse():
    return LabelParser(load_taxonomy(ROOT / "conf/domains/finance.yaml"))


@pytest.mark.parametrize("answer, label", [
    ("earnings_beat", "earnings_beat"),
    ("Earnings_Beat", "earnings_beat"),                       # wrong case
    ("EARNINGS BEAT", "earnings_beat"),                       # spaces for underscores
    ("The event is: earnings-beat.", "earnings_beat"),        # extra text, hyphen
    ("**analyst_upgrade**\n", "analyst_upgrade"),             # markdown
    ("tops estimates", "earnings_beat"),                      # an alias
    ("analyst_downgrade", "analyst_downgrade"),               # "upgrade" inside is no match
])
def test_accepted(parse, answer, label):
    assert parse(answer) == (label, None)


@pytest.mark.parametrize("answer, reason", [
    ("", "empty answer"),
    ("   \n", "empty answer"),
    (None, "empty answer"),
    ("weather_event", "unknown class"),
    ("I am not sure", "unknown class"),
    ("earnings_beat or earnings_miss", "two labels"),
    ("earnings_miss, then analyst_downgrade", "two labels"),
])
def test_rejected_with_a_reason(parse, answer, reason):
    label, why = parse(answer)
    assert label is None and why.startswith(reason)


def test_the_same_class_twice_is_one_label(parse):
    assert parse("earnings_beat (earnings beat)") == ("earnings_beat", None)
