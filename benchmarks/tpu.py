"""What fits where: the recipes' train steps compiled for the TPUs users get, on any machine:
``python -m benchmarks.tpu [--quick] [--topologies v5e:1x1,...] [--largest_batch]``.

Each row is one recipe (``train/configs/``) compiled by the real TPU compiler for one topology
(:mod:`train.aot`): per-device memory of the train step at the recipe's batch per device, XLA's cost
estimate, and, with ``--largest_batch``, the largest global batch whose train step fits. Rows are
merged into ``benchmarks/results/compile-tpu.json`` as they are measured (a row replaces the one of
the same recipe and topology, so the recipes can be measured in several runs); ``--table`` prints
the docs' table (docs/performance.md) from that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling needs no chip
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from benchmarks import measure
from train import aot

# recipe -> (config module in train/configs, batch per device: the CIFAR recipes' 128 on one chip,
# ImageNet's 4096 over 128 chips, COCO's 64 over 8)
RECIPES = {
    "quickstart": ("quickstart", 128),
    "aa_wrn28_10": ("cifar100_aa_wrn28_10", 128),
    "se_wrn28_10": ("cifar100_se_wrn28_10", 128),
    "ge_wrn28_10": ("cifar100_ge_wrn28_10", 128),
    "wrn28_10": ("cifar100_wrn28_10", 128),
    "aa_resnet50": ("imagenet_aa_resnet50", 32),
    "resnet50": ("imagenet_resnet50", 32),
    "aa_mnasnet_a1_100": ("imagenet_aa_resnet50", 32),  # the ImageNet recipe with an (AA-)MnasNet
    "mnasnet_a1_100": ("imagenet_resnet50", 32),
    "aa_retinanet_resnet50": ("coco_aa_retinanet_resnet50", 8),
    "retinanet_resnet50": ("coco_retinanet_resnet50", 8),
}
PLAIN_TWIN = {f"{kind}_wrn28_10": "wrn28_10" for kind in ("aa", "se", "ge")} | {
    "aa_resnet50": "resnet50",
    "aa_mnasnet_a1_100": "mnasnet_a1_100",
    "aa_retinanet_resnet50": "retinanet_resnet50",
}
TOPOLOGIES = ("v5e:1x1",)  # Colab's TPU v5e-1
QUICK = {"model_overrides.depth": 8, "model_overrides.width": 8}  # the default digits run, tiny
RESULTS = measure.RESULTS / "compile-tpu.json"


def config_of(recipe: str):
    module, _ = RECIPES[recipe]
    config = importlib.import_module(f"train.configs.{module}").get_config()
    if "mnasnet" in recipe:
        config.model, config.model_overrides = recipe, {}
    return config


def measure_row(config, recipe: str, topology: str, per_device: int, largest: bool) -> dict:
    """One recipe on one topology: the train step at ``per_device`` images per device."""
    start = time.perf_counter()
    compiler = aot.Compiler(config, topology)
    batch = per_device * len(compiler.devices)
    row = {
        "recipe": recipe,
        "model": config.model,
        "dataset": config.dataset,
        "topology": topology,
        "device_kind": compiler.devices[0].device_kind,
        "devices": len(compiler.devices),
        "usable_hbm_bytes": compiler.hbm,
        "batch_size": batch,
    }
    try:
        footprint = compiler.compile("train", batch)
        row |= {"fits": True, "train": dataclasses.asdict(footprint) | {"total": footprint.total}}
    except aot.DoesNotFit as error:
        row |= {"fits": False, "error": str(error)}
    if largest:
        row["largest_batch"] = compiler.largest_batch(batch)
    return row | {"compile_seconds": round(time.perf_counter() - start, 1)}


def print_row(row: dict) -> None:
    where = f"{row['recipe']:<22}{row['topology']:<10} batch {row['batch_size']:<5}"
    if not row["fits"]:
        print(f"{where} does not fit: {row['error']}", flush=True)
        return
    train = row["train"]
    largest = f", largest batch {row['largest_batch']}" if "largest_batch" in row else ""
    print(
        f"{where} temp {train['temporaries'] / aot.GiB:6.2f} GiB, total {train['total'] / aot.GiB:6.2f} of "
        f"{row['usable_hbm_bytes'] / aot.GiB:.2f} GiB{largest} ({row['compile_seconds']:.0f} s)",
        flush=True,
    )


def table(rows: list[dict]) -> str:
    """The docs' Markdown table of ``rows``: each twin's temporaries also against its plain model's."""
    fitting = {(r["topology"], r["recipe"]): r for r in rows if r["fits"]}
    lines = [
        "| recipe | topology | batch | temporaries GiB | x plain | total GiB / usable | largest batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['recipe']} | {r['topology']} | {r['batch_size']} | does not fit | | | |")
            continue
        train, plain = r["train"], fitting.get((r["topology"], PLAIN_TWIN.get(r["recipe"])))
        ratio = f"{train['temporaries'] / plain['train']['temporaries']:.1f}" if plain else ""
        lines.append(
            f"| {r['recipe']} | {r['topology']} | {r['batch_size']} | {train['temporaries'] / aot.GiB:.2f} | "
            f"{ratio} | {train['total'] / aot.GiB:.2f} / {r['usable_hbm_bytes'] / aot.GiB:.2f} | "
            f"{r.get('largest_batch', '')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="a tiny digits model on v5e:1x1; writes nothing")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES), help="comma-separated TPU topologies")
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}"
    )
    parser.add_argument("--largest_batch", action="store_true", help="also the largest batch that fits")
    parser.add_argument("--table", action="store_true", help=f"print the Markdown table of {RESULTS.name}")
    args = parser.parse_args(argv)
    if args.table:
        rows = json.loads(RESULTS.read_text())["rows"]
        print(table(sorted(rows, key=lambda r: (r["topology"], list(RECIPES).index(r["recipe"])))))
        return
    if args.quick:
        from train.configs import default

        config = default.get_config()
        config.update_from_flattened_dict(QUICK)
        print_row(measure_row(config, "quick", "v5e:1x1", per_device=8, largest=args.largest_batch))
        return
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    for topology in args.topologies.split(","):
        for recipe in args.recipes.split(","):
            row = measure_row(config_of(recipe), recipe, topology, RECIPES[recipe][1], args.largest_batch)
            print_row(row)
            rows = merge(rows, row)
            RESULTS.write_text(json.dumps({"machine": measure.machine_info(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


def merge(rows: list[dict], row: dict) -> list[dict]:
    """``rows`` with ``row`` in place of the one of its recipe and topology (else appended)."""
    key = (row["recipe"], row["topology"])
    kept = [r if (r["recipe"], r["topology"]) != key else row for r in rows]
    return kept if row in kept else [*kept, row]


if __name__ == "__main__":
    main(sys.argv[1:])
