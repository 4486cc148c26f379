"""``python -m train.convert``: PyTorch ResNets into workdirs that compute torch's logits, and what the
rest of the project does with them (load, predict, export, NNX, eval_only, warm starts).

The fixture (``tests/fixtures/``, written by ``make_torch_resnet_fixture.py`` with torch, outside
CI): torchvision-layout ResNet-18 and ResNet-50 state dicts at base width 4 with 10 classes, an
input batch and torch's eval-mode logits.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

import train
from aacn_jax import models
from aacn_jax.nnx import ZooModel
from train import convert, inference, loop, predict, run_record, warm_start

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TORCH = np.load(FIXTURES / "torch_resnet_logits.npz")
IMAGES = TORCH["images"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
NAMES = [f"class {i}" for i in range(10)]
SIZE = 64


def weights(depth: int) -> pathlib.Path:
    return FIXTURES / f"torch_resnet{depth}_w4.safetensors"


def run_convert(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m train.convert ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        convert.main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[int, str]:
    """Workdirs of both fixture networks, converted at 64x64 (ResNet-18 with class names)."""
    root = tmp_path_factory.mktemp("converted")
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    workdirs = {}
    for depth in (18, 50):
        workdir = root / f"resnet{depth}"
        names = ["--class_names", str(root / "names.txt")] if depth == 18 else []
        source = ["--source", "torchvision", "--model", f"resnet{depth}", "--weights", str(weights(depth))]
        target = ["--workdir", str(workdir), "--image_size", str(SIZE), "--data_dir", str(root / "imagenet")]
        convert.main([*source, *target, *names])
        workdirs[depth] = str(workdir)
    return workdirs


@pytest.mark.parametrize("depth", [18, 50])
def test_converted_resnet_computes_torchs_logits(converted, depth):
    model, variables, config = train.load(converted[depth])
    assert (config.model, config.dataset, dict(config.model_overrides)) == (
        f"resnet{depth}",
        "imagenet",
        {"conv_padding": "symmetric", "width": 4},
    )
    logits = np.asarray(model.apply(variables, IMAGES, train=False))
    np.testing.assert_allclose(logits, TORCH[f"logits_resnet{depth}"], rtol=0, atol=1e-5)


def test_the_equality_test_sees_a_wrong_statistic_and_the_padding(converted):
    """The fixture is sensitive to what the conversion could get wrong: one BatchNorm statistic
    left at its initial value, or the XLA SAME padding of the strided 3x3 convolutions."""
    model, variables, _ = train.load(converted[18])
    expected = TORCH["logits_resnet18"]
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    stats["stage2"]["block1"]["bn1"]["var"] = np.ones_like(stats["stage2"]["block1"]["bn1"]["var"])
    wrong_stat = model.apply({**variables, "batch_stats": stats}, IMAGES, train=False)
    same_padding = models.create("resnet18", num_classes=10, width=4).apply(variables, IMAGES, train=False)
    for logits in (wrong_stat, same_padding):
        assert np.abs(np.asarray(logits) - expected).max() > 1e-3


def test_dataset_record_names_classes_and_preprocessing(converted):
    record = run_record.read_dataset(converted[18])
    assert record["class_names"] == NAMES and record["num_classes"] == 10
    assert record["image_shape"] == [SIZE, SIZE, 3] and record["task"] == "classification"
    assert (
        record["preprocessing"]["resize_shorter_side"] == 73
        and record["preprocessing"]["center_crop"] == SIZE
    )
    assert record["preprocessing"]["trained_with"].startswith("torchvision: resize 256 (bilinear)")
    assert run_record.read_dataset(converted[50])["class_names"] == []


def test_predict_exports_and_nnx_agree_with_the_converted_model(converted, tmp_path, capsys):
    workdir = converted[18]
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), np.uint8)).save(picture)
    predict.main(
        ["--workdir", workdir, str(picture), "--batch_size", "2", "--export", str(tmp_path / "r18.jax")]
    )
    lines = capsys.readouterr().out.splitlines()
    model, variables, _ = train.load(workdir)
    images = inference.prepare(workdir, [str(picture)])
    logits = np.asarray(model.apply(variables, images, train=False))[0]
    best = np.argsort(logits)[::-1][:5]
    probabilities = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    assert lines[1] == f"{picture}: " + ", ".join(f"class {i} ({probabilities[i]:.1%})" for i in best)
    exported = jax.export.deserialize((tmp_path / "r18.jax").read_bytes())
    batch = np.concatenate([images, np.zeros_like(images)])
    np.testing.assert_allclose(np.asarray(exported.call(batch))[0], logits, rtol=0, atol=1e-5)
    zoo = ZooModel(model, input_shape=(SIZE, SIZE, 3), rngs=nnx.Rngs(0), variables=variables)
    np.testing.assert_allclose(
        np.asarray(zoo(IMAGES, train=False)), TORCH["logits_resnet18"], rtol=0, atol=1e-5
    )


def test_eval_only_scores_the_converted_weights(converted, tmp_path, capsys):
    """An ImageFolder tree whose 10 validation pictures are filed under the class the converted model
    predicts for the first 6 and under another class for the rest: --eval_only's top-1 is 60%."""
    workdir = converted[18]
    config = run_record.read_config(workdir)
    rng = np.random.default_rng(1)
    pictures = [tmp_path / f"{k}.png" for k in range(10)]
    for path in pictures:
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(path)
    model, variables, _ = train.load(workdir)
    images = inference.prepare(workdir, [str(path) for path in pictures])
    predicted = np.argmax(model.apply(variables, images, train=False), -1)
    root = pathlib.Path(config.data_dir)
    for label, name in enumerate(NAMES):
        for i in range(7):  # train/ sets the classes and the epoch length (at least one batch of 64)
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            (root / "train" / name / f"{i}.png").write_bytes(pictures[label].read_bytes())
        (root / "val" / name).mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(pictures):
        label = predicted[k] if k < 6 else (predicted[k] + 1) % 10
        (root / "val" / NAMES[label] / path.name).write_bytes(path.read_bytes())
    loop.train_and_evaluate(config, workdir, eval_only=True)
    assert "Final test top-1 60.00%" in capsys.readouterr().out


def _abstract(name: str, **overrides) -> dict:
    """Zero-filled variables of a zoo model (no initialisation run), 7 in every leaf."""
    model = models.create(name, **overrides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    return jax.tree.map(lambda x: np.full(x.shape, 7, x.dtype), shapes)


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k.key for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


AA = dict(width=4, num_heads=2, kappa=0.25, upsilon=0.25, min_key_depth_per_head=0)


@pytest.mark.parametrize(
    ("name", "overrides", "new", "dropped"),
    [
        ("aa_resnet50", dict(AA, num_classes=5), "stage{3,4}/block*/conv2/attention (54 arrays)", "none"),
        (
            "se_resnet50",
            dict(width=4, se_reduction=4, num_classes=10),
            "stage{1,2,3,4}/block*/excite",
            "none",
        ),
        (
            "fa_resnet50",
            dict(width=4, num_heads=2, min_key_depth_per_head=0, num_classes=10),
            "attention (54 arrays)",
            "stage{3,4}/block*/conv2 (9",
        ),
        (
            "aa_retinanet_resnet50",
            dict(backbone_overrides=AA, fpn_features=8, num_classes=3),
            "fpn (",
            "head",
        ),
    ],
    ids=["aa_resnet50", "se_resnet50", "fa_resnet50", "aa_retinanet_resnet50"],
)
def test_warm_start_from_a_converted_resnet50(converted, name, overrides, new, dropped):
    """Every shared leaf is copied; an augmented convolution's branch takes the first filters of the
    pretrained kernel; attention, excitation, pyramid and a head of another size stay initial."""
    target = _abstract(name, **overrides)
    params, stats, summary = warm_start.warm_start(target["params"], target["batch_stats"], converted[50])
    _, source, _ = train.load(converted[50])
    flat_source = {**_flat({"params": source["params"]}), **_flat({"batch_stats": source["batch_stats"]})}
    adopted = _flat({"params": params["backbone"] if "backbone" in params else params})
    adopted |= _flat({"batch_stats": stats["backbone"] if "backbone" in stats else stats})
    for key, value in adopted.items():
        if key in flat_source and flat_source[key].shape == value.shape:
            np.testing.assert_array_equal(value, flat_source[key], err_msg=key)
        elif key.endswith("/conv/kernel"):
            pretrained = flat_source[key.removesuffix("/conv/kernel") + "/kernel"]
            np.testing.assert_array_equal(value, pretrained[..., : value.shape[-1]], err_msg=key)
        else:
            assert (value == 7).all(), key
    lines = summary.splitlines()
    assert lines[0].startswith("Initialised ") and f"from resnet50 in {converted[50]}" in lines[0]
    assert lines[1].startswith("  new (initial values): ") and new in lines[1]
    assert lines[2].startswith("  dropped (not in this model): ") and dropped in lines[2]
    if name == "aa_resnet50":
        assert "head (2 arrays) (head/fc/bias: (10,) in the source run, (5,) here)" in summary
        assert (
            "the first filters of the source kernel (convolution branch): stage{3,4}/block*/conv2/conv"
            in summary
        )


def _state(depth: int) -> dict[str, np.ndarray]:
    return load_file(weights(depth))


def _without(name: str) -> dict[str, np.ndarray]:
    state = _state(50)
    del state[name]
    return state


def _reshaped(name: str) -> dict[str, np.ndarray]:
    state = _state(50)
    state[name] = state[name][:, :-1]
    return state


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "missing",
            r"no tensor layer3\.2\.bn2\.running_var \(for batch_stats/stage3/block3/bn2/var\): it is not "
            "resnet50",
        ),
        (
            "shape",
            r"layer2\.0\.conv2\.weight has shape \[8, 7, 3, 3\], but resnet50's "
            r"params/stage2/block1/conv2/kernel needs \[8, 8, 3, 3\]",
        ),
        (
            "architecture",
            r"no tensor layer1\.0\.\S+ .* it is not resnet50 \(basic blocks \(2, 2, 2, 2\) \(resnet18\)\)",
        ),
        ("truncated", r"does not read as safetensors \(.*\): truncated or another format"),
        ("suffix", r"give a \.pth, \.pt, \.bin, \.safetensors file"),
    ],
    ids=["missing", "shape", "architecture", "truncated", "suffix"],
)
def test_bad_weights_are_one_line_exit_2_and_nothing_written(capsys, tmp_path, case, message):
    path = tmp_path / "weights.safetensors"
    if case == "missing":
        save_file(_without("layer3.2.bn2.running_var"), path)
    elif case == "shape":
        save_file(_reshaped("layer2.0.conv2.weight"), path)
    elif case == "architecture":
        path = weights(18)
    elif case == "truncated":
        path.write_bytes(weights(50).read_bytes()[:100_000])
    else:
        path = tmp_path / "weights.npz"
        path.write_bytes(b"")
    workdir = tmp_path / "run"
    code, _, err = run_convert(
        capsys, "--source", "timm", "--model", "resnet50", "--weights", str(path), "--workdir", str(workdir)
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --weights {path}")
    assert re.search(message, err), err
    assert not workdir.exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_a_pth_file_without_torch_asks_for_it_or_safetensors(capsys, tmp_path):
    path = tmp_path / "resnet50.pth"
    path.write_bytes(b"PK")
    code, _, err = run_convert(
        capsys,
        "--source",
        "torchvision",
        "--model",
        "resnet50",
        "--weights",
        str(path),
        "--workdir",
        str(tmp_path / "run"),
    )
    assert (code, err) == (
        2,
        f"error: --weights {path}: reading a .pth file needs PyTorch (pip install torch), or give the "
        "weights as .safetensors\n",
    )
    assert not (tmp_path / "run").exists()


def test_a_workdir_with_a_run_is_not_overwritten(converted, capsys):
    before = sorted(p.name for p in pathlib.Path(converted[18]).iterdir())
    code, _, err = run_convert(
        capsys,
        "--source",
        "torchvision",
        "--model",
        "resnet18",
        "--weights",
        str(weights(18)),
        "--workdir",
        converted[18],
    )
    assert code == 2 and err == f"error: --workdir {converted[18]} holds a run already: give a new folder\n"
    assert sorted(p.name for p in pathlib.Path(converted[18]).iterdir()) == before


@pytest.mark.parametrize("size", [32, 33])
def test_symmetric_padding_keeps_every_shape_of_an_augmented_resnet(size):
    """torch's padding (``conv_padding="symmetric"``) changes where strided windows sit, not the map
    sizes: the same variables fit, convolution branches and attention included, at even and odd sizes."""
    images = jnp.zeros((1, size, size, 3))

    def shapes(padding: str) -> tuple:
        model = models.create("aa_resnet18", num_classes=3, width=8, num_heads=2, conv_padding=padding)
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
        return jax.tree.map(lambda x: x.shape, variables), logits.shape

    assert shapes("same") == shapes("symmetric")
    with pytest.raises(ValueError, match=r"conv_padding='valid' must be one of \('same', 'symmetric'\)"):
        models.create("resnet18", num_classes=3, conv_padding="valid")
