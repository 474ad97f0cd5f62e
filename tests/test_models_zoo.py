"""models.zoo: a smoke run trains entries in child processes and rewrites only its section."""

import json
from pathlib import Path

import yaml

from models import zoo
from models.checkpoint import write_run_config
from models.train import parse_args, run_config_from_args


def _row(name, psnr, usage, codes=256, tokens=64):
    return {"name": name, "system": name, "vq": True, "minutes": 1.0, "parameters": 1000, "data": "photos", "steps": 10,
            "psnr": psnr, "ssim": 0.5, "bits_per_image": tokens * 8.0, "tokens_per_image": {"codes": tokens},
            "codebooks": {"codes": {"codes": codes, "usage": usage, "perplexity": 10.0, "dead": 0}}}


def test_verdicts_name_each_missed_target():
    assert zoo._verdict(_row("a", 23.0, 0.6)) == "meets both"
    assert zoo._verdict(_row("a", 21.0, 0.6)) == "misses: PSNR 21.0 < 22"
    assert zoo._verdict(_row("a", 23.0, 0.3)) == "misses: usage 30% < 50%"
    assert zoo._verdict({"error": "exit code 1"}) == "failed: exit code 1"


def test_comparison_states_token_counts_and_sign():
    rows = {"vqvae": _row("vqvae", 22.0, 0.9), "rqvae": _row("rqvae", 23.5, 0.9)}
    line, missing = zoo.comparison(rows)
    assert "`rqvae` 23.50 dB with 64 tokens/image vs `vqvae` 22.00 dB" in line and "better by +1.50 dB" in line
    assert "`rqvae_depth1_f4` missing" in missing
    rows["rqvae"] = _row("rqvae", 21.0, 0.9, tokens=32)
    rows["rqvae_depth1_f4"] = _row("rqvae_depth1_f4", 20.0, 0.9, codes=512)
    first, second = zoo.comparison(rows)
    assert "32 tokens/image" in first and "NOT better by -1.00 dB" in first and "(same codebook size)" in first
    assert "vs `rqvae_depth1_f4` 20.00 dB" in second and "(different codebook size): better by +1.00 dB" in second


def test_section_replaced_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# head\n\n<!-- bench:start -->\nB\n<!-- bench:end -->\n\n" + zoo.START + "\nold\n" + zoo.END
                    + "\n\ntail\n")
    zoo.write_section(zoo.START + "\nnew\n" + zoo.END, path)
    text = path.read_text()
    assert "old" not in text and "new" in text and text.startswith("# head") and text.endswith("tail\n")
    assert "<!-- bench:start -->\nB\n<!-- bench:end -->" in text


def test_smoke_run_trains_in_child_processes_and_writes_the_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    code = zoo.main(["--only", "vae,vqvae", "--steps", "2", "--out", str(tmp_path / "runs"),
                     "--set", "data.num_images=100", "--set", "train.batch_size=4", "--results", str(results)])
    assert code == 0
    text = results.read_text()
    assert "| `vae` |" in text and "| `vqvae` |" in text and "baseline (no codes)" in text
    record = json.loads((tmp_path / "results" / "zoo.json").read_text())
    assert set(record) == {"vae", "vqvae"} and record["vqvae"]["tokens_per_image"]
    assert record["vqvae"]["parameters"] > 0 and "| ? |" not in text
    assert (tmp_path / "results" / "vqvae.png").stat().st_size > 0


def _gen_row(name, per_class):
    return {"name": name, "tokenizer": "vqvae", "tokenizer_psnr": 30.0, "tokenizer_minutes": 1.0, "minutes": 2.0,
            "parameters": 2e6, "steps": 100, "images": 180, "nll": 1.0, "bits_per_token": 1.44,
            "judge_accuracy": sum(per_class) / 10, "judge_per_class": per_class,
            "judge_min_class_accuracy": min(per_class), "judge_fid": 3.0, "judge_judge_accuracy": 0.978,
            "judge_samples_per_s": 50.0}


def test_generator_verdicts_and_section():
    good = dict(_gen_row("vqvae", [0.9] * 10), guided={"cfg": 2.0, "accuracy": 0.986, "min_class_accuracy": 0.96,
                                                       "fid": 70.54})
    bad = dict(_gen_row("var", [0.9] * 7 + [0.5, 0.95, 0.9]), guided={"cfg": 2.0, "error": "exit code 1"})
    assert zoo._generator_verdict(good) == "meets (every class >= 80%)"
    assert zoo._generator_verdict(bad) == "misses: class 7 at 50% < 80%"
    guided = dict(bad, guided={"cfg": 2.0, "accuracy": 0.95, "min_class_accuracy": 0.8, "fid": 80.0})
    assert zoo._generator_verdict(guided) == "meets with --cfg 2 (every class >= 80%)"
    guided["guided"]["min_class_accuracy"] = 0.78
    assert zoo._generator_verdict(guided) == "misses: class 7 at 50% < 80%, lowest class 78% with --cfg 2"
    assert zoo._generator_verdict({"error": "exit code 1"}) == "failed: exit code 1"
    text = zoo.render_generators({"vqvae": good, "var": bad, "maskgit": {"name": "maskgit", "tokenizer": "vqgan",
                                                                         "error": "exit code 2", "minutes": 0.5}},
                                 "cpu", real_fid=1.25)
    assert text.startswith(zoo.GEN_START) and text.endswith(zoo.GEN_END)
    assert "| `var` | `vqvae` (30.0 dB) | 2.00M | 100 | 2.0 | 1.440 | 86.5% (50%) | 3.00 | exit code 1 |" in text
    assert "| 90.0% (90%) | 3.00 | 98.6% (96%) [70.5] | 50.0 |" in text
    assert "failed: exit code 2" in text and "held-out ones: 1.25" in text
    assert "![var](results/gen-var.png)" in text and "gen-maskgit" not in text


# ---------------------------------------------------------------- --stage text

def _text_result(match, **extra):
    return {"images": 200, "nll": 2.0, "bits_per_token": 2.885, "judge_caption_match": match,
            "judge_per_kind": {"circle": match - 0.1, "rectangle": match}, "judge_per_colour": {"red": match},
            "judge_min_group": "circle", "judge_min_group_match": match - 0.1, "judge_fid": 4.0,
            "judge_judge_accuracy": 0.99, "judge_judge_rejection": 1.0, "judge_judge_iou": 0.88,
            "judge_tokenizer_caption_match": 0.9, "judge_samples": 300, "judge_samples_per_s": 20.0, **extra}


def test_text_stage_trains_each_tokenizer_once_and_writes_its_section(tmp_path, monkeypatch):
    """The text stage with the training replaced by a fake child process that writes what a run writes."""
    import models.eval
    commands = []

    def fake_run(cmd, name):
        commands.append(cmd)
        system = cmd[3]
        if cmd[2] == "models.eval":  # the guided judgement of a trained run
            extra = {"judge_scene_iou": 0.7} if system == "make_a_scene" else {}
            result = _text_result(0.75 if system == "make_a_scene" else 0.85, **extra)
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(result))
            return 0, 0.2
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        if "--stage" not in cmd:
            (out / "eval.json").write_text(json.dumps({"psnr": 25.0, "step": 5}))
            write_run_config(out, run_config_from_args(parse_args(cmd[3:])).to_dict())
            return 0, 0.5
        extra = {"judge_scene_iou": 0.61} if system == "make_a_scene" else {}
        (out / "eval.json").write_text(json.dumps(dict(_text_result(0.8 if system == "muse" else 0.5, **extra), step=7)))
        (out / "samples.png").write_bytes(b"png")
        (out / "log.jsonl").write_text(json.dumps({"kind": "event", "event": "start", "time": 0.0, "parameters": 1234})
                                       + "\n" + json.dumps({"kind": "train", "time": 60.0}) + "\n")
        return 0, 1.5

    monkeypatch.setattr(zoo, "_run", fake_run)
    monkeypatch.setattr(models.eval, "shapes_judge", lambda resolution: (None, {"accuracy": 0.99, "rejection": 1.0,
                                                                             "iou": 0.88}))
    results = tmp_path / "RESULTS.md"
    results.write_text("# head\n\n" + zoo.GEN_START + "\nkept\n" + zoo.GEN_END + "\n")
    runs = tmp_path / "runs"
    assert zoo.main(["--stage", "text", "--only", "make_a_scene,muse", "--out", str(runs), "--results", str(results)]) == 0
    tokenizers = [c[3] for c in commands if "--stage" not in c and c[2] == "models.train"]
    assert tokenizers == ["vqgan", "scene"]  # vqgan trained once, shared by make_a_scene and muse
    assert all(c[c.index("--data") + 1] == "shapes" and "data.hflip=false" in c for c in commands
               if "--stage" not in c and c[2] == "models.train")
    assert ["data.half_resolution=0.5" in c for c in commands if "--stage" not in c and c[2] == "models.train"] == [True, False]
    guided = [c for c in commands if c[2] == "models.eval"]
    assert [c[3] for c in guided] == ["make_a_scene", "muse"]
    assert all(c[c.index("--cfg") + 1] == str(zoo.TEXT_GUIDED_CFG) for c in guided)
    scene_cmd = next(c for c in commands if c[3] == "make_a_scene")
    i = scene_cmd.index("--tokenizer")
    assert scene_cmd[i + 1:i + 3] == [str(runs / "tokenizer-vqgan"), str(runs / "tokenizer-scene")]
    assert f"train.judge_per_class={zoo.TEXT_JUDGE_PER_CLASS}" in scene_cmd
    record = json.loads((tmp_path / "results" / "text.json").read_text())
    assert list(record) == ["make_a_scene", "muse"] and record["make_a_scene"]["tokenizer"] == "vqgan + scene"
    assert record["muse"]["parameters"] == 1234 and record["muse"]["steps"] == 7
    assert (tmp_path / "results" / "text-muse.png").read_bytes() == b"png"
    text = results.read_text()
    assert "kept" in text and zoo.TEXT_START in text and zoo.TEXT_END in text
    assert "accepts 99.0% of the real captions" in text
    assert ("| `make_a_scene` | `vqgan + scene` (25.0 dB) | 0.00M | 7 | 1.0 (1.5) | 2.885 | 50.0% | circle 40% | "
            "90.0% | 0.610 | - | 4.00 | 75.0% (circle 65%) [IoU 0.700] | 20.0 | meets with --cfg 3 (>= 70%) |") in text
    assert record["make_a_scene"]["guided"] == {"cfg": 3.0, "caption_match": 0.75, "min_group": "circle",
                                                "min_group_match": 0.65, "scene_iou": 0.7, "fid": 4.0}
    assert "| `muse` |" in text and "meets (>= 70%)" in text and "![muse](results/text-muse.png)" in text
    # a finished tokenizer run of another configuration is trained again, never reused
    commands.clear()
    saved = yaml.safe_load((runs / "tokenizer-scene" / "config.yaml").read_text())
    saved["train"]["steps"] += 1
    (runs / "tokenizer-scene" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert zoo.main(["--stage", "text", "--only", "make_a_scene", "--out", str(runs), "--results", str(results)]) == 0
    assert [c[3] for c in commands if "--stage" not in c and c[2] == "models.train"] == ["scene"]
    # --only keeps the other rows of the record; a failed tokenizer fails its generators
    monkeypatch.setattr(zoo, "_run", lambda cmd, name: (3, 0.1) if "--stage" not in cmd else fake_run(cmd, name))
    assert zoo.main(["--stage", "text", "--only", "dalle", "--out", str(runs), "--results", str(results)]) == 1
    record = json.loads((tmp_path / "results" / "text.json").read_text())
    assert list(record) == ["dalle", "make_a_scene", "muse"]
    assert record["dalle"]["error"] == "tokenizer dvae exit code 3"
    assert "| `dalle` | `dvae` |" in results.read_text() and "failed: tokenizer dvae exit code 3" in results.read_text()


def test_text_verdicts():
    assert zoo._text_verdict(_text_result(0.7)) == "meets (>= 70%)"
    assert zoo._text_verdict(_text_result(0.69)) == "misses: 69% < 70%"
    guided = {"cfg": 3.0, "caption_match": 0.72, "min_group": "circle", "min_group_match": 0.5, "fid": 4.0}
    assert zoo._text_verdict(dict(_text_result(0.5), guided=guided)) == "meets with --cfg 3 (>= 70%)"
    assert zoo._text_verdict(dict(_text_result(0.5), guided=dict(guided, caption_match=0.6))) == "misses: 60% < 70%"
    assert zoo._text_verdict(dict(_text_result(0.5), guided={"cfg": 3.0, "error": "exit code 1"})) == "misses: 50% < 70%"
    assert zoo._text_verdict({"minutes": 1.0}) == "not judged"
    assert zoo._text_verdict({"error": "exit code 1"}) == "failed: exit code 1"
