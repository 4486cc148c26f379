"""``python -m train.compile --topology v5e:1x1 [--config FILE] [--config.<key>=VALUE ...]
[--largest_batch] [--noeval]``: will this run fit that TPU?

Compiles the run's train and evaluation steps, as ``python -m train`` would build them, for the
named TPU topology with libtpu's compile-only devices (:mod:`train.aot`), on any machine with
``jax[tpu]``, and prints what each device would hold. A run that does not fit is one line ``error:
...`` and exit code 2. ``--largest_batch`` also finds the largest global batch whose train step fits.
"""

import os

# Compiling needs no chip: keep JAX off any local accelerator (a TPU VM's chips may be training) and
# let libtpu load beside a process that holds them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags, logging

from train import aot, cli
from train.errors import InputError

flags.DEFINE_string("topology", None, "A TPU topology: v5e:1x1 (Colab), v5e:2x4 (Kaggle), v4:2x2x1, ...")
flags.DEFINE_bool("largest_batch", False, "Also find the largest global batch whose train step fits.")
flags.DEFINE_bool("eval", True, "Also compile the evaluation step.")
flags.mark_flag_as_required("topology")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}: settings are flags, --config.<key>=<value>")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config, _ = cli.config_from_flags()
    try:
        compiler = aot.Compiler(config, FLAGS.topology)
        print(f"{config.model} on {config.dataset}, compiled for TPU {FLAGS.topology}:")
        print("\n".join(compiler.check(config.batch_size, eval_step=FLAGS.eval).lines()), flush=True)
        if FLAGS.largest_batch:
            print(f"largest global batch whose train step fits: {compiler.largest_batch(config.batch_size)}")
    except InputError as error:
        cli.fail(str(error))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
