"""The paper's sizes on one GPU, in bf16: extraction throughput, a P-Former step, adaptor steps.

    python bench/gpu_bench.py            (bench/gpu.sh runs it on a lent GPU machine)

No weights of EVA ViT-g, bert-base or OPT-2.7B can be had offline, so each model is built
from its real configuration with random weights: speed and memory depend on the shapes, not
the values. The vision tower goes through blitext's own loading path (saved as a folder,
loaded by load_vision_encoder) and extract-features runs end to end on generated PNGs. Each
part runs on its own, so one failure does not hide the other numbers. MFU = step FLOPs
(torch.utils.flop_counter) / step seconds / the bf16 matmul peak measured in the same run.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from common import write_result  # noqa: E402

ASSETS = Path(__file__).parent.parent / ".gpu"  # tokenizer files carried to the GPU machine (bench/gpu.sh)
SMOKE = bool(os.environ.get("BENCH_SMOKE"))  # a tiny CPU rehearsal of every code path, before spending GPU time
DEVICE = "cpu" if SMOKE else "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def layers(n: int) -> int:
    return 1 if SMOKE else n


def timed_cuda(fn, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up, with the GPU synchronised around each call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def reset_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None


def bf16_peak() -> float:
    n = 1024 if SMOKE else 8192
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed_cuda(lambda: a @ b, 5)


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def assert_tells_apart(outputs: torch.Tensor, what: str, least: float = 0.1) -> None:
    """A random tower must give two different inputs different outputs, or what is timed is an artifact."""
    gap = float((outputs[0].float() - outputs[1].float()).abs().max())
    if not gap > least:
        raise SystemExit(f"{what}: two different inputs give outputs {gap:.2g} apart (want > {least}); "
                         f"its random weights are too small to stand for a trained model")


def vit_g_folder(root: Path) -> Path:
    """EVA ViT-g's shape (BLIP-2's vision tower: 1408 wide, 39 layers, 224 px, patch 14 -> 257 tokens)."""
    import transformers as tf

    # initializer_range 0.02 (BLIP-2's config defaults to 1e-10: features ~1e-5, subnormal in fp16,
    # and the same for every image, so timings on them are not timings of real features)
    cfg = tf.Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=layers(39), num_attention_heads=16,
                               image_size=224, patch_size=14, initializer_range=0.02)
    with torch.device(DEVICE):
        model = tf.Blip2VisionModel(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "vit-g-random")
    return root / "vit-g-random"


def extraction(root: Path) -> dict:
    from PIL import Image

    from blitext.data.readers import write_lavis_json
    from blitext.data.records import ImageRecord
    from blitext.features.image import ExtractConfig, extract_features
    from blitext.models.loading import load_vision_encoder

    folder = vit_g_folder(root)
    encoder = load_vision_encoder(str(folder), device=DEVICE).to(torch.bfloat16)
    pixels = torch.randn(8 if SMOKE else 256, 3, 224, 224, device=DEVICE, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert_tells_apart(encoder(pixels[:2]), "the random ViT-g")
        bare = timed_cuda(lambda: encoder(pixels))
    n = 64 if SMOKE else 1024
    (root / "images").mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(64):  # 64 distinct photos-sized noise images, referenced 64 times each
        arr = (torch.rand(480, 640, 3, generator=rng) * 255).byte().numpy()
        Image.fromarray(arr).save(root / "images" / f"{i}.jpg", quality=90)
    write_lavis_json(root / "captions.json", [ImageRecord(f"img{i}", f"images/{i % 64}.jpg", ("a photo",))
                                              for i in range(n)])
    t = time.perf_counter()
    summary = extract_features(ExtractConfig(data=str(root / "captions.json"), out=str(root / "features"),
                                   vision_encoder=str(folder), batch_size=16 if SMOKE else 256, shard_size=1024, num_workers=2 if SMOKE else 14,
                                   device=DEVICE))
    end_to_end = n / (time.perf_counter() - t)
    bare = bare / len(pixels)  # seconds per image
    return {"vit_g_bare_forward_images_per_s": round(1 / bare, 1),
            "extract_features_images_per_s": round(end_to_end, 1),
            "extract_vs_bare": round(end_to_end * bare, 3),
            "extract_timing_s": {k: round(v, 2) for k, v in summary["timing"].items()},
            "extract_note": f"640x480 JPEG decode + resize in 14 workers, fp16 HDF5 writes, {n:,} images",
            **extraction_breakdown(root, encoder, n)}


def extraction_breakdown(root: Path, encoder, n: int) -> dict:
    """Where extract-features' time goes: decoding alone (the same DataLoader), writing alone
    (fp16 rows of ViT-g's shape through ShardWriter), and the disk's plain write speed."""
    import subprocess

    import numpy as np
    from torch.utils.data import DataLoader

    from blitext.cache import CachePlan, ShardWriter
    from blitext.cache.writer import start_or_resume
    from blitext.features.image import ExtractConfig, collate_decoded, decoded_images, plan_items

    config = ExtractConfig(data=str(root / "captions.json"))
    loader = DataLoader(decoded_images(plan_items(config), encoder.preprocess, config), batch_size=64,
                        collate_fn=collate_decoded, num_workers=2 if SMOKE else 14)
    t = time.perf_counter()
    count = sum(len(ok) for ok, _, _ in loader)
    decode = count / (time.perf_counter() - t)
    rows = 16 if SMOKE else 512
    plan = CachePlan(root / "write-test", "image-features", {"encoder": "bench"}, [str(i) for i in range(rows)],
                     rows, "float16")
    start_or_resume(plan)
    block = np.random.default_rng(0).standard_normal((64, 257, 1408)).astype(np.float32)
    t = time.perf_counter()
    with ShardWriter(plan, 0) as writer:
        for start in range(0, rows, 64):
            writer.add([str(i) for i in range(start, min(start + 64, rows))], block[:min(64, rows - start)])
    write = rows / (time.perf_counter() - t)
    dd = subprocess.run(["dd", "if=/dev/zero", f"of={root / 'dd.bin'}", "bs=1M", "count=1024", "conv=fsync"],
                        capture_output=True, text=True).stderr.strip().splitlines()[-1:]
    return {"decode_only_images_per_s": round(decode, 1), "shard_write_rows_per_s": round(write, 1),
            "row_bytes_fp16": 257 * 1408 * 2, "disk_dd_1gib_fsync": dd[0] if dd else None}


def llm_2_7b():
    """OPT-2.7B's shape, random, bf16, frozen, with a real BPE tokenizer (SmolLM2's, ids < 49,152)."""
    import transformers as tf

    from blitext.models.llm import CausalLM
    from blitext.models.loading import _freeze

    cfg = tf.OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=layers(32), num_attention_heads=32,
                       vocab_size=50272, word_embed_proj_dim=2560, max_position_embeddings=2048)
    with torch.device(DEVICE):
        model = tf.OPTForCausalLM(cfg).to(torch.bfloat16)
    with torch.inference_mode():  # two different soft prompts: different next-token logits
        prompts = torch.randn(2, 4, 2560, device=DEVICE, dtype=torch.bfloat16)
        assert_tells_apart(model(inputs_embeds=prompts).logits[:, -1], "the random OPT-2.7B", least=1e-2)
    tokenizer = tf.AutoTokenizer.from_pretrained(ASSETS / "llm-tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return CausalLM(_freeze(model), tokenizer, "opt-2.7b-shape", "opt-2.7b-shape@random", Path("."))


def bert_base():
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(ASSETS / "bert-tokenizer")
    model = tf.BertModel(tf.BertConfig(num_hidden_layers=layers(12)), add_pooling_layer=False).to(DEVICE)  # bert-base-uncased's shape
    return model, tokenizer


def texts(n: int) -> list[str]:
    from blitext.data.compose import compositional_captions

    caps = compositional_captions()
    return [f"{caps[i % len(caps)]} and {caps[(i * 7 + 3) % len(caps)]}" for i in range(n)]


def pformer_step(llm, peak: float, batch: int = 4 if SMOKE else 64) -> dict:
    from blitext.distributed import dist_info
    from blitext.models.pformer import PFormer
    from blitext.pformer.train import Batcher, PFormerConfig, Split, TrainLoop
    from blitext.training import adamw

    bert, tok = bert_base()
    config = PFormerConfig(text=["-"], batch_size=batch, n_prompt=32, max_steps=100, warmup_steps=0, heldout=4)
    pformer = PFormer(bert, 2560, 32).to(DEVICE)
    optimizer = adamw(pformer.parameters(), config.lr, config.weight_decay)
    sentences = texts(batch * 8)
    split = Split([str(i) for i in range(len(sentences))], sentences, sentences[:4])
    loop = TrainLoop(config, pformer, pformer, llm, optimizer, Batcher(tok, llm, config), split, DEVICE,
                     dist_info(), None, logging.getLogger("bench"))
    reset_memory()
    step = timed_cuda(lambda: loop.train_step(1, 100))
    flops = flops_of(lambda: loop.train_step(2, 100))
    return {"pformer_batch": batch, "pformer_step_s": round(step, 4), "pformer_sentences_per_s": round(batch / step, 1),
            "pformer_mfu": round(flops / step / peak, 3),
            "pformer_peak_memory_gib": peak_memory_gib()}


class MemorySource:
    """Visual tokens already in memory (the bench measures the step, not the cache)."""

    def encode(self, batch, device):
        return batch[0].to(device), None


def adapter_steps(llm, peak: float, batch1: int = 4 if SMOKE else 128, batch2: int = 4 if SMOKE else 64) -> dict:
    from blitext.adapter.image import AdapterConfig, AdapterLoop, Setup
    from blitext.data.pairs import Pairs
    from blitext.distributed import dist_info
    from blitext.losses import alignment_loss
    from blitext.models.qformer import QFormer, qformer_tokenizer
    from blitext.training import adamw

    out = {}
    for stage, batch in ((1, batch1), (2, batch2)):
        bert, tok = bert_base()
        tok = qformer_tokenizer(tok)
        model = QFormer.from_text_encoder(bert, tok, 1408, 32, 2560).to(DEVICE)
        config = AdapterConfig(stage=stage, features="-", prompts="-", batch_size=batch, max_steps=100, warmup_steps=0)
        model.train_only(stage, True)
        sentences = texts(batch * 4)
        pairs = Pairs([f"{i}#0" for i in range(len(sentences))], [str(i) for i in range(len(sentences))], sentences, {})
        setup = Setup(model, tok, MemorySource(), pairs, None, llm if stage == 2 else None, {}, alignment_loss)
        loop = AdapterLoop(config, model, setup, DEVICE, dist_info(), None, logging.getLogger("bench"))
        loop.optimizer = adamw(model.parameters(), config.lr, config.weight_decay)
        data = {"features": (torch.randn(batch, 257, 1408, dtype=torch.float16), None),
                "reference": torch.randn(batch, 32, 2560) * 0.02}
        reset_memory()
        train_step = loop.train_step
        step = timed_cuda(lambda: train_step(1, 100, data))
        flops = flops_of(lambda: train_step(2, 100, data))
        out.update({f"stage{stage}_batch": batch, f"stage{stage}_step_s": round(step, 4),
                    f"stage{stage}_pairs_per_s": round(batch / step, 1), f"stage{stage}_mfu": round(flops / step / peak, 3),
                    f"stage{stage}_peak_memory_gib": peak_memory_gib()})
        del loop, model, setup
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    result = {"command": "bash bench/gpu.sh", "device": "cpu smoke" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
              "precision": "bf16 autocast (frozen models in bf16)", "errors": {}}
    import transformers

    result["transformers"] = transformers.__version__
    peak = bf16_peak()
    result["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
    llm = None
    with tempfile.TemporaryDirectory() as tmp:
        parts = (("extraction", lambda: extraction(Path(tmp))), ("pformer", lambda: pformer_step(llm, peak)),
                 ("adapter", lambda: adapter_steps(llm, peak)))
        wanted = os.environ.get("BENCH_PARTS", "extraction,pformer,adapter").split(",")
        for name, part in [p for p in parts if p[0] in wanted]:
            try:
                if name != "extraction" and llm is None:
                    llm = llm_2_7b()
                t = time.perf_counter()
                result.update(part())
                result[f"{name}_wall_s"] = round(time.perf_counter() - t, 1)
            except Exception as e:  # report and go on: one part's failure must not hide the others
                result["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            print(json.dumps(result), flush=True)
    name = os.environ.get("BENCH_NAME", "gpu_bench")
    # a smoke run must not overwrite the GPU's recorded result
    out = Path(os.environ.get("OUT", tempfile.gettempdir() if SMOKE else Path(__file__).parent / "results"))
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not SMOKE:
        write_result(name, result)


if __name__ == "__main__":
    main()
