import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vtoken.bench import fashion
from vtoken.training.train_vit import (
    CHECKPOINT,
    METRICS,
    augment_batch,
    evaluate,
    micro_vit_config,
    num_patch_tokens,
    preprocess,
    train_vit,
)

TINY = dict(hidden_size=16, num_layers=1, num_heads=2)


def _data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2 * n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 2 * n)
    return x[:n], y[:n], x[n:], y[n:]


def _state(path):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(path)
    return model, model.state_dict()


def _fashion_available() -> bool:
    try:
        fashion.load_fashion("test")
    except FileNotFoundError:
        return False
    return True


def test_config_gives_196_patch_tokens():
    from transformers import ViTForImageClassification

    cfg = micro_vit_config()
    assert num_patch_tokens(cfg) == 196
    assert cfg.num_channels == 1 and cfg.num_labels == 10
    assert cfg.id2label[0] == "tshirt" and cfg.label2id["boot"] == 9
    model = ViTForImageClassification(micro_vit_config(**TINY)).eval()
    with torch.no_grad():
        out = model(pixel_values=preprocess(np.zeros((1, 28, 28), np.uint8)), output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, 197, 16)
    assert out.logits.shape == (1, 10)


def test_preprocess_and_augment():
    x = np.full((3, 28, 28), 255, np.uint8)
    x[:, :, 0] = 0
    px = preprocess(x)
    assert px.shape == (3, 1, 28, 28) and px.dtype == torch.float32
    assert px.max().item() == 1.0 and px.min().item() == -1.0
    a = augment_batch(x, np.random.default_rng(1))
    b = augment_batch(x, np.random.default_rng(1))
    assert a.shape == x.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    rgb = augment_batch(np.repeat(x[..., None], 3, -1), np.random.default_rng(1))   # channel axes move along
    assert rgb.shape == (3, 28, 28, 3) and all(np.array_equal(rgb[..., c], a) for c in range(3))


def test_evaluate_counts_correct():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pixel_values):
            logits = torch.zeros(len(pixel_values), 10)
            logits[:, 3] = 1
            return SimpleNamespace(logits=logits)

    labels = np.array([3, 3, 1, 3, 0])
    assert evaluate(Fixed(), np.zeros((5, 28, 28), np.uint8), labels, batch_size=2) == pytest.approx(0.6)


def test_train_save_resume_bit_exact(tmp_path):
    data = _data()
    kw = dict(epochs=2, batch_size=8, lr=1e-3, seed=3, config=micro_vit_config(**TINY), data=data, progress=False,
              log=None, checkpoint_every=1, augment=True, eval_batch_size=4)
    full = train_vit(tmp_path / "full", **kw)
    assert full["finished"] and full["step"] == full["total_steps"] == 2
    assert [h["epoch"] for h in full["history"]] == [1, 2]
    assert json.loads((tmp_path / "full" / METRICS).read_text())["test_accuracy"] == full["test_accuracy"]

    part = train_vit(tmp_path / "split", **kw, stop_after=1)
    assert not part["finished"] and part["step"] == 1
    assert (tmp_path / "split" / CHECKPOINT).is_file()
    assert not (tmp_path / "split" / "model.safetensors").exists()
    torch.manual_seed(123)  # disturb the global RNG: the checkpoint restores it
    logs = []
    resumed = train_vit(tmp_path / "split", **{**kw, "log": logs.append})
    assert any("resumed" in line and "step 1/2" in line for line in logs)  # one step left, not a fresh run
    assert resumed["finished"] and resumed["step"] == 2
    assert resumed["history"] == [{**h, "seconds": resumed["history"][i]["seconds"]}
                                  for i, h in enumerate(full["history"])]

    model, a = _state(tmp_path / "full")
    _, b = _state(tmp_path / "split")
    assert type(model).__name__ == "ViTForImageClassification"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert evaluate(model, data[2], data[3]) == full["test_accuracy"]

    with pytest.raises(ValueError, match="lr"):
        train_vit(tmp_path / "full", **{**kw, "lr": 2e-3})
    again = train_vit(tmp_path / "fresh", **{**kw, "epochs": 1}, resume=False)
    assert again["step"] == 1


@pytest.mark.skipif(not _fashion_available(), reason=f"Fashion-MNIST not installed (apt {fashion.APT_PACKAGE})")
def test_real_data_two_steps(tmp_path):
    m = train_vit(tmp_path, epochs=1, batch_size=16, lr=1e-3, seed=0, limit=32, config=micro_vit_config(**TINY),
                  progress=False, log=None)
    assert m["finished"] and m["step"] == 2 and m["train_images"] == m["test_images"] == 32
    model, _ = _state(tmp_path)
    images, labels = fashion.load_fashion("test")
    assert evaluate(model, images[:32], labels[:32], batch_size=16) == m["test_accuracy"]


def test_shipped_micro_vit_loads_with_auto_classes():
    from transformers import AutoModelForImageClassification

    from vtoken.bench.common import default_vit_path

    path = default_vit_path()
    if not (path / "config.json").is_file():
        pytest.skip("no shipped micro ViT in this checkout")
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    assert num_patch_tokens(model.config) >= 196
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["finished"] and 0 < metrics["test_accuracy"] <= 1
    with torch.no_grad():
        out = model(pixel_values=preprocess(np.zeros((2, 28, 28), np.uint8)))
    assert out.logits.shape == (2, 10)
