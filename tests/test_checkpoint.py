import json

import pytest
import torch

from napari_sparseseg import SparseSegError
from napari_sparseseg.core import checkpoint
from napari_sparseseg.core.network import UNet, make_ema


def _model(ndim=2, channels=1):
    torch.manual_seed(0)
    net = UNet(ndim=ndim, in_channels=channels, base_channels=4, depth=2)
    cfg = {"network": net.config, "normalization": {"low": 1, "high": 99.8}, "scale": 1.0,
           "training": {"iteration": 3}}
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn((1, channels) + (8,) * ndim)).sum().backward()
    opt.step()
    return checkpoint.Model(net=net, ema=make_ema(net), config=cfg, optimizer_state=opt.state_dict())


def test_roundtrip_rebuilds_from_config(tmp_path):
    m = _model()
    checkpoint.save(tmp_path / "m", m)
    loaded = checkpoint.load(tmp_path / "m", with_optimizer=True)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.net(x), m.net.eval()(x))
    assert loaded.ema is not None and loaded.optimizer_state["state"]
    assert loaded.config["training"]["iteration"] == 3


def test_weights_are_safetensors_and_optimizer_loads_weights_only(tmp_path):
    checkpoint.save(tmp_path / "m", _model())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["files"]["weights"]["name"].endswith(".safetensors")
    torch.load(tmp_path / "m" / cfg["files"]["optimizer"]["name"], weights_only=True)


def test_old_files_removed_only_after_new_config(tmp_path):
    m = _model()
    checkpoint.save(tmp_path / "m", m)
    m.config["training"]["iteration"] = 10
    checkpoint.save(tmp_path / "m", m)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "ema-00000010.safetensors", "optimizer-00000010.pt", "weights-00000010.safetensors"]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = _model()
    checkpoint.save(tmp_path / "m", m)
    m.config["training"]["iteration"] = 20

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_atomic_write_bytes", boom)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "m", m)
    monkeypatch.undo()
    loaded = checkpoint.load(tmp_path / "m")
    assert loaded.config["training"]["iteration"] == 3


def test_tampered_and_missing_files_are_refused(tmp_path):
    checkpoint.save(tmp_path / "m", _model())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    w = tmp_path / "m" / cfg["files"]["weights"]["name"]
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(SparseSegError, match="does not match the checksum"):
        checkpoint.load(tmp_path / "m")
    w.unlink()
    with pytest.raises(SparseSegError, match=r"weights-00000003.safetensors is missing"):
        checkpoint.load(tmp_path / "m")
    with pytest.raises(SparseSegError, match="model folder .*nothere: not found"):
        checkpoint.load(tmp_path / "nothere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparseSegError, match="has no config.json"):
        checkpoint.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(SparseSegError, match="config.json is not valid JSON"):
        checkpoint.load(tmp_path / "empty")


def test_compatibility_messages():
    cfg = _model().config
    with pytest.raises(SparseSegError, match="stack.tif: is 3D but the model was trained on 2D images"):
        checkpoint.check_compatible(cfg, 3, 1, "stack.tif")
    with pytest.raises(SparseSegError, match="rgb.png: has 3 channel.s. but the model expects 1; convert it to greyscale"):
        checkpoint.check_compatible(cfg, 2, 3, "rgb.png")
    rgb_model = {**cfg, "network": {**cfg["network"], "in_channels": 3}}
    checkpoint.check_compatible(rgb_model, 2, 1, "grey.png")  # repeated into the 3 channels
    with pytest.raises(SparseSegError, match="two.tif: has 2 channel.s. but the model expects 3"):
        checkpoint.check_compatible(rgb_model, 2, 2, "two.tif")


def test_save_removes_only_the_previous_checkpoints_files(tmp_path):
    folder = tmp_path / "m"
    m = _model()
    checkpoint.save(folder, m)
    first = {e["name"] for e in json.loads((folder / "config.json").read_text())["files"].values()}
    # files the user put there that match our name patterns but no checkpoint wrote
    foreign = {"weights-backup.safetensors": b"user weights", "ema-old.safetensors": b"user ema",
               "optimizer-notes.pt": b"user optimizer", "weights-00000001.safetensors": b"older run"}
    for name, data in foreign.items():
        (folder / name).write_bytes(data)
    for it in (10, 20):
        m.config["training"]["iteration"] = it
        checkpoint.save(folder, m)
        for name, data in foreign.items():
            assert (folder / name).read_bytes() == data, name
    names = {p.name for p in folder.iterdir()}
    assert names == set(foreign) | {"config.json", "ema-00000020.safetensors", "optimizer-00000020.pt",
                                    "weights-00000020.safetensors"}
    assert not first & names  # the first checkpoint's own files went with the second save
    loaded = checkpoint.load(folder, with_optimizer=True)
    assert loaded.config["training"]["iteration"] == 20 and loaded.ema is not None


def test_save_drops_a_role_the_new_checkpoint_no_longer_has(tmp_path):
    folder = tmp_path / "m"
    m = _model()
    checkpoint.save(folder, m)
    m.ema, m.optimizer_state = None, None
    m.config["training"]["iteration"] = 4
    checkpoint.save(folder, m)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights-00000004.safetensors"]
    assert checkpoint.load(folder).ema is None


def test_save_never_deletes_outside_the_folder(tmp_path):
    folder = tmp_path / "m"
    checkpoint.save(folder, _model())
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["files"]["optimizer"]["name"] = "../victim.txt"
    (folder / "config.json").write_text(json.dumps(cfg))
    checkpoint.save(folder, _model())
    assert victim.read_text() == "keep me"
    checkpoint.load(folder)


def test_resave_at_same_iteration_is_atomic_and_overwrites_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    m = _model()
    checkpoint.save(folder, m)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_atomic_write_bytes", boom)
    with pytest.raises(OSError):
        checkpoint.save(folder, m)  # same iteration 3: must not overwrite the files config.json names
    monkeypatch.undo()
    for name, data in before.items():
        assert (folder / name).read_bytes() == data, name
    checkpoint.load(folder)  # the previous checkpoint is intact (checksums match)
    checkpoint.save(folder, m)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(checkpoint.load(folder).net(x), m.net.eval()(x))
    cfg = json.loads((folder / "config.json").read_text())
    names = {p.name for p in folder.iterdir()}
    assert {e["name"] for e in cfg["files"].values()} <= names
    assert not (set(before) - {"config.json"}) & names  # the previous checkpoint's files are gone
