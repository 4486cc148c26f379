"""Entry point: ``python -m train [--config FILE] [--workdir DIR] [--config.<key>=VALUE ...] [--eval_only]``.

With no arguments it trains the default config (an AA-ResNet on scikit-learn's digits) in
``runs/digits``. Running the same command again resumes from the latest checkpoint;
``--eval_only --workdir DIR`` evaluates that checkpoint with the config recorded in DIR.
SIGTERM or Ctrl-C saves a checkpoint of the current step and exits 0 (README, "Preemption and
resume").
"""

import os

from absl import app, flags, logging

from train import cli, loop, run_record
from train.errors import InputError

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: settings are flags, --config.<key>=<value>")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; -v 0 shows it
        logging.set_verbosity(logging.WARNING)
    config, config_file = cli.config_from_flags()
    config_name = os.path.splitext(os.path.basename(config_file))[0]
    workdir = FLAGS.workdir or os.path.join("runs", "digits" if config_name == "default" else config_name)
    try:
        if FLAGS.eval_only and not FLAGS["config"].present:
            try:
                config = run_record.read_config(workdir)
            except FileNotFoundError as error:
                raise InputError(f"--eval_only: {error}") from error
        loop.train_and_evaluate(config, workdir, eval_only=FLAGS.eval_only)
    except InputError as error:
        cli.fail(str(error))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
