"""megatron-reweight-prepare --help reads as the command a user types."""

import argparse

from megatron_reweight.data.prepare import _parser


def test_prepare_help_names_the_command_and_explains_every_option():
    parser = _parser()
    assert parser.format_usage().startswith("usage: megatron-reweight-prepare ")  # the console script's name
    for action in parser._actions:
        assert action.help, action.option_strings  # --output-dir had none
    budget = next(a for a in parser._actions if "--token-budget" in a.option_strings)
    assert budget.default is None and "default: no limit" in budget.help  # 175e9 is an example, not the default
    for action in parser._actions:
        # A number in parentheses reads as the default: it must be the default.
        if action.default not in (None, argparse.SUPPRESS) and "(default " in action.help:
            shown = action.help.split("(default ")[1].split(")")[0]
            assert (action.type or str)(shown) == action.default, (action.option_strings, shown)
