"""Entry point: ``python -m train [--config FILE] [--workdir DIR] [--config.<key>=VALUE ...] [--eval_only]``.

With no arguments it trains the default config (an AA-ResNet on scikit-learn's digits) in
``runs/digits``. Running the same command again resumes from the latest checkpoint;
``--eval_only --workdir DIR`` evaluates that checkpoint with the config recorded in DIR.
SIGTERM or Ctrl-C saves a checkpoint of the current step and exits 0 (README, "Preemption and
resume").
"""

import os
import sys
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from train import loop, run_record
from train.errors import InputError

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

flags.DEFINE_string(
    "workdir",
    None,
    "Checkpoints, metrics.jsonl and TensorBoard files. Default: runs/<config file name>, "
    "runs/digits for the default config.",
)
flags.DEFINE_bool(
    "eval_only",
    False,
    "Evaluate the latest checkpoint in --workdir and exit (with the config recorded there, unless --config).",
)
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: settings are flags, --config.<key>=<value>")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; -v 0 shows it
        logging.set_verbosity(logging.WARNING)
    config_file = config_flags.get_config_filename(FLAGS["config"])
    config_name = os.path.splitext(os.path.basename(config_file))[0]
    workdir = FLAGS.workdir or os.path.join("runs", "digits" if config_name == "default" else config_name)
    config = FLAGS.config
    try:
        config.keys()
    except OSError as error:  # ml_collections reports a config file that failed to load on first use
        fail(f"--config {config_file} does not load ({' '.join(str(error).split())})")
    try:
        if FLAGS.eval_only and not FLAGS["config"].present:
            try:
                config = run_record.read_config(workdir)
            except FileNotFoundError as error:
                raise InputError(f"--eval_only: {error}") from error
        loop.train_and_evaluate(config, workdir, eval_only=FLAGS.eval_only)
    except InputError as error:
        fail(str(error))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
