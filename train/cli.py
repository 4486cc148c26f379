"""What the absl-flag CLIs (``python -m train``, ``python -m train.compile``) share: the one-line
error, and ``--config FILE`` with its ``--config.<key>=VALUE`` overrides."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")
FLAGS = flags.FLAGS


def fail(message: str) -> NoReturn:
    """The CLI's answer to bad input: ``error: <message>`` on stderr, exit code 2."""
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with bad flags (an unknown flag or ``--config.<key>``, a value of the wrong
    type, a config file that does not load) answered by :func:`fail`.

    ml_collections reads the ``--config.<key>`` overrides while the config flag is defined (when
    ``--config`` is not given) or parsed, and reports a key the config lacks as a bare
    AttributeError or KeyError; both happen here.
    """
    try:
        config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "A train/configs/*.py file.")
        return FLAGS(argv)
    except flags.Error as error:
        fail(f"{error}".replace("\n", " "))
    except (AttributeError, KeyError) as error:
        reason = error  # an AttributeError wrapping a KeyError wrapping "'key'\nDid you mean ...?"
        while isinstance(reason, (AttributeError, KeyError)) and reason.args:
            reason = reason.args[0]
        overrides = " ".join(arg for arg in argv if arg.lstrip("-").startswith("config."))
        fail(
            f"unknown config key {str(reason).replace(chr(10), ' ')} (in {overrides}): the keys are those "
            "set by get_config() of the config file (train/configs/default.py has all)"
        )


def config_from_flags() -> tuple[ml_collections.ConfigDict, str]:
    """The parsed ``--config`` and its file name; :func:`fail` when the file does not load."""
    config_file = config_flags.get_config_filename(FLAGS["config"])
    config = FLAGS.config
    try:
        config.keys()
    except OSError as error:  # ml_collections reports a config file that failed to load on first use
        fail(f"--config {config_file} does not load ({' '.join(str(error).split())})")
    return config, config_file
