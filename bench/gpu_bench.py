"""The paper's sizes on one GPU, in bf16: extraction at steady state, the P-Former's and both
adaptor stages' steps, each with its MFU and where its time goes.

    PYTHONPATH=. python bench/gpu_bench.py --prepare    (here, once: the tokenizers into .gpu/)
    BENCH_SMOKE=1 PYTHONPATH=. python bench/gpu_bench.py (here: every code path, tiny, on the CPU)
    bash bench/gpu.sh                                    (on a lent GPU machine)

No weights of EVA ViT-g, bert-base or OPT-2.7B can be had offline, so each model is built
from its real configuration with random weights: speed and memory depend on the shapes, not
the values. The vision tower goes through blitext's own loading path (saved as a folder,
loaded by load_vision_encoder) and extract-features runs end to end on 10,000 JPEGs in .tar
shards (bench/gpu_extract.py). Each trainer's step is timed over BENCH_STEPS (200) steps after
20, then profiled (torch.profiler) for 10. Each part runs on its own, so one failure does not
hide the other numbers. MFU = step FLOPs (torch.utils.flop_counter) / step seconds / the bf16
matmul peak measured in the same run.
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
# a trainer's steady state (a smoke run's bf16 steps take tens of seconds on a CPU: one of each)
STEPS, WARMUP = (1, 1) if SMOKE else (int(os.environ.get("BENCH_STEPS", 200)), 20)
# OPT-2.7B's width; a smoke run's is small (a CPU's bf16 matmuls made one 2560-wide step 140 s)
WIDTH, HEADS = (256, 4) if SMOKE else (2560, 32)


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


def steady(fn, steps: int = STEPS, warmup: int = WARMUP) -> float:
    """Seconds a call over `steps` calls after `warmup`, synchronised at the ends only: the calls
    overlap the GPU's work with the next launch, as training does."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def where_time_goes(fn, steps: int = 1 if SMOKE else 10, top: int = 8) -> dict:
    """torch.profiler over `steps` calls: the kernels with the most GPU time, and the share of the
    wall time no kernel ran (launch overhead, synchronisation, host work: what MFU loses besides
    slow kernels); the host ops with the most CPU time of their own beside them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync()  # warm already: called after steady() and flops_of()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall_us = (time.perf_counter() - t) * 1e6
    events = prof.key_averages()

    def ranked(items, attr):
        return [{"name": e.key[:120], "share_of_wall": round(getattr(e, attr) / wall_us, 3), "calls": e.count}
                for e in sorted(items, key=lambda e: getattr(e, attr), reverse=True)[:top]]

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / wall_us if kernels else None
    return {"profiled_steps": steps, "gpu_idle_share": round(max(0.0, 1 - busy), 3) if busy is not None else None,
            "top_kernels": ranked(kernels, "self_device_time_total"),
            "top_host_ops": ranked([e for e in events if e.device_type == DeviceType.CPU], "self_cpu_time_total")}


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


def llm_2_7b():
    """OPT-2.7B's shape, random, bf16, frozen, with a real BPE tokenizer (SmolLM2's, ids < 49,152)."""
    import transformers as tf

    from blitext.models.llm import CausalLM
    from blitext.models.loading import _freeze

    cfg = tf.OPTConfig(hidden_size=WIDTH, ffn_dim=4 * WIDTH, num_hidden_layers=layers(32), num_attention_heads=HEADS,
                       vocab_size=50272, word_embed_proj_dim=WIDTH, max_position_embeddings=2048)
    with torch.device(DEVICE):
        model = tf.OPTForCausalLM(cfg).to(torch.bfloat16)
    with torch.inference_mode():  # two different soft prompts: different next-token logits
        prompts = torch.randn(2, 4, WIDTH, device=DEVICE, dtype=torch.bfloat16)
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
    pformer = PFormer(bert, WIDTH, 32).to(DEVICE)
    optimizer = adamw(pformer.parameters(), config.lr, config.weight_decay)
    sentences = texts(batch * 8)
    split = Split([str(i) for i in range(len(sentences))], sentences, sentences[:4])
    loop = TrainLoop(config, pformer, pformer, llm, optimizer, Batcher(tok, llm, config), split, DEVICE,
                     dist_info(), None, logging.getLogger("bench"))
    reset_memory()
    step = steady(lambda: loop.train_step(1, 100))
    flops = flops_of(lambda: loop.train_step(2, 100))
    return {"pformer_batch": batch, "pformer_steps_timed": STEPS, "pformer_step_s": round(step, 4),
            "pformer_sentences_per_s": round(batch / step, 1), "pformer_mfu": round(flops / step / peak, 3),
            "pformer_peak_memory_gib": peak_memory_gib(), "pformer_profile": where_time_goes(lambda: loop.train_step(1, 100))}


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
        model = QFormer.from_text_encoder(bert, tok, 1408, 32, WIDTH).to(DEVICE)
        config = AdapterConfig(stage=stage, features="-", prompts="-", batch_size=batch, max_steps=100, warmup_steps=0)
        model.train_only(stage, True)
        sentences = texts(batch * 4)
        pairs = Pairs([f"{i}#0" for i in range(len(sentences))], [str(i) for i in range(len(sentences))], sentences, {})
        setup = Setup(model, tok, MemorySource(), pairs, None, llm if stage == 2 else None, {}, alignment_loss)
        loop = AdapterLoop(config, model, setup, DEVICE, dist_info(), None, logging.getLogger("bench"))
        loop.optimizer = adamw(model.parameters(), config.lr, config.weight_decay)
        data = {"features": (torch.randn(batch, 257, 1408, dtype=torch.float16), None),
                "reference": torch.randn(batch, 32, WIDTH) * 0.02}
        reset_memory()
        train_step = loop.train_step
        step = steady(lambda: train_step(1, 100, data))
        flops = flops_of(lambda: train_step(2, 100, data))
        out.update({f"stage{stage}_batch": batch, f"stage{stage}_steps_timed": STEPS, f"stage{stage}_step_s": round(step, 4),
                    f"stage{stage}_pairs_per_s": round(batch / step, 1), f"stage{stage}_mfu": round(flops / step / peak, 3),
                    f"stage{stage}_peak_memory_gib": peak_memory_gib(),
                    f"stage{stage}_profile": where_time_goes(lambda: train_step(1, 100, data))})
        del loop, model, setup
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return out


def prepare_assets() -> None:
    """The bundled models' tokenizers, saved where the GPU machine (torch and transformers, none of
    blitext's packages) finds them."""
    import transformers as tf

    from blitext.models.loading import llm_path, text_encoder_path

    tf.AutoTokenizer.from_pretrained(llm_path("smollm2-135m")).save_pretrained(ASSETS / "llm-tokenizer")
    tf.AutoTokenizer.from_pretrained(text_encoder_path("all-minilm-l6-v2")).save_pretrained(ASSETS / "bert-tokenizer")


def main() -> None:
    if sys.argv[1:] == ["--prepare"] or (SMOKE and not ASSETS.is_dir()):
        prepare_assets()
        if not SMOKE:
            return
    if not ASSETS.is_dir():
        raise SystemExit(f"{ASSETS} is missing: run `PYTHONPATH=. python bench/gpu_bench.py --prepare` before the device call")
    import gpu_extract

    result = {"command": "bash bench/gpu.sh", "device": "cpu smoke" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
              "precision": "bf16 autocast (frozen models in bf16)", "errors": {}}
    import transformers

    result["transformers"] = transformers.__version__
    peak = bf16_peak()
    result["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
    llm = None
    with tempfile.TemporaryDirectory() as tmp:
        parts = (("extraction", lambda: gpu_extract.extraction(Path(tmp))), ("pformer", lambda: pformer_step(llm, peak)),
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
