"""PyTorch ResNet weights into a workdir: ``python -m train.convert --source torchvision|timm --model
resnet50 --weights FILE --workdir DIR [--class_names FILE]``.

Reads a torchvision or timm ResNet-18/34/50/101/152 state dict (``.safetensors``, or ``.pth`` with
PyTorch installed, loaded with ``weights_only=True``), checks every tensor's name and shape against
the zoo's model of that name, and writes DIR as a run of ``python -m train`` at step 0: the
checkpoint, ``config.json`` (ImageNet, ``--image_size``, torch's padding) and ``dataset.json``
(classes, ``--class_names`` one per line, the preprocessing). Then ``train.load(DIR)``,
``python -m train.predict --workdir DIR``, ``--eval_only`` and ``--config.init_from=DIR`` use it.
The mapping: ``train/torch_weights.py``.

Bad input (a file that does not read, a missing, misshapen or left-over tensor, a workdir that holds
a run) is one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from train import cli, torch_weights
from train.errors import InputError

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, choices=torch_weights.SOURCES, help="who made the weights")
    parser.add_argument("--model", required=True, choices=torch_weights.MODELS, help="the zoo model")
    parser.add_argument("--weights", required=True, help="a .pth or .safetensors state dict")
    parser.add_argument("--workdir", required=True, help="a new folder for the converted run")
    parser.add_argument("--class_names", help="a text file: one class name per line, in output order")
    parser.add_argument("--image_size", type=int, default=224, help="input side of the recorded config")
    parser.add_argument("--data_dir", default="data/imagenet", help="ImageNet, for --eval_only")
    args = parser.parse_args(argv)
    print(
        f"Converting {args.source} {args.model} weights {args.weights} into workdir {args.workdir}",
        flush=True,
    )
    try:
        if not args.weights.endswith(SUFFIXES):
            raise InputError(f"--weights {args.weights}: give a {', '.join(SUFFIXES)} file")
        if not os.path.isfile(args.weights):
            raise InputError(f"--weights {args.weights}: no such file")
        names = _class_names(args.class_names) if args.class_names else None
        state = torch_weights.read_state_dict(args.weights)
        config, record, variables = torch_weights.convert(
            state,
            model=args.model,
            source=args.source,
            image_size=args.image_size,
            data_dir=args.data_dir,
            class_names=names,
        )
        torch_weights.write_workdir(args.workdir, config, record, variables)
    except InputError as error:
        cli.fail(str(error) if str(error).startswith("--") else f"--weights {args.weights}: {error}")
    print(
        f"wrote {args.workdir}: {args.model} with {record['num_classes']} classes "
        f"({len(record['class_names']) or 'no'} class names), the checkpoint of step 0",
        flush=True,
    )


def _class_names(path: str) -> list[str]:
    """The non-empty lines of ``path``."""
    try:
        with open(path) as file:
            return [line.strip() for line in file if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--class_names {path} does not read ({error})") from error


if __name__ == "__main__":
    main()
