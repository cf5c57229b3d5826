"""`anybind eval --speech`: image + text bound, audio added onto text, every pair scored."""

import json

from anybind.cli import main
from test_bundle_modalities import avtoy_data, make_avtoy

SETS = ["--set", "train.max_steps=20", "--set", "train.batch_size=32", "--set", "train.val_every=10"]


def test_eval_speech_scores_emergent_pairs_and_resumes(tmp_path, capsys):
    with avtoy_data(tmp_path / "cache"):
        data = make_avtoy(tmp_path / "avtoy")
        argv = ["eval", "--speech", data, "--data", data, "--image", "random:image", "--text", "random:text", "--audio",
                "random:audio", "--no-cascade", "--folds", "0,", "--seeds", "0,", "--out", str(tmp_path / "ev"),
                "--quiet", *SETS]
        # the speech dataset here is the base dataset itself (same ids and groups, by construction)
        assert main(argv) == 0
        first = capsys.readouterr().out
        assert "audio" in first and "spoken" in first and "map: ridge" in first
        rows = json.loads((tmp_path / "ev" / "summary.json").read_text())
        audio = next(r for r in rows if r["query"] == "audio")
        assert audio["n"] == 1 and 0 <= audio["audio_to_image_R@10"][0] <= 1
        assert "ratio audio_to_image_R@10" in audio
        assert main(argv) == 0  # read back from the log: nothing retrained
        assert capsys.readouterr().out.splitlines()[:8] == first.splitlines()[:8]
