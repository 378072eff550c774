import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError
from napari_sparseseg.core import scale
from napari_sparseseg.core.network import UNet


def test_object_diameter_in_plane_for_stacks():
    lab = np.zeros((10, 40, 40), int)
    lab[2:6, 10:30, 10:30] = 1  # 4 slices of a 20x20 square
    assert scale.object_diameters(lab)[0] == pytest.approx(2 * np.sqrt(400 / np.pi))
    lab2 = np.zeros((40, 40), int)
    lab2[:10, :10] = 3
    lab2[20:40, 20:40] = 5
    assert scale.object_diameters(lab2, background_id=5) == pytest.approx([2 * np.sqrt(100 / np.pi)])


def _squares(side: int, n: int, size: int = 400, jitter: int = 0, seed: int = 0, sides=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), int)
    step = size // 4
    for i in range(n):
        s = sides[i] if sides is not None else (side + int(rng.integers(-jitter, jitter + 1)) if jitter else side)
        y, x = divmod(i, 4)
        lab[y * step : y * step + s, x * step : x * step + s] = i + 1
    return lab


def test_each_image_gets_the_zoom_of_its_own_objects():
    small, big, empty = _squares(16, 8, jitter=2), _squares(80, 8, jitter=8, seed=1), np.zeros((50, 50), int)
    d = scale.image_diameters([small, big, empty])
    assert d[0] == pytest.approx(2 * np.sqrt(256 / np.pi), rel=0.1)  # 8 objects each: barely shrunk
    assert d[1] == pytest.approx(2 * np.sqrt(6400 / np.pi), rel=0.1) and d[2] is None
    zooms = scale.training_zooms(d, 2)
    assert zooms[0] == pytest.approx(32 / d[0]) and zooms[1] == pytest.approx(32 / d[1])
    # an image without objects takes the common (geometric median) diameter
    assert zooms[2] == pytest.approx(32 / np.sqrt(d[0] * d[1]))
    cfg = scale.scale_config(d, 2)
    assert cfg["mixed"] and cfg["target_diameter"] == 32
    # the user's diameter overrides, for every image
    assert scale.training_zooms(d, 2, user_diameter=64) == [0.5, 0.5, 0.5]
    assert not scale.scale_config(d, 2, user_diameter=64)["mixed"]


def test_one_odd_object_does_not_make_its_image_a_scale_of_its_own():
    # plants whose leaves vary a lot; one image's single labeled leaf is small: that is noise in the
    # per-image estimate, not a smaller scale (shrunk towards the common diameter)
    leaves = [18, 22, 27, 33, 40, 48, 58, 70]  # within a plant, leaves vary a lot
    images = [_squares(0, 8, sides=leaves) for _ in range(5)]
    images.append(_squares(16, 1))
    d = scale.image_diameters(images)
    assert d[-1] > 30 and not scale.mixed_sizes(d)
    # the same image with many small objects is a scale of its own
    images[-1] = _squares(12, 8, sides=[10, 11, 11, 12, 12, 13, 13, 14])
    d = scale.image_diameters(images)
    assert d[-1] < 20 and scale.mixed_sizes(d)


def test_a_diameter_from_a_few_painted_objects_is_reported_as_uncertain():
    labs = [_squares(0, 3, sides=[40, 60, 90])]  # 45, 68 and 102 px across
    note = scale.few_objects_note(labs, scale.image_diameters(labs))
    assert note == ("object diameter 68 px, from only 3 painted objects (45-102 px): it may be off by up to 1.7x, "
                    "and the images are zoomed by it; set the object diameter if you know it")
    one = [_squares(0, 1, sides=[40])]
    assert "from only 1 painted object: it may be off by up to 2.4x" in scale.few_objects_note(
        one, scale.image_diameters(one))
    assert scale.diameter_uncertainty(labs) == pytest.approx(1.7, abs=0.05) and scale.uncertain_diameter(labs)
    # sixteen objects of about one size: no warning
    many = [_squares(60, 16, jitter=3)]
    assert scale.few_objects_note(many, scale.image_diameters(many)) == ""
    assert not scale.uncertain_diameter(many) and scale.diameter_uncertainty([np.zeros((8, 8), int)]) == 1.0


def test_a_few_painted_objects_may_enlarge_images_but_keep_their_resolution():
    few = [_squares(0, 3, sides=[40, 60, 90])]  # median 68 px: zoom 32/68 if it were trusted
    d = scale.image_diameters(few)
    assert scale.training_zooms(d, 2) == [pytest.approx(32 / d[0])]
    assert scale.training_zooms(d, 2, keep_resolution=True) == [1.0]
    cfg = scale.scale_config(d, 2, keep_resolution=True)
    assert cfg["zoom"] == 1.0 and cfg["unshrunk"] and cfg["diameter"] == pytest.approx(d[0])
    assert not scale.scale_config(d, 2)["unshrunk"]
    assert scale.diameter_note({"scale": cfg}, 2, 1.0) == (
        "object diameter 68 px, the training scale, at full resolution (few painted cells)")
    assert scale.few_objects_note(few, d, kept=True) == (
        "object diameter 68 px, from only 3 painted objects (45-102 px): it may be off by up to 1.7x, so the images "
        "are not shrunk for it (dense tissue kept at full resolution); set the object diameter if you know it")
    # small objects are still enlarged; the user's diameter rules
    small = [_squares(0, 3, sides=[12, 18, 30])]
    ds = scale.image_diameters(small)
    assert scale.training_zooms(ds, 2, keep_resolution=True) == [pytest.approx(32 / ds[0])]
    assert not scale.scale_config(ds, 2, keep_resolution=True)["unshrunk"]
    assert scale.training_zooms(d, 2, user_diameter=64, keep_resolution=True) == [0.5]
    assert scale.scale_config(d, 2, user_diameter=64, keep_resolution=True)["zoom"] == 0.5


def _tissue_and_blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 240 x 240 tissue of ~60 px cells between bright walls, and bright ~60 px discs on a dark
    background; dense labels of each (the cells, the discs)."""
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:240, :240]
    grid = np.array([(y, x) for y in range(30, 240, 60) for x in range(30, 240, 60)])
    centres = grid + rng.integers(-8, 9, grid.shape)
    cells = 1 + np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1)
    tissue = 0.3 + 0.7 * find_boundaries(cells, mode="thick") + 0.05 * rng.normal(size=cells.shape)
    discs = np.zeros((240, 240), int)
    for i, (y, x) in enumerate(centres[::2], start=1):
        discs[(yy - y) ** 2 + (xx - x) ** 2 < 27**2] = i
    blobs = 0.1 + 0.8 * (discs > 0) + 0.05 * rng.normal(size=discs.shape)
    return tissue.astype(np.float32), cells, blobs.astype(np.float32), discs


def test_dense_tissue_from_a_few_painted_cells_keeps_its_resolution_and_blobs_are_zoomed():
    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core.annotation import looks_dense

    tissue, cells, blobs, discs = _tissue_and_blobs()
    cfg = TrainConfig(iterations=1, method="spoco", patch_shape=(32, 32), base_channels=4, depth=2)
    painted = np.where(np.isin(cells, [1, 6, 11]), cells, 0)  # 3 of 16 cells, ~60 px across
    dots3 = np.where(np.isin(discs, [1, 2, 3]), discs, 0)
    assert looks_dense([tissue[None]], [painted]) and not looks_dense([blobs[None]], [dots3])
    # ignored pixels are not counted as what lies around the painted objects
    assert looks_dense([tissue[None]], [painted], ignore=[np.zeros_like(painted, bool)])
    tr = Trainer([tissue], [painted], cfg)
    assert tr.samples[0].zoom == 1.0 and tr.samples[0].labels.shape == (240, 240)
    assert tr.scale_config["unshrunk"] and tr.scale_config["zoom"] == 1.0
    assert "dense tissue kept at full resolution" in tr.note
    # the same cells with the diameter given: shrunk to the target
    given = Trainer([tissue], [painted], TrainConfig(**{**cfg.__dict__, "diameter": 64.0}))
    assert given.samples[0].zoom == 0.5 and not given.scale_config["unshrunk"]
    # three painted discs on a background: zoomed to the target as before (their edges are not thin walls)
    dots = Trainer([blobs], [dots3], cfg)
    assert dots.samples[0].zoom == pytest.approx(32 / 54, rel=0.1) and not dots.scale_config["unshrunk"]
    assert "and the images are zoomed by it" in dots.note


def test_zoom_limits_and_errors():
    assert scale.zoom_for(1000, 2) == scale.MIN_ZOOM and scale.zoom_for(2, 2) == scale.MAX_ZOOM
    assert scale.zoom_for(16, 3) == 1.0
    with pytest.raises(SparseSegError, match="object diameter must be a positive number of pixels, got -3"):
        scale.zoom_for(-3, 2)
    assert scale.model_zoom({"scale": 0.5}) == 0.5  # models written before per-image zooms
    assert scale.model_zoom({"scale": {"zoom": 0.25}}) == 0.25


def test_the_diameter_note_says_when_objects_are_seen_at_another_size_than_theirs():
    # objects smaller than half the target are enlarged 2x only: the note must not claim 16 px painted
    small = {"scale": scale.scale_config([10.0, 10.0], 2)}
    assert scale.model_zoom(small) == scale.MAX_ZOOM
    assert scale.diameter_note(small, 2, scale.model_zoom(small)) == (
        "object diameter 10 px, the training scale")  # the training images were zoomed the same way
    usual = {"scale": scale.scale_config([30.4, 30.4], 2)}
    assert scale.diameter_note(usual, 2, scale.model_zoom(usual)) == "object diameter 30 px, the training scale"
    assert scale.diameter_note(usual, 2, scale.zoom_for(12, 2), 12) == (
        "object diameter 12 px, given; zoomed as for 16 px: objects are enlarged at most 2x")
    assert scale.diameter_note(usual, 2, scale.zoom_for(20, 2), 20) == "object diameter 20 px, given"
    # a size model's estimate at a zoom limit is a bound
    mixed = {"scale": dict(scale.scale_config([20.0, 60.0], 2), size_model={"weights": []})}
    assert scale.uses_size_model(mixed)
    assert scale.diameter_note(mixed, 2, 1.0) == "object diameter 32 px, estimated from the image"
    assert scale.diameter_note(mixed, 2, scale.MAX_ZOOM) == (
        "object diameter 16 px or less, estimated from the image: objects are enlarged at most 2x")
    assert scale.diameter_note(mixed, 2, scale.MIN_ZOOM) == (
        "object diameter 512 px or more, estimated from the image: objects are shrunk at most 16x")
    assert scale.diameter_note({"scale": 0.5}, 2, 0.5) == "object diameter 64 px, the training scale"  # old models


def _disks(radius: float, size: int = 192, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size), np.float32)
    for _ in range(int(size * size / (9 * radius * radius))):
        cy, cx = rng.uniform(0, size, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = 1.0
    return (img + rng.normal(0, 0.05, img.shape).astype(np.float32))[None]


def test_size_model_recovers_the_zoom_of_a_new_image():
    torch.manual_seed(0)
    net = UNet(2, 1, 4, base_channels=8, depth=3)
    # training images with objects of 8 and 24 px radius, each zoomed to the target diameter
    images = [_disks(8, seed=1), _disks(24, size=384, seed=2)]
    zooms = [32 / 16, 32 / 48]
    sm = scale.fit_size_model(net, images, zooms, views=60)
    assert sm["loo_rmse_log"] < 0.35
    cfg = {"scale": {"zoom": 1.0, "mixed": True, "size_model": sm}}
    for radius, size in ((8, 192), (16, 256), (24, 384)):
        est = scale.estimate_zoom(net, cfg, _disks(radius, size=size, seed=5))
        assert est == pytest.approx(16 / radius, rel=0.35), (radius, est)


def test_size_model_reads_every_encoder_level_and_old_models_their_deepest():
    torch.manual_seed(0)
    net = UNet(2, 1, 4, base_channels=4, depth=3)  # encoder levels of 4, 8 and 16 channels
    x = torch.rand(1, 1, 64, 64)
    assert scale.pooled_features(net, x).shape == (2 * (4 + 8 + 16),)
    assert scale.pooled_features(net, x, "deepest").shape == (2 * 16,)
    sm = scale.fit_size_model(net, [_disks(8, size=96, seed=1)], [2.0], views=8)
    assert sm["features"] == "levels" and len(sm["weights"]) == 2 * (4 + 8 + 16)
    # a size model written before (no "features" entry) was fitted on the deepest level: it still loads
    old = {"mean": [0.0] * 32, "std": [1.0] * 32, "weights": [0.0] * 32, "bias": 0.25}
    assert scale.predict_log_error(net, old, x) == pytest.approx(0.25)


def test_each_round_of_the_size_model_starts_where_the_last_one_ended(monkeypatch):
    # a size model that always says "objects are 1.5x the target": every round divides the zoom by 1.5
    monkeypatch.setattr(scale, "predict_log_error", lambda net, sm, x, rng=None: float(np.log(1.5)))
    net = UNet(2, 1, 4, base_channels=4, depth=2)
    img = np.zeros((1, 64, 64), np.float32)
    cfg = {"scale": {"zoom": 1.0, "mixed": True, "size_model": {"weights": []}}}
    assert scale.estimate_zoom(net, cfg, img, passes=1) == pytest.approx(1 / 1.5)
    assert scale.estimate_zoom(net, cfg, img, passes=2) == pytest.approx(1 / 1.5**2)
    assert scale.SIZE_PASSES == 4 and scale.estimate_zoom(net, cfg, img) == pytest.approx(1 / 1.5**4)
    monkeypatch.setattr(scale, "SIZE_PASSES", 3)  # read when called (benchmarks/sweep.py sets it)
    assert scale.estimate_zoom(net, cfg, img) == pytest.approx(1 / 1.5**3)


def test_z_zoom_makes_voxels_isotropic_at_the_models_scale():
    # no voxel size: z is left as it is (what every model trained without one assumes)
    assert scale.z_zoom(0.5, None) == 1.0
    # 0.3 um deep, 0.1 um wide voxels; y/x shrunk by half: z is enlarged by 1.5
    assert scale.z_zoom(0.5, (0.3, 0.1, 0.1)) == pytest.approx(1.5)
    assert scale.z_zoom(2.0, (1.0, 1.0, 1.0)) == pytest.approx(2.0)  # isotropic: z as y/x
    assert scale.z_zoom(1.0, (1.0, 0.2, 0.3)) == pytest.approx(4.0)  # y/x mean 0.25; at the limit
    assert scale.z_zoom(1.0, (100.0, 1.0, 1.0)) == scale.MAX_Z_ZOOM  # clipped: memory
    assert scale.z_zoom(1.0, (0.001, 1.0, 1.0)) == scale.MIN_Z_ZOOM


def test_voxel_size_errors_name_the_input():
    assert scale.check_voxel_size(None) is None
    assert scale.check_voxel_size([0.3, 0.1, 0.1]) == (0.3, 0.1, 0.1)
    with pytest.raises(SparseSegError, match=r"--voxel-size: expected three positive numbers \(z y x\), got \(0.0, 1.0, 1.0\)"):
        scale.check_voxel_size((0.0, 1.0, 1.0), "--voxel-size")
    with pytest.raises(SparseSegError, match=r"stack.tif: voxel size: expected three positive numbers"):
        scale.check_voxel_size((1.0, 1.0), "stack.tif: voxel size")
    with pytest.raises(SparseSegError, match=r"voxel size: expected three numbers \(z y x\), got 'abc'"):
        scale.check_voxel_size("abc")


def test_training_with_a_voxel_size_zooms_z_and_the_model_remembers_it():
    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core.prediction import predict_scaled
    from napari_sparseseg.core.samples import synthetic_cells

    img, lab = synthetic_cells((12, 64, 64), radius=(6.0, 9.0), seed=3)
    cfg = TrainConfig(iterations=1, method="spoco", patch_shape=(16, 32, 32), base_channels=4, depth=2, diameter=16)
    flat = Trainer([img], [lab], cfg)
    assert flat.samples[0].labels.shape == (12, 64, 64) and flat.scale_config["voxel_size"] is None
    # stated per stack (file metadata): z twice as deep as wide -> z zoomed 2x at zoom 1
    deep = Trainer([img], [lab], TrainConfig(**{**cfg.__dict__, "voxel_size": None}), voxel_sizes=[(2.0, 1.0, 1.0)])
    assert deep.samples[0].z_zoom == pytest.approx(2.0) and deep.samples[0].labels.shape == (24, 64, 64)
    assert deep.scale_config["voxel_size"] == [2.0, 1.0, 1.0]
    # the config's voxel size overrides what the stacks state
    over = Trainer([img], [lab], TrainConfig(**{**cfg.__dict__, "voxel_size": (1.0, 1.0, 1.0)}),
                   voxel_sizes=[(2.0, 1.0, 1.0)])
    assert over.samples[0].labels.shape == (12, 64, 64) and over.scale_config["voxel_size"] == [1.0, 1.0, 1.0]
    # prediction takes the model's voxel size for a stack that states none, and returns the stack's shape
    model = deep.model
    p = predict_scaled(model, img, device="cpu")
    assert p.z_zoom == pytest.approx(2.0) and p.embeddings.shape[1:] == (24, 64, 64) and p.shape == (12, 64, 64)
    assert predict_scaled(model, img, device="cpu", voxel_size=(1.0, 1.0, 1.0)).embeddings.shape[1:] == (12, 64, 64)
    with pytest.raises(SparseSegError, match="1 voxel size"):
        Trainer([img, img], [lab, lab], cfg, voxel_sizes=[(2.0, 1.0, 1.0)])
