"""Mutation check: break one behaviour at a time in the library and see the tests named for it fail.

Each mutation below replaces one exact piece of source text (it must occur once) with a broken
version: an image routed to another image's features, a swapped row, a wrong I3D window, an
image paired with another caption's prompt, a checkpoint wrapper that does nothing, ... Then it
runs the tests named for that behaviour in a fresh pytest process. A mutation is caught when
those tests fail; the source file is restored in `finally`, whatever happens (Ctrl-C included),
and checked byte for byte afterwards.

First the named tests run once unbroken: they must pass, or a "caught" would mean nothing.

    .venv/bin/python bench/mutations.py                 # every mutation -> bench/results/mutations.json
    .venv/bin/python bench/mutations.py --only i3d-unit-range --no-baseline

Slow on 2 shared cores (each run builds the tests' tiny models again): about a minute a mutation.
It edits the tree it is in; to keep working meanwhile, run it from a copy of the tree (its
tests import the copy's blitext, through PYTHONPATH).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "mutations.json"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str          # the behaviour broken, in words
    file: str          # relative to the repository root
    old: str           # exact source text, found once
    new: str           # its broken version
    tests: tuple[str, ...]


T_ADAPTER, T_EVAL, T_EXPORT = "tests/test_adapter.py::", "tests/test_eval.py::", "tests/test_export.py::"
T_VIDEO = "tests/test_video_extract.py::test_i3d_encoder_from_checkpoint_gives_one_1024_vector_per_segment"


def per_llm(test: str) -> tuple[str, ...]:
    """The ids of a test parametrised over the tiny LLM families (tests/conftest.py's LLM_KINDS)."""
    return tuple(f"{test}[{kind}]" for kind in ("opt", "llama", "gpt2"))

MUTATIONS = [
    Mutation("export-untrained-vision-tower", "the exported BLIP-2 sees images through a freshly initialised "
             "copy of the vision tower, not the run's",
             "blitext/export/hf.py", "    model.vision_model = encoder.tower\n",
             "    model.vision_model = type(encoder.tower)(encoder.tower.config)\n",
             (T_EXPORT + "test_stage2_exports_to_blip2_for_conditional_generation_with_the_same_token_ids[opt]",
              T_EXPORT + "test_stage1_exports_to_blip2_for_image_text_retrieval_with_the_same_scores")),
    Mutation("api-image-misrouted", "blitext.load's model encodes a batch's images in reverse order",
             "blitext/evaluation/model.py",
             "pixels = torch.stack([self.encoder.preprocess(_pil(item, self.draft_size)) for item in items])",
             "pixels = torch.stack([self.encoder.preprocess(_pil(item, self.draft_size)) for item in items[::-1]])",
             ("tests/test_api.py::test_captions_equal_the_generate_command_on_the_same_images",
              T_EXPORT + "test_stage2_exports_to_blip2_for_conditional_generation_with_the_same_token_ids[opt]")),
    Mutation("api-float-pixels-read-as-0-255", "float pixel tensors in [0, 1] are read as 0-255 values",
             "blitext/evaluation/model.py",
             "pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)",
             "pixels = pixels.float().clamp(0, 255).round().to(torch.uint8)",
             ("tests/test_api.py::test_paths_pil_images_and_pixel_tensors_give_the_same_caption",)),
    Mutation("generation-row-swap", "batched generation gives each row the previous row's soft prompts",
             "blitext/evaluation/decoding.py",
             "    return generate_after(llm, prompts, texts, settings, adapter.end_of_text)\n",
             "    return generate_after(llm, prompts.roll(1, 0), texts, settings, adapter.end_of_text)\n",
             per_llm("tests/test_adapter_generate.py::test_batched_left_padded_generation_equals_one_at_a_time")),
    Mutation("i3d-wrong-window", "the last I3D window repeats the one before instead of ending at the last frame",
             "blitext/data/video.py", "        starts.append(last_start)\n", "        starts.append(starts[-1])\n",
             (T_VIDEO,)),
    Mutation("i3d-unit-range", "I3D reads pixels in [0, 1] instead of pytorch-i3d's [-1, 1]",
             "blitext/models/video.py", "/ 127.5 - 1.0", "/ 255.0", (T_VIDEO,)),
    Mutation("prompt-of-another-caption", "train-adapter pairs each image with the next pair's reference prompt",
             "blitext/adapter/image.py",
             'batch["reference"] = self.s.prompts.rows([pairs.keys[i] for i in rows])',
             'batch["reference"] = self.s.prompts.rows([pairs.keys[i] for i in rows[1:] + rows[:1]])',
             (T_ADAPTER + "test_each_image_is_aligned_to_its_own_captions_prompt",)),
    Mutation("online-neighbour-features", "--online gives each image its neighbour's features",
             "blitext/data/pairs.py", "        return self.encoder(pixels.to(device, p.dtype)).float(), None\n",
             "        return self.encoder(pixels.to(device, p.dtype)).float().roll(1, 0), None\n",
             (T_ADAPTER + "test_online_encoder_matches_the_cache",)),
    Mutation("checkpoint-wrapper-no-op", "--grad-checkpointing wraps the layers in a wrapper that keeps activations",
             "blitext/models/llm.py", "return checkpoint(forward, *args, use_reentrant=False, **kwargs)",
             "return forward(*args, **kwargs)",
             per_llm("tests/test_memory_levers.py::test_checkpoint_layers_wraps_every_layer_and_recomputes_it_in_backward")),
    Mutation("retrieval-itm-of-another-image", "retrieval re-ranks image i's texts by image i+1's ITM scores",
             "blitext/evaluation/retrieval.py",
             "return self.itm(rows[:, None].expand_as(cands), cands) + sim[rows[:, None], cands]",
             "return self.itm((rows[:, None] + 1).remainder(sim.shape[0]).expand_as(cands), cands) "
             "+ sim[rows[:, None], cands]",
             ("tests/test_eval_retrieval.py::test_retrieval_reranks_only_inside_the_top_k",)),
    Mutation("caption-eval-neighbour-prediction", "eval caption scores each image with the next image's caption",
             "blitext/evaluation/evaluate.py", "metrics, extra = caption_metrics(refs, dict(zip(ids, hyps)),",
             "metrics, extra = caption_metrics(refs, dict(zip(ids, hyps[1:] + hyps[:1])),",
             (T_EVAL + "test_caption_eval_scores_equal_caption_scores_on_its_predictions",)),
    Mutation("score-caption-other-references", "blitext score caption scores predictions against other images' references",
             "blitext/evaluation/score.py", "hyps = dict(zip(refs, matched(",
             "hyps = dict(zip(list(refs)[::-1], matched(",
             ("tests/test_score.py::test_score_of_evals_predictions_is_evals_metrics",)),
    Mutation("nearest-faiss-for-large-searches", "choose_backend picks FAISS from 2,048 queries, against the measurements",
             "blitext/pformer/nearest.py", '    del n_queries, n_rows, dim\n    return "torch"\n',
             '    del n_rows, dim\n    return "faiss" if n_queries >= 2048 else "torch"\n',
             ("tests/test_nearest.py::test_choose_backend_is_torch_at_every_measured_size",)),
    Mutation("video-adapter-forgets-its-slots", "a video adaptor rebuilt from its description has the default 32 slots",
             "blitext/models/video_adapter.py", 'return cls(config, v["d_in"], n_prompt, v["d_llm"])',
             'return cls(config, v["d_in"], 32, v["d_llm"])',
             ("tests/test_video_adapter.py::test_starts_as_the_bert_it_came_from",)),
    Mutation("teacher-forced-accuracy-counts-padding", "teacher-forced accuracy counts ignored positions too",
             "blitext/metrics/llm.py", "(logits.argmax(-1)[real] == targets[real])", "(logits.argmax(-1) == targets)",
             ("tests/test_metrics.py::test_teacher_forced_accuracy_counts_only_real_target_tokens",)),
    Mutation("grad-scaler-not-restored", "a resumed fp16 run starts its loss scaler again from 65,536",
             "blitext/loop.py",
             "            self.precision.load_state_dict(read_json(resolve_resume(run, self.c.resume) / STATE))\n",
             "            read_json(resolve_resume(run, self.c.resume) / STATE)\n",
             ("tests/test_memory_levers.py::test_fp16_loss_scale_is_checkpointed_and_restored_on_resume",)),
]


def run_tests(tests: tuple[str, ...]) -> tuple[int, list[str], float]:
    """(pytest's exit code, the tests that failed, seconds) of one fresh pytest process."""
    t = time.perf_counter()
    # this tree's blitext first: an editable install elsewhere (a copy of the tree) is not the one mutated
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    failed = [line.split(" ", 2)[1] for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return done.returncode, failed, time.perf_counter() - t


def applied(m: Mutation) -> tuple[int, list[str], float]:
    """The named tests' result with the mutation in place; the file is restored whatever happens."""
    path = ROOT / m.file
    original = path.read_bytes()
    text = original.decode()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name}: its source text occurs {text.count(m.old)} times in {m.file}, "
                         f"not once: update the mutation to the current code")
    try:
        path.write_text(text.replace(m.old, m.new))
        return run_tests(m.tests)
    finally:
        path.write_bytes(original)
        assert path.read_bytes() == original, f"{m.file} was not restored"


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return done.stdout.strip() + ("+uncommitted" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutation names (default: all)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unbroken run of the named tests")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    report = {"commit": commit(), "mutations": []}
    if not args.no_baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, failed, took = run_tests(tests)
        report["baseline"] = {"tests": len(tests), "passed": code == 0, "failed": failed, "seconds": round(took)}
        print(f"baseline: {len(tests)} tests, {'pass' if code == 0 else 'FAIL ' + ' '.join(failed)} ({took:.0f} s)")
        if code != 0:
            raise SystemExit("the named tests fail without any mutation: fix them first")
    for m in chosen:
        code, failed, took = applied(m)
        caught = code == 1 and bool(failed)  # 1: tests ran and failed (not a usage or collection error)
        report["mutations"].append({"mutation": m.name, "what": m.what, "file": m.file, "tests": list(m.tests),
                                    "caught": caught, "failed": failed, "exit_code": code, "seconds": round(took)})
        print(f"{m.name}: {'caught' if caught else 'NOT CAUGHT'} (exit {code}, {len(failed)} failed, {took:.0f} s)")
        write_report(report, Path(args.out), len(chosen))  # after each: a stopped run keeps what it found
    print(f"{sum(r['caught'] for r in report['mutations'])} of {len(report['mutations'])} caught -> {args.out}")


def write_report(report: dict, out: Path, planned: int) -> None:
    done = report["mutations"]
    report["finished"] = len(done) == planned
    report["all_caught"] = report["finished"] and all(r["caught"] for r in done)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
