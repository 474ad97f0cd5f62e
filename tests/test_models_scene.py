"""VQ-SEG (models/scene.py): the one-hot + edge input of a hand-made map, the weighted BCE against a
hand computation, the pixel accuracy / mean IoU logs, to_rgb's colours, gradients, the round trip,
the base preset and configuration errors."""

import dataclasses

import pytest
import torch

from models.scene import PRESETS, SceneConfig, SceneTokenizer, class_colours

torch.set_num_threads(1)

MAP = torch.tensor([[[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [2, 2, 0, 0],
                     [2, 2, 0, 0]]])


def small(**kw):
    return SceneConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_classes=3, embed_dim=8,
                       codebook_size=16, **kw)


def scenes(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 3, (n, 4, 4), generator=g)
    return base.repeat_interleave(4, 1).repeat_interleave(4, 2)  # blocks of 4x4 pixels


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return SceneTokenizer(small(**kw))


def test_inputs_are_one_hot_classes_and_the_edge_channel():
    m = model()
    x = m.inputs({"scene": MAP, "image": torch.zeros(1, 3, 4, 4)})
    assert x.shape == (1, 4, 4, 4) and x.dtype == torch.float32
    for k in range(3):
        assert torch.equal(x[0, k], (MAP[0] == k).float())
    expected_edges = torch.tensor([[0, 1, 1, 0],
                                   [1, 1, 1, 1],
                                   [1, 1, 1, 1],
                                   [0, 1, 1, 0]]).float()
    assert torch.equal(x[0, 3], expected_edges)
    with pytest.raises(ValueError, match="scene"):
        m.inputs({"image": torch.zeros(1, 3, 4, 4)})


def test_weighted_bce_matches_the_hand_computation():
    weights = (1.0, 2.0, 0.5, 3.0)
    m = model(class_weights=weights)
    target = m.inputs({"scene": MAP})
    logits = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    p = torch.sigmoid(logits)
    per = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    expected = (per * torch.tensor(weights).view(1, 4, 1, 1)).sum() / per.numel()
    torch.testing.assert_close(m.bce(logits, target), expected)


def test_training_loss_is_bce_plus_vq_and_logs_segmentation_scores():
    m = model()
    logits_seen = []
    m.decoder.register_forward_hook(lambda _, __, out: logits_seen.append(out))
    batch = {"scene": scenes(), "image": torch.zeros(2, 3, 16, 16)}
    out = m(batch, 0)
    logits = logits_seen[0]
    x = m.inputs(batch)
    torch.testing.assert_close(out.loss, m.bce(logits, x) + out.logs["vq_loss"])
    torch.testing.assert_close(out.recon, torch.sigmoid(logits))
    pred = logits[:, :3].argmax(1)
    torch.testing.assert_close(out.logs["pixel_acc"], (pred == batch["scene"]).float().mean())
    assert out.indices["codes"].shape == (2, 4, 4)
    out.loss.backward()
    for part in (m.encoder, m.decoder, m.quant_conv, m.post_quant_conv):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0


def test_pixel_accuracy_and_mean_iou_by_hand():
    m = model()
    truth = MAP
    pred = MAP.clone()
    pred[0, 0, 0] = 1          # one background pixel predicted as class 1
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    accuracy, miou = m.segmentation_scores(logits, truth)
    torch.testing.assert_close(accuracy, torch.tensor(15 / 16))
    iou = [7 / 8, 4 / 5, 4 / 4]  # class 0: 7 of 8; class 1: 4 right, 1 extra; class 2 exact
    torch.testing.assert_close(miou, torch.tensor(sum(iou) / 3))
    # classes absent from both prediction and truth do not count
    only_zero = torch.zeros(1, 4, 4, dtype=torch.int64)
    acc, miou = m.segmentation_scores(torch.nn.functional.one_hot(only_zero, 4).permute(0, 3, 1, 2).float(), only_zero)
    assert acc == 1 and miou == 1


def test_to_rgb_colours_classes_and_darkens_edges():
    m = model()
    colours = class_colours(3)
    assert torch.equal(colours[0], torch.ones(3)) and len({tuple(c.tolist()) for c in colours}) == 3
    assert colours.min() >= -1 and colours.max() <= 1
    x = m.inputs({"scene": MAP})
    rgb = m.to_rgb(x)
    assert rgb.shape == (1, 3, 4, 4)
    torch.testing.assert_close(rgb[0, :, 0, 0], colours[0])                 # background, no edge: white
    torch.testing.assert_close(rgb[0, :, 0, 2], (colours[1] - 1) / 2)       # class 1 on an edge: darkened
    x[:, 3] = 0
    torch.testing.assert_close(m.to_rgb(x)[0, :, 3, 1], colours[2])


def test_round_trip_and_decoded_maps_in_unit_range():
    m = model().eval()
    x = m.inputs({"scene": scenes()})
    with torch.no_grad():
        ids = m.encode(x)
        y = m.decode(ids)
    assert ids.shape == (2, 4, 4) and y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(m.reconstruct(x), y, rtol=0, atol=0)


def test_base_preset_on_the_meta_device():
    cfg = PRESETS["base"].model
    assert cfg.num_classes == 158 and PRESETS["tiny"].model.num_classes == 5
    with torch.device("meta"):
        m = SceneTokenizer(cfg)
    assert m.channels == 159 and m.decoder.conv_out.out_channels == 159
    assert m.codebook_sizes() == {"codes": 1024}


@pytest.mark.parametrize("bad, match", [(dict(num_classes=1), "num_classes"),
                                        (dict(class_weights=(1.0, 1.0)), "class_weights"),
                                        (dict(class_weights=(1.0, 1.0, -1.0, 1.0)), "class_weights"),
                                        (dict(codebook_size=1), "codebook_size"),
                                        (dict(dead_code_threshold=-1.0), "dead_code_threshold"),
                                        (dict(resolution=18), "resolution")])
def test_bad_configuration_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        SceneTokenizer(dataclasses.replace(small(), **bad))
