"""The paper's four claims, tested in miniature: ``python -m benchmarks.claims [--quick]``.

Trains twins of a small CIFAR-style ResNet-8 on the relational ``same_different`` data set
(:mod:`train.data.same_different`: are two far-apart glyphs the same?) through the ordinary
``train.loop.train_and_evaluate``, each for the same number of steps and with every seed, and judges
the paper's claims (Bello et al. 2019):

1. augmenting convolutions with self-attention beats the convolution alone (``aa`` vs ``plain``);
2. ... and beats squeeze-and-excitation and gather-excite (``aa`` vs ``se``, ``ge``);
3. position encodings matter little for augmented networks (``aa`` with relative / none /
   sinusoidal / coordconv positions), but relative ones matter for fully attentional networks
   (``fa`` relative vs none);
4. accuracy grows with the attention channels (kappa, upsilon) up to a point, and fully
   attentional is slightly worse than augmented.

Twins: the registry's ``resnet_cifar`` / ``aa_resnet_cifar`` at depth 8, width 16 (16/32/64
channels at 16x16/8x8/4x4). Attention augments the first convolution of each block in stages 2
and 3 (8x8 and 4x4 maps, each token seeing the whole image), 4 heads, at least 4 key dims per
head; not stage 1, where a 16x16 map made a step ~10x the plain one on the 2-core CPU (229 vs
18 ms measured), which the 60-minute budget cannot hold. Parameter budgets are equal within
2% of ``plain`` (printed): a twin further off gets the stage widths (multiples of 4, for the
heads) whose count is nearest ``plain``'s.

Verdicts (a claim "A beats B"): the difference of mean held-out accuracy over seeds against the
spread, the sum of both models' standard deviations across seeds: ``reproduced`` if it exceeds
the spread in the claimed direction, ``not reproduced`` if it exceeds it the other way,
``inconclusive`` otherwise, and ``inconclusive`` whenever none of the compared models is above
chance by more than its spread (nothing learned, nothing to compare). A "matters little" claim
is reproduced when no difference exceeds its spread (and something was learned).

Writes ``benchmarks/results/claims-<platform>.json`` after every run (the run resumes: finished
runs in ``--workdir`` are read back, not retrained) and the PNG at the end. ``--quick``: one seed,
a few steps, into ``--out`` (default: a temporary directory); checks only that every twin trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from aacn_jax import models
from benchmarks import measure

if TYPE_CHECKING:
    import ml_collections

CHANCE = 0.5
POOLED_DETECTOR_BOUND = 0.643  # train.data.same_different: best rule of pooled local detectors (K = 8)
BASE = dict(depth=8, width=16)
ATTENTION = dict(augmented_stages=(2, 3))
FULLY_ATTENTIONAL = dict(ATTENTION, kappa=1.0, upsilon=1.0)
TOLERANCE = 0.02  # parameter counts within 2% of the plain twin's


@dataclasses.dataclass(frozen=True)
class Twin:
    name: str
    model: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


TWINS = (
    Twin("plain", "resnet_cifar"),
    Twin("se", "resnet_cifar", dict(excite="se")),
    Twin("ge", "resnet_cifar", dict(excite="ge")),
    Twin("aa", "aa_resnet_cifar", ATTENTION),  # relative positions, kappa 0.2, upsilon 0.1
    Twin("aa_none", "aa_resnet_cifar", dict(ATTENTION, attention_position="none")),
    Twin("aa_sinusoidal", "aa_resnet_cifar", dict(ATTENTION, attention_position="sinusoidal")),
    Twin("aa_coordconv", "aa_resnet_cifar", dict(ATTENTION, attention_position="coordconv")),
    Twin("aa_k0.5_u0.25", "aa_resnet_cifar", dict(ATTENTION, kappa=0.5, upsilon=0.25)),
    Twin("aa_k1_u0.5", "aa_resnet_cifar", dict(ATTENTION, kappa=1.0, upsilon=0.5)),
    Twin("fa", "aa_resnet_cifar", FULLY_ATTENTIONAL),
    Twin("fa_none", "aa_resnet_cifar", dict(FULLY_ATTENTIONAL, attention_position="none")),
)
# (claim number, statement, kind, A, Bs): kind "beats" (A beats each B) or "little" (A within
# spread of each B).
CLAIMS = (
    (1, "augmented beats the convolution alone", "beats", "aa", ("plain",)),
    (2, "augmented beats squeeze-excite and gather-excite", "beats", "aa", ("se", "ge")),
    (
        3,
        "augmented: position encodings matter little",
        "little",
        "aa",
        ("aa_none", "aa_sinusoidal", "aa_coordconv"),
    ),
    (3, "fully attentional: relative positions beat none", "beats", "fa", ("fa_none",)),
    (4, "more attention channels help (kappa, upsilon)", "beats", "aa_k0.5_u0.25", ("aa",)),
    (4, "more attention channels help (kappa, upsilon)", "beats", "aa_k1_u0.5", ("aa",)),
    (4, "fully attentional is slightly worse than augmented", "beats", "aa", ("fa",)),
)


def parameter_count(model: str, overrides: dict[str, Any]) -> int:
    module = models.create(model, num_classes=2, **BASE, **overrides)
    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    return models.count_params(jax.eval_shape(init)["params"])


def matched_overrides(twin: Twin, target: int) -> dict[str, Any]:
    """The twin's overrides, plus the stage widths nearest ``target`` parameters if it is more
    than ``TOLERANCE`` off at the base widths (16, 32, 64)."""
    if abs(parameter_count(twin.model, twin.overrides) / target - 1) <= TOLERANCE:
        return dict(twin.overrides)
    candidates = [(16, 32 + 4 * i, 64 + 4 * j) for i in range(-2, 5) for j in range(-2, 7)]

    def changed(widths: tuple[int, ...]) -> int:
        return abs(widths[1] - 32) + abs(widths[2] - 64)

    def preference(widths: tuple[int, ...]) -> tuple[bool, int, float]:
        """Within the tolerance first, then the fewest channels changed, then the nearest count."""
        off = abs(parameter_count(twin.model, dict(twin.overrides, stage_widths=widths)) / target - 1)
        return off > TOLERANCE, changed(widths), off

    # In order of channels changed, up to the first change with a candidate within the tolerance:
    # no later one is preferred, and each count is an eval_shape (~0.3 s).
    ordered = sorted(candidates, key=changed)
    best, best_key = ordered[0], preference(ordered[0])
    for widths in ordered[1:]:
        if not best_key[0] and changed(widths) > best_key[1]:
            break
        key = preference(widths)
        if key < best_key:
            best, best_key = widths, key
    return dict(twin.overrides, stage_widths=best)


def twin_config(twin: Twin, overrides: dict[str, Any], seed: int, steps: int) -> ml_collections.ConfigDict:
    """The config of one run: ``train/configs/same_different.py`` with the twin's model at ``BASE``
    plus ``overrides`` (the twin's, as :func:`matched_overrides` returns them), ``seed`` and
    ``steps`` steps, evaluated, checkpointed and logged once, at the end."""
    import ml_collections

    from train.configs import same_different

    config = same_different.get_config()
    config.model = twin.model
    config.model_overrides = ml_collections.ConfigDict(dict(BASE, **overrides))
    config.seed = seed
    config.num_train_steps = steps
    config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = steps
    return config


def train_twin(twin: Twin, overrides: dict[str, Any], seed: int, steps: int, workdir: pathlib.Path) -> dict:
    """One run through ``train.loop.train_and_evaluate`` (or its finished record): final test top-1."""
    from train import loop

    record = workdir / "claims_run.json"
    if record.exists():
        return json.loads(record.read_text())
    config = twin_config(twin, overrides, seed, steps)
    start = time.perf_counter()
    state = loop.train_and_evaluate(config, str(workdir))
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in evals if e["split"] == "eval" and e["step"] == steps][-1]
    run = {
        "twin": twin.name,
        "seed": seed,
        "test_top1": final["top1"],
        "train_top1": [e for e in evals if e["split"] == "train"][-1]["top1"],  # mean over the run
        "params": models.count_params(state.params),
        "seconds": time.perf_counter() - start,
    }
    record.write_text(json.dumps(run))
    return run


def summarise(runs: Sequence[dict]) -> dict[str, dict]:
    summary = {}
    for name in dict.fromkeys(run["twin"] for run in runs):
        scores = [run["test_top1"] for run in runs if run["twin"] == name]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        summary[name] = {"mean": statistics.mean(scores), "std": std, "seeds": len(scores)}
    return summary


def verdict(kind: str, a: dict, bs: Sequence[dict]) -> str:
    """See the module docstring; ``a``, ``bs``: summaries (mean, std)."""
    if all(m["mean"] - CHANCE <= m["std"] for m in (a, *bs)):
        return "inconclusive"
    margins = [(a["mean"] - b["mean"], a["std"] + b["std"]) for b in bs]
    if kind == "little":
        return "reproduced" if all(abs(d) <= spread for d, spread in margins) else "not reproduced"
    if all(d > spread for d, spread in margins):
        return "reproduced"
    if any(-d > spread for d, spread in margins):
        return "not reproduced"
    return "inconclusive"


def judge(summary: dict[str, dict]) -> list[dict]:
    verdicts = []
    for number, statement, kind, a, bs in CLAIMS:
        if a not in summary or any(b not in summary for b in bs):
            continue
        diffs = {b: summary[a]["mean"] - summary[b]["mean"] for b in bs}
        verdicts.append(
            {
                "claim": number,
                "statement": statement,
                "compared": [a, *bs],
                "difference": diffs,
                "spread": {b: summary[a]["std"] + summary[b]["std"] for b in bs},
                "verdict": verdict(kind, summary[a], [summary[b] for b in bs]),
            }
        )
    return verdicts


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [twin["name"] for twin in results["twins"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, name in enumerate(names):
        scores = [run["test_top1"] for run in results["runs"] if run["twin"] == name]
        if not scores:
            continue
        ax.scatter([i] * len(scores), scores, s=14, color="0.55", zorder=2)
        stats = results["summary"][name]
        ax.errorbar(i, stats["mean"], yerr=stats["std"], fmt="o", color="C0", capsize=4, zorder=3)
    ax.axhline(CHANCE, color="0.3", linestyle=":", linewidth=1, label="chance")
    ax.axhline(POOLED_DETECTOR_BOUND, color="C3", linestyle="--", linewidth=1, label="pooled local detectors")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("held-out top-1")
    ax.set_title(
        f"same_different, ResNet-8 twins, {results['steps']} steps, seeds {results['seeds']} "
        f"(mean ± std, dots: seeds)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 steps: checks that all twins train")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every twin")
    parser.add_argument("--twins", nargs="+", help="names of the twins to run (default: all)")
    parser.add_argument("--workdir", help="run directories (default: runs/claims; --quick: a temporary one)")
    parser.add_argument("--out", help="folder for the JSON and PNG (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 2, [0]
    unknown = set(args.twins or ()) - {twin.name for twin in TWINS}
    if unknown:
        parser.error(f"unknown twins {sorted(unknown)}; choose from {[twin.name for twin in TWINS]}")
    twins = [twin for twin in TWINS if not args.twins or twin.name in args.twins]
    needs_scratch = args.quick and not (args.workdir and args.out)
    scratch = tempfile.mkdtemp(prefix="claims-") if needs_scratch else None
    workdir = pathlib.Path(args.workdir or scratch or "runs/claims")
    out = pathlib.Path(args.out or scratch or measure.RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    target = parameter_count("resnet_cifar", {})
    matched = {twin.name: matched_overrides(twin, target) for twin in twins}
    rows = []
    for twin in twins:
        params = parameter_count(twin.model, matched[twin.name])
        overrides = matched[twin.name]
        rows.append({"name": twin.name, "model": twin.model, "overrides": overrides, "params": params})
        print(f"{twin.name:<15}{params:>8} params ({params / target - 1:+.1%} vs plain)  {overrides}")
        if abs(params / target - 1) > TOLERANCE:
            raise SystemExit(f"{twin.name} has {params} parameters, more than 2% off plain's {target}")

    platform = jax.default_backend()
    json_path, png_path = out / f"claims-{platform}.json", out / f"claims-{platform}.png"
    results: dict[str, Any] = {"machine": measure.machine_info(), "steps": args.steps, "seeds": args.seeds}
    results |= {"plain_params": target, "twins": rows, "runs": []}
    for seed in args.seeds:  # seed-major: a run stopped early still covers every twin
        for twin in twins:
            run = train_twin(twin, matched[twin.name], seed, args.steps, workdir / f"{twin.name}-seed{seed}")
            results["runs"].append(run)
            print(f"{twin.name:<15} seed {seed}: test top-1 {run['test_top1']:.4f} ({run['seconds']:.0f} s)")
            results["summary"] = summarise(results["runs"])
            results["verdicts"] = judge(results["summary"])
            json_path.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, png_path)
    print(format_table(results))
    print(f"wrote {json_path} and {png_path}")


def format_table(results: dict) -> str:
    """The Markdown table (mean ± std over seeds) and the verdicts."""
    lines = ["| model | params | held-out top-1 (mean ± std) | seeds |", "|---|---|---|---|"]
    params = {twin["name"]: twin["params"] for twin in results["twins"]}
    for name, stats in results["summary"].items():
        accuracy = f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}%"
        lines.append(f"| {name} | {params[name]:,} | {accuracy} | {stats['seeds']} |")
    lines += ["", "| claim | compared | difference (spread) | verdict |", "|---|---|---|---|"]
    for v in results["verdicts"]:
        diffs = ", ".join(
            f"{b}: {100 * d:+.1f} ({100 * v['spread'][b]:.1f})" for b, d in v["difference"].items()
        )
        lines.append(f"| {v['claim']}. {v['statement']} | {v['compared'][0]} vs | {diffs} | {v['verdict']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
