"""A saved model says how it was trained, and reports name models by it, not by a path."""

from __future__ import annotations

from apr import model as model_lib
from apr.report import compare, markdown, write_plots
from apr.stages.evaluate import summarize
from tests.test_evaluate import hand_row

SFT = {"stage": "sft", "traces": "apr", "shape": "tiny", "step": 40}


def test_origin_is_saved_with_the_model_and_read_back_in_words(tmp_path):
    tiny = model_lib.build("tiny", seed=1)
    sft = model_lib.save(tiny, tmp_path / "sft", origin=SFT)
    assert model_lib.origin(sft) == SFT
    assert model_lib.describe(sft) == "SFT on APR traces (tiny shape), step 40"
    grpo = model_lib.save(tiny, tmp_path / "grpo", origin={"stage": "grpo", "step": 2,
                                                           "from": SFT})
    assert model_lib.describe(grpo) == "GRPO step 2 from SFT on APR traces (tiny shape), step 40"
    plain = model_lib.save(tiny, tmp_path / "plain")
    assert model_lib.origin(plain) is None and model_lib.describe(plain) == "plain"


def test_the_comparison_names_each_model_by_its_training(tmp_path):
    rows = [hand_row(True, 2, 300, 200, 150, 0.5)]

    def metrics(setting, label):
        return {"engine": "local", "problems": 1, "split": "val", "context": 512,
                "model": f"/runs/{setting}/model", "model_label": label, "seconds": 1.0,
                "settings": {setting: summarize(rows, [512], [1024])}}

    merged = compare(metrics("apr", "GRPO step 2 from SFT on APR traces (tiny shape), step 40"),
                     metrics("sos", "SFT on SoS+ traces (tiny shape), step 40"))
    header = markdown(merged).splitlines()[2]
    assert "APR: GRPO step 2 from SFT on APR traces" in header
    assert "SoS+: SFT on SoS+ traces" in header and "{" not in header  # not a dict's repr
    assert len(write_plots(merged, tmp_path)) == 3
