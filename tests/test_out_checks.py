"""Issue 22: `--out` naming a file, or a path under a file, is one line before any work starts, in
every phase (one library helper, blitext.atomic.check_out): no traceback, and eval never generates
captions it then cannot write."""
from __future__ import annotations

import pytest

from blitext.adapter.image import AdapterConfig, train_adapter
from blitext.adapter.video import VideoAdapterConfig, train_video_adapter
from blitext.errors import BlitextError
from blitext.evaluation.evaluate import EvalConfig, eval_caption, eval_retrieval, eval_vqa
from blitext.evaluation.score import ScoreConfig, score_caption
from blitext.export import ExportConfig, export_run
from blitext.features.image import ExtractConfig, extract_features
from blitext.features.imported import ImportConfig, import_features
from blitext.features.video import VideoExtractConfig, extract_video_features
from blitext.pformer.prompts import BuildPromptsConfig, build_prompts
from blitext.pformer.train import PFormerConfig, train_pformer

# Every phase that writes a folder, called with inputs that do not exist: the output check comes first.
PHASES = {
    "extract-features": lambda out: extract_features(ExtractConfig(data="no-data", vision_encoder="no-enc", out=out,
                                                                   device="cpu")),
    "extract-features --modality video": lambda out: extract_video_features(VideoExtractConfig(
        data="no-data", vision_encoder="no-enc", out=out, device="cpu")),
    "import-features": lambda out: import_features(ImportConfig(folder="no-folder", out=out)),
    "build-prompts": lambda out: build_prompts(BuildPromptsConfig(pformer="no-run", captions=["no.json"], out=out,
                                                                  device="cpu")),
    "train-pformer": lambda out: train_pformer(PFormerConfig(text=["no.txt"], out=out, device="cpu")),
    "train-adapter": lambda out: train_adapter(AdapterConfig(features="no-cache", captions=["no.json"], out=out,
                                                             w_align=0, device="cpu")),
    "train-adapter --modality video": lambda out: train_video_adapter(VideoAdapterConfig(
        features="no-cache", captions=["no.json"], out=out, w_align=0, device="cpu")),
    "eval caption": lambda out: eval_caption(EvalConfig(adapter="no-run", features="f", data="d", out=out)),
    "eval vqa": lambda out: eval_vqa(EvalConfig(adapter="no-run", features="f", data="d", out=out)),
    "eval retrieval": lambda out: eval_retrieval(EvalConfig(adapter="no-run", features="f", data="d", out=out)),
    "score caption": lambda out: score_caption(ScoreConfig(predictions="p.json", data="d.json", out=out)),
    "export": lambda out: export_run(ExportConfig(run="no-run", out=out)),
}


@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
@pytest.mark.parametrize("phase", sorted(PHASES))
def test_out_naming_a_file_is_one_line_before_any_work(tmp_path, phase, under):
    file = tmp_path / "notes.txt"
    file.write_text("not a folder\n")
    out = file / "sub" if under else file
    with pytest.raises(BlitextError) as e:
        PHASES[phase](str(out))
    text = str(e.value)
    option = "OUT" if phase == "export" else "--out"  # export's folder is an argument
    assert f"{option} {out}" in text and "is a file" in text and "\n" not in text, text
    assert file.read_text() == "not a folder\n"
