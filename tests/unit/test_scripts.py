"""The Lua scripts as the store sends them: each holds the lib pieces its body uses, and only
those. (Each runs, on Redis and on the embedded store, through HTTP in tests/integration.)"""

from __future__ import annotations

import re

import pytest

from xsp_middleware.store import scripts
from xsp_middleware.store.protocol import user_log

ALL = [
    value
    for value in vars(scripts).values()
    if isinstance(value, scripts.Script) and value.name != "three_commands"
]
DEFINED = re.compile(r"^local (?:function )?([\w, ]+)", re.MULTILINE)
USED = re.compile(r"\b((?:xsp|XSP)_\w+)")


@pytest.mark.parametrize("script", ALL, ids=lambda s: s.name)
def test_every_lib_name_a_script_uses_is_defined_in_it(script: scripts.Script) -> None:
    code = "\n".join(line.split("--")[0] for line in script.text.splitlines())
    defined = {n.strip() for names in DEFINED.findall(script.text) for n in names.split(",")}
    assert set(USED.findall(code)) <= defined


def test_a_script_leaves_out_the_pieces_it_does_not_use() -> None:
    assert "xsp_user_unrecord" not in scripts.RESERVE.text  # the undo side
    assert "xsp_pending_take" not in scripts.RESERVE.text  # a beacon's side
    assert "xsp_user_gate" not in scripts.LEASE.text  # a grant never reads a user
    assert "xsp_config" in scripts.RESERVE.text and "xsp_config" in scripts.LEASE.text


@pytest.mark.parametrize(
    ("raw", "log"),
    [
        (None, (0, [])),
        ("", (0, [])),
        ("1796295240243", (1, [1796295240243])),  # a first impression, compact
        ("1|1796295240243", (1, [1796295240243])),  # the same, as earlier releases wrote it
        ("3|10,20,30", (3, [10, 20, 30])),
        ("4|", (4, [])),  # lifetime caps only: no times kept
        ("junk", (0, [])),
        ("\u00b2", (0, [])),  # a digit int() refuses: a hand-edited hash never raises
    ],
)
def test_python_reads_both_log_forms_as_the_scripts_do(
    raw: str | None, log: tuple[int, list[int]]
) -> None:
    assert user_log(raw) == log
