"""The fast data path (resopt.data.decoded): same pixels, same augmentation distribution, same batches for
the same seed, the budget fallback, and training that learns as well as on the PIL path."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from resopt.artifacts import Preprocess  # noqa: E402


def _pre(size: int = 32) -> Preprocess:
    return Preprocess(input_size=size, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), resize=None)


def _prepared(root: Path, path: str, **kw):
    from resopt.train import DataOptions, prepare_data

    return prepare_data(DataOptions(str(root), data_path=path, **kw), preprocess=_pre(), device="cpu")


def test_decoded_pixels_equal_the_pil_path(cifar_small: Path) -> None:
    from torchvision import transforms as T

    from resopt.data import load_image, targets_of
    from resopt.data.decoded import DecodedImages

    fast, pil = _prepared(cifar_small, "fast"), _prepared(cifar_small, "pil")
    assert fast.data_path == "fast" and pil.data_path == "pil"
    assert isinstance(fast.train, DecodedImages) and isinstance(fast.test, DecodedImages)
    # 40 of the 400 train images are held out for validation (10% of each class).
    assert len(fast.train) == len(pil.train) == 360 and len(fast.test) == len(pil.test) == 200
    assert fast.train.targets == targets_of(pil.train) and fast.classes == pil.classes
    # Train split: the decoded uint8 pixels / 255 are exactly ToTensor of the same file.
    for i in (0, 57, 359):
        path, label = pil.train.dataset.samples[pil.train.indices[i]]
        assert torch.equal(fast.train.images[i].float() / 255, T.ToTensor()(load_image(path)))
        assert int(fast.train.labels[i]) == label
    # Eval splits: normalized batches are bit-identical to the PIL eval transform's output.
    for x_fast, y_fast, x_pil, y_pil in (fast.test[i] + pil.test[i] for i in (0, 123, 199)):
        assert y_fast == y_pil and torch.equal(x_fast, x_pil)


def test_crop_flip_is_the_pil_crop_then_flip(cifar_small: Path) -> None:
    """For given offsets and flips, the batched gather equals torchvision's pad / crop / hflip on the image."""
    from torchvision.transforms import functional as F

    from resopt.data.decoded import crop_flip

    fast = _prepared(cifar_small, "fast")
    x = fast.train.images[:6]
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [3, 5], [4, 4]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = crop_flip(x, offsets, flips, 4)
    for b in range(6):
        img = F.to_pil_image(x[b])
        ref = F.crop(F.pad(img, 4, fill=0), int(offsets[b, 0]), int(offsets[b, 1]), 32, 32)
        if flips[b]:
            ref = F.hflip(ref)
        assert torch.equal(out[b], F.pil_to_tensor(ref)), b


def _offsets_and_flip(img: torch.Tensor, pad: int = 4) -> tuple[int, int, bool]:
    """Recover (row offset, column offset, flipped) of an augmented copy of the probe image below, whose
    pixel (r, c) is c + 1 in every row and channel, so padding (0) and order are visible."""
    rows_nonzero = (img[0] > 0).any(dim=1).nonzero().flatten()
    cols_nonzero = (img[0] > 0).any(dim=0).nonzero().flatten()
    r0, c0 = int(rows_nonzero[0]), int(cols_nonzero[0])
    top_zero_rows = r0
    oy = pad - top_zero_rows if top_zero_rows else pad + (32 - len(rows_nonzero))
    row = img[0, r0]
    vals = row[row > 0]
    flipped = len(vals) > 1 and bool(vals[0] > vals[-1])
    first = int(row[c0])  # value c + 1 of the source column shown at output column c0
    # unflipped: output column j shows padded column ox + j (source column ox + j - pad, value one more);
    # flipped: padded column ox + 31 - j
    ox = first - 1 + pad - c0 if not flipped else first - (32 - pad) + c0
    return oy, ox, flipped


def test_augmentation_distribution_matches_the_pil_path() -> None:
    from PIL import Image
    from torchvision import transforms as T

    from resopt.data.decoded import DecodedImages, TensorBatches

    probe = (torch.arange(32, dtype=torch.uint8) + 1).expand(3, 32, 32).contiguous()
    draws = 1800
    data = DecodedImages(probe.expand(draws, 3, 32, 32).contiguous(), torch.zeros(draws, dtype=torch.int64),
                         ["a"], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pad=4)
    fast = [(_offsets_and_flip((x * 255).round().to(torch.uint8)))
            for batch, _ in TensorBatches(data, 600, shuffle=True, seed=3) for x in batch]
    torch.manual_seed(3)
    aug = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.PILToTensor()])
    pil_img = Image.fromarray(probe.permute(1, 2, 0).numpy())
    pil = [_offsets_and_flip(aug(pil_img)) for _ in range(draws)]
    for name, draws_ in (("fast", fast), ("pil", pil)):
        for axis in (0, 1):
            counts = torch.bincount(torch.tensor([d[axis] for d in draws_]), minlength=9)
            assert len(counts) == 9, (name, counts)  # offsets 0..8 only
            # uniform over 9 values: each count within 5 sigma of draws/9
            expect, sigma = draws / 9, (draws * (1 / 9) * (8 / 9)) ** 0.5
            assert ((counts - expect).abs() < 5 * sigma).all(), (name, axis, counts)
        flip_rate = sum(d[2] for d in draws_) / draws
        assert abs(flip_rate - 0.5) < 0.05, (name, flip_rate)


def test_augmented_batch_statistics_match_the_pil_path(cifar_small: Path) -> None:
    from resopt.data import make_loader

    def channel_stats(loader) -> tuple[torch.Tensor, torch.Tensor]:
        xs = torch.cat([x for _ in range(3) for x, _ in loader])
        return xs.mean(dim=(0, 2, 3)), xs.std(dim=(0, 2, 3))

    fast, pil = _prepared(cifar_small, "fast"), _prepared(cifar_small, "pil")
    torch.manual_seed(0)
    m_fast, s_fast = channel_stats(make_loader(fast.train, 100, shuffle=True, seed=0))
    m_pil, s_pil = channel_stats(make_loader(pil.train, 100, shuffle=True, seed=0, workers=0))
    assert torch.allclose(m_fast, m_pil, atol=0.03), (m_fast, m_pil)
    assert torch.allclose(s_fast, s_pil, atol=0.03), (s_fast, s_pil)
    # The zero padding is present (as black pixels, -mean/std after normalization) on both paths.
    black = -torch.tensor(_pre().mean) / torch.tensor(_pre().std)
    x_fast = next(iter(make_loader(fast.train, 400, shuffle=True, seed=1)))[0]
    frac = (x_fast == black[None, :, None, None]).all(dim=1).float().mean()
    assert 0.05 < frac < 0.15, frac  # E[padded area] = 1 - (E[32 - |o - 4|] / 32)^2 = 0.11 for offsets 0..8


def test_same_seed_same_batches_and_shards(cifar_small: Path) -> None:
    from resopt.data.decoded import TensorBatches

    train = _prepared(cifar_small, "fast").train

    def batches(seed: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(TensorBatches(train, 64, shuffle=True, seed=seed, **kw))

    a, b, c = batches(5), batches(5), batches(6)
    assert len(a) == len(b) == 6  # 360 fit images (40 held out) / 64, the last partial batch kept
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    # A second epoch draws a new order and new crops from the same generator.
    loader = TensorBatches(train, 360, shuffle=True, seed=5)
    e1, e2 = next(iter(loader))[1], next(iter(loader))[1]
    assert sorted(e1.tolist()) == sorted(e2.tolist()) and not torch.equal(e1, e2)
    # torchrun: two processes with the same seed see disjoint halves of the same epoch.
    r0 = torch.cat([y for _, y in batches(5, rank=0, world_size=2, drop_last=True)])
    r1 = torch.cat([y for _, y in batches(5, rank=1, world_size=2, drop_last=True)])
    assert len(r0) == len(r1) == 128  # 180 each of the 360 fit images, 2 full batches of 64
    full = torch.cat([y for _, y in batches(5)])
    assert torch.equal(r0, full[0:256:2]) and torch.equal(r1, full[1:256:2])


def test_auto_falls_back_when_over_budget(cifar_small: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import resopt.data.decoded as decoded

    assert _prepared(cifar_small, "auto").data_path == "fast"
    # 600 images of 3 x 32 x 32 bytes need 1.8 MB: over a quarter of 4 MB of free RAM.
    monkeypatch.setattr(decoded, "available_memory", lambda device: (4_000_000, None))
    capsys.readouterr()
    prepared = _prepared(cifar_small, "auto")
    assert prepared.data_path == "pil"
    err = capsys.readouterr().err
    assert "data path: pil (600 decoded images need 2 MiB, more than 25% of the 4 MiB of free RAM)" in err
    assert _prepared(cifar_small, "fast").data_path == "fast"  # asked for explicitly: no budget


def test_fast_refuses_large_images_and_unknown_paths() -> None:
    from resopt.data.decoded import choose_data_path
    from resopt.errors import UsageError

    big = Preprocess(input_size=224, mean=(0.5,) * 3, std=(0.25,) * 3, resize=256)
    assert choose_data_path("auto", big, 10).path == "pil"
    with pytest.raises(UsageError, match="--data-path fast is for images of at most 64 px"):
        choose_data_path("fast", big, 10)
    with pytest.raises(UsageError, match="unknown data-path 'gpu'; choose one of: auto, fast, pil"):
        choose_data_path("gpu", _pre(), 10)


def test_cli_rejects_an_unknown_data_path(cli, cifar_small: Path, tmp_path: Path) -> None:
    r = cli("train", "--data", cifar_small, "--data-path", "gpu", "--epochs", "1", "-o", tmp_path / "m.pt")
    assert r.code == 2 and "unknown data-path 'gpu'" in r.stderr
    assert not (tmp_path / "m.pt").exists()


def test_fast_path_trains_as_well_as_pil(cli, cifar_small: Path, tmp_path: Path) -> None:
    """Three epochs of a quarter-width ResNet-20 on 360 images: the fast path learns as well as the PIL path
    (same recipe, different random draws, so a tolerance), and the lineage says which path was taken."""
    from resopt.artifacts import load_checkpoint

    results = {}
    for path in ("fast", "pil"):
        r = cli("train", "--data", cifar_small, "--arch", "resnet20", "--width", "0.25", "--epochs", "3",
                "--batch-size", "32", "--lr", "0.05", "--data-path", path, "-o", tmp_path / f"{path}.pt", "--json")
        assert r.code == 0, r.stderr
        results[path] = r.json()
        ckpt = load_checkpoint(tmp_path / f"{path}.pt")
        entry = ckpt["lineage"][-1]
        assert entry["options"]["data_path"] == path and entry["metrics"]["data_path"] == path
    fast, pil = results["fast"], results["pil"]
    assert fast["data_path"] == "fast" and pil["data_path"] == "pil"
    # test top-1 of the epoch chosen on val, so no longer the best of the epochs on test itself
    assert fast["top1"] > 15.0 and pil["top1"] > 15.0  # both learn (chance: 10%)
    assert fast["top1"] >= pil["top1"] - 8.0, (fast["top1"], pil["top1"])
    assert abs(fast["history"][-1]["loss"] - pil["history"][-1]["loss"]) < 0.25


def test_time_budget_plans_epochs_from_the_first(cli, cifar_small: Path, tmp_path: Path) -> None:
    r = cli("train", "--data", cifar_small, "--arch", "resnet20", "--width", "0.25", "--epochs", "50",
            "--time-budget", "0.001", "-o", tmp_path / "m.pt", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["epochs"] == 1 and len(d["history"]) == 1  # the first epoch alone exceeds the budget
    assert d["history"][0]["images_per_sec"] > 0
    r = cli("train", "--data", cifar_small, "--time-budget", "-1", "-o", tmp_path / "n.pt")
    assert r.code == 2 and "--time-budget must be" in r.stderr


def test_time_budget_plan_and_cosine() -> None:
    from resopt.train.loop import TrainConfig, _plan_epochs

    cfg = TrainConfig(epochs=100, time_budget=60.0)
    planned = {"epochs": 100}
    _plan_epochs(planned, cfg, epoch=0, start_epoch=0, elapsed=7.0, world_size=1)
    assert planned["epochs"] == 8  # 7 s spent, 53 s left: 7 more epochs of 7 s
    _plan_epochs(planned, cfg, epoch=3, start_epoch=0, elapsed=30.0, world_size=1)
    assert planned["epochs"] == 8  # within budget: the plan stands
    _plan_epochs(planned, cfg, epoch=5, start_epoch=0, elapsed=61.0, world_size=1)
    assert planned["epochs"] == 6  # over budget: stop after this epoch
    planned = {"epochs": 5}
    _plan_epochs(planned, TrainConfig(epochs=5, time_budget=1e6), epoch=0, start_epoch=0, elapsed=1.0,
                 world_size=1)
    assert planned["epochs"] == 5  # never more than --epochs
