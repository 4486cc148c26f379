"""The benchmark suite: quick mode (every attention implementation agrees with dense), timing, rows."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aacn_jax import models as flax_models
from benchmarks import attention, measure, models, plot


def test_attention_quick_checks_agreement(capsys):
    attention.main(["--quick"])
    assert "implementations match dense" in capsys.readouterr().out


def test_agreement_check_catches_a_wrong_implementation(monkeypatch):
    wrong = lambda q, k, v, rel_h, rel_w: attention.IMPLEMENTATIONS["dense"](q, k, v, rel_h, rel_w[::-1])
    monkeypatch.setitem(attention.IMPLEMENTATIONS, "wrong", wrong)
    monkeypatch.setattr(attention, "RELATIVE", (*attention.RELATIVE, "wrong"))
    with pytest.raises(AssertionError, match="wrong"):
        attention.check_agreement(attention.QUICK_SHAPES[1], ["wrong"])


def test_models_quick_times_a_real_training_step_of_each_twin(capsys, monkeypatch):
    """The timed call is one SGD step (each call moves the parameters again); the rows count the
    parameters of the model; the printed ratio is the two measured speeds'. With two attention
    implementations the AA model is built and timed once per implementation, in the same run: one
    row each, recording its implementation, with its ratios to the plain twin's row. (``dense``, not
    the ``mgpu`` that device.sh passes: on a CPU that is fused's slow XLA route, and the dry run of
    device.sh runs it.)"""
    prepared, implementations = [], []
    prepare = models.prepare_model

    def spy(*args, **kw):
        implementations.append(args[5] if len(args) > 5 else kw.get("attention_implementation"))
        prepared.append(prepare(*args, **kw))
        return prepared[-1]

    monkeypatch.setattr(models, "prepare_model", spy)
    rows = models.main(["--quick", "--attention_implementations", "default", "dense"])
    out = capsys.readouterr().out
    (names, size, num_classes, _), *_ = models.QUICK_PAIRS
    assert [row["model"] for row, _ in prepared] == [names[0], names[1], names[1]]
    assert implementations == [None, None, "dense"]  # "default" leaves the model's default
    assert [(r["model"], r["attention_implementation"]) for r in rows] == [
        (names[0], None),
        (names[1], "default"),
        (names[1], "dense"),
    ]
    for row in rows[1:]:
        assert row["time_ratio"] == pytest.approx(row["seconds_per_step"] / rows[0]["seconds_per_step"])
        assert row["memory_ratio"] == pytest.approx(row["temp_bytes"] / rows[0]["temp_bytes"])
    for row, _ in prepared[:2]:  # the dense twin has the default twin's parameters
        assert row["model_overrides"] == models.QUICK_OVERRIDES
        model = flax_models.create(row["model"], num_classes=num_classes, **models.QUICK_OVERRIDES)
        init = lambda key: model.init(key, jnp.zeros((1, size, size, 3)), train=False)  # noqa: B023
        shapes = jax.eval_shape(init, jax.random.key(1))
        assert row["params"] == sum(x.size for x in jax.tree.leaves(shapes["params"]))
    assert prepared[2][0]["params"] == prepared[1][0]["params"]
    for _, run in prepared:
        before = jax.tree.map(np.asarray, run()["params"])
        after = jax.tree.map(np.asarray, run()["params"])
        assert any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)))
    speeds = [float(line.split(" img/s")[0].split()[-1]) for line in out.splitlines() if "img/s" in line]
    printed = [float(line.split("time ")[1].split("x")[0]) for line in out.splitlines() if "time " in line]
    assert len(speeds) == 3 and len(printed) == 2
    for speed, ratio in zip(speeds[1:], printed, strict=True):
        assert ratio == pytest.approx(speeds[0] / speed, rel=0.02)


def test_mgpu_sweep_times_each_setting_and_records_those_that_fail(monkeypatch):
    """Every (key_block, stages) setting the shape allows gets a row: the median seconds of its
    forward+backward and of its forward alone, or, for a pass whose check against dense raised (on a
    GPU: a kernel beyond the shared memory, a backward that fails), the error's first line and no
    time; a failing pass is not timed, the other pass of its setting is."""
    timed = []

    def check(shape, names, dtype, key_block, stages, backward):
        if (key_block, stages) == (128, 2) or (backward and (key_block, stages) == (64, 2)):
            raise ValueError("Mosaic GPU kernel exceeds available shared memory: smem_bytes=1\nmore")

    def timed_pass(backward):
        def make(name, key_block, stages):
            return lambda *args: timed.append((key_block, stages, backward)) or jnp.zeros(())

        return make

    timing = measure.interleaved_median_seconds
    monkeypatch.setattr(attention, "check_agreement", check)
    monkeypatch.setattr(attention, "forward_backward", timed_pass(True))
    monkeypatch.setattr(attention, "forward", timed_pass(False))
    monkeypatch.setattr(  # the real timing, without the 0.5 s per call that a GPU's calls need
        measure, "interleaved_median_seconds", lambda calls, repeats, min_seconds: timing(calls, repeats)
    )
    rows = attention.sweep_mgpu(attention.QUICK_SHAPES[0], repeats=1, stages=(1, 2))
    assert [(r["key_block"], r["stages"]) for r in rows] == [(64, 1), (64, 2), (128, 1), (128, 2)]
    error = "ValueError: Mosaic GPU kernel exceeds available shared memory: smem_bytes=1"
    assert rows[3] == {
        "shape": "quick_8x8",
        "key_block": 128,
        "stages": 2,
        "error": error,
        "forward_error": error,
    }
    assert rows[1]["error"] == error and rows[1]["forward_seconds"] > 0 and "seconds" not in rows[1]
    for row in (rows[0], rows[2]):
        assert row["seconds"] > 0 and row["forward_seconds"] > 0 and "error" not in row
    assert set(timed) == {(64, 1, True), (64, 1, False), (64, 2, False), (128, 1, True), (128, 1, False)}


def test_interleaved_timing_calls_each_once_per_round_in_shuffled_orders():
    order = []

    def call(name, pause):
        def run():
            order.append(name)
            time.sleep(pause)
            return jnp.zeros(())

        return run

    calls = {"a": call("a", 0.0), "b": call("b", 0.02), "c": call("c", 0.0)}
    seconds = measure.interleaved_median_seconds(calls, repeats=5)
    rounds = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)  # warm-up + 5
    assert len({tuple(r) for r in rounds[1:]}) > 1  # the timed rounds do not all run in one order
    assert seconds["b"] >= 0.02 and seconds.keys() == calls.keys()


def test_attention_full_mode_rows_plot_and_table_on_a_tiny_shape(tmp_path):
    rows = attention.measure_shape(attention.QUICK_SHAPES[0], peak_flops=1e9, repeats=1)
    assert [r["implementation"] for r in rows] == list(attention.IMPLEMENTATIONS)
    for row in rows:
        assert row["seconds"] > 0 and row["temp_bytes"] >= 0 and row["flops_fraction"] > 0
        assert ("forward_seconds" in row) == (row["implementation"] in ("plain_flash", "mgpu"))
        assert row.get("forward_seconds", 1) > 0
    path = tmp_path / "attention-cpu.json"
    path.write_text(json.dumps({"machine": measure.machine_info(), "rows": rows}))
    assert plot.plot(path).stat().st_size > 0
    header, _, line = plot.markdown_table(path).splitlines()
    seconds = {r["implementation"]: r["seconds"] for r in rows}
    column = dict(zip(_cells(header), _cells(line), strict=True))
    assert header.count("|") == line.count("|") and column["shape (batch)"] == "quick_8x8 (2)"
    assert column["auto / plain"].startswith(f"{seconds['auto'] / seconds['plain']:.2f}x / ")
    assert column["fused / plain_flash"].startswith(f"{seconds['fused'] / seconds['plain_flash']:.2f}x / ")
    assert column["paper_port / auto"] == f"{seconds['paper_port'] / seconds['auto']:.2f}x"
    without_port = [r for r in rows if r["implementation"] != "paper_port"]
    path.write_text(json.dumps({"machine": measure.machine_info(), "rows": without_port}))
    assert "paper_port" not in plot.markdown_table(path)
    peer = dict(rows[0], implementation="flex_attention", seconds=2 * seconds["fused"])
    (tmp_path / "peers-cpu.json").write_text(json.dumps({"rows": [peer]}))
    header, _, line = plot.markdown_table(path).splitlines()
    assert dict(zip(_cells(header), _cells(line), strict=True))["flex_attention / fused"] == "2.00x"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_tpu_quick_compiles_a_train_step_for_colabs_chip(capsys):
    from benchmarks import tpu

    tpu.main(["--quick"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("quick") and "v5e:1x1" in line and "of 15.75 GiB" in line, line
    assert float(line.split("total")[1].split()[0]) > 0


def test_tpu_table_sets_each_twin_against_its_plain_model():
    from benchmarks import tpu

    def row(recipe, temporaries, fits=True):
        train = {"temporaries": temporaries * 2**30, "total": (temporaries + 1) * 2**30}
        common = {
            "recipe": recipe,
            "topology": "v5e:1x1",
            "batch_size": 128,
            "usable_hbm_bytes": 15.75 * 2**30,
        }
        return common | ({"fits": True, "train": train} if fits else {"fits": False})

    lines = tpu.table([row("wrn28_10", 0.5), row("aa_wrn28_10", 1.5), row("ge_wrn28_10", 0, fits=False)])
    assert lines.splitlines()[2:] == [
        "| wrn28_10 | v5e:1x1 | 128 | 0.50 |  | 1.50 / 15.75 |  |",
        "| aa_wrn28_10 | v5e:1x1 | 128 | 1.50 | 3.0 | 2.50 / 15.75 |  |",
        "| ge_wrn28_10 | v5e:1x1 | 128 | does not fit | | | |",
    ]


def test_tpu_rows_of_a_later_run_replace_those_of_their_recipe_and_topology():
    from benchmarks import tpu

    rows = [
        {"recipe": r, "topology": t, "n": 0}
        for r, t in [("a", "v5e:1x1"), ("b", "v5e:1x1"), ("a", "v4:2x2x1")]
    ]
    rows = tpu.merge(rows, {"recipe": "b", "topology": "v5e:1x1", "n": 1})
    rows = tpu.merge(rows, {"recipe": "c", "topology": "v5e:1x1", "n": 2})
    assert [(r["recipe"], r["topology"], r["n"]) for r in rows] == [
        ("a", "v5e:1x1", 0),
        ("b", "v5e:1x1", 1),
        ("a", "v4:2x2x1", 0),
        ("c", "v5e:1x1", 2),
    ]


def test_gpu_compile_reads_ptxas_reports_written_below_python():
    """What ptxas prints while XLA compiles a Mosaic GPU kernel (these lines as it wrote them for the
    forward kernel deviceless, JAX 0.12) reaches file descriptor 1 from C++, past ``sys.stdout``;
    ``process_stdout`` collects it and ``ptxas_report`` reads each kernel's registers and spills."""
    import os

    from benchmarks import gpu_compile

    report = [
        "ptxas info    : Compiling entry function 'relative_attention_fwd_mosaic_gpu_kernel' for 'sm_90a'",
        "ptxas info    : Function properties for relative_attention_fwd_mosaic_gpu_kernel",
        "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads",
        "ptxas info    : Used 77 registers, used 2 barriers, 1 bytes smem",
        "ptxas info    : Compiling entry function 'relative_attention_dq_mosaic_gpu_kernel' for 'sm_90a'",
        "ptxas info    : Used 138 registers, used 2 barriers, 1 bytes smem",
    ]
    with gpu_compile.process_stdout() as lines:
        os.write(1, ("\n".join(report) + "\n").encode())
    assert lines == report
    assert gpu_compile.ptxas_report(lines) == {
        "relative_attention_fwd": {"registers": 77, "spill_bytes": 12},
        "relative_attention_dq": {"registers": 138},
    }


def test_gpu_compile_tables_set_mgpu_against_cudnn_and_each_model_against_its_twin():
    """The docs' tables from a results file: attention temporaries with mgpu's ratio to plain cuDNN,
    the kernels' registers, spills or shared-memory refusal per setting, the steps against twins."""
    from benchmarks import gpu_compile

    shape = {"name": "s_8x8"}
    attention_rows = [
        {"shape": shape, "implementation": name, "temp_bytes": mib * 2**20, "memory_ratio": mib / 4}
        for name, mib in (("plain_cudnn", 4), ("fused", 9), ("mgpu", 6))
    ]
    kernels = {
        f"relative_attention_{k}": {"registers": r, "spill_bytes": b}
        for k, r, b in (("fwd", 70, 0), ("dq", 255, 8), ("dkv", 200, 4))
    }
    knobs = [
        {"shape": "s_8x8", "key_block": 64, "stages": 1, "kernels": kernels},
        {
            "shape": "s_8x8",
            "key_block": 64,
            "stages": 2,
            "error": "ValueError: exceeds available shared memory",
        },
    ]
    models = [
        {"model": "wrn28_10", "attention_implementation": None, "batch": 8, "temp_bytes": 2**30},
        {"model": "aa_wrn28_10", "attention_implementation": "mgpu", "batch": 8, "temp_bytes": 3 * 2**30},
    ]
    text = gpu_compile.table({"attention": attention_rows, "mgpu_knobs": knobs, "models": models})
    assert "| s_8x8 | 4 | 9 | 6 | 1.5x |" in text
    assert "| s_8x8 | 70/255/200, spills 12 B | over shared memory |" in text
    assert "| aa_wrn28_10 | mgpu | 8 | 3.00 | 3.00 |" in text and "| wrn28_10 |  | 8 | 1.00 |  |" in text
