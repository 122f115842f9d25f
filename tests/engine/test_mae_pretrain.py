"""MAE pre-training through lazyconfig_train_net.py (configs/mae/): the checkpoint is MAE's
released format and MIMDet loads it as it is; two CPU processes and a killed-and-resumed run
end with the weights of an uninterrupted one; unreadable images are skipped with a count;
tools/mae_reconstruct.py draws what a checkpoint reconstructs."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import models  # noqa: F401  (before detectron2)
import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from PIL import Image

from models.backbones.mimdet import MIMDetBackbone
from models.checkpoint import load_checkpoint_file, load_mae_into_backbone, load_mae_weights
from models.config import load_config
from tools import mae_reconstruct

REPO = Path(__file__).resolve().parents[2]
MAE_B = "configs/mae/mae_pretrain_vit_base.py"
ITERATIONS = 6


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 images of 40-72 px with a coloured rectangle each, and one file that is not an image."""
    folder = tmp_path_factory.mktemp("pretrain_images")
    rng = np.random.default_rng(0)
    for i in range(12):
        height, width = rng.integers(40, 72, size=2)
        pixels = np.full((height, width, 3), 128, np.uint8)
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[y:y + height // 2, x:x + width // 2] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return folder


TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
              "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]


def tiny(folder: Path, output_dir: Path, *extra: str):
    return [
        "--config-file", MAE_B, *TINY_MODEL,
        f"dataloader.train.dataset.folder={folder}", "dataloader.train.total_batch_size=4",
        "dataloader.train.num_workers=0", f"train.max_iter={ITERATIONS}", "train.checkpointer.period=2",
        "train.log_period=1", "train.amp.enabled=False", "train.seed=3", f"train.output_dir={output_dir}", *extra,
    ]


def run(args, **env) -> subprocess.CompletedProcess:
    # One thread per process: bit-identical runs need the same thread count.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "tests/engine/fault_runner.py", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def final_weights(output_dir: Path) -> dict:
    return load_checkpoint_file(str(output_dir / "model_final.pth"))["model"]


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("mae_uninterrupted")
    result = run(tiny(image_folder, output_dir))
    assert result.returncode == 0, result.stdout[-4000:]
    return output_dir, result.stdout


def test_vit_b_pretraining_writes_maes_full_checkpoint_and_mimdet_loads_it_as_it_is(image_folder, tmp_path, interop):
    result = run(["--config-file", MAE_B, f"dataloader.train.dataset.folder={image_folder}",
                  "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "train.max_iter=1",
                  f"train.output_dir={tmp_path}"])
    assert result.returncode == 0, result.stdout[-4000:]
    assert "learning rate 1.17e-06 = base 0.00015 x batch 2 / 256" in result.stdout
    state = load_checkpoint_file(str(tmp_path / "model_final.pth"))["model"]
    released = interop("mae_pretrain_vit_b_full.tsv").entries
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: shape for k, (shape, _) in released.items()}
    assert all(str(v.dtype).replace("torch.", "") == released[k][1] for k, v in state.items())

    backbone = MIMDetBackbone()  # ViT-B, 4 decoder blocks: the paper's "4xdec"
    report = load_mae_into_backbone(backbone, str(tmp_path / "model_final.pth"))
    assert [k for k in report.missing if k.startswith(("encoder.blocks", "encoder.norm", "decoder."))] == []
    assert torch.equal(backbone.encoder.blocks[11].attn.qkv.weight, state["blocks.11.attn.qkv.weight"])
    assert torch.equal(backbone.decoder.decoder_blocks[3].mlp.fc1.bias, state["decoder_blocks.3.mlp.fc1.bias"])


def test_unreadable_files_in_the_folder_are_skipped_with_a_count(uninterrupted, image_folder):
    _, log = uninterrupted
    assert f"{image_folder}: skipped 1 of 13 files that are not readable images, e.g. broken.jpg" in log
    assert "12 images" in log


def test_a_killed_and_resumed_run_ends_with_exactly_the_uninterrupted_weights(uninterrupted, image_folder,
                                                                               tmp_path):
    killed = run(tiny(image_folder, tmp_path), MIMDET_KILL_AT="3:step")
    assert killed.returncode == -signal.SIGKILL
    resumed = run(["--resume", *tiny(image_folder, tmp_path)])
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "model_0000001.pth" in resumed.stdout and "Starting training from iteration 2" in resumed.stdout
    expected, got = final_weights(uninterrupted[0]), final_weights(tmp_path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_two_cpu_processes_end_with_the_uninterrupted_weights(uninterrupted, image_folder, tmp_path,
                                                             tmp_path_factory):
    """Each image's crop, flip and hidden patches follow from its place in the data stream, and
    every image hides as many patches, so 2 processes x 2 images compute the 4-image step of
    one process; only the order of floating-point sums differs."""
    result = run(["--num-cpu-processes", "2", *tiny(image_folder, tmp_path)])
    assert result.returncode == 0, result.stdout[-4000:]
    assert "World size: 2" in result.stdout
    start = tmp_path_factory.mktemp("mae_seed_4")
    other = run(tiny(image_folder, start, "train.seed=4"))  # another data stream: how far apart runs can be
    assert other.returncode == 0, other.stdout[-4000:]
    expected, got, unrelated = final_weights(uninterrupted[0]), final_weights(tmp_path), final_weights(start)
    difference = max((expected[k] - got[k]).abs().max().item() for k in expected)
    apart = max((expected[k] - unrelated[k]).abs().max().item() for k in expected)
    assert difference < 1e-5 and apart > 1e-3, (difference, apart)


def test_mask_ratio_outside_zero_one_is_named(image_folder, tmp_path):
    result = run(tiny(image_folder, tmp_path, "model.mask_ratio=1.5"))
    assert result.returncode != 0
    assert "mask_ratio must be a number in (0, 1), got 1.5" in result.stdout
    assert not (tmp_path / "last_checkpoint").exists()


def test_the_reconstruction_picture_shows_the_visible_patches_as_they_are(uninterrupted, image_folder, tmp_path):
    checkpoint = str(uninterrupted[0] / "model_final.pth")
    model = mae_reconstruct.load_model(MAE_B, checkpoint, TINY_MODEL, "cpu")
    crops = torch.stack([mae_reconstruct.square_crop(str(image_folder / f"{i:02d}.png"), 32) for i in range(3)])
    rows = mae_reconstruct.reconstruct(model, crops, 0.75, seed=0)
    for crop, (original, masked, reconstruction, pasted) in zip(crops, rows):
        assert np.array_equal(original, crop.permute(1, 2, 0).numpy())
        blocks = lambda a: a.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)  # noqa: E731
        visible = (blocks(masked) == blocks(original)).all(1)
        assert visible.sum() == int(16 * (1 - 0.75))  # exactly the kept patches are shown
        assert (blocks(pasted)[visible] == blocks(original)[visible]).all()
        assert (blocks(pasted)[~visible] == blocks(reconstruction)[~visible]).all()

    picture = mae_reconstruct.run(mae_reconstruct.parse_args(
        [str(image_folder), "--config-file", MAE_B, "--checkpoint", checkpoint, "--output", str(tmp_path / "r.png"),
         "--max-images", "3", "--opts", *TINY_MODEL]))
    assert Image.open(picture).size == (4 * 224, mae_reconstruct.TITLE_HEIGHT + 3 * 224)  # 32 px drawn 7x


def test_a_checkpoint_of_another_width_names_the_mismatched_keys_in_mimdet(uninterrupted):
    detector = instantiate(load_config("configs/test/tiny_mimdet.py").model)  # a 96-wide ViT; the checkpoint's is 32
    named = r"blocks\.0\.attn\.qkv\.weight: checkpoint \(96, 32\) vs backbone \(288, 96\)"
    with pytest.raises(ValueError, match=named):
        load_mae_weights(detector, str(uninterrupted[0] / "model_final.pth"))


def test_the_reconstruction_tool_names_bad_inputs_and_skips_unreadable_images(uninterrupted, image_folder, tmp_path,
                                                                              caplog):
    checkpoint = str(uninterrupted[0] / "model_final.pth")
    base = ["--config-file", MAE_B, "--output", str(tmp_path / "r.png"), "--opts", *TINY_MODEL]
    assert mae_reconstruct.main([str(image_folder), "--checkpoint", str(tmp_path / "none.pth"), *base]) == 2
    assert "--checkpoint " + str(tmp_path / "none.pth") + ": no such file" in caplog.text
    assert mae_reconstruct.main([str(image_folder), "--checkpoint", checkpoint, "--mask-ratio", "0.97", *base]) == 2
    assert "mask_ratio 0.97 hides every one of the 16 patches" in caplog.text
    broken = image_folder / "broken.jpg"
    assert mae_reconstruct.main([str(broken), str(image_folder / "00.png"), "--checkpoint", checkpoint, *base]) == 0
    assert f"skipping {broken}, which cannot be read as an image" in caplog.text
    assert Image.open(tmp_path / "r.png").size == (4 * 224, mae_reconstruct.TITLE_HEIGHT + 224)  # one image drawn
    # --max-images counts images drawn: the unreadable one gives its place to the next.
    two = [str(broken), str(image_folder / "00.png"), str(image_folder / "01.png"), "--max-images", "2"]
    assert mae_reconstruct.main([*two, "--checkpoint", checkpoint, *base]) == 0
    assert Image.open(tmp_path / "r.png").size == (4 * 224, mae_reconstruct.TITLE_HEIGHT + 2 * 224)
    assert mae_reconstruct.main([str(image_folder), "--checkpoint", str(tmp_path), *base]) == 2
    assert f"--checkpoint {tmp_path} is a folder, not a checkpoint file (.pth)" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--output", "{tmp}"], "--output {tmp} is a folder; give the picture's file name, e.g. {tmp}/reconstruction.png"),
    (["--output", "{tmp}/r.xyz"], "--output {tmp}/r.xyz: .xyz is not a picture format PIL writes"),
    (["--max-images", "0"], "--max-images must be >= 1, got 0"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--output", "{tmp}/model.pth/sheets/r.png"], "--output {tmp}/model.pth/sheets/r.png: {tmp}/model.pth is not a "
                                                   "folder, so no picture can be written below it"),
], ids=["folder", "extension", "max_images", "device", "below-a-file"])
def test_the_reconstruction_tool_refuses_bad_arguments_before_loading_anything(tmp_path, capsys, argv, message):
    (tmp_path / "model.pth").write_bytes(b"weights")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    with pytest.raises(SystemExit) as stop:
        mae_reconstruct.parse_args(["image.png", "--config-file", MAE_B, "--checkpoint", "c.pth", *argv])
    assert stop.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
